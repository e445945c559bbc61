"""Runs GPTQModel / transformers jobs for the interop tests and benchmark, in the interop venv (not ours).

    .venv-gptqmodel/bin/python tests/interop/gptqmodel_worker.py jobs.json results.json

``jobs.json`` is a list of jobs; each writes its output files and gets one entry in ``results.json`` (same order):
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``, so one bad checkpoint does not hide the others.

- ``{"op": "logits", "route": "transformers" | "gptqmodel", "dir": D, "bits": B, "tokens": T.npy, "out": O.npy}``:
  logits ``(S, L, V)`` float32 of the int tokens ``(S, L)`` in ``T.npy``. "transformers" loads with
  ``AutoModelForCausalLM.from_pretrained(..., dtype=float32, quantization_config=GPTQConfig(bits=B,
  backend="gptq_torch"))``; "gptqmodel" with ``GPTQModel.load(D, backend=BACKEND.GPTQ_TORCH, dtype=float16)``
  (that route takes fp16/bf16 only). Both pin the pure-torch kernel: the default one first compiles C++.
- ``{"op": "quantize", "float_dir": F, "out_dir": Q, "bits", "group_size", "sym", "desc_act", "damp_percent",
  "act_group_aware", "calib": C.npy}``: ``GPTQModel.load(F, QuantizeConfig(...), device="cpu").quantize(windows)``
  then ``.save(Q)``; the result carries ``seconds`` (quantize only) and ``peak_rss_mb`` (this process's peak RSS so
  far). Without ``act_group_aware`` GPTQModel picks it (7.7: on whenever ``desc_act`` is off); give it to compare
  like with like. ``"record": R.npz`` also saves, for each module ``M`` (full name), the Hessian GPTQModel solved
  with (``H::M``, float32, before damping), the dequantized weight its solve returned (``Q::M``, float32 scales) and
  those scales (``S::M``, ``[N, groups]``), and the model's dtype during quantization (``model_dtype``).
- ``{"op": "nll", "dir": D, "bits": B, "tokens": T.npy}``: transformers route as above (or a float model when
  ``bits`` is null); returns ``{"nll_sum", "tokens"}``: summed next-token NLL over the windows of ``T.npy``;
  with ``"logits_out": O.npy`` also saves the logits ``(1, L, V)`` of the first window.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # on 2 cores it otherwise refuses with a worker-pool error
# GPTQModel's pure-torch kernel (TorchLinear.post_init -> optimize) wraps its dequantization in torch.compile with
# the inductor backend, which compiles C++ on first use: minutes on a cold, busy machine (it once took the worker past
# its whole time budget). Dynamo off runs the same function eagerly; the numbers compared are the same. torch 2.13
# reads both: TORCH_COMPILE_DISABLE into torch._dynamo.config.disable, TORCHDYNAMO_DISABLE in torch.compile itself.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402


def _peak_rss_mb() -> float:
    """Peak RSS of this process (``VmHWM``): ``ru_maxrss`` would carry the peak of the process that started it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _transformers_model(path: str, bits: int | None):
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {}
    if bits is not None:
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kwargs).eval()


def _gptqmodel_model(path: str):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(path, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long))
    return out.logits.float().numpy()


def logits(job: dict) -> dict:
    tokens = np.load(job["tokens"])
    if job["route"] == "transformers":
        model = _transformers_model(job["dir"], job["bits"])
    elif job["route"] == "gptqmodel":
        model = _gptqmodel_model(job["dir"])
    else:
        raise ValueError(f"unknown route {job['route']!r}")
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    np.save(job["out"], _logits(model, tokens))
    return {"kernels": kernels}


def nll(job: dict) -> dict:
    tokens = np.load(job["tokens"])
    model = _transformers_model(job["dir"], job.get("bits"))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for i, row in enumerate(tokens):
        ids = torch.as_tensor(row[None], dtype=torch.long)
        with torch.no_grad():
            lg = model(input_ids=ids).logits.float()[0]
        if i == 0 and job.get("logits_out"):
            np.save(job["logits_out"], lg[None].numpy())
        lg = lg[:-1]
        lp = torch.log_softmax(lg, dim=-1)
        total += float(-lp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return {"nll_sum": total, "tokens": count, "seconds": time.perf_counter() - t0}


def quantize(job: dict) -> dict:
    from gptqmodel import GPTAQConfig, GPTQModel, QuantizeConfig

    calib = np.load(job["calib"])
    windows = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    qc = QuantizeConfig(
        bits=job["bits"],
        group_size=job["group_size"],
        sym=job["sym"],
        desc_act=job["desc_act"],
        damp_percent=job.get("damp_percent", 0.01),
        **({"act_group_aware": job["act_group_aware"]} if "act_group_aware" in job else {}),
        # GPTQModel's own GPTAQ (experimental in 7.7.0): its alpha scales the float/quantized cross term.
        **({"gptaq": GPTAQConfig(alpha=job["gptaq_alpha"], device="cpu")} if job.get("gptaq_alpha") is not None
           else {}),
    )
    torch.manual_seed(0)
    model = GPTQModel.load(job["float_dir"], qc, device="cpu")
    record = _record_solves() if job.get("record") else None
    t0 = time.perf_counter()
    model.quantize(windows, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - t0
    model.save(job["out_dir"])
    if record is not None:
        record["model_dtype"] = np.array(str(next(model.model.parameters()).dtype))
        tmp = job["record"] + ".tmp.npz"
        np.savez(tmp, **record)
        os.replace(tmp, job["record"])
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def _record_solves() -> dict:
    """Wrap GPTQModel's per-module GPTQ (7.7: ``GPTQ.finalize_hessian`` then ``GPTQ.quantize``, which returns
    ``(Q, scale, ...)``) to keep each module's Hessian and result; modules may be solved on worker threads."""
    import threading

    from gptqmodel.quantization import gptq

    lock, record = threading.Lock(), {}
    finalize, solve = gptq.GPTQ.finalize_hessian, gptq.GPTQ.quantize

    def traced_finalize(self, *args, **kwargs):
        out = finalize(self, *args, **kwargs)
        with lock:
            record[f"H::{self._named_module.full_name}"] = self.H.detach().float().numpy().copy()
        return out

    def traced_solve(self, *args, **kwargs):
        out = solve(self, *args, **kwargs)
        with lock:
            record[f"Q::{self._named_module.full_name}"] = out[0].detach().float().numpy().copy()
            record[f"S::{self._named_module.full_name}"] = torch.as_tensor(out[1]).detach().float().numpy().copy()
        return out

    gptq.GPTQ.finalize_hessian, gptq.GPTQ.quantize = traced_finalize, traced_solve
    return record


OPS = {"logits": logits, "nll": nll, "quantize": quantize}


def main(argv: list[str]) -> int:
    jobs_file, results_file = argv
    with open(jobs_file) as f:
        jobs = json.load(f)
    torch.set_num_threads(int(os.environ.get("INTEROP_THREADS", "2")))
    assert torch._dynamo.config.disable, "TORCH_COMPILE_DISABLE=1 did not turn torch.compile off"
    results = []
    progress = results_file + ".progress"  # the job running now, for a caller whose deadline passes
    for i, job in enumerate(jobs):
        with open(progress, "w") as f:
            json.dump({"job": i, "of": len(jobs), "op": job["op"], "route": job.get("route"),
                       "dir": job.get("dir", job.get("out_dir")), "started": time.time()}, f)
        t0 = time.perf_counter()
        try:
            res = {"ok": True, **OPS[job["op"]](job)}
        except Exception as e:  # reported per job; the test names the failing checkpoint
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        res["job_seconds"] = time.perf_counter() - t0
        results.append(res)
        with open(results_file, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
