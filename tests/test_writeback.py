"""The weights the engine writes back for the next block hold the scales the config asks for."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gptq_jax import QuantConfig, accumulate_hessian, init_hessian, quantize_weight
from gptq_jax.engine.solve import written_back


def test_written_back_keeps_the_configs_scale_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    w = (0.01 * rng.standard_normal((32, 64))).astype(np.float32)
    h, _ = accumulate_hessian(*init_hessian(64), jnp.asarray(x))
    kernel_shape = (64, 32)  # a Flax kernel [K, N]: the contracting axis is 0
    for fp16 in (True, False):
        qw = quantize_weight(w, h, QuantConfig(bits=3, group_size=32, sym=False, fp16_scales=fp16))
        got = np.asarray(written_back(qw, kernel_shape, (0,), jnp.float32)).T  # (N, K)
        np.testing.assert_array_equal(got, np.asarray(qw.dequantize()))
        f16 = dict(qw.__dict__, scales=qw.scales.astype(jnp.float16).astype(jnp.float32))
        rounded = np.asarray(type(qw)(**f16).dequantize())
        # float32 scales: the next block sees them unrounded (the rounding moves some weights); float16: the same
        assert np.array_equal(got, rounded) == fp16
