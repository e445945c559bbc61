"""Hessians of the layer-wise objective: ``H = 2/n sum_i x_i x_i^T`` over calibration inputs, and the cross term
``D = 2/n sum_i (x_fp_i - x_i) x_i^T`` between the float model's inputs and the quantized model's (GPTAQ, Qronos).

Accumulated as a fold so that calibration can stream: ``h, n = accumulate_hessian(h, n, x)``. The sum
is kept as a running mean in float32, so the result does not depend on how tokens are batched (up to
float rounding) and never grows with the number of tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def init_hessian(in_features: int) -> tuple[jax.Array, jax.Array]:
    """Empty accumulator: ``h`` f32 ``[K, K]`` zeros and token count ``n`` int32 ``[]``."""
    return jnp.zeros((in_features, in_features), jnp.float32), jnp.zeros((), jnp.int32)


@jax.jit
def accumulate_hessian(
    h: jax.Array, n: jax.Array, x: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Fold activations into the running Hessian.

    Args:
      h: f32 ``[K, K]``, the Hessian of the ``n`` tokens seen so far (zeros when ``n == 0``).
      n: int32 ``[]``, tokens seen so far.
      x: ``[..., K]`` activations (any float dtype; upcast to f32).
      mask: optional ``[...]`` (x's shape without K), nonzero for real tokens and 0 for padding.

    Returns:
      ``(h', n')`` with ``h' = (n h + 2 sum x x^T) / n'`` and ``n' = n + tokens``.
    """
    xtx, t = token_xtx(x, mask)  # (K, K), ()
    n_new = n + t
    denom = jnp.maximum(n_new, 1).astype(jnp.float32)
    h_new = h * (n.astype(jnp.float32) / denom) + (2.0 / denom) * xtx
    return h_new, n_new


def token_xtx(x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``sum x x^T`` over the unmasked tokens of ``x`` ``[..., K]`` (f32, ``[K, K]``) and their count (int32)."""
    k = x.shape[-1]
    x = x.reshape(-1, k).astype(jnp.float32)  # (T, K)
    if mask is None:
        t = jnp.asarray(x.shape[0], jnp.int32)
    else:
        m = mask.reshape(-1) != 0
        x = jnp.where(m[:, None], x, 0.0)
        t = jnp.sum(m, dtype=jnp.int32)
    return jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST), t


def init_cross(in_features: int) -> tuple[jax.Array, jax.Array]:
    """Empty accumulator of ``accumulate_cross``: f32 ``[K, K]`` zeros and token count int32 ``[]``."""
    return init_hessian(in_features)


@jax.jit
def accumulate_cross(
    d: jax.Array, n: jax.Array, x_fp: jax.Array, x_q: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Fold a pair of input streams into the cross term ``D = 2/n sum (x_fp - x_q) x_q^T`` of GPTAQ and Qronos.

    Args:
      d: f32 ``[K, K]``, the cross term of the ``n`` tokens seen so far.
      n: int32 ``[]``, tokens seen so far.
      x_fp: ``[..., K]`` the float model's inputs to the layer.
      x_q: ``[..., K]`` the partly quantized model's inputs to the same layer, token for token (the stream ``H``
        is accumulated on).
      mask: optional ``[...]``, nonzero for real tokens.

    Returns:
      ``(d', n')``, normalised like ``accumulate_hessian`` so that ``D`` and ``H`` of the same tokens share a
      scale: ``X_fp X_q^T = n/2 (H + D)``.
    """
    if x_fp.shape != x_q.shape:
        raise ValueError(f"float inputs {x_fp.shape} and quantized inputs {x_q.shape} must have the same shape")
    k = x_q.shape[-1]
    xq = x_q.reshape(-1, k).astype(jnp.float32)  # (T, K)
    dx = x_fp.reshape(-1, k).astype(jnp.float32) - xq
    if mask is None:
        t = jnp.asarray(xq.shape[0], jnp.int32)
    else:
        m = mask.reshape(-1) != 0
        dx = jnp.where(m[:, None], dx, 0.0)
        t = jnp.sum(m, dtype=jnp.int32)
    n_new = n + t
    denom = jnp.maximum(n_new, 1).astype(jnp.float32)
    dxx = jnp.matmul(dx.T, xq, precision=lax.Precision.HIGHEST)  # (K, K)
    return d * (n.astype(jnp.float32) / denom) + (2.0 / denom) * dxx, n_new


def init_expert_hessians(experts: int, in_features: int) -> tuple[jax.Array, jax.Array]:
    """Empty accumulator of ``accumulate_expert_hessians``: f32 ``[E, K, K]`` zeros and int32 ``[E]`` counts."""
    return jnp.zeros((experts, in_features, in_features), jnp.float32), jnp.zeros((experts,), jnp.int32)


@jax.jit
def accumulate_expert_hessians(
    h: jax.Array, n: jax.Array, x: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``accumulate_hessian`` for each of E experts (MoE), each over the tokens routed to it only.

    Args:
      h: f32 ``[E, K, K]``; n: int32 ``[E]``, tokens each expert has seen so far.
      x: ``[E, T, K]`` (expert e's slots) or ``[T, K]`` (tokens shared by every expert, as in a grouped matmul).
      mask: ``[E, T]``, nonzero where slot t of expert e holds a token routed to it (padding and unrouted slots
        count in neither the sum nor ``n``).
    """
    return jax.vmap(accumulate_hessian, in_axes=(0, 0, 0 if x.ndim == 3 else None, 0))(h, n, x, mask)
