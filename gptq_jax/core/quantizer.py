"""The quantization grid: scales and zeros, quantize, dequantize, and the round-to-nearest baseline.

The grid is the one of the GPTQ checkpoint format (docs/checkpoints.md), so that codes match the
PyTorch tools code for code:

- symmetric:  ``scale = 2 * max|w| / maxq``, ``zero = (maxq + 1) / 2``
- asymmetric: ``scale = (xmax - xmin) / maxq`` with ``xmin <= 0 <= xmax``, ``zero = round(-xmin / scale)``
- codes:      ``q = clamp(round(w / scale) + zero, 0, maxq)``; ``w ~ scale * (q - zero)``

A group that is all zeros gets the range [-1, 1] so its scale is never 0. With ``QuantConfig.fp16_scales`` (the
default) each scale is rounded to float16, as the checkpoint stores it, before the zero and the codes are taken.

Orientation: weights here are in the paper's orientation ``[out_features N, in_features K]``;
a group is a run of input columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.config import QuantConfig


def grid_params(w: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """Scale and zero of each row of ``w`` ``[..., C]``, reducing over the last axis.

    Returns ``scale`` f32 ``[...]`` and ``zero`` f32 ``[...]`` (integer-valued).
    """
    w = w.astype(jnp.float32)
    xmin = jnp.minimum(w.min(axis=-1), 0.0)
    xmax = jnp.maximum(w.max(axis=-1), 0.0)
    if config.sym:
        xmax = jnp.maximum(-xmin, xmax)
        xmax = jnp.where(xmax == 0.0, 1.0, xmax)
        xmin = -xmax
    else:
        empty = (xmin == 0.0) & (xmax == 0.0)
        xmin = jnp.where(empty, -1.0, xmin)
        xmax = jnp.where(empty, 1.0, xmax)
    scale, zero = _scale_zero(xmin, xmax, config)
    if config.mse:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, config)
    return scale, zero


def true_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` rounded as IEEE division, even where ``b`` broadcasts.

    XLA on CPU divides by a broadcast operand as multiplication by its reciprocal, which is 1 ulp off for
    some values. The symmetric grid puts each group's extreme weight exactly on a rounding tie
    (``w / scale = -(maxq + 1) / 2``), so that ulp changes codes; the PyTorch tools divide exactly. The
    barrier keeps XLA from seeing the broadcast.
    """
    b = lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), jnp.broadcast_shapes(a.shape, b.shape)))
    return a / b


# With ``fp16_scales``, scales are kept within float16's positive finite range: the smallest subnormal up to the
# largest finite value, so no stored scale is 0 or inf.
_F16_TINY = float(jnp.finfo(jnp.float16).smallest_subnormal)
_F16_MAX = float(jnp.finfo(jnp.float16).max)


def _scale_zero(xmin: jax.Array, xmax: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    scale = true_div(xmax - xmin, jnp.float32(config.maxq))
    if config.fp16_scales:
        scale = jnp.clip(scale, _F16_TINY, _F16_MAX).astype(jnp.float16).astype(jnp.float32)
    if config.sym:
        zero = jnp.full_like(scale, (config.maxq + 1) / 2)
    else:
        zero = jnp.round(true_div(-xmin, scale))
    return scale, zero


def _mse_search(
    w: jax.Array, xmin: jax.Array, xmax: jax.Array, scale: jax.Array, zero: jax.Array, config: QuantConfig
) -> tuple[jax.Array, jax.Array]:
    """Shrink the range by p = 1, 1 - 1/grid, ... and keep the grid with the lowest sum |w - dq|^norm.

    The paper's reference quantizer does this search for its ``mse`` option; sym grids keep their
    fixed zero, asym grids re-round it for each shrunk range.
    """
    steps = int(config.mse_max_shrink * config.mse_grid)

    def body(i, carry):
        best, best_scale, best_zero = carry
        p = 1.0 - i / config.mse_grid
        s, z = _scale_zero(p * xmin, p * xmax, config)
        dq = dequantize(quantize(w, s[..., None], z[..., None], config.maxq), s[..., None], z[..., None])
        err = jnp.sum(jnp.abs(dq - w) ** config.mse_norm, axis=-1)
        better = err < best
        return (
            jnp.where(better, err, best),
            jnp.where(better, s, best_scale),
            jnp.where(better, z, best_zero),
        )

    best = jnp.full(scale.shape, jnp.inf, jnp.float32)
    _, scale, zero = jax.lax.fori_loop(0, steps, body, (best, scale, zero))
    return scale, zero


def quantize(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes (as f32) ``clamp(round(w / scale) + zero, 0, maxq)``; broadcasting."""
    return jnp.clip(jnp.round(true_div(w, scale)) + zero, 0.0, float(maxq))


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """``scale * (q - zero)``; broadcasting."""
    return scale * (q - zero)


def group_grid_params(w: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
    """Grid of every group of ``w`` ``[N, K]``: scale and zero f32 ``[N, G]``, G = ceil(K / g).

    A partial last group is padded with zeros, which never changes its grid: the range always
    contains 0 and 0 quantizes exactly on every grid, so padding adds no error to the MSE search.
    """
    n, k = w.shape
    g = config.effective_group_size(k)
    groups = config.groups(k)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, groups * g - k)))
    return grid_params(w.reshape(n, groups, g), config)


# Codes are at most 8 bits: one byte each, a quarter of int32, so a model's quantized weights held in memory (the
# result of ``quantize``) take a quarter of its float32 weights, not as much again.
CODE_DTYPE = jnp.uint8


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "zeros", "g_idx", "perm", "loss", "damp", "fallback"],
    meta_fields=["bits", "group_size", "sym"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One quantized linear layer in the paper's orientation (``W`` is ``[N out, K in]``).

    ``codes``    uint8 ``[N, K]`` (``CODE_DTYPE``): integer codes in [0, 2**bits - 1], columns in the layer's
                 own order (act-order is already undone).
    ``scales``   f32 ``[N, G]``: scale of each output row and group, G = ceil(K / group_size).
    ``zeros``    int32 ``[N, G]``: true zero point (not the checkpoint's v1 ``zero - 1``).
    ``g_idx``    int32 ``[K]``: group of each input column; ``k // group_size`` unless act-order
                 formed the groups in another order.
    ``perm``     int32 ``[K]`` or None: the column order the solver visited (act-order), else None. The
                 group-aware order (``act_group_aware``) needs none: it moves whole groups, so every column
                 keeps its own group's grid and ``g_idx`` is ``k // group_size``.
    ``loss``     f32 ``[]``: the paper's proxy loss ``sum (w - q)^2 / [H^-1]_jj^2 / 2`` (for a
                 round-to-nearest result, the same sum with H's diagonal: ``sum (w - q)^2 * H_jj / 2``).
    ``damp``     f32 ``[]``: the dampening actually used, as a fraction of mean(diag H); 0 for RTN.
    ``fallback`` bool ``[]``: True where H could not be factored even with more damping and the layer
                 fell back to round-to-nearest.
    ``bits``, ``group_size`` (the effective one: K for per-channel), ``sym``: static.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    perm: jax.Array | None
    loss: jax.Array
    damp: jax.Array
    fallback: jax.Array
    bits: int
    group_size: int
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``[N, K]``: ``scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]])``."""
        s = jnp.take(self.scales, self.g_idx, axis=1)
        z = jnp.take(self.zeros, self.g_idx, axis=1).astype(jnp.float32)
        return (s * (self.codes.astype(jnp.float32) - z)).astype(dtype)


@jax.jit
def _nonfinite(x):
    return jnp.sum(~jnp.isfinite(x))


def count_nonfinite(x) -> int:
    return int(_nonfinite(jnp.asarray(x)))


def check_weight(w, config: QuantConfig) -> None:
    """Boundary checks on a weight ``[N out, K in]``: shape, dtype, finiteness, group size."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"weight must be a 2-D array [out_features, in_features], got shape {shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weight must be a floating-point array, got dtype {w.dtype}")
    if min(shape) == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(shape)}")
    config.check_in_features(shape[1])
    bad = count_nonfinite(w)
    if bad:
        raise ValueError(f"weight of shape {tuple(shape)} holds {bad} NaN or Inf values")



def rtn_codes(w: jax.Array, config: QuantConfig, scales: jax.Array, zeros: jax.Array, g_idx: jax.Array) -> jax.Array:
    """Round-to-nearest codes ``CODE_DTYPE`` ``[N, K]`` of ``w`` on given per-group grids ``[N, G]``."""
    s = jnp.take(scales, g_idx, axis=1)
    z = jnp.take(zeros, g_idx, axis=1)
    return quantize(w.astype(jnp.float32), s, z, config.maxq).astype(CODE_DTYPE)


@functools.partial(jax.jit, static_argnames=("config",))
def _rtn(w: jax.Array, config: QuantConfig) -> QuantizedWeight:
    n, k = w.shape
    g = config.effective_group_size(k)
    scales, zeros = group_grid_params(w, config)
    g_idx = jnp.arange(k, dtype=jnp.int32) // g
    codes = rtn_codes(w, config, scales, zeros, g_idx)
    zeros = zeros.astype(jnp.int32)
    out = QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        perm=None,
        loss=jnp.zeros((), jnp.float32),
        damp=jnp.zeros((), jnp.float32),
        fallback=jnp.zeros((), jnp.bool_),
        bits=config.bits,
        group_size=g,
        sym=config.sym,
    )
    err = w.astype(jnp.float32) - out.dequantize()
    return dataclasses.replace(out, loss=0.5 * jnp.sum(err * err))


def rtn_quantize(w: jax.Array, config: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` ``[N out, K in]`` on the config's grid: the baseline.

    ``loss`` is ``sum (w - q)^2 / 2`` (the proxy loss with H = I). Act-order and static groups have
    no meaning without a Hessian and are ignored.
    """
    check_weight(w, config)
    return _rtn(jnp.asarray(w), config)
