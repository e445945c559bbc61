"""A plain GPTQ in NumPy float64, written from the paper (Frantar et al. 2022, Alg. 1 without blocking).

Column by column: quantize column j, divide its error by [U]_jj (U the upper Cholesky factor of H^-1)
and subtract the error times row j of U from every later column at once. No lazy batches, no tricks:
the reference the JAX solver is checked against.
"""

from __future__ import annotations

import numpy as np


def grid(w: np.ndarray, bits: int, sym: bool, fp16_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of each row of w [N, C] (the grid of docs/checkpoints.md), in float32 like the code under test.

    The grid is computed in float32 because the symmetric grid puts each group's largest weight exactly on
    a rounding tie (w / scale = maxq / 2 + 1/2); in float64 the tie breaks differently than in float32.
    ``fp16_scales`` rounds the scale to float16 (kept in its positive finite range) before the zero is taken.
    """
    w = w.astype(np.float32)
    maxq = np.float32(2**bits - 1)
    xmin = np.minimum(w.min(axis=1), 0.0)
    xmax = np.maximum(w.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmax = np.where(xmax == 0, 1.0, xmax)
        xmin = -xmax
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = np.where(empty, -1.0, xmin)
        xmax = np.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if fp16_scales:
        f16 = np.finfo(np.float16)
        scale = np.clip(scale, float(f16.smallest_subnormal), float(f16.max)).astype(np.float16).astype(np.float32)
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def group_aware_order(d: np.ndarray, g: int) -> np.ndarray:
    """GPTQModel's act_group_aware visiting order, written from its description with plain Python sorts.

    Full groups only: each group's columns by descending d, groups by descending max d (Python's sort is stable,
    so tied groups keep their order); the partial last group, if any, follows in its natural order.
    """
    k = len(d)
    groups = [list(range(i, i + g)) for i in range(0, k - k % g, g)]
    order = sorted(range(len(groups)), key=lambda i: -max(d[c] for c in groups[i]))
    perm = []
    for i in order:
        perm += sorted(groups[i], key=lambda c: -d[c])
    perm += list(range(len(groups) * g, k))
    return np.array(perm, np.int64)


def gptq(
    w,
    h,
    *,
    bits,
    group_size,
    sym,
    act_order=False,
    static_groups=False,
    damp_percent=0.01,
    fit_block=None,
    act_group_aware=False,
    fp16_scales=False,
):
    """Returns (codes [N, K] int, scales [N, G], zeros [N, G], g_idx [K], dequantized W [N, K]).

    Group grids are fitted on the weights as they are when the loop reaches the group, with the feedback of every
    earlier column. ``fit_block=B`` fits them instead on the weights as they were at the start of their block of B
    columns, as the paper's blocked loop (blocksize B) does when a group starts inside a block. ``act_group_aware``
    visits the columns in ``group_aware_order``; each group's grid is fitted at its first visited column and stored
    under the group's own index.
    """
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    n, k = w.shape
    maxq = 2**bits - 1
    g = k if group_size == -1 else group_size
    groups = -(-k // g)

    if group_size == -1:
        fixed = [grid(w, bits, sym, fp16_scales)]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if static_groups and group_size != -1:
        fixed = [grid(w[:, i : i + g], bits, sym, fp16_scales) for i in range(0, k, g)]
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
    elif act_group_aware:
        perm = group_aware_order(np.diag(h), g)
    else:
        perm = np.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    h[np.arange(k), np.arange(k)] += damp_percent * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U

    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, groups))
    zeros = np.zeros((n, groups))
    g_idx_perm = np.zeros(k, np.int64)
    snapshot = w
    for j in range(k):
        if fit_block is not None and j % fit_block == 0:
            snapshot = w.copy()
        if group_size == -1:
            s, z = fixed[0]
            gi = 0
        elif static_groups:
            gi = perm[j] // g
            s, z = fixed[gi]
        else:
            gi = perm[j] // g if act_group_aware else j // g
            if j % g == 0:
                s, z = grid((w if fit_block is None else snapshot)[:, j : j + g], bits, sym, fp16_scales)
        scales[:, gi], zeros[:, gi] = s, z
        g_idx_perm[j] = gi
        q = np.clip(np.round(w[:, j].astype(np.float32) / s) + z, 0, maxq)
        err = (w[:, j] - s * (q - z)) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
        codes[:, j] = q
    inv = np.argsort(perm)
    codes = codes[:, inv]
    g_idx = g_idx_perm[inv]
    deq = scales[:, g_idx] * (codes - zeros[:, g_idx])
    return codes, scales, zeros, g_idx, deq
