"""MoE experts: a parameter stacked on an expert axis, each slice along it a weight of its own.

Two forms read such a stack (``trace.find_uses`` records the expert axis as ``Use.w_batch``):

- a ``dot_general`` with one batch dimension, experts ``[E, D, F]`` in ``einsum("etd,edf->etf", dispatched, w)``:
  slot t of expert e is row ``dispatched[e, t]``; a slot no token was routed to is an all-zero row;
- ``lax.ragged_dot(x [M, K], w [G, K, N], group_sizes [G])``: tokens sorted by expert, rows
  ``[sum(sizes[:g]), sum(sizes[:g + 1]))`` meet expert g; rows past the last group meet none.

Each expert gets its own Hessian, from the tokens routed to it only (``expert_rows``): zero rows of the dense form
and rows outside a group's range count in neither the sum nor the token count. Each expert is solved on its own
(``solve_experts``) as the paper's ``[N, K]`` matrix of its slice, written back into the stack, and named
``path[e]`` in ``QuantizeResult.weights`` (``path[:,e]`` for an expert axis 1, and so on). An expert that got no
token has no Hessian: it is rounded to nearest, marked ``fallback`` with the reason in its report record; one with
fewer tokens than K goes through the solver's own path (damping grows until ``H`` factors, else round-to-nearest).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.engine.solve import Solved, Solver, solve_group
from gptq_jax.engine.trace import Use, activation_rows
from pallas_kernels import PackedWeight

NO_TOKENS = "no tokens routed to this expert: round-to-nearest"
_NAME = re.compile(r"^(.*)\[((?::,)*)(\d+)\]$")


def expert_name(path: str, axis: int, e: int) -> str:
    """The name of slice ``e`` along ``axis`` of parameter ``path``: ``path[e]``, ``path[:,e]``, ..."""
    return f"{path}[{':,' * axis}{e}]"


def split_expert(name: str) -> tuple[str, int, int] | None:
    """``(path, axis, e)`` of an expert slice's name (``expert_name``), or None for a whole parameter."""
    m = _NAME.match(name)
    return None if m is None else (m.group(1), len(m.group(2)) // 2, int(m.group(3)))


def slice_axes(w_axes: Sequence[int], axis: int) -> tuple[int, ...]:
    """Contracting axes of one slice, the expert ``axis`` taken out."""
    return tuple(a - (a > axis) for a in w_axes)


def expert_rows(use: Use, value: Any, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The activation of an expert matmul as ``(rows, routed)``: rows ``[E, T, K]`` (dense form) or ``[M, K]``
    shared by every expert (ragged form), and ``routed`` ``[E, T]`` / ``[G, M]``, True where the row is a token
    routed to that expert. ``mask`` (the calibration batch's token mask) is applied where the slots are the batch's
    tokens in order (``[E, B, S]`` or ``[E, B * S]``); in the ragged form, rows are tokens in the model's own order,
    so a padding token the model routes counts."""
    if use.groups is not None:
        x, sizes = value
        rows = activation_rows(x, use.x_axes)  # (M, K)
        ends = jnp.cumsum(sizes.astype(jnp.int32))
        idx = jnp.arange(rows.shape[0], dtype=jnp.int32)
        return rows, (idx[None, :] >= (ends - sizes)[:, None]) & (idx[None, :] < ends[:, None])  # (G, M)
    xb = jnp.moveaxis(value, use.x_batch, 0)  # (E, ...)
    axes = slice_axes(use.x_axes, use.x_batch)
    rows = jax.vmap(lambda s: activation_rows(s, axes))(xb)  # (E, T, K)
    routed = jnp.any(rows != 0, axis=-1)  # an unrouted slot is an all-zero row
    free = [d for a, d in enumerate(xb.shape[1:]) if a not in axes]
    if mask is not None and mask.size == math.prod(free) and (len(free) == 1 or tuple(free) == mask.shape):
        routed = routed & (mask.reshape(1, -1) != 0)  # the slots are the batch's tokens in order
    return rows, routed


def _rtn(ws: Sequence[jax.Array], h: Any, config: QuantConfig) -> list[QuantizedWeight]:
    return [rtn_quantize(w, config) for w in ws]


def solve_experts(solver: Solver, names: Sequence[str], leaves: list[Any], ps: Sequence[int],
                  w_axes: dict[int, tuple[int, ...]], axis: dict[int, int], h: jax.Array | None, n: jax.Array | None,
                  qc: QuantConfig, mesh: Any) -> list[Solved]:
    """Solve parameters ``ps`` of ``leaves`` (one stage, one config, E experts each) expert by expert, each on its
    own Hessian ``h[e]`` of ``n[e]`` tokens, and write every slice back into its stack in place (module docstring).
    """
    out: list[Solved] = []
    no_tokens = dataclasses.replace(solver, solve=_rtn, sharded=None)
    num = int(jnp.shape(leaves[ps[0]])[axis[ps[0]]])
    counts = [None] * num if n is None else [int(c) for c in np.asarray(n)]  # None: no statistics (RTN)
    for e, count in enumerate(counts):
        parts = [lax.index_in_dim(leaves[p], e, axis[p], keepdims=False) for p in ps]
        sub_axes = {i: slice_axes(w_axes[p], axis[p]) for i, p in enumerate(ps)}
        sub_names = [expert_name(name, axis[p], e) for name, p in zip(names, ps, strict=True)]
        done = solve_group(solver if count != 0 else no_tokens, sub_names, parts, range(len(ps)), sub_axes,
                           None if h is None else h[e], qc, mesh)
        for i, p in enumerate(ps):
            leaves[p] = lax.dynamic_update_index_in_dim(leaves[p], parts[i], e, axis[p])
        for d in done:
            d.record.update(expert=e, tokens=count)
            if count == 0:
                d.record.update(fallback=True, fallback_reason=NO_TOKENS)
                d = d._replace(weight=dataclasses.replace(d.weight, fallback=jnp.asarray(True)))
            out.append(d)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Packed inference


def stack_packed(ws: Sequence[PackedWeight]) -> PackedWeight:
    """Per-expert ``PackedWeight``s (same bits, group size and padded shape) stacked on a leading expert axis. An
    expert without act-order gets the identity ``perm``, so that every expert has the same arrays."""
    k = ws[0].in_features
    if any(w.perm is not None for w in ws):
        ws = [w if w.perm is not None else dataclasses.replace(w, perm=jnp.arange(k, dtype=jnp.int32)) for w in ws]
    if any(w.g_idx is not None for w in ws):
        g = ws[0].group_len
        ws = [w if w.g_idx is not None else dataclasses.replace(w, g_idx=jnp.arange(k, dtype=jnp.int32) // g)
              for w in ws]
    return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *ws)


def dequantized_stack(w: PackedWeight, shape: Sequence[int], w_axes: Sequence[int], axis: int) -> jax.Array:
    """The f32 parameter of ``shape`` a stacked ``PackedWeight`` (``stack_packed``) stands for: each expert's
    ``[K, N]`` dequantized (padding cut off) and put back in the slice's layout, stacked on ``axis``."""
    sub = [d for a, d in enumerate(shape) if a != axis]
    sub_axes = slice_axes(w_axes, axis)
    free = [a for a in range(len(sub)) if a not in sub_axes]
    k = math.prod(sub[a] for a in sub_axes)
    n = math.prod(sub) // k
    dq = jax.vmap(lambda x: x.dequantize(jnp.float32))(w)[:, :k, :n]  # (E, K, N)
    order = (*free, *sub_axes)
    t = jnp.swapaxes(dq, 1, 2).reshape(dq.shape[0], *[sub[a] for a in order])  # (E, free..., contracting...)
    t = jnp.transpose(t, [0, *[1 + order.index(a) for a in range(len(sub))]])  # (E, *sub)
    return jnp.moveaxis(t, 0, axis)


__all__ = ["NO_TOKENS", "dequantized_stack", "expert_name", "expert_rows", "slice_axes", "solve_experts",
           "split_expert", "stack_packed"]
