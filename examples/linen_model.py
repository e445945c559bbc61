"""GPTQ of a Linen model: its params pytree and ``apply`` are all the engine needs (one-shot mode).

    python examples/linen_model.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gptq_jax
from gptq_jax.engine.packed import pack

V, D, F = 256, 64, 256


class MLPLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(V, D)(tokens)
        for _ in range(3):
            h = h + nn.Dense(D)(nn.gelu(nn.Dense(F)(nn.LayerNorm()(h))))
        return nn.Dense(V)(h)


def main() -> None:
    net = MLPLM()
    rng = np.random.default_rng(0)
    calib = rng.integers(0, V, (32, 32)).astype(np.int32)
    held = jnp.asarray(rng.integers(0, V, (8, 32)).astype(np.int32))
    params = net.init(jax.random.key(0), held)["params"]
    ref = net.apply({"params": params}, held)

    qc = gptq_jax.QuantConfig(bits=4, group_size=64)
    result = gptq_jax.quantize(params, calib, apply_fn=net.apply, quant_config=qc)
    print(f"quantized {len(result.weights)} weights ({result.report.mode}): {sorted(result.weights)}")
    packed = pack(result.model, result, apply_fn=net.apply)
    err = float(jnp.mean((packed(held) - ref) ** 2) / jnp.mean(ref**2))
    print(f"relative logit error of the packed model: {err:.2e}")


if __name__ == "__main__":
    main()
