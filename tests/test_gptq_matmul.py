"""gptq_matmul: the jnp reference against a float64 numpy oracle; each Pallas kernel, in interpret mode, against
the reference; dispatch; validation; and the kernels' lowering to Triton IR (no GPU needed to lower)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import pallas_kernels
from pallas_kernels import (
    KernelConfig,
    PackedWeight,
    gptq_matmul,
    gptq_matmul_chunked,
    gptq_matmul_pallas,
    gptq_matmul_reference,
)
from pallas_kernels import matmul as matmul_mod

# Tolerance per activation dtype, used for every comparison in this file: |got - want| <= TOL * (|want| + max|want|).
# The output is rounded to x's dtype (bf16 keeps 8 significant bits, f16 11); f32 differs by summation order only.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


def make_layer(k, n, bits, group_size, *, sym, act_order, seed=0):
    """A random packed layer and its float64 dequantized weight [K, N] in the layer's input-row order."""
    rng = np.random.default_rng(seed)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, (k, n))
    zeros = np.full((groups, n), (maxq + 1) // 2) if sym else rng.integers(0, maxq + 1, (groups, n))
    scales = (rng.uniform(0.5, 1.5, (groups, n)) * 2 / maxq).astype(np.float16)
    g_idx = np.arange(k) // g
    if act_order:  # GPTQ desc_act: groups formed along the solver's visiting order
        order = rng.permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[order] = np.arange(k) // g
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx.astype(np.int32), bits, group_size)
    return w, scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx])


def numpy_matmul(x, w64, dtype):
    """Oracle: dequantized weight rounded to x's dtype (as the reference does), product in float64."""
    np_dtype = {jnp.float32: np.float32, jnp.float16: np.float16, jnp.bfloat16: ml_dtypes.bfloat16}[dtype]
    w = w64.astype(np.float32).astype(np_dtype).astype(np.float64)
    return np.asarray(x, np.float64) @ w


def activations(m, k, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


# ---------------------------------------------------------------------------------------------------------------
# The reference against float64 numpy
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # (M, K, N, bits, group_size, act_order, dtype)
    *[(3, 576, 192, b, 128, False, jnp.float32) for b in (2, 3, 4, 8)],  # SmolLM2: K = 576, g = 128, 5 groups
    *[(5, 256, 96, b, 32, True, jnp.bfloat16) for b in (2, 3, 4, 8)],
    *[(1, 384, 64, b, -1, False, jnp.float16) for b in (2, 3, 4, 8)],
    (1, 576, 1536, 3, 128, True, jnp.float32),  # SmolLM2 up_proj
    (4, 1536, 576, 8, 32, False, jnp.float16),  # SmolLM2 down_proj
]


@pytest.mark.parametrize("m,k,n,bits,group_size,act_order,dtype", REFERENCE_CASES)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_reference_matches_float64_numpy(m, k, n, bits, group_size, act_order, dtype, sym):
    w, w64 = make_layer(k, n, bits, group_size, sym=sym, act_order=act_order, seed=k + n + bits)
    x = activations(m, k, dtype)
    y = gptq_matmul_reference(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, numpy_matmul(x, w64, dtype), dtype)


@pytest.mark.parametrize(
    "m,k,n,act_order,dtype",
    [(2, 4096, 4096, True, jnp.bfloat16), (1, 11008, 4096, False, jnp.float32)],  # Llama-7B q_proj, down_proj
)
def test_reference_on_llama_shapes(m, k, n, act_order, dtype):
    w, w64 = make_layer(k, n, 4, 128, sym=True, act_order=act_order, seed=k)
    x = activations(m, k, dtype)
    assert_close(gptq_matmul_reference(x, w), numpy_matmul(x, w64, dtype), dtype)


def test_reference_detects_a_wrong_zero_point():
    """The oracle comparison is sharp enough to catch an off-by-one zero in one group (a test that can fail)."""
    w, w64 = make_layer(256, 64, 4, 64, sym=False, act_order=False)
    x = activations(3, 256, jnp.float32)
    w64_bad = w64.copy()
    w64_bad[64:128] -= np.asarray(w.scales, np.float64)[1]  # zero + 1 in group 1
    with pytest.raises(AssertionError):
        assert_close(gptq_matmul_reference(x, w), numpy_matmul(x, w64_bad, jnp.float32), jnp.float32)


def test_reference_is_jittable_and_keeps_leading_dims():
    w, w64 = make_layer(128, 64, 4, 32, sym=True, act_order=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 128)), jnp.float32)
    y = jax.jit(gptq_matmul_reference)(x, w)
    assert y.shape == (2, 3, 64)
    assert_close(y, np.asarray(x, np.float64) @ w64, jnp.float32)


@pytest.mark.parametrize("fn,k,group_size", [(gptq_matmul_reference, 256, 64), (gptq_matmul_chunked, 576, 128)])
def test_a_nan_stays_in_its_own_row(fn, k, group_size):
    """Both CPU paths tie the dequantization to x (for XLA:CPU's scheduler), and the chunked one folds per-group sums
    of x into every row's zero-point term; neither may leak a NaN or inf across rows."""
    w, w64 = make_layer(k, 64, 4, group_size, sym=False, act_order=True)
    for bad in (np.nan, np.inf):
        x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
        x[0, 0] = bad
        y = np.asarray(jax.jit(fn)(jnp.asarray(x), w))
        assert np.isnan(y[0]).all() or np.isinf(y[0]).any()
        assert_close(y[1:], x[1:].astype(np.float64) @ w64, jnp.float32)


def test_uneven_groups_are_served_by_the_reference():
    rng = np.random.default_rng(0)
    codes, zeros = rng.integers(0, 16, (64, 32)), rng.integers(0, 16, (2, 32))
    scales = rng.uniform(0.1, 0.2, (2, 32)).astype(np.float16)
    g_idx = np.array([1, 0] * 8 + [0] * 8 + [1] * 40)  # 24 rows in group 0, 40 in group 1
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, 4, 32)
    x = activations(2, 64, jnp.float32)
    want = np.asarray(x, np.float64) @ (scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx]))
    assert_close(gptq_matmul(x, w, interpret=True), want, jnp.float32)  # Pallas declines, reference runs
    with pytest.raises(NotImplementedError, match=r"g_idx == k // group_size"):
        gptq_matmul(x, w, impl="pallas", interpret=True)
    assert_close(gptq_matmul(x, w), want, jnp.float32)  # CPU decode: no chunk of one group, the reference runs
    assert matmul_mod.cpu_chunk_rows(w) is None
    with pytest.raises(NotImplementedError, match=r"no chunk of whole words inside one group"):
        gptq_matmul_chunked(x, w)


# ---------------------------------------------------------------------------------------------------------------
# CPU decode: the chunked path
# ---------------------------------------------------------------------------------------------------------------

T = matmul_mod.CPU_DECODE_MAX_M
CHUNKED_CASES = [
    # (M, K, N, bits, group_size, act_order, rows): rows None is cpu_chunk_rows' choice
    *[(1, 576, 192, b, 128, False, None) for b in (2, 3, 4, 8)],  # SmolLM2 k_proj: 4 chunks and a 64-row tail
    *[(m, 576, 1536, b, 128, True, None) for b in (3, 4) for m in (1, T - 1, T, T + 1)],  # up_proj, act-order
    *[(1, 384, 64, b, -1, False, None) for b in (2, 3, 4, 8)],  # group -1: chunks of one group spanning K
    (2, 1536, 576, 8, 32, True, None),  # down_proj, small groups
    (3, 96, 40, 4, 32, False, 8),  # odd N, 12 chunks of one word each
    (1, 160, 48, 2, 32, True, 16),  # a chunk is exactly one word of 2-bit codes
    (1, 96, 64, 3, -1, False, 32),  # 3-bit: chunks of 3 words; 3 chunks, no tail
    (2, 352, 64, 4, 32, True, 64),  # chunks of two groups (scales in the tile), a one-group tail
    (1, 352, 64, 3, 32, False, 96),  # chunks of three groups, a two-group tail
    (T, 1536, 576, 4, 128, True, 384),  # down_proj in chunks of three groups
    (1, 224, 32, 3, -1, False, 32),  # 3-bit group -1 over K = 7 chunks
]


@pytest.mark.parametrize("m,k,n,bits,group_size,act_order,rows", CHUNKED_CASES)
def test_chunked_matches_float64_numpy_and_the_reference(m, k, n, bits, group_size, act_order, rows):
    w, w64 = make_layer(k, n, bits, group_size, sym=False, act_order=act_order, seed=k + n + bits)
    x = activations(m, k, jnp.float32)
    y = gptq_matmul_chunked(x, w, rows=rows)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    assert_close(y, numpy_matmul(x, w64, jnp.float32), jnp.float32)
    assert_close(y, gptq_matmul_reference(x, w), jnp.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,k,rows", [
    (64, 352, 64),  # 5 chunks in the loop and a 32-row tail in the sixth group
    (-1, 288, 96),  # one group: 3 chunks, no tail
    (128, 576, None),  # SmolLM2's K: a 64-row tail
    (128, 128, 128),  # one chunk, no loop
    (32, 352, 96),  # chunks of three groups: 3 in the loop, a two-group tail
    (32, 160, 128),  # one four-group chunk, a one-group tail
])
def test_chunked_counts_every_row_once(bits, group_size, k, rows):
    """x = I: the product is the dequantized weight itself, row for row, so a chunk dropped, counted twice, shifted
    or scaled with another group's scales shows as whole wrong rows (compared exactly: one product per entry)."""
    w, w64 = make_layer(k, 32, bits, group_size, sym=False, act_order=True, seed=bits)
    y = np.asarray(gptq_matmul_chunked(jnp.eye(k, dtype=jnp.float32), w, rows=rows), np.float64)
    np.testing.assert_allclose(y, w64, rtol=1e-6, atol=1e-6 * np.abs(w64).max())


def test_chunked_detects_a_dropped_chunk(monkeypatch):
    """The comparison above fails when the loop runs one chunk short (a test that can fail)."""
    w, w64 = make_layer(256, 32, 4, 64, sym=False, act_order=False)
    real = lax.fori_loop
    monkeypatch.setattr(matmul_mod.lax, "fori_loop", lambda lo, hi, body, init: real(lo, hi - 1, body, init))
    matmul_mod._chunked.clear_cache()
    try:
        y = np.asarray(gptq_matmul_chunked(jnp.eye(256, dtype=jnp.float32), w, rows=32), np.float64)
    finally:
        monkeypatch.undo()
        matmul_mod._chunked.clear_cache()
    # The last of 8 chunks is missing: its rows keep only the zero-point term, the others are right.
    np.testing.assert_allclose(y[:224], w64[:224], rtol=1e-6, atol=1e-6 * np.abs(w64).max())
    assert np.abs(y[224:] - w64[224:]).max() > 0.1 * np.abs(w64).max()
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y, w64, rtol=1e-6, atol=1e-6 * np.abs(w64).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_chunked_half_precision_activations_and_leading_dims(dtype):
    w, w64 = make_layer(576, 192, 4, 128, sym=True, act_order=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 576)), dtype)
    y = jax.jit(gptq_matmul)(x, w)  # CPU, M = 2: the chunked path
    assert y.dtype == dtype and y.shape == (1, 2, 192)
    assert_close(y, np.asarray(x.astype(jnp.float32), np.float64) @ w64, dtype)
    assert_close(y, gptq_matmul_reference(x, w), dtype)


def test_cpu_chunk_rows_fit_the_tile_groups_and_words():
    tile = matmul_mod.CPU_TILE_BYTES
    for bits, unit in ((2, 16), (3, 32), (4, 8), (8, 4)):
        for group_size, k, n in ((128, 576, 1536), (128, 576, 192), (32, 1536, 576), (-1, 576, 96), (32, 96, 4096)):
            w, _ = make_layer(k, n, bits, group_size, sym=True, act_order=False)
            r = matmul_mod.cpu_chunk_rows(w)
            g = k if group_size == -1 else group_size
            valid = [c for c in range(unit, -(-k // g) * g + 1, unit) if g % c == 0 or c % g == 0]
            assert r in valid
            assert r * n * 4 <= tile or r == min(valid)
            assert all(c * n * 4 > tile for c in valid if c > r)  # the largest that fits
    w, _ = make_layer(96, 32, 3, 48, sym=True, act_order=False)  # 48-row groups: not whole runs of 32 3-bit codes
    assert matmul_mod.cpu_chunk_rows(w) is None
    with pytest.raises(ValueError, match=r"rows=24 must be a positive multiple of 8 that divides or is a multiple"):
        gptq_matmul_chunked(activations(1, 128, jnp.float32), make_layer(128, 32, 4, 64, sym=True,
                                                                        act_order=False)[0], rows=24)


# ---------------------------------------------------------------------------------------------------------------
# Each kernel, in interpret mode, against the reference
# ---------------------------------------------------------------------------------------------------------------

M_VALUES = {"decode": (1, 2, 3, 16), "prefill": (1, 3, 16, 17, 128)}  # decode takes M <= 16 (one dot tile)
KERNEL_BITS = (2, 4, 8)
# (K, N, group_size): odd multiples of the tiles, SmolLM2's partial last group, per-channel.
KERNEL_SHAPES = [(576, 96, 128), (384, 48, 32), (160, 80, -1), (256, 128, 32), (384, 64, 128)]
DTYPES = (jnp.bfloat16, jnp.float32)


def _kernel_cases():
    """Every M x bits for each kernel; shapes, act-order and dtype cycle so each meets every M and bits."""
    cases = []
    for kernel in ("decode", "prefill"):
        others = itertools.cycle(itertools.product(KERNEL_SHAPES, (False, True), DTYPES))
        for m, bits in itertools.product(M_VALUES[kernel], KERNEL_BITS):
            (k, n, g), act_order, dtype = next(others)
            cases.append(pytest.param(kernel, m, k, n, bits, g, act_order, dtype,
                                      id=f"{kernel}-M{m}-K{k}-N{n}-b{bits}-g{g}-{'act' if act_order else 'seq'}-"
                                         f"{jnp.dtype(dtype).name}"))
    return cases


@pytest.mark.parametrize("kernel,m,k,n,bits,group_size,act_order,dtype", _kernel_cases())
def test_kernel_matches_reference(kernel, m, k, n, bits, group_size, act_order, dtype):
    x = activations(m, k, dtype, seed=m)
    for sym in (True, False):  # same shapes: the second call reuses the compiled kernel
        w, _ = make_layer(k, n, bits, group_size, sym=sym, act_order=act_order, seed=k + bits)
        y = gptq_matmul_pallas(x, w, kernel=kernel, interpret=True)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close(y, gptq_matmul_reference(x, w), dtype)


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_kernel_groups_with_act_order_against_numpy(kernel, group_size):
    """Each group size with act-order on, against float64 numpy directly (act-order off: the grid above)."""
    m = 1 if kernel == "decode" else 24
    x = activations(m, 256, jnp.float32)
    w, w64 = make_layer(256, 64, 4, group_size, sym=False, act_order=True, seed=7)
    assert (w.perm is not None) == (group_size != -1)
    y = gptq_matmul_pallas(x, w, kernel=kernel, interpret=True)
    assert_close(y, numpy_matmul(x, w64, jnp.float32), jnp.float32)


def test_kernel_float16_and_leading_dims():
    w, _ = make_layer(256, 64, 4, 128, sym=True, act_order=False)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 256)), jnp.float16)
    y = gptq_matmul(x, w, impl="pallas", interpret=True)
    assert y.shape == (2, 2, 64) and y.dtype == jnp.float16
    assert_close(y, gptq_matmul_reference(x, w), jnp.float16)


@pytest.mark.parametrize("split_k,runs", [(1, 8), (2, 4), (3, 3), (5, 2)])  # 8 K steps; 3 and 5 leave a short last
def test_decode_split_k_partial_sums_add_up(split_k, runs):
    w, w64 = make_layer(512, 32, 4, 128, sym=False, act_order=True, seed=2)
    x = activations(3, 512, jnp.float32)
    cfg = KernelConfig(decode=pallas_kernels.DecodeTiles(block_n=32, block_k=64, split_k=split_k))
    plan = matmul_mod._plan(3, w, "decode", cfg)
    assert (plan.steps_per_split, plan.split_k) == (runs, -(-8 // runs))
    assert_close(gptq_matmul_pallas(x, w, kernel="decode", config=cfg, interpret=True),
                 numpy_matmul(x, w64, jnp.float32), jnp.float32)


def test_kernel_detects_a_wrong_scale():
    """Corrupting one group's scales must fail the comparison (the kernel test can fail)."""
    w, _ = make_layer(256, 64, 4, 64, sym=True, act_order=False)
    x = activations(1, 256, jnp.float32)
    bad = dataclasses.replace(w, scales=w.scales.at[2].multiply(1.5))
    with pytest.raises(AssertionError):
        assert_close(gptq_matmul_pallas(x, bad, interpret=True), gptq_matmul_reference(x, w), jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tile plans
# ---------------------------------------------------------------------------------------------------------------


def test_plan_fits_tiles_to_the_shape():
    w, _ = make_layer(576, 96, 4, 128, sym=True, act_order=False)
    p = matmul_mod._plan(1, w, "decode", KernelConfig())
    assert (p.block_m, p.x_rows, p.block_n, p.block_k) == (16, 1, 32, 64)  # bk | gcd(576, 128) = 64; bn | 96
    assert p.split_k * p.steps_per_split >= 9 > (p.split_k - 1) * p.steps_per_split  # 9 K steps, no empty split
    p = matmul_mod._plan(3, w, "decode", KernelConfig())
    assert (p.block_m, p.x_rows) == (16, 16)
    p = matmul_mod._plan(100, w, "prefill", KernelConfig())
    assert (p.block_m, p.split_k) == (64, 1)
    p = matmul_mod._plan(17, w, "prefill", KernelConfig())
    assert p.block_m == 32


@pytest.mark.parametrize("k,n,split,per_split", [(4096, 4096, 8, 4), (11008, 4096, 9, 10), (8192, 8192, 5, 13)])
def test_auto_split_k_fills_the_grid_on_llama_shapes(k, n, split, per_split):
    tiles = KernelConfig().decode
    w = PackedWeight(qweight=jnp.zeros((k // 8, n), jnp.int32), qzeros=jnp.zeros((k // 128, n // 8), jnp.int32),
                     scales=jnp.zeros((k // 128, n), jnp.float16), g_idx=None, perm=None, bits=4, group_size=128,
                     in_features=k, out_features=n)
    p = matmul_mod._plan(1, w, "decode", KernelConfig())
    assert (p.block_n, p.block_k, p.split_k, p.steps_per_split) == (128, 128, split, per_split)
    steps = k // p.block_k
    assert p.steps_per_split >= tiles.min_k_steps and (p.split_k - 1) * p.steps_per_split < steps


@pytest.mark.parametrize(
    "k,n,bits,group_size,match",
    [
        (256, 40, 4, 128, r"N \(got block_n=8\)"),
        (96, 64, 4, 24, r"gcd\(K, group\)=24 \(got block_k=8\)"),
        (256, 64, 3, 128, r"bits=3.*take bits in \(2, 4, 8\)"),
    ],
)
def test_kernel_names_the_shape_it_cannot_take(k, n, bits, group_size, match):
    w, _ = make_layer(k, n, bits, group_size, sym=True, act_order=False)
    x = activations(2, k, jnp.float32)
    with pytest.raises(NotImplementedError, match=match):
        gptq_matmul(x, w, impl="pallas", interpret=True)
    assert_close(gptq_matmul(x, w, interpret=True), gptq_matmul_reference(x, w), jnp.float32)  # falls back


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Record which implementation ``gptq_matmul`` ran."""
    calls = []
    real_pallas, real_ref = matmul_mod.gptq_matmul_pallas, matmul_mod.gptq_matmul_reference
    real_chunked = matmul_mod.gptq_matmul_chunked

    def pallas(*a, **kw):
        calls.append(("pallas", kw.get("interpret")))
        return real_pallas(*a, **kw)

    def ref(*a, **kw):
        calls.append(("xla", None))
        return real_ref(*a, **kw)

    def chunked(*a, **kw):
        calls.append(("xla_chunked", None))
        return real_chunked(*a, **kw)

    monkeypatch.setattr(matmul_mod, "gptq_matmul_pallas", pallas)
    monkeypatch.setattr(matmul_mod, "gptq_matmul_reference", ref)
    monkeypatch.setattr(matmul_mod, "gptq_matmul_chunked", chunked)
    return calls


def test_cpu_default_is_chunked_up_to_the_decode_threshold_then_the_reference(spy, monkeypatch):
    monkeypatch.delenv(matmul_mod.INTERPRET_ENV, raising=False)
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    t = matmul_mod.CPU_DECODE_MAX_M
    for m in (1, t, t + 1):
        gptq_matmul(activations(m, 128, jnp.float32), w)
    assert spy == [("xla_chunked", None), ("xla_chunked", None), ("xla", None)]


def test_interpret_env_var_runs_the_kernel_on_cpu(spy, monkeypatch):
    monkeypatch.setenv(matmul_mod.INTERPRET_ENV, "1")
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    x = activations(2, 128, jnp.float32)
    assert_close(gptq_matmul(x, w), gptq_matmul_reference(x, w), jnp.float32)
    assert spy[0] == ("pallas", True)


def test_gpu_dispatch_picks_the_kernel_by_m_and_falls_back(monkeypatch):
    """On a GPU (simulated: the launch is replaced) the order is Pallas, then XLA; the kernel is chosen by M."""
    seen = []

    def launch(x, qweight, scales, qzeros, *, bits, group, plan, interpret):
        seen.append((x.shape[0], plan.kernel, interpret))
        return jnp.zeros((x.shape[0], qweight.shape[1]), x.dtype)

    monkeypatch.setattr(matmul_mod, "_pallas_matmul", launch)
    monkeypatch.setattr(matmul_mod, "_platform", lambda x: "gpu")
    monkeypatch.delenv(matmul_mod.INTERPRET_ENV, raising=False)
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    for m in (1, 16, 17):
        gptq_matmul(activations(m, 128, jnp.float32), w)
    assert seen == [(1, "decode", False), (16, "decode", False), (17, "prefill", False)]
    w3, w64 = make_layer(128, 32, 3, 32, sym=True, act_order=False)  # 3-bit: Pallas declines, XLA runs
    x = activations(2, 128, jnp.float32)
    assert_close(gptq_matmul(x, w3), np.asarray(x, np.float64) @ w64, jnp.float32)
    assert len(seen) == 3


def test_explicit_pallas_on_cpu_without_interpret_says_how(monkeypatch):
    monkeypatch.delenv(matmul_mod.INTERPRET_ENV, raising=False)
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    with pytest.raises(NotImplementedError, match=r"needs a GPU; x is on 'cpu'.*interpret=True"):
        gptq_matmul(activations(1, 128, jnp.float32), w, impl="pallas")


def test_gptq_matmul_under_jit():
    w, w64 = make_layer(128, 32, 4, 32, sym=False, act_order=True)
    x = activations(2, 128, jnp.float32)
    assert_close(jax.jit(gptq_matmul)(x, w), np.asarray(x, np.float64) @ w64, jnp.float32)
    f = jax.jit(lambda x, w: gptq_matmul(x, w, impl="pallas", interpret=True))
    assert_close(f(x, w), np.asarray(x, np.float64) @ w64, jnp.float32)


@pytest.mark.parametrize(
    "x,kwargs,error,match",
    [
        (jnp.ones((2, 128), jnp.int32), {}, ValueError, r"x has dtype int32; gptq_matmul takes float32"),
        (jnp.ones((2, 96), jnp.float32), {}, ValueError, r"x has shape \(2, 96\) but the packed weight has K=128"),
        (jnp.ones((), jnp.float32), {}, ValueError, r"x has shape \(\) but"),
        ([[1.0] * 128], {}, ValueError, r"x must be an array"),
        (jnp.ones((2, 128), jnp.float32), dict(impl="triton"), ValueError, r"impl='triton' is not one of"),
    ],
)
def test_bad_inputs_are_named(x, kwargs, error, match):
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    with pytest.raises(error, match=match):
        gptq_matmul(x, w, **kwargs)


def test_bad_weight_is_named():
    w, _ = make_layer(128, 32, 4, 32, sym=True, act_order=False)
    with pytest.raises(TypeError, match=r"PackedWeight, got ndarray"):
        gptq_matmul(jnp.ones((1, 128)), np.ones((128, 32)))
    bad = dataclasses.replace(w, qzeros=w.qzeros[:, :2])
    with pytest.raises(ValueError, match=r"PackedWeight.qzeros is int32 \(4, 2\).*needs \(4, 4\)"):
        gptq_matmul(jnp.ones((1, 128)), bad)
    with pytest.raises(ValueError, match=r"kernel='tiled' must be"):
        gptq_matmul_pallas(jnp.ones((1, 128)), w, kernel="tiled", interpret=True)


# ---------------------------------------------------------------------------------------------------------------
# Lowering to Triton IR: the real GPU path up to (not including) PTX, checked on CPU
# ---------------------------------------------------------------------------------------------------------------


def _triton_modules(lowered) -> list[bytes]:
    """The Triton IR bytecode of every Pallas custom call in a module lowered for CUDA."""
    from jax._src.lib.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in child.attributes:
                        cfg = child.attributes["mhlo.backend_config"]
                        found.append(ir.StringAttr(cfg["ir"]).value_bytes)
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


@pytest.mark.parametrize("bits", KERNEL_BITS)
@pytest.mark.parametrize("m,dtype", [(1, jnp.bfloat16), (3, jnp.float16), (64, jnp.bfloat16), (40, jnp.float32)])
def test_kernels_lower_to_valid_triton_ir(bits, m, dtype):
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"no Triton lowering in this jaxlib: {e}")
    w, _ = make_layer(576, 256, bits, 128, sym=False, act_order=True)
    x = jax.ShapeDtypeStruct((m, 576), dtype)
    f = jax.jit(lambda x, w: gptq_matmul_pallas(x, w, interpret=False))
    try:
        lowered = f.trace(x, w).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "compilation handler" in str(e):  # newer jaxlib compiles Triton while lowering: needs a GPU
            pytest.skip(f"this jaxlib compiles Triton at lowering time: {e}")
        raise
    modules = _triton_modules(lowered)
    assert len(modules) == 1
    with triton_lowering._new_ir_context():
        module = ir.Module.parse(modules[0])
        assert module.operation.verify()
        text = str(module)
    assert "tt.reshape" in text  # in-register unpacking
    assert "scf.for" in text and "scf.while" not in text  # the K loop is a for loop Triton can pipeline
    assert "tt.dot" in text  # every M, M = 1 included: Triton software-pipelines the loads that feed a dot


# ---------------------------------------------------------------------------------------------------------------
# The tile table and the launch guard
# ---------------------------------------------------------------------------------------------------------------


def test_tile_table_rules_match_in_order():
    from pallas_kernels import tuning

    table = tuning.parse({"rules": [
        {"device": "H200", "m_min": 1, "m_max": 1, "kernel": "decode", "tiles": {"block_k": 64}, "tuned": True},
        {"device": "*", "dtype": "float32", "m_min": 1, "m_max": 16, "kernel": "decode", "tiles": {"block_k": 32}},
        {"device": "*", "m_min": 1, "m_max": 8, "kernel": "decode", "tiles": {}},
        {"device": "*", "m_min": 9, "m_max": None, "kernel": "prefill", "tiles": {"block_m": 32}},
    ]})
    assert tuning.lookup("NVIDIA H200", 1, "bfloat16", table) is table[0]
    assert tuning.lookup("NVIDIA H100 80GB HBM3", 1, "bfloat16", table) is table[2]
    assert tuning.lookup("NVIDIA H200", 2, "float32", table) is table[1]
    assert tuning.lookup("cpu", 9, "bfloat16", table) is table[3]
    assert tuning.lookup("cpu", 4096, "float16", table).kernel == "prefill"
    with pytest.raises(ValueError, match=r"rule 0: kernel='gemv' is not one of"):
        tuning.parse({"rules": [{"device": "*", "m_min": 1, "kernel": "gemv"}]})
    with pytest.raises(ValueError, match=r"rule 0 .*malformed"):
        tuning.parse({"rules": [{"device": "*", "kernel": "decode"}]})
    with pytest.raises(LookupError, match=r"no tile table rule for device_kind='cpu', M=1"):
        tuning.lookup("cpu", 1, "bfloat16", table[3:])


def test_shipped_tile_table_covers_every_m_and_dtype():
    from pallas_kernels import tuning

    for m in (1, 2, 16, 17, 64, 2048, 10**6):
        for dtype in ("bfloat16", "float16", "float32"):
            rule = tuning.lookup("NVIDIA H100 80GB HBM3", m, dtype)
            assert rule.kernel == ("decode" if m <= 16 else "prefill")
            assert not rule.tuned  # no GPU has measured any row yet; a tuned row must come from one


def test_dispatcher_uses_the_table_and_refuses_plans_that_cannot_launch():
    w, _ = make_layer(4096, 256, 4, 128, sym=True, act_order=False)
    assert matmul_mod.select_plan(1, w, x_dtype=jnp.bfloat16).block_k == 128
    assert matmul_mod.select_plan(1, w, x_dtype=jnp.float32).block_k == 64  # the float32 row
    assert matmul_mod.select_plan(256, w, x_dtype=jnp.float32).block_m == 32
    # What the issue found: the decode kernel forced on M = 256 needed 245 888 B of shared memory.
    with pytest.raises(NotImplementedError, match=r"decode kernel takes M <= 16"):
        matmul_mod.select_plan(256, w, kernel="decode")
    huge = KernelConfig(prefill=pallas_kernels.PrefillTiles(block_m=128, block_n=256, block_k=128, num_stages=4))
    with pytest.raises(NotImplementedError, match=r"shared memory, over the 232448"):
        matmul_mod.select_plan(256, w, config=huge)
    x = activations(256, 4096, jnp.bfloat16)  # gptq_matmul falls back to the reference instead
    assert_close(gptq_matmul(x, w, config=huge, interpret=True), gptq_matmul_reference(x, w), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"max_decode_m=17 must be in \[0, 16\]"):
        KernelConfig(max_decode_m=17)
