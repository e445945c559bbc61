"""Plain GPTAQ and Qronos in NumPy float64, column by column, written from their papers' equations.

GPTAQ (arXiv 2504.02692): the paper's column loop with the asymmetry term, ``W_F -= Err_j U_jF - W_j P_jF``,
``P = alpha triu(D U^T, 1) U``. Qronos (arXiv 2505.11695): literally its two steps for every column, error
correction (least squares for column t given the quantized columns and the current later ones) then diffusion
(least squares for every later column given the quantized ones), one linear solve each. Neither uses the
closed forms of ``gptq_jax.core.methods``, which these check.
"""

from __future__ import annotations

import numpy as np
from gptq_reference import grid, group_aware_order


def _prepare(w, h, d, bits, group_size, sym, act_order, static_groups, damp_percent, act_group_aware, fp16_scales):
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    d = np.array(d, np.float64)
    n, k = w.shape
    g = k if group_size == -1 else group_size
    fixed = [grid(w, bits, sym, fp16_scales)] if group_size == -1 else None
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    d[dead, :] = 0.0
    d[:, dead] = 0.0
    if static_groups and group_size != -1:
        fixed = [grid(w[:, i : i + g], bits, sym, fp16_scales) for i in range(0, k, g)]
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
    elif act_group_aware:
        perm = group_aware_order(np.diag(h), g)
    else:
        perm = np.arange(k)
    w, h, d = w[:, perm], h[perm][:, perm], d[perm][:, perm]
    h[np.arange(k), np.arange(k)] += damp_percent * np.mean(np.diag(h))
    return w, h, d, perm, fixed, g


def _column_grid(j, w_fit, perm, fixed, g, group_size, static_groups, act_group_aware, bits, sym, fp16, cur):
    """The grid of visited column j: (scale, zero, group index); ``cur`` is the group's grid so far."""
    if group_size == -1:
        return (*fixed[0], 0)
    if static_groups:
        gi = perm[j] // g
        return (*fixed[gi], gi)
    gi = perm[j] // g if act_group_aware else j // g
    if j % g == 0:
        return (*grid(w_fit[:, j : j + g], bits, sym, fp16), gi)
    return (*cur, gi)


def _finish(codes, scales, zeros, g_idx_perm, perm):
    inv = np.argsort(perm)
    codes, g_idx = codes[:, inv], g_idx_perm[inv]
    deq = scales[:, g_idx] * (codes - zeros[:, g_idx])
    return codes, scales, zeros, g_idx, deq


def gptaq(w, h, d, *, alpha, bits, group_size, sym, act_order=False, static_groups=False, damp_percent=0.01,
          fit_block=None, act_group_aware=False, fp16_scales=False):  # fmt: skip
    """Returns (codes [N, K], scales [N, G], zeros [N, G], g_idx [K], dequantized W [N, K]). ``fit_block=B`` fits
    group grids on W as it was at the start of its block of B columns (the paper's blocked loop), else on W now."""
    w, h, d, perm, fixed, g = _prepare(w, h, d, bits, group_size, sym, act_order, static_groups, damp_percent,
                                       act_group_aware, fp16_scales)  # fmt: skip
    n, k = w.shape
    maxq = 2**bits - 1
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    p = alpha * np.triu(d @ u.T, 1) @ u
    groups = -(-k // g)
    codes, scales, zeros = np.zeros((n, k), np.int64), np.zeros((n, groups)), np.zeros((n, groups))
    g_idx_perm = np.zeros(k, np.int64)
    snapshot, cur = w, None
    for j in range(k):
        if fit_block is not None and j % fit_block == 0:
            snapshot = w.copy()
        s, z, gi = _column_grid(j, w if fit_block is None else snapshot, perm, fixed, g, group_size, static_groups,
                                act_group_aware, bits, sym, fp16_scales, cur)  # fmt: skip
        cur = (s, z)
        scales[:, gi], zeros[:, gi], g_idx_perm[j] = s, z, gi
        v = w[:, j].copy()
        q = np.clip(np.round(v.astype(np.float32) / s) + z, 0, maxq)
        err = (v - s * (q - z)) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:]) - np.outer(v, p[j, j:])
        codes[:, j] = q
    return _finish(codes, scales, zeros, g_idx_perm, perm)


def qronos(w, h, d, *, bits, group_size, sym, act_order=False, static_groups=False, damp_percent=0.01,
           act_group_aware=False, fp16_scales=False):  # fmt: skip
    """As ``gptaq``; group grids are fitted on the weights at the group's first column, after its correction
    (the first group: after the later columns are refitted to that correction).

    The target is ``min ||W X_fp - Q X_q||^2`` with H damped (a ridge towards W): the least-squares fit ``v`` of any
    free columns solves ``v H_FF = (W (H + D))_F - (fixed columns) H_.F``.
    """
    w0, h, d, perm, fixed, g = _prepare(w, h, d, bits, group_size, sym, act_order, static_groups, damp_percent,
                                        act_group_aware, fp16_scales)  # fmt: skip
    n, k = w0.shape
    maxq = 2**bits - 1
    target = w0 @ (h + d)  # (N, K): W X_fp X_q^T, damped
    w = w0.copy()
    groups = -(-k // g)
    codes, scales, zeros = np.zeros((n, k), np.int64), np.zeros((n, groups)), np.zeros((n, groups))
    g_idx_perm = np.zeros(k, np.int64)
    cur = None
    for t in range(k):
        # Error correction: column t, given the quantized columns before it and the current ones after it.
        others = w.copy()
        others[:, t] = 0.0
        w[:, t] = (target[:, t] - others @ h[:, t]) / h[t, t]
        if t == 0 and k > 1:
            # The first group's grid sees the later columns refitted to the corrected first one (not in the
            # paper, which fits no grids during the loop; every later refit overrides it, so only that grid moves).
            w[:, 1:] = np.linalg.solve(h[1:, 1:], (target[:, 1:] - np.outer(w[:, 0], h[0, 1:])).T).T
        s, z, gi = _column_grid(t, w, perm, fixed, g, group_size, static_groups, act_group_aware, bits, sym,
                                fp16_scales, cur)  # fmt: skip
        cur = (s, z)
        scales[:, gi], zeros[:, gi], g_idx_perm[t] = s, z, gi
        q = np.clip(np.round(w[:, t].astype(np.float32) / s) + z, 0, maxq)
        codes[:, t] = q
        w[:, t] = s * (q - z)
        # Diffusion: every later column, given the quantized ones.
        f = slice(t + 1, k)
        if t + 1 < k:
            rhs = target[:, f] - w[:, : t + 1] @ h[: t + 1, f]
            w[:, f] = np.linalg.solve(h[f, f], rhs.T).T
    return _finish(codes, scales, zeros, g_idx_perm, perm)
