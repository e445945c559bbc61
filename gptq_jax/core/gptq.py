"""GPTQ for one linear layer: ``quantize_weight(w, h, config) -> QuantizedWeight``.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022), Algorithm 1. Notation follows the paper: ``W`` is ``[N out, K in]``, ``H`` is
``2/n X X^T`` over calibration inputs, and ``U`` is the upper Cholesky factor of ``H^-1``, whose rows
give the error feedback of each quantized column onto the columns after it.

The readable version is the plain column loop of ``tests/gptq_reference.py`` (float64, no blocks, the paper's
``W``, ``Q``, ``Err``, ``Hinv``); the solver here computes the same numbers, up to float rounding, faster. Its
pieces, in the order ``gptq_solve`` calls them:

==========================  =================================  =============================================
piece                       here                               the paper (Alg. 1) / its reference code
==========================  =================================  =============================================
``prepare``                 ``Prepared.w``, ``.h``, ``.perm``  ``W``, ``H``, act-order ``perm``, dead columns
``damped_factor``           ``ft = F^T``, ``rdiag = diag R``   ``Hinv = Cholesky(H^-1)^T`` (``U = R^-1``)
``make_feedback``           ``Feedback.wt`` / ``.wt0``         ``W`` (updated) / ``W`` as given
``sweep``                   ``d = wt0 - dequant(q)``           ``Err1 = (W1 - Q1) / diag(Hinv1)``, ``Err1 U = W - Q``
``sweep``                   ``SolvePlan.block``, ``i1``        ``blocksize``, ``i1``, ``i2 = i1 + blocksize``
``_columns``                one column ``j`` of a sub-block    the inner ``for i in range(count)`` loop
``assemble``                ``QuantizedWeight`` (codes ``Q``)  ``Q``, ``scale``, ``zero``, ``g_idx``
==========================  =================================  =============================================

The same numbers come from one Cholesky factorization of ``H`` and no inverse: with ``H = R R^T``
(``R`` upper), ``U = R^-1``, and each column by the time it is quantized is its original value plus
``sum_{i<j} (w_i - q_i) R_ij / R_jj`` (see ``damped_factor``). The solve feeds back the original weights
minus their dequantized codes through ``F = R diag(R)^-1``, held transposed.

The solve works on ``Wt = W^T`` (``[K, N]``, a row per input column) so that a column of the paper is a
contiguous row here. Columns are visited in three nested levels of blocks, each applying its feedback
lazily (the paper's "lazy batch updates", generalised one level further):

- sub-blocks of ``b`` (<= 16) columns: exact rank-1 updates inside;
- blocks of ``B`` (``config.block_size``) columns: after each sub-block, one ``[B, b] @ [b, N]`` update;
- super-blocks of ``S`` columns, a Python loop: after each block, one ``[S, B] @ [B, N]`` update, and
  after each super-block the exact trailing update ``Wt[s2:] += F^T[s2:, s1:s2] @ D`` with static shapes.

All levels compute the same numbers as the column-by-column algorithm, up to float rounding; the block
size is a speed knob only. Group grids are fitted when the solve reaches a group's first column, on the
weights as the paper's blocked loop has them then: as they were at the start of their 128-column block (the paper's
blocksize), recovered through that block's diagonal block of ``U``; see ``GROUP_FITS``.

Column orders: the natural one; act-order (descending ``diag(H)``, groups formed in that order, so ``g_idx`` is
permuted); or group-aware (``group_aware_perm``: whole groups reordered, so each group's grid is fitted at its first
visited column and ``g_idx`` stays ``k // g``). The solve runs on ``W[:, p]`` and ``H[p][:, p]`` and is un-permuted.

GPTAQ and Qronos (``core.methods``) reuse these pieces with another ``Feedback``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.quantizer import (
    CODE_DTYPE,
    QuantizedWeight,
    check_weight,
    count_nonfinite,
    grid_params,
    group_grid_params,
    true_div,
)

log = logging.getLogger(__name__)

_HIGHEST = lax.Precision.HIGHEST
# Sub-block width: rank-1 updates touch only [b, N], which stays in cache on CPUs.
_SUB_BLOCK = 16
# Columns per super-block; inside one, block updates are masked (some wasted flops), across them exact.
_SUPER_BLOCK = 512
# Damping grows by this factor per retry, up to 100% of mean(diag H).
_DAMP_GROWTH = 4.0
_UNROLL = 1
# What a group's grid is fitted on, when a block holds several groups (group_size < block_size):
# "current": the group's weights with the feedback of every column before it, as the column-by-column
#   algorithm has them;
# "block_start": the weights as they were at the start of their block of _FIT_BLOCK columns, before that block's
#   earlier columns fed back into them, as the paper's blocked loop (blocksize 128) does: it fits on W, whose in-block
#   columns only receive the block's feedback at the block's end (the updates go to the clone W1). Applies to group
#   sizes that divide _FIT_BLOCK (others never start a group mid-block, or straddle blocks: those fit "current").
GROUP_FITS = ("current", "block_start")
# Measured on 11 SmolLM2 layers x 7 linears (benchmarks/investigations/group_fit_smollm2.py): "block_start" gives
# the lower objective tr((W-Q) H (W-Q)^T) at 2-bit group 64 asym and 3-bit group 64 sym, and is even at 3-bit group
# 32 asym (docs/results.md). So the paper's choice is the default.
GROUP_FIT = "block_start"
_FIT_BLOCK = 128


def check_hessian(w, h) -> None:
    """Boundary checks on a Hessian ``[K, K]`` for a weight ``[N, K]``."""
    shape = getattr(h, "shape", None)
    k = w.shape[1]
    if shape is None or tuple(shape) != (k, k):
        raise ValueError(
            f"hessian shape {None if shape is None else tuple(shape)} does not match the weight: "
            f"weight is [out_features, in_features] = {tuple(w.shape)}, so the hessian must be ({k}, {k})"
        )
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"hessian must be a floating-point array, got dtype {h.dtype}")
    bad = count_nonfinite(h)
    if bad:
        raise ValueError(f"hessian of shape {tuple(shape)} holds {bad} NaN or Inf values")


def quantize_weight(w: jax.Array, h: jax.Array, config: QuantConfig) -> QuantizedWeight:
    """Quantize one linear layer with GPTQ.

    Args:
      w: float ``[N out_features, K in_features]``, the paper's orientation (a Flax kernel is its
        transpose; a torch ``Linear.weight`` is this).
      h: float ``[K, K]``, ``2/n sum x x^T`` over calibration inputs (see ``accumulate_hessian``).
      config: the grid and the solver's options.

    Returns:
      A ``QuantizedWeight``. If ``h`` is not positive definite even after growing the damping up to
      100% of its mean diagonal, the layer falls back to round-to-nearest: ``fallback`` is True, a
      warning is logged, and the output still holds no NaN.
    """
    w = jnp.asarray(w)
    h = jnp.asarray(h)
    check_weight(w, config)
    check_hessian(w, h)
    out = jitted_solver()(w, h, config)[0]
    log_damping(out, tuple(w.shape), config)
    return out


def checked_group(ws: Sequence[Any], h: Any, config: QuantConfig) -> tuple[list[jax.Array], jax.Array]:
    """Weights that share a Hessian, and the Hessian, as arrays, each checked against the config and the others."""
    ws = [jnp.asarray(w) for w in ws]
    if not ws:
        return ws, h
    h = jnp.asarray(h)
    for w in ws:
        check_weight(w, config)
        check_hessian(w, h)
    return ws, h


# Weights that share a Hessian are solved as one when their stacked rows hold at most this many values (512 MB in
# f32 per copy of the solve's [K, N] state): one factorization and one column sweep instead of one per weight.
FUSE_MAX_VALUES = 1 << 27


def quantize_weights(ws: Sequence[jax.Array], h: jax.Array, config: QuantConfig) -> list[QuantizedWeight]:
    """GPTQ of several weights that read the same inputs (one Hessian, such as q/k/v or gate/up), solved together.

    Given ``H``, GPTQ treats each output row on its own (the column order, the factor of ``H`` and the feedback
    weights depend on ``H`` alone), so the weights' rows are stacked, as long as they stay under
    ``FUSE_MAX_VALUES``, and solved in one sweep: each result is the one ``quantize_weight`` gives for that weight
    alone, up to float rounding in the feedback matmuls, with its own ``loss``.

    Args:
      ws: float ``[N_i, K]`` weights with the same ``K``.
      h: float ``[K, K]``, their common Hessian.
      config: the grid and the solver's options, the same for every weight.
    """
    ws, h = checked_group(ws, h, config)
    if not ws:
        return []
    out: list[QuantizedWeight] = []
    solve = _stacked_cpu if jax.default_backend() == "cpu" else _stacked_jit
    for part in fused_parts([int(w.shape[0]) for w in ws], int(h.shape[0])):
        qws = solve(tuple(ws[i] for i in part), h, config)  # one program: stack, solve, cut apart
        log_damping(qws[0], (sum(int(ws[i].shape[0]) for i in part), int(h.shape[0])), config)
        out.extend(qws)
    return out


def _stacked(ws: tuple[jax.Array, ...], h: jax.Array, config: QuantConfig) -> list[QuantizedWeight]:
    w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=0)
    return split_rows(*gptq_solve(w, h, config), [int(x.shape[0]) for x in ws])


def fused_parts(rows: Sequence[int], k: int, max_values: int = FUSE_MAX_VALUES) -> list[list[int]]:
    """Consecutive runs of weights (by index) whose stacked ``rows x k`` stays within ``max_values``."""
    parts: list[list[int]] = []
    total = 0
    for i, n in enumerate(rows):
        if parts and (total + n) * k <= max_values:
            parts[-1].append(i)
            total += n
        else:
            parts.append([i])
            total = n
    return parts


def split_rows(qw: QuantizedWeight, row_loss: jax.Array, sizes: Sequence[int]) -> list[QuantizedWeight]:
    """The weights of a stacked solve, cut back apart by output rows; each gets the loss of its own rows."""
    if len(sizes) == 1:
        return [qw]
    out, a = [], 0
    for n in sizes:
        out.append(dataclasses.replace(
            qw, codes=qw.codes[a : a + n], scales=qw.scales[a : a + n], zeros=qw.zeros[a : a + n],
            loss=jnp.sum(row_loss[a : a + n]),
        ))
        a += n
    return out


def log_damping(out: QuantizedWeight, shape: tuple[int, int], config: QuantConfig) -> None:
    """Warn when a solve fell back to round-to-nearest or needed more damping than asked for."""
    if bool(out.fallback):
        log.warning(
            "GPTQ: the hessian of a %dx%d weight is not positive definite even with damping 1.0 x mean(diag H); "
            "fell back to round-to-nearest for this weight",
            *shape,
        )
    elif float(out.damp) > config.damp_percent * (1 + 1e-6):
        log.warning(
            "GPTQ: the hessian of a %dx%d weight needed damping %.4g (asked for %.4g) to be positive definite",
            shape[0],
            shape[1],
            float(out.damp),
            config.damp_percent,
        )


# ---------------------------------------------------------------------------------------------------------------
# The damped factor
# ---------------------------------------------------------------------------------------------------------------


def _set_diagonal(a: jax.Array, d: jax.Array) -> jax.Array:
    """``a`` with its diagonal replaced by ``d``: a scatter of K values, not a pass over K^2."""
    i = jnp.arange(a.shape[0])
    return a.at[i, i].set(d, unique_indices=True)


def damped_factor(h: jax.Array, damp_percent: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The solve's feedback matrix for ``H + damp * mean(diag H) * I``, growing ``damp`` until it works.

    One Cholesky factorization and no inverse. With ``J`` the reversal permutation, factor
    ``J H J = L L^T``; then ``R = J L J`` is upper triangular with ``H = R R^T``, and ``R^-1`` is the
    paper's ``U`` (the upper Cholesky factor of ``H^-1``). The paper's column loop writes
    ``W - Q = Err U``, so ``Err = (W - Q) R``, and each column, by the time it is quantized, is

        w~_j = w_j + sum_{i<j} (w_i - q_i) R_ij / R_jj,

    a feedback from the weights *as given* minus their dequantized codes through ``F = R diag(R)^-1``
    (upper, unit diagonal). The paper's proxy loss is ``(w~_j - q_j)^2 R_jj^2 / 2``. The paper's code
    forms ``H^-1`` and factors it again; this needs a third of the flops.

    JAX's Cholesky returns NaN instead of raising on a matrix that is not positive definite (the whole
    factor), so success is checked on its diagonal. Returns ``(F^T, diag R, damp used, ok)``; where nothing
    worked, ``F = I`` and ``R = sqrt(diag H)``, which makes the solve exactly round-to-nearest.
    """
    k = h.shape[0]
    diag = jnp.diagonal(h)
    mean_diag = jnp.mean(diag)
    h_rev = h[::-1, ::-1]
    diag_rev = diag[::-1]

    def cond(c):
        frac, _, _, ok = c
        return (~ok) & (frac < 1.0)

    def body(c):
        frac, _, _, _ = c
        # The first pass tries damp_percent itself; later passes grow it.
        frac = jnp.where(frac < 0, damp_percent, jnp.minimum(frac * _DAMP_GROWTH, 1.0))
        low = jax.scipy.linalg.cholesky(_set_diagonal(h_rev, diag_rev + frac * mean_diag), lower=True)
        rd = jnp.diagonal(low)[::-1]
        ok = jnp.all(jnp.isfinite(rd) & (rd > 0))
        # One fused pass: F^T = diag(R)^-1 J L^T J, and the identity where the factor failed. The solve
        # keeps F transposed (lower) so that every feedback product is a plain [M, c] @ [c, N] matmul.
        ft = jnp.where(ok, low.T[::-1, ::-1] / rd[:, None], jnp.eye(k, dtype=h.dtype))
        return frac, ft, rd, ok

    init = (jnp.float32(-1.0), jnp.zeros_like(h), jnp.zeros((k,), h.dtype), jnp.bool_(False))
    frac, ft, rd, ok = lax.while_loop(cond, body, init)
    rd_rtn = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
    return ft, jnp.where(ok, rd, rd_rtn), frac, ok


def group_aware_perm(d: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """The group-aware visiting order (GPTQModel's ``act_group_aware``) for a Hessian diagonal ``d`` ``[K]``.

    Only the ``K // g`` full groups move: inside each, columns in descending ``d``; the groups in descending order
    of their largest ``d`` (ties keep the groups' own order); a partial last group stays last, in its own order.
    Each run of ``g`` visited columns is then exactly one original group.

    Returns ``perm`` int32 ``[K]`` (``perm[visit position] = column``) and ``group_order`` int32 ``[ceil(K / g)]``
    (``group_order[visit position] = group``).
    """
    k, g = d.shape[0], group_size
    full = k // g
    d_full = d[: full * g].reshape(full, g)  # (G_full, g)
    within = jnp.argsort(-d_full, axis=1, stable=True)  # (G_full, g), each group's columns by descending d
    order = jnp.argsort(-jnp.max(d_full, axis=1), stable=True)  # (G_full,)
    perm = (order[:, None] * g + within[order]).reshape(-1)
    perm = jnp.concatenate([perm, jnp.arange(full * g, k)]).astype(jnp.int32)
    group_order = jnp.concatenate([order, jnp.arange(full, -(-k // g))]).astype(jnp.int32)
    return perm, group_order


@dataclasses.dataclass(frozen=True)
class SolvePlan:
    """Static block sizes for one solve (see the module docstring)."""

    k: int  # real columns
    kp: int  # padded to a multiple of block
    sub: int
    block: int
    superblock: int
    group: int  # effective group size (K for per-channel)
    dynamic_groups: bool  # grids fitted during the solve, at each group's first column
    fit_block: int  # 0, or _FIT_BLOCK when mid-block groups are fitted on the weights at their fit block's start


def solve_plan(k: int, config: QuantConfig, group_fit: str = GROUP_FIT) -> SolvePlan:
    """The block sizes of a solve of ``k`` columns under ``config``."""
    if group_fit not in GROUP_FITS:
        raise ValueError(f"group_fit={group_fit!r} is not one of {GROUP_FITS}")
    g = config.effective_group_size(k)
    dynamic = config.group_size != -1 and not config.static_groups
    fit_block = _FIT_BLOCK if dynamic and group_fit == "block_start" and g < _FIT_BLOCK and _FIT_BLOCK % g == 0 else 0
    if dynamic:
        # Group starts must fall on sub-block starts and a group must lie inside one block, so that
        # every column of the group has had all earlier feedback when the grid is fitted.
        sub = math.gcd(g, _SUB_BLOCK)
        block = (config.block_size // g) * g if g <= config.block_size else g
        if fit_block:
            # Fit blocks must lie inside solver blocks, so a fit block's start state is at hand.
            block = max(fit_block, (config.block_size // fit_block) * fit_block)
    else:
        sub = _SUB_BLOCK
        block = -(-config.block_size // sub) * sub
    kp = -(-k // block) * block
    superblock = min(max(1, _SUPER_BLOCK // block) * block, kp)
    return SolvePlan(
        k=k, kp=kp, sub=sub, block=block, superblock=superblock, group=g, dynamic_groups=dynamic, fit_block=fit_block
    )


# ---------------------------------------------------------------------------------------------------------------
# Prepare and permute
# ---------------------------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """The problem in visiting order, as the sweep sees it."""

    w: jax.Array  # (N, K) f32, the weight with dead inputs zeroed, columns in visiting order
    h: jax.Array  # (K, K) f32, H in visiting order, dead inputs given a unit diagonal
    dead: jax.Array  # (K,) bool, inputs that never fire, in visiting order
    perm: jax.Array  # (K,) int32, perm[visit position] = column
    group_order: jax.Array | None  # (G,) int32 for act_group_aware: group_order[visit position] = group
    fixed_scales: jax.Array | None  # (G or 1, N): grids fixed before the solve (per-channel, static groups)
    fixed_zeros: jax.Array | None
    col_group: jax.Array | None  # (Kp,) int32, the fixed grid of each visited column


class Order(NamedTuple):
    """What the visiting order takes from ``H`` alone (``visiting_order``)."""

    dead: jax.Array  # (K,) bool, inputs that never fire, in the columns' own order
    perm: jax.Array  # (K,) int32, perm[visit position] = column
    group_order: jax.Array | None  # (G,) int32 for act_group_aware: group_order[visit position] = group
    h: jax.Array  # (K, K) f32, H in visiting order, dead inputs given a unit diagonal


def visiting_order(h: jax.Array, config: QuantConfig, plan: SolvePlan) -> Order:
    """Dead inputs given a unit diagonal (they carry no information), and the order the columns are visited in."""
    h = h.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0.0
    h = _set_diagonal(h, jnp.where(dead, 1.0, diag))
    group_order = None
    if config.act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
    elif config.act_group_aware:
        perm, group_order = group_aware_perm(jnp.diagonal(h), plan.group)
    else:
        perm = jnp.arange(plan.k, dtype=jnp.int32)
    if config.act_order or config.act_group_aware:
        h = h[perm][:, perm]
    return Order(dead, perm, group_order, h)


def prepare(w: jax.Array, h: jax.Array | None, config: QuantConfig, plan: SolvePlan,
            order: Order | None = None) -> Prepared:
    """Dead inputs out, grids that are fixed before the solve fitted, columns put in visiting order (``order``:
    ``visiting_order(h)`` computed beforehand; ``h`` is then not read)."""
    k, g, kp = plan.k, plan.group, plan.kp
    w = w.astype(jnp.float32)
    order = visiting_order(h, config, plan) if order is None else order
    dead, perm, group_order, h = order
    w_live = jnp.where(dead[None, :], 0.0, w)  # a dead input gets a zero weight

    # Grids fixed before the solve: per-channel (on the weight as given, as the reference tools do) or static
    # groups (on the weight after dead inputs are zeroed).
    fixed_scales = fixed_zeros = col_group = None
    if config.group_size == -1:
        s, z = grid_params(w, config)
        fixed_scales, fixed_zeros = s[None, :], z[None, :]  # (1, N)
        col_group = jnp.zeros((kp,), jnp.int32)
    elif config.static_groups:
        s, z = group_grid_params(w_live, config)  # (N, G)
        fixed_scales, fixed_zeros = s.T, z.T  # (G, N)
    if config.act_order or config.act_group_aware:
        w_live = w_live[:, perm]
        dead = dead[perm]
    if config.static_groups and config.group_size != -1:
        col_group = jnp.pad(perm // g, (0, kp - k))  # grid of each visited column
    return Prepared(w_live, h, dead, perm, group_order, fixed_scales, fixed_zeros, col_group)


# ---------------------------------------------------------------------------------------------------------------
# What the sweep feeds back
# ---------------------------------------------------------------------------------------------------------------


class Feedback(NamedTuple):
    """What the blocked sweep runs on, padded to ``Kp`` columns; rows of ``[Kp, N]`` arrays are the paper's columns.

    Column ``j`` is quantized at the value ``wt[j] + sum_{i<j} (wt0[i] - deq_i) F_ij`` (``F^T = ft``, lower, unit
    diagonal); GPTQ starts from ``wt = wt0 = W^T``. ``rdiag`` weighs the proxy loss ``(w~_j - q_j)^2 R_jj^2 / 2``.
    To fit a group's grid on the paper's weights at the group's first column, the sweep maps its own state back
    with ``S = wt0 + Minv^T (wt - wt0 - PG^T wt0)`` per diagonal block, ``Minv`` the inverse of the block of the
    matrix ``G`` with ``F = G`` (GPTQ) or ``F = G - PG`` (GPTAQ, ``core.methods``).
    """

    wt: jax.Array  # (Kp, N)
    wt0: jax.Array  # (Kp, N)
    ft: jax.Array  # (Kp, Kp)
    rdiag: jax.Array  # (Kp,)
    minv_groups: jax.Array | None  # (Kp/g, g, g), Minv^T of each group's diagonal block
    pg_groups: jax.Array | None  # (Kp/g, g, g), PG^T of each group's diagonal block, None when PG = 0
    minv_fit: jax.Array | None  # (Kp/F, F, F), the same for fit blocks
    pg_fit: jax.Array | None


def _pad_square(a: jax.Array, kp: int, unit: bool) -> jax.Array:
    k = a.shape[0]
    if kp == k:
        return a
    a = jnp.pad(a, ((0, kp - k), (0, kp - k)))
    if unit:  # padding columns get a unit, uncoupled row: they quantize exactly and feed back nothing
        a = jnp.where(jnp.eye(kp, dtype=jnp.bool_) & (jnp.arange(kp) >= k)[None, :], 1.0, a)
    return a


def _diag_blocks(a: jax.Array, size: int) -> jax.Array:
    """The diagonal ``[size, size]`` blocks of ``a`` ``[Kp, Kp]``: ``(Kp / size, size, size)``."""
    nb = a.shape[0] // size
    return a.reshape(nb, size, nb, size)[jnp.arange(nb), :, jnp.arange(nb)]


def _block_inverses_t(gt: jax.Array, size: int) -> jax.Array:
    """``(G_BB^-1)^T`` of every diagonal block, ``gt = G^T`` lower with a unit diagonal: K size^2 flops."""
    blocks = _diag_blocks(gt, size)  # (nB, s, s), lower
    eye = jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), blocks.shape)
    return jax.scipy.linalg.solve_triangular(blocks, eye, lower=True, unit_diagonal=True)


def make_feedback(
    wt: jax.Array, wt0: jax.Array, ft: jax.Array, rdiag: jax.Array, plan: SolvePlan,
    gt: jax.Array | None = None, pgt: jax.Array | None = None, minv: tuple | None = None,
) -> Feedback:  # fmt: skip
    """Pads the sweep's inputs (``[K, N]`` states, ``[K, K]`` matrices) to ``Kp`` and forms the diagonal blocks
    that group fits need. ``gt`` (``G^T``) defaults to ``ft``; ``pgt`` (``PG^T``) to zero; ``minv``: the inverses
    of ``G``'s diagonal blocks formed beforehand (``group_inverses``)."""
    kp, k = plan.kp, plan.k
    pad = ((0, kp - k), (0, 0))
    ft = _pad_square(ft, kp, unit=True)
    gt = ft if gt is None else _pad_square(gt, kp, unit=True)
    pgt = None if pgt is None else _pad_square(pgt, kp, unit=False)
    rdiag = jnp.pad(rdiag, (0, kp - k), constant_values=1.0)
    minv_g, minv_f = group_inverses(gt, plan) if minv is None else minv
    pg_g = pg_f = None
    if plan.dynamic_groups and pgt is not None:
        pg_g = _diag_blocks(pgt, plan.group)
        pg_f = _diag_blocks(pgt, plan.fit_block) if plan.fit_block else None
    return Feedback(jnp.pad(wt, pad), jnp.pad(wt0, pad), ft, rdiag, minv_g, pg_g, minv_f, pg_f)


def group_inverses(gt: jax.Array, plan: SolvePlan) -> tuple[jax.Array | None, jax.Array | None]:
    """``(Minv^T`` of each group's diagonal block of ``gt`` (``[K, K]``, or already padded to ``[Kp, Kp]``), the same
    for fit blocks``)``;
    None where the grids are not fitted during the sweep.

    A group's grid is fitted on its columns as the paper's loop has them at the group's first column. The F-form
    sweep holds other values there (the same ones by the time each column is quantized, not before), so the
    diagonal blocks that map one to the other are formed here: K g^2 flops."""
    if not plan.dynamic_groups:
        return None, None
    gt = _pad_square(gt, plan.kp, unit=True)  # a no-op when already padded
    return _block_inverses_t(gt, plan.group), _block_inverses_t(gt, plan.fit_block) if plan.fit_block else None


class HessianFactor(NamedTuple):
    """What a GPTQ solve needs from ``H`` alone (``hessian_factor``), so that solves of several row blocks against
    one ``H`` (``engine.sharding``) can share one factorization."""

    order: Order
    ft: jax.Array  # (K, K) f32: F^T, lower (see ``damped_factor``)
    rdiag: jax.Array  # (K,) f32: diag R
    damp: jax.Array  # f32 []: the damping used
    ok: jax.Array  # bool []: False where no damping made H positive definite (the solve is then RTN)
    minv: tuple  # ``group_inverses`` of F^T


def hessian_factor(h: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT) -> HessianFactor:
    """The part of GPTQ's solve that depends on ``h`` ``[K, K]`` alone: dead inputs, the visiting order, the
    damped Cholesky factor and the inverses of its diagonal blocks. Every LAPACK call of the solve is here (XLA:CPU
    runs batched LAPACK kernels on the pool that also runs each device's program, so several devices calling them
    at once can take every thread and wait forever: ``engine.sharding`` therefore calls this once, on one device,
    and hands the result to every device)."""
    plan = solve_plan(h.shape[0], config, group_fit)
    order = visiting_order(h, config, plan)
    ft, rdiag, damp, ok = damped_factor(order.h, config.damp_percent)  # ft = F^T, lower
    return HessianFactor(order, ft, rdiag, damp, ok, group_inverses(ft, plan))


def _paper_state(w0: jax.Array, wt: jax.Array, minv_t: jax.Array, pg_t: jax.Array | None) -> jax.Array:
    """The paper's weights of a block at the block's first column, from the sweep's state there (``Feedback``)."""
    fed = wt - w0  # (B, N)
    if pg_t is not None:
        fed = fed - jnp.matmul(pg_t, w0, precision=_HIGHEST)
    return w0 + jnp.matmul(minv_t, fed, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------------------------
# The blocked sweep (GPTQ, Alg. 1 with lazy batch updates)
# ---------------------------------------------------------------------------------------------------------------


class _Grids(NamedTuple):
    cur_s: jax.Array  # (N,) the grid of the group being solved (dynamic groups)
    cur_z: jax.Array
    scales: jax.Array  # (G, N) every group's grid, in visiting order
    zeros: jax.Array


def _columns(c0, wt_b, w0_b, ft_b, r_b, grid, loss, prep: Prepared, plan: SolvePlan, config: QuantConfig):
    """Columns c0 .. c0+b-1, one at a time (GPTQ, Alg. 1 inner loop).

    wt_b (b, N) as updated, w0_b (b, N) the drivers, ft_b (b, b) the block of F^T, r_b (b,) diag R.
    Returns the codes and ``D = W0 - dequant(Q)`` of the sub-block, and the loss.
    """
    maxq = float(config.maxq)

    def column(j, carry):
        wt_b, q_b, d_b, loss = carry
        w_j = wt_b[j]  # (N,)
        if plan.dynamic_groups:
            s, z = grid.cur_s, grid.cur_z
        else:
            s, z = prep.fixed_scales[prep.col_group[c0 + j]], prep.fixed_zeros[prep.col_group[c0 + j]]
        q = jnp.clip(jnp.round(true_div(w_j, s)) + z, 0.0, maxq)
        deq = s * (q - z)
        err = w_j - deq
        loss = loss + 0.5 * (err * err) * (r_b[j] * r_b[j])  # (N,): a loss per output row
        d = w0_b[j] - deq
        wt_b = wt_b + ft_b[:, j][:, None] * d[None, :]  # rank-1 feedback; F^T is lower, earlier rows keep
        return wt_b, q_b.at[j].set(q.astype(CODE_DTYPE)), d_b.at[j].set(d), loss

    init = (wt_b, jnp.zeros(wt_b.shape, CODE_DTYPE), jnp.zeros_like(wt_b), loss)
    _, q_b, d_b, loss = lax.fori_loop(0, plan.sub, column, init, unroll=_UNROLL)
    return q_b, d_b, loss


def _refit(grid: _Grids, gi, w_g: jax.Array, config: QuantConfig) -> _Grids:
    """Fit group ``gi``'s grid on its weights ``w_g`` (g, N) and make it the current one."""
    s, z = grid_params(w_g.T, config)  # (N,)
    return _Grids(s, z, grid.scales.at[gi].set(s), grid.zeros.at[gi].set(z))


def _block(c0, wt_blk, w0_blk, ft_blk, r_blk, grid, loss, fb: Feedback, prep: Prepared, plan: SolvePlan, config):
    """One block of B columns starting at global column c0 (i1 of the paper); wt_blk, w0_blk (B, N), ft_blk (B, B).
    Sub-blocks of b columns inside, each followed by one ``[B, b] @ [b, N]`` update of the block's later rows."""
    bsz, sub, g, fbs = plan.block, plan.sub, plan.group, plan.fit_block
    n = wt_blk.shape[1]

    def body(si, carry):
        wt_blk, q_blk, d_blk, grid, loss, paper_fb = carry
        l0 = si * sub
        if fbs:  # the paper's W of the fit block starting here, as at that block's start: (F, N)
            def fit_start():
                i = (c0 + l0) // fbs
                pg = None if fb.pg_fit is None else fb.pg_fit[i]
                return _paper_state(lax.dynamic_slice_in_dim(w0_blk, l0, fbs),
                                    lax.dynamic_slice_in_dim(wt_blk, l0, fbs), fb.minv_fit[i], pg)  # fmt: skip

            paper_fb = lax.cond(l0 % fbs == 0, fit_start, lambda: paper_fb)
        if plan.dynamic_groups:

            def refit(grid):
                gi = (c0 + l0) // g
                if fbs:
                    w_g = lax.dynamic_slice_in_dim(paper_fb, l0 % fbs, g)  # (g, N)
                else:
                    pg = None if fb.pg_groups is None else fb.pg_groups[gi]
                    w_g = _paper_state(lax.dynamic_slice_in_dim(w0_blk, l0, g),
                                       lax.dynamic_slice_in_dim(wt_blk, l0, g), fb.minv_groups[gi], pg)  # fmt: skip
                return _refit(grid, gi, w_g, config)

            grid = lax.cond((c0 + l0) % g == 0, refit, lambda grid: grid, grid)
        q_b, d_b, loss = _columns(
            c0 + l0, lax.dynamic_slice_in_dim(wt_blk, l0, sub), lax.dynamic_slice_in_dim(w0_blk, l0, sub),
            lax.dynamic_slice(ft_blk, (l0, l0), (sub, sub)), lax.dynamic_slice_in_dim(r_blk, l0, sub),
            grid, loss, prep, plan, config,
        )  # fmt: skip
        # Lazy update of the rest of the block: rows after this sub-block only.
        cols = lax.dynamic_slice_in_dim(ft_blk, l0, sub, axis=1)  # (B, b)
        cols = jnp.where(jnp.arange(bsz)[:, None] >= l0 + sub, cols, 0.0)
        wt_blk = wt_blk + jnp.matmul(cols, d_b, precision=_HIGHEST)  # (B, N)
        q_blk = lax.dynamic_update_slice_in_dim(q_blk, q_b, l0, 0)
        d_blk = lax.dynamic_update_slice_in_dim(d_blk, d_b, l0, 0)
        return wt_blk, q_blk, d_blk, grid, loss, paper_fb

    init = (wt_blk, jnp.zeros((bsz, n), CODE_DTYPE), jnp.zeros_like(wt_blk), grid, loss, jnp.zeros((fbs, n)))
    _, q_blk, d_blk, grid, loss, _ = lax.fori_loop(0, bsz // sub, body, init)
    return q_blk, d_blk, grid, loss


def sweep(fb: Feedback, prep: Prepared, plan: SolvePlan, config: QuantConfig) -> tuple[jax.Array, _Grids, jax.Array]:
    """All columns in visiting order: codes ``(K, N)``, the grids, and the proxy loss per output row ``(N,)``.

    Super-blocks of S columns (a Python loop), blocks of B (the paper's ``blocksize``; ``i1, i2`` its bounds) inside:
    after each block one ``[S, B] @ [B, N]`` update of the super-block, after each super-block the exact trailing
    update ``Wt[s2:] += F^T[s2:, s1:s2] @ D`` with static shapes (the paper's ``W[:, i2:] -= Err1 Hinv[i1:i2, i2:]``).
    """
    n = fb.wt.shape[1]
    groups_p = plan.kp // plan.group if plan.dynamic_groups else 1
    grid = _Grids(jnp.ones((n,)), jnp.zeros((n,)), jnp.zeros((groups_p, n)), jnp.zeros((groups_p, n)))
    loss = jnp.zeros((n,), jnp.float32)
    wt, q_parts = fb.wt, []
    for s1 in range(0, plan.kp, plan.superblock):
        s2 = min(s1 + plan.superblock, plan.kp)
        size = s2 - s1
        w0_s, ft_s, r_s = fb.wt0[s1:s2], fb.ft[s1:s2, s1:s2], fb.rdiag[s1:s2]

        def block_body(bi, carry, s1=s1, size=size, w0_s=w0_s, ft_s=ft_s, r_s=r_s):
            wt_s, q_s, d_s, grid, loss = carry
            i1 = bi * plan.block
            q_blk, d_blk, grid, loss = _block(
                s1 + i1, lax.dynamic_slice_in_dim(wt_s, i1, plan.block), lax.dynamic_slice_in_dim(w0_s, i1, plan.block),
                lax.dynamic_slice(ft_s, (i1, i1), (plan.block, plan.block)),
                lax.dynamic_slice_in_dim(r_s, i1, plan.block), grid, loss, fb, prep, plan, config,
            )  # fmt: skip
            cols = lax.dynamic_slice_in_dim(ft_s, i1, plan.block, axis=1)  # (S, B)
            cols = jnp.where(jnp.arange(size)[:, None] >= i1 + plan.block, cols, 0.0)
            wt_s = wt_s + jnp.matmul(cols, d_blk, precision=_HIGHEST)  # (S, N)
            q_s = lax.dynamic_update_slice_in_dim(q_s, q_blk, i1, 0)
            d_s = lax.dynamic_update_slice_in_dim(d_s, d_blk, i1, 0)
            return wt_s, q_s, d_s, grid, loss

        init = (wt[s1:s2], jnp.zeros((size, n), CODE_DTYPE), jnp.zeros((size, n), jnp.float32), grid, loss)
        _, q_s, d_s, grid, loss = lax.fori_loop(0, size // plan.block, block_body, init)
        q_parts.append(q_s)
        if s2 < plan.kp:
            # Exact trailing update with static shapes (GPTQ, Alg. 1, lazy batch update).
            wt = wt.at[s2:].add(jnp.matmul(fb.ft[s2:, s1:s2], d_s, precision=_HIGHEST))
    return jnp.concatenate(q_parts, axis=0)[: plan.k], grid, loss


# ---------------------------------------------------------------------------------------------------------------
# Assemble
# ---------------------------------------------------------------------------------------------------------------


def assemble(
    codes_perm: jax.Array, grid: _Grids, loss: jax.Array, damp: jax.Array, ok: jax.Array,
    prep: Prepared, plan: SolvePlan, config: QuantConfig,
) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """The sweep's codes ``(K, N)`` and grids, un-permuted into a ``QuantizedWeight``; and the loss per row."""
    k, g = plan.k, plan.group
    perm = prep.perm
    if plan.dynamic_groups:
        groups = config.groups(k)
        scales, zeros = grid.scales[:groups], grid.zeros[:groups]  # (G, N), in visiting order
        if config.act_group_aware:
            # Visited group i is the original group group_order[i]: store each grid under its own group, and
            # every column keeps its own group, so g_idx is k // g.
            scales = jnp.zeros_like(scales).at[prep.group_order].set(scales)
            zeros = jnp.zeros_like(zeros).at[prep.group_order].set(zeros)
            g_idx_perm = perm // g
        else:
            g_idx_perm = (jnp.arange(k) // g).astype(jnp.int32)
    else:
        scales, zeros = prep.fixed_scales, prep.fixed_zeros
        g_idx_perm = prep.col_group[:k]
    if config.act_order or config.act_group_aware:
        inv = jnp.argsort(perm)
        codes, g_idx = codes_perm[inv], g_idx_perm[inv]
    else:
        codes, g_idx = codes_perm, g_idx_perm
    qw = QuantizedWeight(
        codes=codes.T, scales=scales.T, zeros=zeros.T.astype(jnp.int32), g_idx=g_idx,
        perm=perm if config.act_order else None, loss=jnp.sum(loss), damp=damp, fallback=~ok,
        bits=config.bits, group_size=g, sym=config.sym,
    )  # fmt: skip
    return qw, loss


def gptq_solve(
    w: jax.Array, h: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT
) -> tuple[QuantizedWeight, jax.Array]:
    """The solve: the ``QuantizedWeight`` and the proxy loss of each output row ``[N]`` (its ``loss`` is their sum).
    Traceable (``jitted_solver`` is its jitted form); ``quantize_weight`` is the checked entry. The part that reads
    ``h`` alone is ``hessian_factor`` (``core.methods.method_factor`` shares it between row blocks on a mesh)."""
    plan = solve_plan(w.shape[1], config, group_fit)
    f = hessian_factor(h, config, group_fit)
    prep = prepare(w, None, config, plan, f.order)
    wt = prep.w.T  # (K, N)
    codes, grid, loss = sweep(make_feedback(wt, wt, f.ft, f.rdiag, plan, minv=f.minv), prep, plan, config)
    return assemble(codes, grid, loss, f.damp, f.ok, prep, plan, config)


def jitted_solver() -> Any:
    """``gptq_solve`` jitted for the default backend, returning ``(QuantizedWeight, loss per row)``
    (``jitted_solver().lower(w, h, config)`` compiles it ahead of time)."""
    return _gptq_cpu if jax.default_backend() == "cpu" else _gptq_jit


# XLA:CPU's default scheduler favours concurrency and keeps many K x K and K x N temporaries live at once; its
# memory-optimized scheduler halves the temp buffer of a 4096x4096 solve (422 -> 218 MB). XLA:CPU allocates that
# buffer afresh for every call and the kernel faults it in page by page (152k -> 70k faults per call), so the
# smaller buffer is also faster: 1.98 -> 1.81 s and 1.68 -> 1.62 s in two interleaved runs on the 2-core CPU.
CPU_SOLVE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_gptq_jit = jax.jit(gptq_solve, static_argnames=("config", "group_fit"))
_gptq_cpu = jax.jit(gptq_solve, static_argnames=("config", "group_fit"), compiler_options=CPU_SOLVE_OPTIONS)
_stacked_jit = jax.jit(_stacked, static_argnames=("config",))
_stacked_cpu = jax.jit(_stacked, static_argnames=("config",), compiler_options=CPU_SOLVE_OPTIONS)
