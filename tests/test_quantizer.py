"""The grid of docs/checkpoints.md, round-to-nearest, the MSE range search, and Hessian accumulation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax import QuantConfig, accumulate_hessian, init_hessian, rtn_quantize
from gptq_jax.core.quantizer import grid_params


def test_symmetric_grid_is_the_checkpoint_formats():
    w = np.array([[-0.3, 0.1, 0.75], [0.2, -0.5, 0.0]], np.float32)
    scale, zero = grid_params(jnp.asarray(w), QuantConfig(bits=4, sym=True, fp16_scales=False))
    np.testing.assert_allclose(np.asarray(scale), [2 * 0.75 / 15, 2 * 0.5 / 15], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), [8.0, 8.0])


@pytest.mark.parametrize("bits,zero", [(2, 2), (3, 4), (4, 8), (8, 128)])
def test_symmetric_zero_is_half_range(bits, zero):
    _, z = grid_params(jnp.ones((1, 4)), QuantConfig(bits=bits, sym=True))
    assert float(z[0]) == zero


def test_asymmetric_grid_includes_zero():
    w = np.array([[0.2, 0.6, 1.0], [-1.0, -0.2, -0.4]], np.float32)
    scale, zero = grid_params(jnp.asarray(w), QuantConfig(bits=4, sym=False, fp16_scales=False))
    # Rows are all positive / all negative: the range is widened to contain 0.
    np.testing.assert_allclose(np.asarray(scale), [1.0 / 15, 1.0 / 15], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), [0.0, 15.0])


def test_all_zero_group_gets_a_usable_grid():
    for sym in (True, False):
        scale, zero = grid_params(jnp.zeros((1, 8)), QuantConfig(bits=4, sym=sym, fp16_scales=False))
        assert float(scale[0]) == pytest.approx(2.0 / 15)
        out = rtn_quantize(np.zeros((2, 8), np.float32), QuantConfig(bits=4, group_size=-1, sym=sym))
        np.testing.assert_array_equal(np.asarray(out.dequantize()), 0.0)


def test_symmetric_extreme_rounds_like_ieee_division():
    # max|w| / scale is exactly the tie -(maxq+1)/2 in real arithmetic; the code depends on the float32
    # quotient, which must be computed as a true division (this value differs by one ulp otherwise).
    w = np.array([[-2.966042, 2.5151048, 0.1]], np.float32)
    out = rtn_quantize(w, QuantConfig(bits=4, group_size=-1, sym=True, fp16_scales=False))
    scale = np.float32(np.float32(2.966042) + np.float32(2.966042)) / np.float32(15)
    expected = np.clip(np.round(w / scale) + 8, 0, 15).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(out.codes), expected)


def test_fp16_scales_round_before_the_zero_and_stay_finite():
    """By default each scale is a float16 value (what the checkpoint stores), and the asymmetric zero is taken
    with that scale; scales below float16's range are raised to its smallest value rather than stored as 0."""
    w = np.array([[0.2, 0.6, 1.0, -0.3], [-1.0, -0.2, -0.4, 0.05], [1e-9, -1e-9, 0.0, 5e-10]], np.float32)
    for sym in (True, False):
        s32, _ = grid_params(jnp.asarray(w), QuantConfig(bits=4, sym=sym, fp16_scales=False))
        scale, zero = grid_params(jnp.asarray(w), QuantConfig(bits=4, sym=sym))
        scale, s32 = np.asarray(scale), np.asarray(s32)
        np.testing.assert_array_equal(scale[:2], s32[:2].astype(np.float16).astype(np.float32))
        assert scale[2] == np.finfo(np.float16).smallest_subnormal and s32[2] < scale[2]
        if not sym:
            np.testing.assert_array_equal(np.asarray(zero), np.round(-np.minimum(w.min(1), 0) / scale))
        out = rtn_quantize(w, QuantConfig(bits=4, group_size=-1, sym=sym))
        assert np.all(np.isfinite(np.asarray(out.dequantize())))
        np.testing.assert_allclose(np.asarray(out.dequantize())[2], 0.0, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_partial_last_group(bits, sym):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((6, 576)).astype(np.float32)  # SmolLM2's K: 576 = 4.5 groups of 128
    out = rtn_quantize(w, QuantConfig(bits=bits, group_size=128, sym=sym))
    assert out.scales.shape == (6, 5) and out.zeros.shape == (6, 5)
    np.testing.assert_array_equal(np.asarray(out.g_idx), np.arange(576) // 128)
    codes = np.asarray(out.codes)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    # Round-to-nearest: each weight is within half a step of its dequantized value (or clipped at the edge).
    s = np.asarray(out.scales)[:, np.arange(576) // 128]
    err = np.abs(np.asarray(out.dequantize()) - w)
    inside = (codes > 0) & (codes < 2**bits - 1)
    assert np.all(err[inside] <= 0.5 * s[inside] * (1 + 1e-5))


def test_mse_search_lowers_the_norm_error():
    rng = np.random.default_rng(0)
    w = rng.standard_t(df=3, size=(32, 256)).astype(np.float32)  # heavy tails: shrinking the range pays
    base = QuantConfig(bits=3, group_size=128, sym=False)
    mse = QuantConfig(bits=3, group_size=128, sym=False, mse=True)

    def norm_err(cfg):
        return float(np.sum(np.abs(np.asarray(rtn_quantize(w, cfg).dequantize()) - w) ** 2.4))

    assert norm_err(mse) < 0.9 * norm_err(base)


def test_hessian_is_two_over_n_xxt():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 16)).astype(np.float32)
    h, n = accumulate_hessian(*init_hessian(16), jnp.asarray(x))
    flat = x.reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(np.asarray(h), 2.0 / 150 * flat.T @ flat, rtol=1e-5, atol=1e-6)
    assert int(n) == 150


def test_hessian_does_not_depend_on_batching():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    whole, n1 = accumulate_hessian(*init_hessian(24), jnp.asarray(x))
    h, n = init_hessian(24)
    for chunk in np.split(x, [7, 100, 101, 260]):
        h, n = accumulate_hessian(h, n, jnp.asarray(chunk))
    assert int(n) == int(n1) == 300
    np.testing.assert_allclose(np.asarray(h), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_hessian_mask_drops_padding():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 10, 8)).astype(np.float32)
    mask = np.ones((2, 10), np.int32)
    mask[1, 6:] = 0
    x[1, 6:] = 1e3  # padding garbage must not leak in
    h, n = accumulate_hessian(*init_hessian(8), jnp.asarray(x), jnp.asarray(mask))
    real = np.concatenate([x[0], x[1, :6]]).astype(np.float64)
    assert int(n) == 16
    np.testing.assert_allclose(np.asarray(h), 2.0 / 16 * real.T @ real, rtol=1e-5, atol=1e-6)
    # An all-padding batch changes nothing.
    h2, n2 = accumulate_hessian(h, n, jnp.asarray(x), jnp.zeros((2, 10)))
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(h))
    assert int(n2) == 16


def test_hessian_accepts_bf16_activations():
    x = jnp.ones((4, 8), jnp.bfloat16)
    h, _ = accumulate_hessian(*init_hessian(8), x)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h), 2.0 * np.ones((8, 8)), rtol=1e-6)
