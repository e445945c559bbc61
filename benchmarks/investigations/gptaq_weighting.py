"""Which weight should GPTAQ's asymmetry term carry: a column's value before rounding, or after?

When GPTAQ quantizes column j, the later columns take up its rounding error (through ``U``, as in GPTQ) and its share of
the float/quantized input mismatch (through ``P = alpha triu(D U^T, 1) U``), weighted by a value of column j. The
paper's column equation, and ``gptq_jax.core.methods``, use its value before rounding. GPTQModel 7.7.0 runs the loop in
blocks of 128 columns and hands the term on to the columns after a block with the block's rounded values (inside a
block, the values before rounding). On SmolLM2 3-bit g128 asym our GPTAQ is 1.3% above GPTQModel's over three seeds
(docs/methods.md); this script asks whether that choice is the reason.

Each variant is a float64 NumPy column loop (written from the equations, like ``tests/methods_reference.py``) run as
the engine's solver through the public hook ``quantize(..., solver=Solver(solve=..., statistics=("hessian",
"cross")))``, so the pipeline around it is ours in every case:

- ``before``: the value before rounding everywhere (the paper's equation; the library's algorithm, other roundings);
- ``block``: GPTQModel's, rounded values across 128-column blocks;
- ``after``: the rounded value everywhere;
- ``library``: ``quantize(method="gptaq")`` itself.

    python benchmarks/investigations/gptaq_weighting.py --seeds 0 1 --variants library before block after

Perplexity on the first 16 held-out windows of 512 tokens, as ``benchmarks/vs_gptqmodel.py`` scores. Writes
benchmarks/results/gptaq_weighting/gptaq_weighting_cpu.json after every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from gptq_reference import grid  # noqa: E402  (the float32 grid of the test references)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax.numpy as jnp  # noqa: E402
import provenance  # noqa: E402  (benchmarks/provenance.py)

from gptq_jax import QuantConfig, quantize  # noqa: E402
from gptq_jax.core.calibration import random_windows  # noqa: E402
from gptq_jax.core.quantizer import QuantizedWeight  # noqa: E402
from gptq_jax.engine.solve import Solver  # noqa: E402
from gptq_jax.io.default_model import fetch_smollm2  # noqa: E402
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize  # noqa: E402
from gptq_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from gptq_jax.tasks.eval import perplexity  # noqa: E402

BLOCK = 128  # GPTQModel's column block
ALPHA = 0.25
VARIANTS = ("library", "before", "block", "after")


def gptaq_loop(w, h, d, bits: int, group: int, variant: str):
    """Codes, scales and zeros of asymmetric GPTAQ, columns in order (no act-order), group grids fitted on the current
    weights at each group's first column, float16-rounded scales (the library's default)."""
    w, h, d = np.array(w, np.float64), np.array(h, np.float64), np.array(d, np.float64)
    n, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead], d[dead, :], d[:, dead] = 0.0, 0.0, 0.0
    h[np.arange(k), np.arange(k)] += 0.01 * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    p = ALPHA * np.triu(d @ u.T, 1) @ u
    maxq = 2**bits - 1
    groups = -(-k // group)
    codes = np.zeros((n, k), np.int64)
    scales, zeros = np.zeros((n, groups)), np.zeros((n, groups))
    for j in range(k):
        if j % group == 0:
            scales[:, j // group], zeros[:, j // group] = grid(w[:, j : j + group], bits, False, True)
        s, z = scales[:, j // group], zeros[:, j // group]
        v = w[:, j].copy()
        q = np.clip(np.round(v.astype(np.float32) / s) + z, 0, maxq)
        deq = s * (q - z)
        err = (v - deq) / u[j, j]
        # columns [j, split) take the term weighted by v, columns [split, k) by the rounded value
        split = {"before": k, "block": min(k, (j // BLOCK + 1) * BLOCK), "after": j + 1}[variant]
        w[:, j:split] -= np.outer(err, u[j, j:split]) - np.outer(v, p[j, j:split])
        w[:, split:] -= np.outer(err, u[j, split:]) - np.outer(deq, p[j, split:])
        codes[:, j] = q
    return codes, scales, zeros


def loop_solver(variant: str) -> Solver:
    def solve(ws, h, config, cross=None):
        out = []
        for wm in ws:
            d = np.zeros(h.shape) if cross is None else np.asarray(cross)
            c, s, z = gptaq_loop(np.asarray(wm), np.asarray(h), d, config.bits, config.group_size, variant)
            out.append(QuantizedWeight(
                codes=jnp.asarray(c, jnp.uint8), scales=jnp.asarray(s, jnp.float32), zeros=jnp.asarray(z, jnp.int32),
                g_idx=jnp.arange(c.shape[1], dtype=jnp.int32) // config.group_size, perm=None, loss=jnp.float32(0),
                damp=jnp.float32(0.01), fallback=jnp.bool_(False), bits=config.bits, group_size=config.group_size,
                sym=config.sym))  # fmt: skip
        return out

    return Solver(solve=solve, statistics=("hessian", "cross"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", default=str(provenance.result_path("gptaq_weighting", "gptaq_weighting_cpu.json")))
    args = ap.parse_args(argv)
    started = provenance.start()
    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    calib_ids = tokenize(tok, default_calibration_text())
    eval_ids = np.asarray(tokenize(tok, default_eval_text())[: 16 * 512])
    qc = QuantConfig(bits=3, group_size=128, sym=False)
    rows = []
    for seed in args.seeds:
        calib = random_windows(calib_ids, nsamples=32, seqlen=512, seed=seed)
        for variant in args.variants:
            model, _ = load_pretrained(model_dir)
            t0 = time.perf_counter()
            if variant == "library":
                quantize(model, calib, quant_config=qc, method="gptaq", gptaq_alpha=ALPHA)
            else:
                quantize(model, calib, quant_config=qc, solver=loop_solver(variant))
            secs = time.perf_counter() - t0
            ppl = float(perplexity(model, eval_ids, seqlen=512, batch_size=4).perplexity)
            rows.append({"seed": seed, "variant": variant, "perplexity": ppl, "quantize_seconds": secs})
            print(f"seed {seed} {variant}: perplexity {ppl:.3f} ({secs:.0f} s)", flush=True)
            provenance.write_result(args.out, {
                "benchmark": "gptaq_weighting", "model": "SmolLM2-135M-Instruct",
                "setting": "3-bit g128 asym, GPTAQ alpha 0.25, 32 x 512 calibration windows",
                "evaluation": "first 16 held-out windows of 512 tokens", "rows": rows}, started=started)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
