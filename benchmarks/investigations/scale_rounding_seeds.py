"""Where should the float16 rounding of the scales happen? Perplexity over several calibration seeds.

A checkpoint stores float16 scales. The solver fits float32 grids; three places to round them are measured on
SmolLM2 over ``--seeds`` calibration draws (``--nsamples`` x ``--seqlen`` windows of the default text):

- ``writeback_f16`` (``QuantConfig(fp16_scales=False)``): the solver picks codes on float32 grids; the weights each
  block writes back for the next block's inputs use float16 scales, as inference will;
- ``writeback_f32`` (the paper's code and GPTQModel): the next block sees the solver's float32-scale weights; only
  the file has float16 scales;
- ``solver_f16`` (``fp16_scales=True``, gptq-jax's default since this measurement): every grid is rounded to
  float16 as soon as it is fitted, so the solver's error feedback, the next block's inputs and the file all use the
  same weights.

Every variant is scored the same way: its weights packed as the checkpoint holds them (float16 scales) and run by
``tasks.eval.perplexity`` on the held-out windows. Each variant runs in its own process (the solver's jitted
programs must not be shared between variants).

    python benchmarks/investigations/scale_rounding_seeds.py --bits 3 --asym --seeds 0 1 2 3

Writes benchmarks/results/scale_rounding_seeds/scale_rounding_seeds_<bits>bit_g<group>_<sym|asym>_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import lowbit_solver_swap  # noqa: E402  (the shared run flags)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import provenance  # noqa: E402  (benchmarks/provenance.py)

VARIANTS = ("writeback_f16", "writeback_f32", "solver_f16")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_variant(args) -> list[dict]:
    """In this process: quantize once per seed with ``args.variant`` and score each result."""
    import jax.numpy as jnp

    from gptq_jax import QuantConfig, quantize
    from gptq_jax.core.calibration import random_windows
    from gptq_jax.engine.solve import Solver, dequantized
    from gptq_jax.io.default_model import fetch_smollm2
    from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
    from gptq_jax.models import load_pretrained, load_tokenizer
    from gptq_jax.models.qlinear import pack_model
    from gptq_jax.tasks.eval import perplexity

    # The write-back names its scale dtype: the engine's default keeps the scales as fitted (float32 here).
    write_dtype = {"writeback_f32": jnp.float32, "writeback_f16": jnp.float16}.get(args.variant)
    solver = None if write_dtype is None else Solver(write=lambda qw: dequantized(qw, write_dtype))
    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    ids = tokenize(tok, default_calibration_text())
    eval_ids = np.asarray(tokenize(tok, default_eval_text()))
    eval_ids = eval_ids[: args.eval_windows * args.seqlen]
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order,
                     fp16_scales=args.variant == "solver_f16")
    rows = []
    for seed in args.seeds:
        calib = random_windows(ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
        model, _ = load_pretrained(model_dir)
        t0 = time.perf_counter()
        res = quantize(model, calib, quant_config=qc, solver=solver)
        seconds = time.perf_counter() - t0
        pack_model(model, res.weights)
        ppl = float(perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4).perplexity)
        rows.append({"variant": args.variant, "seed": seed, "perplexity": ppl, "seconds": seconds,
                     "objective_sum": float(sum(r["loss"] for r in res.report.linears))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    started = provenance.start()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lowbit_solver_swap.add_run_args(ap, seeds=True)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: the child process
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    tag = lowbit_solver_swap.run_tag(args)
    out = args.out or os.path.join(
        REPO, "benchmarks", "results", "scale_rounding_seeds", f"scale_rounding_seeds_{tag}_cpu.json")
    payload = {
        "benchmark": "scale_rounding_seeds", "config": tag,
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "calibration": {"text": "Python docs (default)", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seeds": args.seeds},
        "evaluation": {"text": "held-out tail of Python docs", "seqlen": args.seqlen, "windows": args.eval_windows,
                       "weights": "packed, float16 scales (as the checkpoint)"},
        "load_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "rows": [],
    }  # fmt: skip
    for variant in args.variants:
        cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
        payload["rows"] += json.loads(proc.stdout.strip().splitlines()[-1])
    by = {v: {r["seed"]: r["perplexity"] for r in payload["rows"] if r["variant"] == v} for v in args.variants}
    payload["summary"] = {v: {"mean": float(np.mean(list(p.values()))), "per_seed": p} for v, p in by.items()}
    payload["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    provenance.write_result(out, payload, started=started)
    print(json.dumps(payload["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
