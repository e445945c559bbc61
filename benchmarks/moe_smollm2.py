"""GPTQ of MoE experts on SmolLM2-135M-Instruct's trained weights: the dense model against the same model
"upcycled" into 4 experts per layer, in both MoE forms the engine handles.

Each layer's MLP becomes ``--experts`` copies of the trained MLP stacked on an expert axis (``[E, D, F]``), behind a
fixed random router with top-1 routing (its one weight is 1, the top-1 weights normalised to sum to 1), so the float
MoE model computes the dense model's logits up to float rounding (checked and recorded). Two forms:

- ``dense``: dispatch and combine einsums, experts run as ``einsum("etd,edf->etf")`` on ``[E, T, D]`` slots
  (an unrouted slot is a zero row);
- ``ragged``: tokens sorted by expert and ``lax.ragged_dot`` on ``[M, D]`` rows with the group sizes.

Each is quantized with ``gptq_jax.quantize`` (blocks, true-sequential) at 4-bit g128 asym act-order on the same
calibration windows as the dense model (``random_windows`` of the Python docs minus their held-out tail, as
``methods_smollm2.py``), and held-out perplexity is measured on every full window of the tail. The issue's bar: every
expert quantized from its own tokens, perplexity within 4% of the dense model's GPTQ.

    nice -n 5 python benchmarks/moe_smollm2.py --nsamples 16           # dense, MoE dense, MoE ragged

Writes benchmarks/results/moe_smollm2/moe_smollm2_cpu.json after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax import QuantConfig, quantize
from gptq_jax.core.calibration import random_windows
from gptq_jax.io.default_model import fetch_smollm2
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
from gptq_jax.models import load_pretrained, load_tokenizer
from gptq_jax.tasks.eval import perplexity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402

QC = QuantConfig(bits=4, group_size=128, sym=False, act_order=True)


class UpcycledMoE(nnx.Module):
    """``experts`` copies of a trained SwiGLU MLP behind a fixed random top-1 router (module docstring).

    The router is an ``nnx.Variable``, not a ``Param``: fixed, so the engine never sees it as a weight."""

    def __init__(self, mlp: nnx.Module, experts: int, form: str, seed: int):
        d = mlp.gate_proj.kernel.shape[0]
        stack = lambda lin: nnx.Param(jnp.stack([lin.kernel[...]] * experts))  # noqa: E731
        self.gate, self.up, self.down = stack(mlp.gate_proj), stack(mlp.up_proj), stack(mlp.down_proj)
        self.router = nnx.Variable(jax.random.normal(jax.random.key(seed), (d, experts)) / np.sqrt(d))
        self.experts, self.form = experts, form

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        xt = x.reshape(b * t, d)  # (T, D)
        idx = jnp.argmax(xt @ self.router[...], axis=-1)  # top-1: its normalised weight is 1
        if self.form == "dense":
            disp = jax.nn.one_hot(idx, self.experts, dtype=x.dtype)  # (T, E)
            xe = jnp.einsum("te,td->etd", disp, xt)  # (E, T, D)
            a = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, self.gate[...])) * jnp.einsum(
                "etd,edf->etf", xe, self.up[...])  # (E, T, F)
            y = jnp.einsum("te,etd->td", disp, jnp.einsum("etf,efd->etd", a, self.down[...]))
        else:
            order = jnp.argsort(idx)
            sizes = jnp.bincount(idx, length=self.experts).astype(jnp.int32)  # (E,)
            xs = xt[order]  # (T, D) sorted by expert
            a = jax.nn.silu(jax.lax.ragged_dot(xs, self.gate[...], sizes)) * jax.lax.ragged_dot(
                xs, self.up[...], sizes)  # (T, F)
            y = jnp.zeros_like(xt).at[order].set(jax.lax.ragged_dot(a, self.down[...], sizes))
        return y.reshape(b, t, d)


def upcycle(model: nnx.Module, experts: int, form: str, seed: int) -> nnx.Module:
    """Replace every layer's MLP (in place) by an ``UpcycledMoE`` of it; each layer its own random router."""
    for i, layer in enumerate(model.layers):
        layer.mlp = UpcycledMoE(layer.mlp, experts, form, seed + i)
    return model


def _token_stats(records: list[dict], experts: int) -> dict:
    """Per expert record: tokens routed, summarised over the layers (min, max, experts with none)."""
    ex = [r for r in records if "expert" in r]
    toks = [r["tokens"] for r in ex]
    return {"expert_slices": len(ex), "tokens_min": min(toks, default=None), "tokens_max": max(toks, default=None),
            "slices_without_tokens": sum(t == 0 for t in toks), "experts": experts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forms", nargs="+", choices=("dense", "ragged"), default=["dense", "ragged"])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-windows", type=int, default=None, help="held-out windows (default: all)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (a smoke test)")
    ap.add_argument("--out", default=str(provenance.result_path("moe_smollm2", "moe_smollm2_cpu.json")))
    args = ap.parse_args(argv)
    started = provenance.start()
    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen,
                           seed=args.seed)
    rows: list[dict] = []
    n_tokens = None

    def ppl(model):
        r = perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4, max_windows=args.max_windows)
        return r.perplexity, r.tokens

    def write():
        dense = next((r["perplexity"] for r in rows if r["model"] == "dense" and r["method"] == "gptq"), None)
        for r in rows:
            if dense and r["method"] == "gptq":
                r["vs_dense_gptq"] = r["perplexity"] / dense - 1
        provenance.write_result(args.out, {
            "benchmark": "moe_smollm2", "model": "SmolLM2-135M-Instruct", "quant_config": repr(QC),
            "experts": args.experts, "routing": "fixed random router, top-1",
            "calibration": {"text": "Python docs minus the held-out tail", "nsamples": args.nsamples,
                            "seqlen": args.seqlen, "seed": args.seed},
            "evaluation": {"text": "held-out tail of Python docs", "seqlen": args.seqlen, "tokens": n_tokens,
                           "max_windows": args.max_windows},
            "layers": args.layers, "rows": rows}, started=started)

    def load():
        model = load_pretrained(model_dir)[0]
        if args.layers is not None:
            model.layers = nnx.List(list(model.layers)[: args.layers])
        return model

    probe = jnp.asarray(calib.tokens[:2])
    dense_float = load()
    ref_logits = np.asarray(dense_float(probe)[0])
    p, n_tokens = ppl(dense_float)
    rows.append({"model": "dense", "method": "float32", "perplexity": p})
    print(f"dense float32: perplexity {p:.3f} over {n_tokens} tokens", flush=True)
    del dense_float
    for form in ["none", *args.forms]:
        model = load()
        row = {"model": "dense" if form == "none" else f"moe-{form}", "method": "gptq"}
        if form != "none":
            upcycle(model, args.experts, form, args.seed)
            row["float_max_abs_logit_diff_vs_dense"] = float(np.abs(np.asarray(model(probe)[0]) - ref_logits).max())
        t0 = time.perf_counter()
        res = quantize(model, calib, quant_config=QC)
        row["quantize_seconds"] = time.perf_counter() - t0
        row["perplexity"], n_tokens = ppl(model)
        row.update(weights=len(res.weights), mode=res.report.mode, fallbacks=res.report.fallbacks,
                   unquantized=[u["path"] for u in res.report.unquantized if ".layers." in u["path"]],
                   load_after=list(os.getloadavg()), **_token_stats(res.report.weights, args.experts))
        rows.append(row)
        print(f"{row['model']} gptq: perplexity {row['perplexity']:.3f}, {row['weights']} weights, quantized in "
              f"{row['quantize_seconds']:.0f} s", flush=True)
        write()
    write()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
