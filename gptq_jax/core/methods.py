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

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.gptq import (
    CPU_SOLVE_OPTIONS,
    GROUP_FIT,
    assemble,
    check_hessian,
    check_weight,
    damped_factor,
    fused_parts,
    gptq_solve,
    log_damping,
    make_feedback,
    permute_square,
    prepare,
    solve_plan,
    split_rows,
    sweep,
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


def gptaq_solve(
    w: jax.Array, h: jax.Array, d: jax.Array, config: QuantConfig, alpha: float = GPTAQ_ALPHA,
    group_fit: str = GROUP_FIT,
) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """GPTAQ of ``w`` ``[N, K]`` given ``H`` and the cross term ``D`` (``[K, K]`` each): the ``QuantizedWeight``
    and the sweep's proxy loss per row. Traceable; see the module docstring for the algebra."""
    plan = solve_plan(w.shape[1], config, group_fit)
    prep = prepare(w, h, config, plan)
    ft, rdiag, damp, ok = damped_factor(prep.h, config.damp_percent)
    k = plan.k
    eye = jnp.eye(k, dtype=jnp.float32)
    r = ft.T * rdiag[None, :]  # (K, K) upper, H + damping = R R^T
    u = jax.scipy.linalg.solve_triangular(r, eye, lower=False)  # U = R^-1
    a = jnp.where(ok, jnp.float32(alpha), 0.0)  # round-to-nearest fallback: no feedback at all
    t = jnp.triu(jnp.matmul(permute_square(d, prep, config), u.T, precision=_HIGHEST), 1)  # (K, K)
    udiag = 1.0 / rdiag
    n_mat = jax.scipy.linalg.solve_triangular(eye - a * udiag[:, None] * t, eye, lower=False, unit_diagonal=True)
    g = jnp.matmul(r, n_mat, precision=_HIGHEST) * udiag[None, :]  # G = M^-1, unit upper
    pg = a * jnp.matmul(t, n_mat, precision=_HIGHEST) * udiag[None, :]  # P G, strictly upper
    wt0 = prep.w.T  # (K, N)
    wt = wt0 + jnp.matmul(pg.T, wt0, precision=_HIGHEST)  # (W0 (I + P G))^T
    fb = make_feedback(wt, wt0, (g - pg).T, rdiag, plan, gt=g.T, pgt=pg.T)
    codes, grid, loss = sweep(fb, prep, plan, config)
    return assemble(codes, grid, loss, damp, ok, prep, plan, config)


def qronos_start(w: jax.Array, h_damped: jax.Array, r: jax.Array, d: jax.Array) -> jax.Array:
    """Qronos' starting weights ``(N, K)`` from ``w`` ``(N, K)``, damped ``H`` and its factor ``R`` (``H = R R^T``),
    and ``D``, all in visiting order: the first column corrected, the rest refitted to it by least squares."""
    e = jnp.matmul(w, d, precision=_HIGHEST)  # (N, K) = W D
    c1 = e[:, 0] / h_damped[0, 0]  # (N,)
    if w.shape[1] == 1:
        return w + c1[:, None]
    rhs = e[:, 1:] - c1[:, None] * h_damped[0, 1:][None, :]  # (N, K-1)
    r_f = r[1:, 1:]  # H_FF = R_FF R_FF^T
    z = jax.scipy.linalg.solve_triangular(r_f, rhs.T, lower=False)
    x = jax.scipy.linalg.solve_triangular(r_f.T, z, lower=True)  # (K-1, N) = H_FF^-1 rhs^T
    return w + jnp.concatenate([c1[:, None], x.T], axis=1)


def qronos_solve(
    w: jax.Array, h: jax.Array, d: jax.Array, config: QuantConfig, group_fit: str = GROUP_FIT
) -> tuple[QuantizedWeight, jax.Array]:
    """Qronos of ``w`` ``[N, K]`` given ``H`` and the cross term ``D``: GPTQ's sweep from ``qronos_start``."""
    plan = solve_plan(w.shape[1], config, group_fit)
    prep = prepare(w, h, config, plan)
    ft, rdiag, damp, ok = damped_factor(prep.h, config.damp_percent)
    diag = jnp.diagonal(prep.h)
    h_damped = prep.h + jnp.diag(jnp.where(ok, damp, 0.0) * jnp.mean(diag) * jnp.ones_like(diag))
    r = ft.T * rdiag[None, :]
    start = jnp.where(ok, qronos_start(prep.w, h_damped, r, permute_square(d, prep, config)), prep.w)
    wt = start.T  # (K, N)
    codes, grid, loss = sweep(make_feedback(wt, wt, ft, rdiag, plan), prep, plan, config)
    return assemble(codes, grid, loss, damp, ok, prep, plan, config)


def method_solve(w, h, d, config: QuantConfig, method: Method, group_fit: str = GROUP_FIT):
    """The traceable solve of any ``Method``: ``(QuantizedWeight, loss per row)``; ``d`` is unused for GPTQ."""
    if method.name == "gptaq":
        return gptaq_solve(w, h, d, config, method.alpha, group_fit)
    if method.name == "qronos":
        return qronos_solve(w, h, d, config, group_fit)
    return gptq_solve(w, h, config, group_fit)


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
    ws = [jnp.asarray(w) for w in ws]
    if not ws:
        return []
    h = jnp.asarray(h)
    for w in ws:
        check_weight(w, config)
        check_hessian(w, h)
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
