"""GPTQ for one linear layer: ``quantize_weight(w, h, config) -> QuantizedWeight``.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022), Algorithm 1. Notation follows the paper: ``W`` is ``[N out, K in]``, ``H`` is
``2/n X X^T`` over calibration inputs, and ``U`` is the upper Cholesky factor of ``H^-1``, whose rows
give the error feedback of each quantized column onto the columns after it.

The same numbers come from one Cholesky factorization of ``H`` and no inverse: with ``H = R R^T``
(``R`` upper), ``U = R^-1``, and each column by the time it is quantized is its original value plus
``sum_{i<j} (w_i - q_i) R_ij / R_jj`` (see ``_damped_factor``). The solve feeds back the original weights
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
    _count_nonfinite,
    _true_div,
    check_weight,
    grid_params,
    group_grid_params,
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
    bad = _count_nonfinite(h)
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
    out = _gptq(w, h, config)
    log_damping(out, tuple(w.shape), config)
    return out


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
    ws = [jnp.asarray(w) for w in ws]
    if not ws:
        return []
    h = jnp.asarray(h)
    for w in ws:
        check_weight(w, config)
        check_hessian(w, h)
    out: list[QuantizedWeight] = []
    solve = _stacked_cpu if jax.default_backend() == "cpu" else _stacked_jit
    for part in fused_parts([int(w.shape[0]) for w in ws], int(h.shape[0])):
        qws = solve(tuple(ws[i] for i in part), h, config)  # one program: stack, solve, cut apart
        log_damping(qws[0], (sum(int(ws[i].shape[0]) for i in part), int(h.shape[0])), config)
        out.extend(qws)
    return out


def _stacked(ws: tuple[jax.Array, ...], h: jax.Array, config: QuantConfig) -> list[QuantizedWeight]:
    w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=0)
    return split_rows(*_gptq_impl(w, h, config), [int(x.shape[0]) for x in ws])


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


def _set_diagonal(a: jax.Array, d: jax.Array) -> jax.Array:
    """``a`` with its diagonal replaced by ``d``: a scatter of K values, not a pass over K^2."""
    i = jnp.arange(a.shape[0])
    return a.at[i, i].set(d, unique_indices=True)


def _damped_factor(h: jax.Array, damp_percent: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
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
class _Plan:
    """Static block sizes for one solve (see the module docstring)."""

    k: int  # real columns
    kp: int  # padded to a multiple of block
    sub: int
    block: int
    superblock: int
    group: int  # effective group size (K for per-channel)
    dynamic_groups: bool  # grids fitted during the solve, at each group's first column
    fit_block: int  # 0, or _FIT_BLOCK when mid-block groups are fitted on the weights at their fit block's start


def _plan(k: int, config: QuantConfig, group_fit: str = GROUP_FIT) -> _Plan:
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
    return _Plan(
        k=k, kp=kp, sub=sub, block=block, superblock=superblock, group=g, dynamic_groups=dynamic, fit_block=fit_block
    )


def _solver() -> Any:
    """The jitted solve for the default backend, returning ``(QuantizedWeight, loss per row)``
    (``_solver().lower(w, h, config)`` compiles it ahead of time)."""
    return _gptq_cpu if jax.default_backend() == "cpu" else _gptq_jit


def _gptq(w: jax.Array, h: jax.Array, config: QuantConfig) -> QuantizedWeight:
    return _solver()(w, h, config)[0]


class HessianFactor(NamedTuple):
    """What a solve needs from ``H`` alone (``hessian_factor``), so that solves of several row blocks against one
    ``H`` (``engine.sharding``) can share one factorization. ``K`` real columns, ``Kp`` padded (see ``_plan``)."""

    dead: jax.Array  # bool [K]: inputs that never fire (zero diagonal)
    perm: jax.Array  # int32 [K]: visiting order (the identity without act-order)
    group_order: jax.Array | None  # int32 [ceil(K / g)]: with act_group_aware, the group visited at each position
    ft: jax.Array  # float32 (Kp, Kp): F^T, lower (see ``_damped_factor``)
    rdiag: jax.Array  # float32 [Kp]: diag R
    damp: jax.Array  # float32 []: the damping used
    ok: jax.Array  # bool []: False where no damping made H positive definite (the solve is then RTN)
    u_groups: jax.Array | None  # float32 (G, g, g): diagonal blocks of U, for grids fitted during the solve
    u_fit: jax.Array | None  # float32 (nF, F, F): the same for fit blocks (group_fit "block_start")


def hessian_factor(h: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT) -> HessianFactor:
    """The part of the solve that depends on ``h`` ``[K, K]`` alone: dead inputs, the visiting order, the damped
    Cholesky factor and, for grids fitted during the solve, the inverses of its diagonal blocks. Every LAPACK call
    of the solve is here (XLA:CPU runs batched LAPACK kernels on the pool that also runs each device's program, so
    several devices calling them at once can take every thread and wait forever: ``engine.sharding`` therefore
    calls this once, on one device, and hands the result to every device)."""
    if group_fit not in GROUP_FITS:
        raise ValueError(f"group_fit={group_fit!r} is not one of {GROUP_FITS}")
    k = h.shape[0]
    plan = _plan(k, config, group_fit)
    g, kp = plan.group, plan.kp
    h = h.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0.0
    h = _set_diagonal(h, jnp.where(dead, 1.0, diag))  # a dead input gets a unit diagonal
    group_order = None
    if config.act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
    elif config.act_group_aware:
        perm, group_order = group_aware_perm(jnp.diagonal(h), g)
    else:
        perm = jnp.arange(k, dtype=jnp.int32)
    if config.act_order or config.act_group_aware:
        h = h[perm][:, perm]
    ft, rdiag, damp, ok = _damped_factor(h, config.damp_percent)  # ft = F^T, lower
    if kp > k:
        ft = jnp.pad(ft, ((0, kp - k), (0, kp - k)))
        ft = jnp.where(jnp.eye(kp, dtype=jnp.bool_) & (jnp.arange(kp) >= k)[None, :], 1.0, ft)
        rdiag = jnp.pad(rdiag, (0, kp - k), constant_values=1.0)
    u_groups = u_fit = None
    if plan.dynamic_groups:
        # A group's grid is fitted on its columns as the paper's loop has them at the group's first column:
        # w_G + A U_GG, with A the feedback from earlier columns and U_GG = R_GG^-1 the group's diagonal
        # block of U. The F-form loop holds w_G + A diag(R_GG)^-1 instead (the same numbers by the time
        # each column is quantized, not before), so the diagonal blocks of U are formed here: K g^2 flops.
        groups_p = kp // g
        ft_blocks = ft.reshape(groups_p, g, groups_p, g)[jnp.arange(groups_p), :, jnp.arange(groups_p)]  # (G, g, g)
        r_blocks = jnp.swapaxes(ft_blocks, 1, 2) * rdiag.reshape(groups_p, 1, g)
        eye_g = jnp.broadcast_to(jnp.eye(g, dtype=jnp.float32), r_blocks.shape)
        u_groups = jax.scipy.linalg.solve_triangular(r_blocks, eye_g, lower=False)  # (G, g, g)
        if plan.fit_block:
            # The same recovery for whole fit blocks: the paper's W of a block at the block's start is
            # w_B + A U_BB, A the feedback from the columns before the block.
            fb = plan.fit_block
            nb = kp // fb
            ft_bb = ft.reshape(nb, fb, nb, fb)[jnp.arange(nb), :, jnp.arange(nb)]  # (nF, F, F)
            r_bb = jnp.swapaxes(ft_bb, 1, 2) * rdiag.reshape(nb, 1, fb)
            eye_b = jnp.broadcast_to(jnp.eye(fb, dtype=jnp.float32), r_bb.shape)
            u_fit = jax.scipy.linalg.solve_triangular(r_bb, eye_b, lower=False)  # (nF, F, F)
    return HessianFactor(dead, perm, group_order, ft, rdiag, damp, ok, u_groups, u_fit)


def _gptq_impl(
    w: jax.Array, h: jax.Array | None, config: QuantConfig, group_fit: str = GROUP_FIT,
    factor: HessianFactor | None = None,
) -> tuple[QuantizedWeight, jax.Array]:
    """The solve: the ``QuantizedWeight`` and the proxy loss of each output row ``[N]`` (its ``loss`` is their sum).
    ``factor``: ``hessian_factor(h, config, group_fit)`` computed beforehand (``h`` is then not read)."""
    if group_fit not in GROUP_FITS:
        raise ValueError(f"group_fit={group_fit!r} is not one of {GROUP_FITS}")
    n, k = w.shape
    plan = _plan(k, config, group_fit)
    g, kp = plan.group, plan.kp
    maxq = float(config.maxq)
    w = w.astype(jnp.float32)
    if factor is None:
        factor = hessian_factor(h, config, group_fit)
    perm, ft, rdiag, u_groups, u_fit = factor.perm, factor.ft, factor.rdiag, factor.u_groups, factor.u_fit
    # Inputs that never fire carry no information: a zero weight (their Hessian row is a unit one).
    w_live = jnp.where(factor.dead[None, :], 0.0, w)

    # Grids that are fixed before the solve: per-channel (on the weight as given, as the reference
    # tools do) or static groups (on the weight after dead inputs are zeroed).
    if config.group_size == -1:
        s, z = grid_params(w, config)
        fixed_scales, fixed_zeros = s[None, :], z[None, :]  # [1, N]
        col_group = jnp.zeros((kp,), jnp.int32)
    elif config.static_groups:
        s, z = group_grid_params(w_live, config)  # [N, G]
        fixed_scales, fixed_zeros = s.T, z.T  # [G, N]
    reorder = config.act_order or config.act_group_aware
    if reorder:
        w_live = w_live[:, perm]
    if config.static_groups and config.group_size != -1:
        col_group = jnp.pad(perm // g, (0, kp - k))  # grid of each visited column

    # Padding columns have w = 0 and a unit, uncoupled row in F: they quantize exactly and feed back nothing.
    wt = jnp.pad(w_live.T, ((0, kp - k), (0, 0)))  # (Kp, N), updated as the solve goes
    wt0 = wt  # the weights as given: the feedback is driven by wt0 - dequant(q)
    groups_p = kp // g if plan.dynamic_groups else 1
    grid = (
        jnp.ones((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((groups_p, n), jnp.float32),
        jnp.zeros((groups_p, n), jnp.float32),
    )

    def column_grid(c, grid):
        if plan.dynamic_groups:
            return grid[0], grid[1]
        return fixed_scales[col_group[c]], fixed_zeros[col_group[c]]

    def solve_sub(c0, wt_b, w0_b, ft_b, r_b, grid, loss):
        """Columns c0 .. c0+b-1, one at a time (GPTQ, Alg. 1 inner loop).

        wt_b (b, N) as updated, w0_b (b, N) as given, ft_b (b, b) the block of F^T, r_b (b,) diag R.
        Returns the codes and ``D = W0 - dequant(Q)`` for the sub-block.
        """

        def column(j, carry):
            wt_b, q_b, d_b, loss = carry
            w_j = wt_b[j]  # (N,)
            s, z = column_grid(c0 + j, grid)
            q = jnp.clip(jnp.round(_true_div(w_j, s)) + z, 0.0, maxq)
            deq = s * (q - z)
            err = w_j - deq
            loss = loss + 0.5 * (err * err) * (r_b[j] * r_b[j])  # (N,): a loss per output row
            d = w0_b[j] - deq
            wt_b = wt_b + ft_b[:, j][:, None] * d[None, :]  # rank-1 feedback; F^T is lower, earlier rows keep
            return wt_b, q_b.at[j].set(q.astype(CODE_DTYPE)), d_b.at[j].set(d), loss

        init = (wt_b, jnp.zeros(wt_b.shape, CODE_DTYPE), jnp.zeros_like(wt_b), loss)
        _, q_b, d_b, loss = lax.fori_loop(0, plan.sub, column, init, unroll=_UNROLL)
        return q_b, d_b, loss

    def solve_block(c0, wt_blk, w0_blk, ft_blk, r_blk, q_blk, grid, loss):
        """One block of B columns starting at global column c0; wt_blk, w0_blk (B, N), ft_blk (B, B)."""
        bsz, sub = plan.block, plan.sub
        d_blk = jnp.zeros_like(wt_blk)
        fb = plan.fit_block

        def fit_block_start(l0, wt_blk):
            """The paper's W of the fit block starting at local column l0, as at that block's start: (F, N)."""
            w0_f = lax.dynamic_slice_in_dim(w0_blk, l0, fb)
            r_f = lax.dynamic_slice_in_dim(r_blk, l0, fb)
            fed = (lax.dynamic_slice_in_dim(wt_blk, l0, fb) - w0_f) * r_f[:, None]  # (F, N)
            return w0_f + jnp.matmul(u_fit[(c0 + l0) // fb].T, fed, precision=_HIGHEST)

        def body(si, carry):
            wt_blk, q_blk, d_blk, grid, loss, paper_fb = carry
            l0 = si * sub
            if fb:
                paper_fb = lax.cond(l0 % fb == 0, lambda: fit_block_start(l0, wt_blk), lambda: paper_fb)
            if plan.dynamic_groups:

                def refit(grid):
                    cur, zcur, scales, zeros = grid
                    gi = (c0 + l0) // g
                    if fb:
                        w_g = lax.dynamic_slice_in_dim(paper_fb, l0 % fb, g)  # (g, N)
                    else:
                        w0_g = lax.dynamic_slice_in_dim(w0_blk, l0, g)  # (g, N)
                        r_g = lax.dynamic_slice_in_dim(r_blk, l0, g)  # (g,)
                        fed = (lax.dynamic_slice_in_dim(wt_blk, l0, g) - w0_g) * r_g[:, None]  # A^T, (g, N)
                        w_g = w0_g + jnp.matmul(u_groups[gi].T, fed, precision=_HIGHEST)
                    s, z = grid_params(w_g.T, config)  # (N,)
                    return s, z, scales.at[gi].set(s), zeros.at[gi].set(z)

                grid = lax.cond((c0 + l0) % g == 0, refit, lambda grid: grid, grid)
            wt_b = lax.dynamic_slice_in_dim(wt_blk, l0, sub)  # (b, N)
            w0_b = lax.dynamic_slice_in_dim(w0_blk, l0, sub)
            ft_b = lax.dynamic_slice(ft_blk, (l0, l0), (sub, sub))
            r_b = lax.dynamic_slice_in_dim(r_blk, l0, sub)
            q_b, d_b, loss = solve_sub(c0 + l0, wt_b, w0_b, ft_b, r_b, grid, loss)
            # Lazy update of the rest of the block: rows after this sub-block only.
            cols = lax.dynamic_slice_in_dim(ft_blk, l0, sub, axis=1)  # (B, b)
            cols = jnp.where(jnp.arange(bsz)[:, None] >= l0 + sub, cols, 0.0)
            wt_blk = wt_blk + jnp.matmul(cols, d_b, precision=_HIGHEST)  # (B, N)
            q_blk = lax.dynamic_update_slice_in_dim(q_blk, q_b, l0, 0)
            d_blk = lax.dynamic_update_slice_in_dim(d_blk, d_b, l0, 0)
            return wt_blk, q_blk, d_blk, grid, loss, paper_fb

        paper_fb = jnp.zeros((fb, n), jnp.float32)
        init = (wt_blk, q_blk, d_blk, grid, loss, paper_fb)
        _, q_blk, d_blk, grid, loss, _ = lax.fori_loop(0, bsz // sub, body, init)
        return q_blk, d_blk, grid, loss

    loss = jnp.zeros((n,), jnp.float32)
    q_parts = []
    for s1 in range(0, kp, plan.superblock):
        s2 = min(s1 + plan.superblock, kp)
        size = s2 - s1
        wt_s = wt[s1:s2]  # (S, N)
        w0_s = wt0[s1:s2]
        ft_s = ft[s1:s2, s1:s2]
        r_s = rdiag[s1:s2]

        def block_body(bi, carry, s1=s1, size=size, w0_s=w0_s, ft_s=ft_s, r_s=r_s):
            wt_s, q_s, d_s, grid, loss = carry
            i1 = bi * plan.block
            wt_blk = lax.dynamic_slice_in_dim(wt_s, i1, plan.block)
            w0_blk = lax.dynamic_slice_in_dim(w0_s, i1, plan.block)
            ft_blk = lax.dynamic_slice(ft_s, (i1, i1), (plan.block, plan.block))
            r_blk = lax.dynamic_slice_in_dim(r_s, i1, plan.block)
            q_blk = jnp.zeros((plan.block, n), CODE_DTYPE)
            q_blk, d_blk, grid, loss = solve_block(s1 + i1, wt_blk, w0_blk, ft_blk, r_blk, q_blk, grid, loss)
            cols = lax.dynamic_slice_in_dim(ft_s, i1, plan.block, axis=1)  # (S, B)
            cols = jnp.where(jnp.arange(size)[:, None] >= i1 + plan.block, cols, 0.0)
            wt_s = wt_s + jnp.matmul(cols, d_blk, precision=_HIGHEST)  # (S, N)
            q_s = lax.dynamic_update_slice_in_dim(q_s, q_blk, i1, 0)
            d_s = lax.dynamic_update_slice_in_dim(d_s, d_blk, i1, 0)
            return wt_s, q_s, d_s, grid, loss

        init = (wt_s, jnp.zeros((size, n), CODE_DTYPE), jnp.zeros((size, n), jnp.float32), grid, loss)
        _, q_s, d_s, grid, loss = lax.fori_loop(0, size // plan.block, block_body, init)
        q_parts.append(q_s)
        if s2 < kp:
            # Exact trailing update with static shapes (GPTQ, Alg. 1, lazy batch update).
            wt = wt.at[s2:].add(jnp.matmul(ft[s2:, s1:s2], d_s, precision=_HIGHEST))

    codes_perm = jnp.concatenate(q_parts, axis=0)[:k]  # (K, N), visiting order
    groups = config.groups(k)
    if plan.dynamic_groups:
        scales, zeros = grid[2][:groups], grid[3][:groups]  # (G, N), in visiting order
        if config.act_group_aware:
            # Visited group i is the original group group_order[i]: store each grid under its own group, and
            # every column keeps its own group, so g_idx is k // g.
            scales = jnp.zeros_like(scales).at[factor.group_order].set(scales)
            zeros = jnp.zeros_like(zeros).at[factor.group_order].set(zeros)
            g_idx_perm = perm // g
        else:
            g_idx_perm = (jnp.arange(k) // g).astype(jnp.int32)
    else:
        scales, zeros = fixed_scales, fixed_zeros
        g_idx_perm = col_group[:k]
    if reorder:
        inv = jnp.argsort(perm)
        codes = codes_perm[inv]
        g_idx = g_idx_perm[inv]
    else:
        codes, g_idx = codes_perm, g_idx_perm
    qw = QuantizedWeight(
        codes=codes.T,
        scales=scales.T,
        zeros=zeros.T.astype(jnp.int32),
        g_idx=g_idx,
        perm=perm if config.act_order else None,
        loss=jnp.sum(loss),
        damp=factor.damp,
        fallback=~factor.ok,
        bits=config.bits,
        group_size=g,
        sym=config.sym,
    )
    return qw, loss


# XLA:CPU's default scheduler favours concurrency and keeps many K x K and K x N temporaries live at once; its
# memory-optimized scheduler halves the temp buffer of a 4096x4096 solve (422 -> 218 MB). XLA:CPU allocates that
# buffer afresh for every call and the kernel faults it in page by page (152k -> 70k faults per call), so the
# smaller buffer is also faster: 1.98 -> 1.81 s and 1.68 -> 1.62 s in two interleaved runs on the 2-core CPU.
CPU_SOLVE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_gptq_jit = jax.jit(_gptq_impl, static_argnames=("config", "group_fit"))
_gptq_cpu = jax.jit(_gptq_impl, static_argnames=("config", "group_fit"), compiler_options=CPU_SOLVE_OPTIONS)
_stacked_jit = jax.jit(_stacked, static_argnames=("config",))
_stacked_cpu = jax.jit(_stacked, static_argnames=("config",), compiler_options=CPU_SOLVE_OPTIONS)
