"""Benchmark: compile time of a packed scanned model's jitted forward, at 4 and 30 layers.

    python benchmarks/scan_compile.py                    # 4 and 30 layers, 3 repeats, the unrolled model beside it
    python benchmarks/scan_compile.py --layers 4 30 60 --no-unrolled

A small Llama-like Linen model (RMS norms, grouped-query attention with 4 query and 2 key/value heads, a gated MLP;
``--width``) whose layers are stacked by ``nn.scan`` is quantized (4-bit, group 32, round-to-nearest: only the
packed program is measured here, not the solve) and packed (``gptq_jax.pack``): the packed weights are stacked on
the layer axis and the scan's body computes its matmuls from them, so the program holds one layer whatever the
depth. For each depth the packed forward's logits are checked against the dequantized model's, then its jitted
forward is traced, lowered and compiled afresh ``--repeats`` times (a new ``PackedModel`` each time, so nothing
is cached) and the median is reported, after one untimed compile that pays JAX's start-up costs. Beside it, the
same model unrolled (``layers_0 .. layers_N``), whose packed program grows with depth. Target: 30 layers compile
in at most 1.5x the time of 4 (the script exits 1 otherwise). Writes
``benchmarks/results/scan_compile/scan_compile_<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import provenance

import gptq_jax
from gptq_jax import QuantConfig

HEADS, KV_HEADS, VOCAB, SEQ, BATCH = 4, 2, 256, 64, 2
TARGET = 1.5  # 30 layers may take at most this times the compile time at 4


def _attend(q, k, v, positions, head_dim):
    b, t, _ = q.shape
    q = q.reshape(b, t, HEADS, head_dim) * jnp.cos(positions[..., None, None] / 10.0)
    k, v = (jnp.repeat(a.reshape(b, t, KV_HEADS, head_dim), HEADS // KV_HEADS, axis=2) for a in (k, v))
    att = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    att = jax.nn.softmax(jnp.where(positions[:, None, :, None] >= positions[:, None, None, :], att, -1e9), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, -1)


class Layer(linen.Module):
    width: int

    @linen.compact
    def __call__(self, h, positions):
        d, hd = self.width, self.width // HEADS
        dense = lambda n, name: linen.Dense(n, use_bias=False, name=name)  # noqa: E731
        x = linen.RMSNorm(name="norm1")(h)
        q, k, v = dense(d, "q")(x), dense(KV_HEADS * hd, "k")(x), dense(KV_HEADS * hd, "v")(x)
        h = h + dense(d, "o")(_attend(q, k, v, positions, hd))
        x = linen.RMSNorm(name="norm2")(h)
        g = jax.nn.silu(dense(3 * d, "gate")(x)) * dense(3 * d, "up")(x)
        return h + dense(d, "down")(g), None


class Net(linen.Module):
    layers: int
    width: int
    scanned: bool

    @linen.compact
    def __call__(self, tokens, positions):
        h = linen.Embed(VOCAB, self.width, name="embed")(tokens)
        if self.scanned:
            stack = linen.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                               in_axes=linen.broadcast, length=self.layers)
            h, _ = stack(self.width, name="layers")(h, positions)
        else:
            for i in range(self.layers):
                h, _ = Layer(self.width, name=f"layers_{i}")(h, positions)
        return linen.Dense(VOCAB, use_bias=False, name="lm_head")(linen.RMSNorm(name="norm")(h))


def _compile_seconds(net: Net, result, tokens, positions) -> float:
    """Trace, lower and compile a fresh packed model's jitted forward."""
    packed = gptq_jax.pack(result.model, result, apply_fn=net.apply)
    t0 = time.perf_counter()
    packed.lower(tokens, positions).compile()
    return time.perf_counter() - t0


def measure(layers: int, width: int, scanned: bool, repeats: int, quiet: bool = False) -> dict:
    net = Net(layers, width, scanned)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)))
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    params = net.init(jax.random.key(0), tokens, positions)["params"]
    result = gptq_jax.quantize(params, [{"tokens": tokens, "positions": positions}], method="rtn",
                               forward=lambda p, b: net.apply({"params": p}, b["tokens"], b["positions"]),
                               quant_config=QuantConfig(bits=4, group_size=32))
    assert len(result.weights) == 7 * layers, f"{len(result.weights)} weights quantized, expected {7 * layers}"
    packed = gptq_jax.pack(result.model, result, apply_fn=net.apply)
    got, want = packed(tokens, positions), net.apply({"params": result.model}, tokens, positions)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-3, f"packed logits differ from the dequantized model's by {err:.2e} (relative)"
    times = [_compile_seconds(net, result, tokens, positions) for _ in range(repeats)]
    row = {"layers": layers, "scanned": scanned, "compile_seconds": statistics.median(times),
           "compile_seconds_all": times, "packed_vs_dequantized_max_rel_error": err}
    if not quiet:
        print(f"{'scanned' if scanned else 'unrolled':>8} {layers:3d} layers: compile {row['compile_seconds']:.2f} s "
              f"(runs {', '.join(f'{t:.2f}' for t in times)}), packed vs dequantized {err:.1e}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 30])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-unrolled", action="store_true", help="skip the unrolled model")
    args = ap.parse_args(argv)
    started = provenance.start()
    measure(min(args.layers), args.width, True, 1, quiet=True)  # JAX's one-time start-up costs, not timed
    rows = [measure(n, args.width, True, args.repeats) for n in args.layers]
    if not args.no_unrolled:
        rows += [measure(n, args.width, False, args.repeats) for n in args.layers]
    scanned = {r["layers"]: r["compile_seconds"] for r in rows if r["scanned"]}
    lo, hi = min(args.layers), max(args.layers)
    ratio = scanned[hi] / scanned[lo]
    ok = ratio <= TARGET
    print(f"scanned: {hi} layers / {lo} layers = {ratio:.2f}x (target <= {TARGET}x): {'ok' if ok else 'FAILED'}")
    payload = {"benchmark": "scan_compile", "what": "packed jitted forward: trace + lower + compile, median",
               "model": {"width": args.width, "heads": HEADS, "kv_heads": KV_HEADS, "vocab": VOCAB, "seq": SEQ,
                         "batch": BATCH, "bits": 4, "group_size": 32},
               "rows": rows, "ratio_scanned": ratio, "target": TARGET, "ok": ok}
    device = jax.devices()[0].platform
    path = provenance.write_result(provenance.result_path("scan_compile", f"scan_compile_{device}.json"), payload,
                                   started=started)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
