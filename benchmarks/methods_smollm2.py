"""GPTQ, GPTAQ and Qronos on SmolLM2-135M-Instruct: held-out perplexity and quantization time per method.

Calibration: ``--nsamples`` windows of ``--seqlen`` tokens drawn from Python's bundled docs minus their held-out tail,
one draw per seed; evaluation: every full ``--seqlen`` window of the held-out tail (GPTQ paper protocol). Each
(setting, method) row is the mean over seeds with its standard error (sample standard deviation / sqrt(seeds)).

    python benchmarks/methods_smollm2.py --settings 3g128asym --seeds 0           # one seed, the three methods
    python benchmarks/methods_smollm2.py --settings 4g128act 3g128asym 2g64 --seeds 0 1 2

Writes benchmarks/results/methods_smollm2/methods_smollm2_cpu.json after every row.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

from gptq_jax import QuantConfig, quantize
from gptq_jax.core.calibration import random_windows
from gptq_jax.io.default_model import fetch_smollm2
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
from gptq_jax.models import load_pretrained, load_tokenizer
from gptq_jax.tasks.eval import perplexity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402

SETTINGS = {  # the three settings
    "4g128act": {"bits": 4, "group_size": 128, "sym": True, "act_order": True},
    "3g128asym": {"bits": 3, "group_size": 128, "sym": False},
    "2g64": {"bits": 2, "group_size": 64, "sym": False},
}


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["setting"], r["method"]) for r in rows}):
        ps = [r["perplexity"] for r in rows if (r["setting"], r["method"]) == key]
        ts = [r["quantize_seconds"] for r in rows if (r["setting"], r["method"]) == key]
        se = statistics.stdev(ps) / math.sqrt(len(ps)) if len(ps) > 1 else None
        out.append({"setting": key[0], "method": key[1], "seeds": len(ps), "perplexity_mean": statistics.mean(ps),
                    "perplexity_stderr": se, "quantize_seconds_mean": statistics.mean(ts)})  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["3g128asym"])
    ap.add_argument("--methods", nargs="+", choices=("gptq", "gptaq", "qronos"), default=["gptq", "gptaq", "qronos"])
    ap.add_argument("--gptaq-alpha", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--float", action="store_true", help="also measure the float model")
    ap.add_argument("--out", default=str(provenance.result_path("methods_smollm2", "methods_smollm2_cpu.json")))
    args = ap.parse_args(argv)
    started = provenance.start()

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib_ids = tokenize(tok, default_calibration_text())

    def ppl(model):
        r = perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4)
        return r.perplexity, r.tokens

    rows: list[dict] = []
    n_tokens = None

    def write():
        payload = {
            "benchmark": "methods_smollm2",
            "model": "SmolLM2-135M-Instruct",
            "calibration": {"text": "Python docs minus the held-out tail", "nsamples": args.nsamples,
                            "seqlen": args.seqlen},
            "evaluation": {"text": "held-out tail of Python docs, every full window", "seqlen": args.seqlen,
                           "tokens": n_tokens},
            "gptaq_alpha": args.gptaq_alpha,
            "rows": rows,
            "summary": _summary([r for r in rows if r["method"] != "float32"]),
        }
        provenance.write_result(args.out, payload, started=started)

    if args.float:
        p, n_tokens = ppl(load_pretrained(model_dir)[0])
        rows.append({"setting": "float32", "method": "float32", "seed": None, "perplexity": p, "quantize_seconds": 0})
        print(f"float32: perplexity {p:.3f} over {n_tokens} tokens", flush=True)
    for seed in args.seeds:
        calib = random_windows(calib_ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        for setting in args.settings:
            qc = QuantConfig(**SETTINGS[setting])
            for method in args.methods:
                model, _ = load_pretrained(model_dir)
                t0 = time.perf_counter()
                res = quantize(model, calib, quant_config=qc, method=method, gptaq_alpha=args.gptaq_alpha)
                secs = time.perf_counter() - t0
                p, n_tokens = ppl(model)
                lines = res.report.linears
                rows.append({
                    "setting": setting, "method": method, "seed": seed, "perplexity": p, "quantize_seconds": secs,
                    # the solves alone; the rest is the calibration passes (two streams for GPTAQ and Qronos)
                    "solve_seconds": sum(r["seconds"] for r in lines),
                    "fallbacks": res.report.fallbacks, "load_after": list(os.getloadavg()),
                    "gptq_objective_sum": sum(r.get("gptq_objective", float("nan")) for r in lines),
                    "cross_objective_sum": sum(r.get("cross_objective", float("nan")) for r in lines),
                })  # fmt: skip
                print(f"seed {seed} {setting} {method}: perplexity {p:.3f}, quantized in {secs:.0f} s", flush=True)
                write()
    write()
    for s in _summary([r for r in rows if r["method"] != "float32"]):
        se = "" if s["perplexity_stderr"] is None else f" +- {s['perplexity_stderr']:.3f}"
        print(f"{s['setting']} {s['method']}: {s['perplexity_mean']:.3f}{se} ({s['seeds']} seeds), "
              f"{s['quantize_seconds_mean']:.0f} s")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
