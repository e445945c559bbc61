"""GPTQ of a Flax NNX model this project did not write: a small transformer whose projections are einsum weights.

    python examples/own_nnx_model.py

The engine finds every matmul that reads a parameter in the traced program (here the [D, N, H] q/k/v weights, an
[N, H, D] output projection contracting two axes, and a raw ``jnp.einsum`` in the MLP), quantizes the blocks one
after another, and ``pack`` runs the same model code on packed 4-bit weights. A third-party model (google-tunix's
Qwen3 or Gemma3, for example) goes the same way: pass ``forward=`` when its call needs more than the tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptq_jax
from gptq_jax.engine.packed import pack

D, N, H, F, V, LAYERS = 64, 4, 16, 128, 256, 4


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = lambda *shape: nnx.Param(0.1 * jax.random.normal(rngs.params(), shape))  # noqa: E731
        self.wq, self.wk, self.wv = init(D, N, H), init(D, N, H), init(D, N, H)
        self.wo = init(N, H, D)
        self.w_up, self.w_down = init(D, F), init(F, D)
        self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, h, mask):
        x = self.norm1(h)
        q, k, v = (jnp.einsum("btd,dnh->btnh", x, w[...]) for w in (self.wq, self.wk, self.wv))
        s = jnp.einsum("btnh,bsnh->bnts", q, k) / H**0.5
        p = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
        a = jnp.einsum("bnts,bsnh->btnh", p, v)
        h = h + jnp.einsum("btnh,nhd->btd", a, self.wo[...])  # contracts two axes of wo
        y = jax.nn.gelu(jnp.einsum("btd,df->btf", self.norm2(h), self.w_up[...]))
        return h + y @ self.w_down[...]


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.out = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(h)


def main() -> None:
    rng = np.random.default_rng(0)
    calib = rng.integers(0, V, (32, 64)).astype(np.int32)
    held = jnp.asarray(rng.integers(0, V, (8, 64)).astype(np.int32))
    ref = Model(nnx.Rngs(0))(held)

    model = Model(nnx.Rngs(0))
    result = gptq_jax.quantize(model, calib, quant_config=gptq_jax.QuantConfig(bits=4, group_size=32), progress=True)
    print(f"quantized {len(result.weights)} weights in {result.report.seconds:.1f} s ({result.report.mode})")
    for r in result.report.unquantized:
        print(f"  kept float: {r['path']}: {r['reason']}")
    packed = pack(model, result)
    err = float(jnp.mean((packed(held) - ref) ** 2) / jnp.mean(ref**2))
    print(f"packed model: {packed.nbytes() / 2**20:.2f} MiB, relative logit error {err:.2e}")


if __name__ == "__main__":
    main()
