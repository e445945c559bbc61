"""GPTAQ and Qronos: GPTQ's sweep fitted to the float model's outputs instead of the layer's own.

GPTQ fits each layer to its own float output on the inputs that come out of the already quantized earlier layers,
``min ||W X_q - Q X_q||``. Both methods here fit it to the float model's output on the float model's inputs,
``min ||W X_fp - Q X_q||``, so that a layer corrects some of the error the layers before it made. Besides
``H = 2/n X_q X_q^T`` they need one more ``[K, K]`` statistic, ``D = 2/n (X_fp - X_q) X_q^T`` (rows index the
float-minus-quantized input, columns the quantized input; ``hessian.accumulate_cross``). With ``D = 0`` (the
same inputs) both are exactly GPTQ. Both write the same ``QuantizedWeight`` as GPTQ (codes, scales, zeros), so
every checkpoint writer and kernel takes their output unchanged.

**GPTAQ** (Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025,
arXiv 2504.02692). When column ``j`` is quantized, the later columns ``F`` compensate both its rounding error and
its share of the asymmetry, ``w_j (x_fp,j - x_q,j)``: the paper's column loop becomes

    Err_j = (W_j - Q_j) / U_jj,    W_F -= Err_j U_jF - W_j P_jF,    P = alpha triu(D U^T, 1) U,

with ``U`` the upper Cholesky factor of ``H^-1``; ``alpha`` scales ``D`` (0.25 by default, the paper's authors'
choice; ``alpha = 0`` is GPTQ). The sweep of ``core.gptq`` runs a feedback of ``W0 - dequant(Q)`` through one
matrix; the same loop in that form, with ``M = diag(U)^-1 U - P`` and ``G = M^-1``, starts from
``W0 (I + P G)`` and feeds back through ``F = (I - P) G``. With ``R = U^-1``, ``T = triu(D U^T, 1)`` and
``N = (I - alpha diag(U) T)^-1``: ``G = R N diag(U)`` and ``P G = alpha T N diag(U)``, a few ``K^3`` flops.

**Qronos** (Zhang, Zhang, Colbert, Saab, "Qronos: Correcting the Past by Shaping the Future... in Post-Training
Quantization", arXiv 2505.11695). Column by column it alternates error correction (set column ``t`` to the value
that best fits the target given the columns already quantized) and diffusion (refit every later column by least
squares given the quantized ones). After the first column the later columns are already the least-squares fit, so
the correction is a no-op and the diffusion is GPTQ's update on ``H``: Qronos is GPTQ started from

    w'_1 = w_1 + (W D)_1 / H_11,    w'_F = w_F + ((W D)_F - (W D)_1 H_1F / H_11) H_FF^-1,

the first visited column corrected and the others refitted to it (``F`` the columns after the first). ``H`` is
damped as for GPTQ, which makes the target ``||W X_fp - Q X_q||^2 + lambda ||Q - W||^2``.

The grids that are fitted before the solve (per channel, static groups) are fitted on the weights as given, as for
GPTQ; group grids are fitted during the sweep on the method's own weights at the group's first column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.gptq import (
    CPU_SOLVE_OPTIONS,
    GROUP_FIT,
    Order,
    assemble,
    checked_group,
    damped_factor,
    fused_parts,
    gptq_solve,
    group_inverses,
    hessian_factor,
    log_damping,
    make_feedback,
    prepare,
    solve_plan,
    split_rows,
    sweep,
    visiting_order,
)
from gptq_jax.core.quantizer import QuantizedWeight, count_nonfinite

METHODS = ("gptq", "gptaq", "qronos")
# GPTAQ's scale of the cross term; its authors' code uses 0.25 (the paper does not state it).
GPTAQ_ALPHA = 0.25
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """Which solve fits a weight: ``"gptq"``, ``"gptaq"`` (with ``alpha``) or ``"qronos"``. Frozen and hashable,
    so it is a static argument of the jitted solves."""

    name: str = "gptq"
    alpha: float = GPTAQ_ALPHA

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method {self.name!r} is not one of {METHODS}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"GPTAQ alpha={self.alpha} must be in [0, 1]")

    @property
    def needs_cross(self) -> bool:
        """Whether the method reads the float/quantized cross term ``D``."""
        return self.name != "gptq"


class MethodFactor(NamedTuple):
    """What a method's solve takes from ``H`` and ``D`` alone (``method_factor``): every factorization and
    triangular solve, so that several row blocks solved against one ``H`` (``engine.sharding``) share it and the
    per-device programs run only matmuls and the sweep. Fields a method does not use are None."""

    order: Order
    damp: jax.Array  # f32 []: the damping used
    ok: jax.Array  # bool []: False where no damping made H positive definite (the solve is then RTN)
    rdiag: jax.Array  # (K,) diag R, H + damping = R R^T
    ft: jax.Array  # (K, K) the feedback matrix transposed: F^T (GPTQ, Qronos), (G - PG)^T (GPTAQ)
    minv: tuple  # ``group_inverses`` of G^T (F^T for GPTQ and Qronos)
    gt: jax.Array | None = None  # GPTAQ: G^T
    pgt: jax.Array | None = None  # GPTAQ: (P G)^T; the start is W0 (I + P G)
    d: jax.Array | None = None  # Qronos: D in visiting order, dead inputs zeroed
    h0: jax.Array | None = None  # Qronos: row 0 of the damped H in visiting order
    hinv_f: jax.Array | None = None  # Qronos: H_FF^-1 of the damped H (F: every column after the first)


def _visiting(a: jax.Array, order: Order, config: QuantConfig) -> jax.Array:
    """A ``[K, K]`` statistic in visiting order, f32, with the rows and columns of dead inputs zeroed."""
    a, dead = a.astype(jnp.float32), order.dead
    if config.act_order or config.act_group_aware:
        a, dead = a[order.perm][:, order.perm], dead[order.perm]
    return jnp.where(dead[:, None] | dead[None, :], 0.0, a)


def gptaq_factor(h: jax.Array, d: jax.Array, config: QuantConfig, alpha: float = GPTAQ_ALPHA,
                 group_fit: str = GROUP_FIT) -> MethodFactor:  # fmt: skip
    """GPTAQ's ``G``, ``P G`` and feedback ``(I - P) G`` from ``H`` and ``D``; see the module docstring."""
    plan = solve_plan(h.shape[0], config, group_fit)
    order = visiting_order(h, config, plan)
    ft, rdiag, damp, ok = damped_factor(order.h, config.damp_percent)
    eye = jnp.eye(plan.k, dtype=jnp.float32)
    r = ft.T * rdiag[None, :]  # (K, K) upper, H + damping = R R^T
    u = jax.scipy.linalg.solve_triangular(r, eye, lower=False)  # U = R^-1
    a = jnp.where(ok, jnp.float32(alpha), 0.0)  # round-to-nearest fallback: no feedback at all
    t = jnp.triu(jnp.matmul(_visiting(d, order, config), u.T, precision=_HIGHEST), 1)  # (K, K)
    udiag = 1.0 / rdiag
    n_mat = jax.scipy.linalg.solve_triangular(eye - a * udiag[:, None] * t, eye, lower=False, unit_diagonal=True)
    g = jnp.matmul(r, n_mat, precision=_HIGHEST) * udiag[None, :]  # G = M^-1, unit upper
    pg = a * jnp.matmul(t, n_mat, precision=_HIGHEST) * udiag[None, :]  # P G, strictly upper
    return MethodFactor(order, damp, ok, rdiag, (g - pg).T, group_inverses(g.T, plan), gt=g.T, pgt=pg.T)


def qronos_factor(h: jax.Array, d: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT) -> MethodFactor:
    """GPTQ's factor of ``H``, with what Qronos' starting weights need: ``D``, the damped ``H``'s first row and
    ``H_FF^-1`` (formed once here, so the start is two matmuls per row block)."""
    plan = solve_plan(h.shape[0], config, group_fit)
    f = hessian_factor(h, config, group_fit)
    diag = jnp.diagonal(f.order.h)
    h_damped = f.order.h + jnp.diag(jnp.where(f.ok, f.damp, 0.0) * jnp.mean(diag) * jnp.ones_like(diag))
    hinv_f = None
    if plan.k > 1:
        r_f = (f.ft.T * f.rdiag[None, :])[1:, 1:]  # H_FF = R_FF R_FF^T (R upper)
        rinv = jax.scipy.linalg.solve_triangular(r_f, jnp.eye(plan.k - 1, dtype=jnp.float32), lower=False)
        hinv_f = jnp.matmul(rinv.T, rinv, precision=_HIGHEST)
    return MethodFactor(f.order, f.damp, f.ok, f.rdiag, f.ft, f.minv, d=_visiting(d, f.order, config),
                        h0=h_damped[0], hinv_f=hinv_f)  # fmt: skip


def qronos_start(w: jax.Array, d: jax.Array, h0: jax.Array, hinv_f: jax.Array | None) -> jax.Array:
    """Qronos' starting weights ``(N, K)`` from ``w`` ``(N, K)``, ``D``, the damped ``H``'s first row ``h0`` and
    ``H_FF^-1``, all in visiting order: the first column corrected, the rest refitted to it by least squares."""
    e = jnp.matmul(w, d, precision=_HIGHEST)  # (N, K) = W D
    c1 = e[:, 0] / h0[0]  # (N,)
    if hinv_f is None:
        return w + c1[:, None]
    rhs = e[:, 1:] - c1[:, None] * h0[1:][None, :]  # (N, K-1)
    return w + jnp.concatenate([c1[:, None], jnp.matmul(rhs, hinv_f, precision=_HIGHEST)], axis=1)


def method_factor(h: jax.Array, d: jax.Array | None, config: QuantConfig, method: Method,
                  group_fit: str = GROUP_FIT) -> MethodFactor:  # fmt: skip
    """The part of ``method``'s solve that depends on ``H`` and ``D`` alone (``d`` is unused for GPTQ)."""
    if method.name == "gptaq":
        return gptaq_factor(h, d, config, method.alpha, group_fit)
    if method.name == "qronos":
        return qronos_factor(h, d, config, group_fit)
    f = hessian_factor(h, config, group_fit)
    return MethodFactor(f.order, f.damp, f.ok, f.rdiag, f.ft, f.minv)


def method_sweep(w: jax.Array, f: MethodFactor, config: QuantConfig, group_fit: str = GROUP_FIT
                 ) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """The part of the solve that reads ``w`` ``[N, K]``: its start, the blocked sweep and the assembled
    ``QuantizedWeight``, with the loss per row. Matmuls only: the factorizations are in ``f``."""
    plan = solve_plan(w.shape[1], config, group_fit)
    prep = prepare(w, None, config, plan, f.order)
    wt0 = prep.w.T  # (K, N)
    if f.pgt is not None:  # GPTAQ: W0 (I + P G)
        wt = wt0 + jnp.matmul(f.pgt, wt0, precision=_HIGHEST)
    elif f.d is not None:  # Qronos
        wt = jnp.where(f.ok, qronos_start(prep.w, f.d, f.h0, f.hinv_f), prep.w).T
        wt0 = wt
    else:
        wt = wt0
    fb = make_feedback(wt, wt0, f.ft, f.rdiag, plan, gt=f.gt, pgt=f.pgt, minv=f.minv)
    codes, grid, loss = sweep(fb, prep, plan, config)
    return assemble(codes, grid, loss, f.damp, f.ok, prep, plan, config)


def method_solve(w, h, d, config: QuantConfig, method: Method, group_fit: str = GROUP_FIT):
    """The traceable solve of any ``Method``: ``(QuantizedWeight, loss per row)``; ``d`` is unused for GPTQ."""
    if method.name == "gptq":
        return gptq_solve(w, h, config, group_fit)
    return method_sweep(w, method_factor(h, d, config, method, group_fit), config, group_fit)


def gptaq_solve(w: jax.Array, h: jax.Array, d: jax.Array, config: QuantConfig, alpha: float = GPTAQ_ALPHA,
                group_fit: str = GROUP_FIT) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """GPTAQ of ``w`` ``[N, K]`` given ``H`` and the cross term ``D``: the ``QuantizedWeight`` and the loss per row."""
    return method_sweep(w, gptaq_factor(h, d, config, alpha, group_fit), config, group_fit)


def qronos_solve(w: jax.Array, h: jax.Array, d: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT
                 ) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """Qronos of ``w`` ``[N, K]`` given ``H`` and the cross term ``D``: GPTQ's sweep from ``qronos_start``."""
    return method_sweep(w, qronos_factor(h, d, config, group_fit), config, group_fit)


def _stacked(ws, h, d, config: QuantConfig, method: Method) -> list[QuantizedWeight]:
    w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=0)
    return split_rows(*method_solve(w, h, d, config, method), [int(x.shape[0]) for x in ws])


_STATIC = ("config", "method", "group_fit")
_solve_jit = jax.jit(method_solve, static_argnames=_STATIC)
_solve_cpu = jax.jit(method_solve, static_argnames=_STATIC, compiler_options=CPU_SOLVE_OPTIONS)
_stacked_jit = jax.jit(_stacked, static_argnames=("config", "method"))
_stacked_cpu = jax.jit(_stacked, static_argnames=("config", "method"), compiler_options=CPU_SOLVE_OPTIONS)


def jitted_method_solver():
    """``(w, h, d, config, method, group_fit) -> (QuantizedWeight, loss per row)``, jitted for the backend."""
    return _solve_cpu if jax.default_backend() == "cpu" else _solve_jit


def check_cross(h, d) -> None:
    """Boundary checks on a cross term ``D`` beside its Hessian ``H``."""
    if d is None:
        raise ValueError("this method needs the cross term D = 2/n (X_fp - X_q) X_q^T (see accumulate_cross)")
    shape = getattr(d, "shape", None)
    if shape is None or tuple(shape) != tuple(h.shape):
        raise ValueError(f"cross term shape {None if shape is None else tuple(shape)} must equal the hessian's "
                         f"{tuple(h.shape)}")  # fmt: skip
    if not jnp.issubdtype(d.dtype, jnp.floating):
        raise ValueError(f"cross term must be a floating-point array, got dtype {d.dtype}")
    bad = count_nonfinite(d)
    if bad:
        raise ValueError(f"cross term of shape {tuple(shape)} holds {bad} NaN or Inf values")


def quantize_weights_method(
    ws: Sequence[jax.Array], h: jax.Array, config: QuantConfig, method: Method, d: jax.Array | None = None
) -> list[QuantizedWeight]:
    """``core.gptq.quantize_weights`` (weights sharing a Hessian, solved stacked) for any ``Method``.

    Args:
      ws: float ``[N_i, K]`` weights with the same ``K``.
      h: float ``[K, K]``, ``2/n X_q X_q^T``.
      config: the grid and the solver's options.
      method: which solve.
      d: float ``[K, K]``, ``2/n (X_fp - X_q) X_q^T`` (``accumulate_cross``); needed unless the method is GPTQ.
    """
    ws, h = checked_group(ws, h, config)
    if not ws:
        return []
    if method.needs_cross:
        d = jnp.asarray(d) if d is not None else None
        check_cross(h, d)
    else:
        d = jnp.zeros((), jnp.float32)  # unused
    solve = _stacked_cpu if jax.default_backend() == "cpu" else _stacked_jit
    out: list[QuantizedWeight] = []
    for part in fused_parts([int(w.shape[0]) for w in ws], int(h.shape[0])):
        qws = solve(tuple(ws[i] for i in part), h, d, config, method)
        log_damping(qws[0], (sum(int(ws[i].shape[0]) for i in part), int(h.shape[0])), config)
        out.extend(qws)
    return out


def quantize_weight_method(
    w: jax.Array, h: jax.Array, config: QuantConfig, method: Method, d: jax.Array | None = None
) -> QuantizedWeight:
    """One weight ``[N, K]`` with any ``Method``; see ``quantize_weights_method``."""
    return quantize_weights_method([w], h, config, method, d)[0]


@jax.jit
def objective_terms(w: jax.Array, deq: jax.Array, h: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tr((Q-W) H (Q-W)^T), sum((W D) * (Q - W)))``, float32: GPTQ's objective and the cross term's share of
    ``cross_objective`` (which is the first minus twice the second)."""
    w = w.astype(jnp.float32)
    e = deq.astype(jnp.float32) - w  # (N, K)
    quad = jnp.sum(jnp.matmul(e, h.astype(jnp.float32), precision=_HIGHEST) * e)
    return quad, jnp.sum(jnp.matmul(w, d.astype(jnp.float32), precision=_HIGHEST) * e)


@jax.jit
def cross_objective(w: jax.Array, deq: jax.Array, h: jax.Array, d: jax.Array) -> jax.Array:
    """``2/n (||W X_fp - Q X_q||^2 - ||W X_fp - W X_q||^2)``, the objective GPTAQ (alpha = 1) and Qronos minimise,
    measured from keeping the float weights: ``tr((Q-W) H (Q-W)^T) - 2 sum((W D) * (Q - W))``, float32 ``[]``.

    With ``D = 0`` it is GPTQ's ``tr((W-Q) H (W-Q)^T)``; it can be negative, when the quantized weights fit the
    float model's output better than the float weights on quantized inputs do.
    """
    quad, lin = objective_terms(w, deq, h, d)
    return quad - 2.0 * lin
