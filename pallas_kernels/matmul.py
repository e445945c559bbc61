"""The GPTQ dequant-matmul ``y = x @ dequant(w)``: Pallas GPU kernels, a pure-jnp reference, one entry point.

Layout: ``pallas_kernels.packing`` (``PackedWeight``). Implementations, tried in this order by ``gptq_matmul``:

- ``"pallas"`` (GPU, or anywhere in interpret mode): picks by M = prod(x.shape[:-1]).
  - ``"pallas_decode"`` (M <= 16): split-K over a grid of (N tiles, K splits), so a small-M product still has
    enough programs to keep every SM streaming. Each program reads its run of K steps of the packed weights once
    (Triton pipelines the loop with ``num_stages`` of 16-byte ``cp.async`` copies), unpacks codes with shifts and
    masks in registers and accumulates one 16-row ``dot`` tile in f32: 2 <= M <= 16 pads M to 16, and a
    matrix-vector product (M = 1) loads its one row and repeats it in registers. The splits need not divide K
    evenly (the last one runs fewer steps). Their f32 partial sums are added outside the kernel: deterministic,
    no atomics, and small next to the weights.
  - ``"pallas_prefill"`` (larger M): a tiled matmul over (M tiles, N tiles), looping over K.
- ``"xla"``: plain jnp; the CPU path and the fallback. On CPU at M <= ``CPU_DECODE_MAX_M`` (decode) it is
  ``gptq_matmul_chunked``, a loop over K chunks that never materializes the float weight; otherwise
  ``gptq_matmul_reference``, which dequantizes the whole weight and calls one ``jnp.dot``.

Which kernel and which tiles: the tile table ``tiles.json`` (``pallas_kernels.tuning``), keyed by device kind,
activation dtype and M, unless a ``KernelConfig`` is passed. ``select_plan`` fits the tiles to the shape and
refuses (``NotImplementedError``) a plan whose shared memory could exceed what an sm_90 block may have; every
plan it can pick is compiled to sm_90a in CI (benchmarks/compile_sm90.py, tests/test_sm90_compile.py).

Both kernels take 2, 4 and 8 bits (a code never straddles an int32 word), any group size whose groups are
contiguous (no act-order ``g_idx`` left after ``packing.reorder_for_act_order``), and K, N with a power-of-two
tile of at least 16 (Triton's block sizes are powers of two; ``dot`` needs 16). 3-bit is reference-only.

Backend: the kernels are written for Pallas's Triton lowering (BlockSpecs, ``dot``) and select it explicitly by
passing ``jax.experimental.pallas.triton.CompilerParams``; since JAX 0.9 a ``pallas_call`` without compiler
params lowers to Mosaic GPU on NVIDIA GPUs, which these kernels are not written for.

Inside a K tile the scale is applied after the dot: every tile lies in one group, so
``x @ ((q - z) * s) == (x @ (q - z)) * s`` column by column, with ``q - z`` an exact small integer in bf16/f16.
That saves a multiply per weight and rounds the weight to x's dtype nowhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import tuning
from pallas_kernels.packing import PackedWeight, chunk_shape, unpack_cols_jnp, unpack_rows_jnp

try:  # The Triton lowering's public names; absent only from JAX builds without GPU Pallas support.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KERNEL_BITS = (2, 4, 8)
IMPLS = ("pallas", "pallas_decode", "pallas_prefill", "xla")
SMEM_LIMIT_BYTES = 227 * 1024  # shared memory one block may use on sm_90 (H100/H200)
INTERPRET_ENV = "PALLAS_KERNELS_INTERPRET"  # "1": run the Pallas kernels in interpret mode (CPU tests)
# CPU decode (``gptq_matmul_chunked``): M up to this loops over K chunks whose f32 tile is at most
# CPU_TILE_BYTES. Each loop step has a fixed cost, and fewer, larger chunks measured faster: SmolLM2's packed decode
# went from 32-34 to 37-39 tokens/s when the tile grew from 768 KiB (a core's L2 here) to 3 MiB (the L3 is 32 MiB);
# 6 and 12 MiB were no faster. Measured in benchmarks/bench_model.py (docs/kernels.md, CPU inference).
CPU_DECODE_MAX_M = 4
CPU_TILE_BYTES = 3 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Tile configuration (how the kernels are tuned; static arguments, so frozen and hashable)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeTiles:
    """Small-M kernel. Sizes are upper bounds: each is cut to the largest power of two that divides the shape."""

    block_n: int = 128  # output columns per program
    block_k: int = 128  # input rows per loop step; also capped at the group size (one group per step)
    split_k: int | None = None  # K splits; None: enough for min_programs programs, keeping min_k_steps each
    min_programs: int = 264  # two waves of an H100's 132 SMs: enough loads in flight to saturate memory
    min_k_steps: int = 4  # K steps per program at least, so the weight stream has a loop to pipeline
    num_warps: int = 4
    num_stages: int = 3  # software pipelining of the weight stream


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillTiles:
    """Large-M kernel: a (block_m, block_n) output tile per program, looping over K in block_k steps."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


DECODE_BLOCK_M = 16  # the decode kernel's one dot tile of rows: M <= 16 (M = 1 repeats its row in registers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """An explicit choice of kernel by M and tiles, overriding the tile table (``tiles.json``, see ``tuning``)."""

    max_decode_m: int = DECODE_BLOCK_M  # M up to this runs the split-K decode kernel
    decode: DecodeTiles = DecodeTiles()
    prefill: PrefillTiles = PrefillTiles()

    def __post_init__(self):
        if not 0 <= self.max_decode_m <= DECODE_BLOCK_M:
            raise ValueError(f"max_decode_m={self.max_decode_m} must be in [0, {DECODE_BLOCK_M}]: the decode kernel "
                             f"computes one {DECODE_BLOCK_M}-row dot tile")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Resolved static shape of one kernel launch. Everything but split_k/steps_per_split shapes the compiled code."""

    kernel: str  # "decode" | "prefill"
    block_m: int  # rows of the dot tile (M is padded to a multiple; decode at M = 1 repeats the row in registers)
    block_n: int
    block_k: int
    split_k: int  # grid size along K (decode); 1 for prefill
    steps_per_split: int  # K steps of block_k per split; the last split may run fewer
    num_warps: int
    num_stages: int
    x_rows: int  # rows of x each decode program loads: 1 at M = 1 (repeated in registers), else block_m

    def smem_bound(self, bits: int, x_bytes: int) -> int:
        """An upper bound on the shared memory (bytes) Triton allots this plan on sm_90, from its pipelined buffers.

        ``num_stages`` copies of each streamed tile (x, packed weights, scales, zeros, as ``cp.async`` buffers),
        plus one x-dtype staging copy of each dot operand and one f32 tile for layout conversion. The sm_90a compile
        check (benchmarks/compile_sm90.py) asserts it is >= what Triton reports for every plan the dispatcher picks.
        """
        bm, bn, bk = self.block_m, self.block_n, self.block_k
        rows = self.x_rows
        stream = rows * bk * x_bytes + bk * bn * bits // 8 + bn * 4 + max(bn * bits // 8, 4)
        staging = (bm * bk + bk * bn) * x_bytes + bm * bn * 4
        return self.num_stages * stream + staging


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


def _unpack_tile_rows(words: jax.Array, bits: int) -> jax.Array:
    """int32 ``(rows, cols)`` packed along rows -> int32 codes ``(rows * 32 / bits, cols)``, in registers."""
    per_word = 32 // bits
    shifts = lax.broadcasted_iota(jnp.int32, (1, per_word, 1), 1) * bits
    codes = (words[:, None, :] >> shifts) & ((1 << bits) - 1)  # (rows, per_word, cols); the mask drops sign bits
    return codes.reshape(words.shape[0] * per_word, words.shape[1])


def _unpack_tile_cols(words: jax.Array, bits: int) -> jax.Array:
    """int32 ``(rows, cols)`` packed along columns -> int32 ``(rows, cols * 32 / bits)``."""
    per_word = 32 // bits
    shifts = lax.broadcasted_iota(jnp.int32, (1, 1, per_word), 2) * bits
    codes = (words[:, :, None] >> shifts) & ((1 << bits) - 1)  # (rows, cols, per_word)
    return codes.reshape(words.shape[0], words.shape[1] * per_word)


def _tile_product(x_ref, qw_ref, s_ref, qz_ref, i, k_global, *, bits: int, group: int, block_m: int, block_k: int,
                  precision, interpret: bool):
    """f32 ``(block_m, block_n)``: step ``i`` of the K loop, input rows ``[k_global, k_global + block_k)``."""
    words = block_k * bits // 32
    gi = lax.div(k_global, group)  # the whole step lies in this group
    q = _unpack_tile_rows(qw_ref[pl.ds(i * words, words), :], bits)  # (bk, bn)
    z = _unpack_tile_cols(qz_ref[pl.ds(gi, 1), :], bits)  # (1, bn)
    s = s_ref[pl.ds(gi, 1), :].astype(jnp.float32)  # (1, bn)
    xk = x_ref[:, pl.ds(i * block_k, block_k)]  # (rows, bk)
    if xk.shape[0] < block_m:  # matrix-vector (M = 1): the row repeated in registers to dot's 16 rows
        xk = jnp.broadcast_to(xk, (block_m, block_k))  # (bm, bk)
    d = q - z  # (bk, bn) integers in [-maxq, maxq]: exact in f16/bf16
    if precision is None and interpret:
        # XLA:CPU has no bf16 x bf16 -> f32 dot for every operand layout. On f32 copies the result is the same:
        # a product of two bf16 (or f16) values is exact in f32, and accumulation is f32 either way.
        part = pltriton.dot(xk.astype(jnp.float32), d.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    else:
        part = pltriton.dot(xk, d.astype(xk.dtype), precision=precision)  # (bm, bn) f32
    return part * s


def gptq_decode_kernel(x_ref, qw_ref, s_ref, qz_ref, o_ref, *, bits: int, group: int, block_m: int, block_k: int,
                       steps_per_split: int, precision, interpret: bool):
    """One (N tile, K split) program of the small-M kernel: K steps ``[s * steps_per_split, ...)`` of split s.

    Refs: ``x_ref`` ``(rows, K)``; ``qw_ref`` int32 ``(K * bits / 32, bn)``; ``s_ref`` ``(G, bn)``; ``qz_ref`` int32
    ``(G, bn * bits / 32)``; ``o_ref`` f32 ``(rows, bn)``, this split's partial sum. ``rows`` is 1 (a matrix-vector
    product, computed as a ``block_m``-row dot of the repeated row) or ``block_m`` (M padded).

    Why a dot even at M = 1: Triton software-pipelines (``cp.async``, ``num_stages`` deep) the loads of a loop
    that feeds a ``dot``, and streams the packed tile with 16-byte loads. A CUDA-core multiply-add version
    compiled to plain loads, unpipelined, and spilled registers (see benchmarks/results/kernels_sm90_compile.json).
    The tensor cores' wasted rows cost nothing here: the kernel is bound by the weight stream.
    """
    steps = x_ref.shape[1] // block_k
    first = pl.program_id(1) * steps_per_split
    count = jnp.minimum(steps_per_split, steps - first)  # the last split may be short; lowers to scf.for all the same
    tile = functools.partial(_tile_product, x_ref, qw_ref, s_ref, qz_ref, bits=bits, group=group, block_m=block_m,
                             block_k=block_k, precision=precision, interpret=interpret)
    acc = lax.fori_loop(first, first + count, lambda i, acc: acc + tile(i, i * block_k),
                        jnp.zeros((block_m, o_ref.shape[1]), jnp.float32))  # (bm, bn)
    if o_ref.shape[0] < block_m:  # M = 1: every row of acc is the same product; keep row 0 (adding exact zeros)
        row = lax.broadcasted_iota(jnp.int32, acc.shape, 0)
        acc = jnp.sum(jnp.where(row == 0, acc, 0.0), axis=0, keepdims=True)  # (1, bn)
    o_ref[...] = acc


def gptq_prefill_kernel(x_ref, qw_ref, s_ref, qz_ref, o_ref, *, bits: int, group: int, block_k: int, precision,
                        interpret: bool):
    """One (M tile, N tile) program of the large-M kernel.

    Refs: ``x_ref`` ``(bm, K)``; ``qw_ref`` int32 ``(K * bits / 32, bn)``; ``s_ref`` ``(G, bn)``; ``qz_ref`` int32
    ``(G, bn * bits / 32)``; ``o_ref`` ``(bm, bn)`` in x's dtype.
    """
    block_m, k = x_ref.shape
    tile = functools.partial(_tile_product, x_ref, qw_ref, s_ref, qz_ref, bits=bits, group=group, block_m=block_m,
                             block_k=block_k, precision=precision, interpret=interpret)
    acc = lax.fori_loop(0, k // block_k, lambda i, acc: acc + tile(i, i * block_k),
                        jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group", "plan", "interpret"))
def _pallas_matmul(x, qweight, scales, qzeros, *, bits: int, group: int, plan: _Plan, interpret: bool):
    """``x`` ``(M, K)`` (rows already permuted) times the packed weight -> ``(M, N)`` in x's dtype."""
    m, k = x.shape
    n = qweight.shape[1]
    groups = scales.shape[0]
    bm, bn, bk, split = plan.block_m, plan.block_n, plan.block_k, plan.split_k
    m_pad = plan.x_rows if plan.kernel == "decode" else -(-m // bm) * bm  # decode at M = 1: repeated in the kernel
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))  # (Mp, K): activations are small next to the weights
    precision = None
    if x.dtype == jnp.float32:
        # Not IEEE f32 (Triton lowers it to a CUDA-core FMA loop that spills on every tile) nor plain TF32 (10-bit
        # mantissa): 3xTF32 runs on the tensor cores, and as ``q - z`` is an exact small integer in TF32 only x is
        # split, so the product is f32 to ~2^-22. Interpret mode (XLA:CPU) takes HIGHEST, the same to that order.
        precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    statics = dict(bits=bits, group=group, block_k=bk, precision=precision, interpret=interpret)
    params = pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    word_rows, zero_cols = bits * k // 32, bn * bits // 32
    if plan.kernel == "decode":
        # Blocks span all of K: each split finds its own run of K steps, so splits need not divide K.
        partial = pl.pallas_call(
            functools.partial(gptq_decode_kernel, block_m=bm, steps_per_split=plan.steps_per_split, **statics),
            out_shape=jax.ShapeDtypeStruct((split, m_pad, n), jnp.float32),
            grid=(n // bn, split),
            in_specs=[
                pl.BlockSpec((m_pad, k), lambda j, s: (0, 0)),
                pl.BlockSpec((word_rows, bn), lambda j, s: (0, j)),
                pl.BlockSpec((groups, bn), lambda j, s: (0, j)),
                pl.BlockSpec((groups, zero_cols), lambda j, s: (0, j)),
            ],
            out_specs=pl.BlockSpec((None, m_pad, bn), lambda j, s: (s, 0, j)),
            compiler_params=params,
            interpret=interpret,
            name="gptq_decode",
        )(x, qweight, scales, qzeros)  # (split, Mp, N) f32
        y = partial.sum(axis=0)
    else:
        y = pl.pallas_call(
            functools.partial(gptq_prefill_kernel, **statics),
            out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
            grid=(m_pad // bm, n // bn),
            in_specs=[
                pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((word_rows, bn), lambda i, j: (0, j)),
                pl.BlockSpec((groups, bn), lambda i, j: (0, j)),
                pl.BlockSpec((groups, zero_cols), lambda i, j: (0, j)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            compiler_params=params,
            interpret=interpret,
            name="gptq_prefill",
        )(x, qweight, scales, qzeros)  # (Mp, N)
    return y[:m].astype(x.dtype)


def _pow2_tile(extent: int, want: int) -> int:
    """Largest power of two <= want that divides extent (Triton block sizes are powers of two)."""
    t = 1 << (max(want, 1).bit_length() - 1)
    while extent % t:
        t //= 2
    return t


def _plan(m: int, w: PackedWeight, kernel: str, config: KernelConfig, x_bytes: int = 2) -> _Plan:
    """Fit the tiles to this shape, or raise NotImplementedError saying why the kernel cannot take it.

    ``x_bytes``: bytes per activation element (2 for bf16/f16, 4 for f32), for the shared-memory bound.
    """
    k, n, bits, group = w.in_features, w.out_features, w.bits, w.group_len
    where = f"{kernel} kernel, M={m}, K={k}, N={n}, bits={bits}, group_size={w.group_size}"
    if pltriton is None:
        raise NotImplementedError("this JAX has no Pallas Triton lowering (jax.experimental.pallas.triton)")
    if bits not in KERNEL_BITS:
        raise NotImplementedError(f"{where}: the Pallas kernels take bits in {KERNEL_BITS}; 3-bit codes straddle "
                                  "int32 words and are served by the reference only")
    if w.g_idx is not None:
        raise NotImplementedError(f"{where}: groups are not contiguous blocks of {group} rows even after sorting "
                                  "by g_idx (uneven group sizes); the kernels need g_idx == k // group_size")
    if m == 0:
        raise NotImplementedError(f"{where}: empty input")
    if kernel == "decode" and m > DECODE_BLOCK_M:
        raise NotImplementedError(f"{where}: the decode kernel takes M <= {DECODE_BLOCK_M} (one dot tile of rows, "
                                  "every row of x held by every program); use the prefill kernel")
    tiles = config.decode if kernel == "decode" else config.prefill
    bn = _pow2_tile(n, tiles.block_n)
    # Each K step must lie inside one group: the step divides the group length (or all of K for group_size -1).
    bk = _pow2_tile(math.gcd(k, group), tiles.block_k)
    if bn < 16 or bk < 16:
        raise NotImplementedError(
            f"{where}: needs power-of-two tiles of at least 16 dividing N (got block_n={bn}) and "
            f"gcd(K, group)={math.gcd(k, group)} (got block_k={bk})"
        )
    if kernel == "decode":
        bm = DECODE_BLOCK_M  # dot needs 16 rows: M < 16 is padded (M = 1: repeated in registers, not in memory)
        steps = k // bk
        split = tiles.split_k
        if split is None:
            split = min(-(-tiles.min_programs // (n // bn)), steps // max(tiles.min_k_steps, 1))
        split = max(1, min(split, steps))
        per_split = -(-steps // split)
        split = -(-steps // per_split)  # no empty splits: e.g. 86 steps in 9 splits run 10 steps each, last 6
        x_rows = 1 if m == 1 else bm
    else:
        cap = 1 << (max(tiles.block_m, 16).bit_length() - 1)  # block_m rounded down to a power of two
        bm = max(16, min(cap, 1 << (m - 1).bit_length()))  # no bigger than M rounded up to a power of two
        split, per_split, x_rows = 1, k // bk, bm
    plan = _Plan(kernel, bm, bn, bk, split, per_split, tiles.num_warps, tiles.num_stages, x_rows)
    smem = plan.smem_bound(bits, x_bytes)
    if smem > SMEM_LIMIT_BYTES:  # Triton compiles such a kernel; it would fail at launch
        raise NotImplementedError(f"{where}: tiles {plan} may need {smem} bytes of shared memory, over the "
                                  f"{SMEM_LIMIT_BYTES} an sm_90 block can have; choose smaller tiles or fewer stages")
    return plan


def _config_for(m: int, device_kind: str, dtype: Any) -> tuple[str, KernelConfig]:
    """The tile table's kernel and tiles for this device kind, M and dtype (``tiles.json``, first matching rule)."""
    rule = tuning.lookup(device_kind, m, jnp.dtype(dtype).name)
    tiles = dict(rule.tiles)
    if rule.kernel == "decode":
        return "decode", KernelConfig(decode=DecodeTiles(**tiles))
    return "prefill", KernelConfig(prefill=PrefillTiles(**tiles))


def select_plan(m: int, w: PackedWeight, *, kernel: str | None = None, config: KernelConfig | None = None,
                device_kind: str = "*", x_dtype: Any = jnp.bfloat16) -> _Plan:
    """What the dispatcher launches for M rows of x on ``device_kind``: an explicit ``config`` (kernel chosen by
    ``config.max_decode_m``) or else the tile table. ``NotImplementedError`` when no kernel takes it."""
    if config is None:
        table_kernel, config = _config_for(m, device_kind, x_dtype)
        kernel = kernel or table_kernel
    elif kernel is None:
        kernel = "decode" if m <= config.max_decode_m else "prefill"
    if kernel not in ("decode", "prefill"):
        raise ValueError(f"kernel={kernel!r} must be 'decode', 'prefill' or None")
    return _plan(m, w, kernel, config, x_bytes=jnp.dtype(x_dtype).itemsize)


def _device_kind(x: Any) -> str:
    if isinstance(x, jax.Array):
        try:
            return next(iter(x.devices())).device_kind
        except Exception:  # a tracer: it runs on the default device
            pass
    return jax.devices()[0].device_kind


def gptq_matmul_pallas(
    x: jax.Array,
    w: PackedWeight,
    *,
    kernel: str | None = None,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x`` ``[..., K]`` @ ``w`` with a Pallas kernel (Triton lowering); ``[..., N]`` in x's dtype.

    Args:
      x: float32/bfloat16/float16 ``[..., K]``.
      w: the packed layer; ``w.perm`` is applied to x's last axis.
      kernel: ``"decode"``, ``"prefill"`` or None (as the tile table or ``config.max_decode_m`` says).
      config: explicit tiles; None looks them up in the tile table (``tiles.json``) by device kind and M.
      interpret: run the kernel body in Pallas interpret mode (any platform, slow; for tests).

    Raises:
      NotImplementedError: the kernel does not take this shape/bits/layout (the message says which and why).
    """
    check_inputs(x, w)
    if kernel not in (None, "decode", "prefill"):
        raise ValueError(f"kernel={kernel!r} must be 'decode', 'prefill' or None")
    lead, k = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    plan = select_plan(m, w, kernel=kernel, config=config, device_kind=_device_kind(x), x_dtype=x.dtype)
    x2 = x.reshape(m, k)  # (M, K)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)  # activations in the weight's stored row order
    y = _pallas_matmul(x2, w.qweight, w.scales, w.qzeros, bits=w.bits, group=w.group_len, plan=plan,
                       interpret=bool(interpret))
    return y.reshape(*lead, w.out_features)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------


def check_inputs(x: Any, w: PackedWeight) -> None:
    """Validation at the boundary: ``w`` is a well-formed ``PackedWeight`` and ``x`` a float ``[..., K]``."""
    if not isinstance(w, PackedWeight):
        raise TypeError(f"w must be a pallas_kernels.PackedWeight, got {type(w).__name__}")
    w.validate()
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"x must be an array [..., K], got {type(x).__name__}")
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"x has dtype {jnp.dtype(dtype)}; gptq_matmul takes float32, bfloat16 or float16 activations")
    if len(shape) < 1 or shape[-1] != w.in_features:
        raise ValueError(
            f"x has shape {tuple(shape)} but the packed weight has K={w.in_features} input features "
            f"(qweight {tuple(w.qweight.shape)} at {w.bits} bits)"
        )


def _interpret_default() -> bool:
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes")


def _platform(x: Any) -> str:
    """Platform x lives on ("cpu", "gpu", "tpu"); the default backend for tracers."""
    if isinstance(x, jax.Array):
        try:
            return next(iter(x.devices())).platform
        except Exception:  # tracers (under jit) have no device: the computation runs on the default backend
            pass
    return jax.default_backend()


def gptq_matmul(
    x: jax.Array,
    w: PackedWeight,
    *,
    impl: str | None = None,
    config: KernelConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``y = x @ dequant(w)``: float ``[..., K]`` -> ``[..., N]`` in x's dtype, accumulated in f32.

    Args:
      x: float32/bfloat16/float16 ``[..., K]``, K = ``w.in_features``.
      w: a ``PackedWeight``; its act-order permutation ``w.perm`` is applied to x.
      impl: None tries, in order, the Pallas kernels (on GPU, or anywhere when interpreting) and then ``"xla"``,
        moving on when one raises ``NotImplementedError``. ``"pallas"`` (kernel chosen by M), ``"pallas_decode"``,
        ``"pallas_prefill"`` or ``"xla"`` runs exactly that one and lets its error through.
      config: kernel tiles (``KernelConfig``).
      interpret: run Pallas kernels in interpret mode; None reads the ``PALLAS_KERNELS_INTERPRET`` env var ("1").

    Raises:
      ValueError: bad inputs (dtype, K, malformed ``w``) or an unknown ``impl``.
      NotImplementedError: the requested ``impl`` cannot take this input (the message names shape, bits, platform).
    """
    check_inputs(x, w)
    interpret = _interpret_default() if interpret is None else bool(interpret)
    platform = _platform(x)

    def run(name: str) -> jax.Array:
        if name == "xla":
            m = math.prod(x.shape[:-1])
            if platform == "cpu" and 0 < m <= CPU_DECODE_MAX_M and cpu_chunk_rows(w) is not None:
                return gptq_matmul_chunked(x, w)
            return gptq_matmul_reference(x, w)
        if platform != "gpu" and not interpret:
            raise NotImplementedError(
                f"impl={name!r} compiles Pallas kernels through the Triton lowering, which needs a GPU; x is on "
                f"{platform!r}. Pass interpret=True (or set {INTERPRET_ENV}=1) to run the kernel body on CPU"
            )
        kernel = {"pallas": None, "pallas_decode": "decode", "pallas_prefill": "prefill"}[name]
        return gptq_matmul_pallas(x, w, kernel=kernel, config=config, interpret=interpret)

    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        return run(impl)
    order = ("pallas", "xla") if (platform == "gpu" or interpret) else ("xla",)
    reasons = []
    for name in order:
        try:
            return run(name)
        except NotImplementedError as e:
            logger.debug("gptq_matmul: %s skipped: %s", name, e)
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no gptq_matmul implementation takes this input: " + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("f32_operands",))
def _reference(x: jax.Array, w: PackedWeight, f32_operands: bool) -> jax.Array:
    if x.size:
        # Tie the dequantization to x. Nothing else orders it: the packed weights are ready when the program starts,
        # and XLA:CPU's (default) concurrency-optimized scheduler then runs every layer's dequantization up front,
        # so a whole model's float weights are written and read back per decoded token (SmolLM2-135M: 2.6 tokens/s
        # packed against 25 float). Data-dependent on x, each runs just before its product, while it is still in
        # cache. ``nan_to_num(x0 * 0)`` is exactly +-0 for every x0 (inf * 0 and NaN * 0 are NaN, mapped to 0);
        # XLA cannot fold it away as it could ``x0 * 0`` under fast math or an integer ``& 0``.
        zero = jnp.nan_to_num(x.reshape(-1)[0].astype(jnp.float32) * 0.0)
        w = dataclasses.replace(w, scales=w.scales + zero.astype(w.scales.dtype))  # (G, N), values unchanged
    wd = w.dequantize(x.dtype, stored_order=True)  # (K, N): unpack, (q - z) * s in f32, cast to x's dtype
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)  # (..., K) in stored row order
    out_dtype = x.dtype
    if f32_operands:  # same products, exact in f32 (see _tile_product): XLA:CPU lacks some bf16 -> f32 dots
        x, wd = x.astype(jnp.float32), wd.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # (M, K)
    y = jnp.dot(x2, wd, preferred_element_type=jnp.float32, precision=precision)  # (M, N)
    return y.astype(out_dtype).reshape(*lead, wd.shape[1])


def gptq_matmul_reference(x: jax.Array, w: PackedWeight) -> jax.Array:
    """Plain jnp: unpack, dequantize in f32, cast to x's dtype, ``jnp.dot`` with f32 accumulation.

    Same contract as ``gptq_matmul``; every bit width and any ``g_idx``. The CPU path and what the kernels are
    tested against; under ``jax.jit`` XLA fuses the unpacking into the dot's operand.
    """
    check_inputs(x, w)
    return _reference(x, w, f32_operands=_platform(x) == "cpu")


# ---------------------------------------------------------------------------------------------------------------
# CPU decode: K chunks, never the whole float weight
# ---------------------------------------------------------------------------------------------------------------


def cpu_chunk_rows(w: PackedWeight, tile_bytes: int | None = None) -> int | None:
    """Rows R per K chunk of ``gptq_matmul_chunked``, or None when the layout has no valid R.

    R is whole packed words (a multiple of 8 rows at 4 bits, 32 at 3 bits) and either divides the group length
    (a chunk lies in one group: the scale is applied after the dot) or is a multiple of it (a chunk is whole
    groups: the scales are applied to the tile). Of those, the largest whose f32 tile ``R x N`` fits
    ``tile_bytes`` (default ``CPU_TILE_BYTES``), or the smallest when none does; at most K rounded up to a group.
    None for uneven groups (``g_idx`` set) and for group lengths that are not whole runs of words.
    """
    if w.g_idx is not None:
        return None
    unit, _ = chunk_shape(w.bits)
    g, k = w.group_len, w.in_features
    if g % unit:
        return None
    fit = max((CPU_TILE_BYTES if tile_bytes is None else tile_bytes) // (4 * w.out_features), unit)
    rows = [r for r in range(unit, g + 1, unit) if g % r == 0] + list(range(2 * g, -(-k // g) * g + 1, g))
    fitting = [r for r in rows if r <= fit]
    return max(fitting) if fitting else min(rows)


@functools.partial(jax.jit, static_argnames=("rows",))
def _chunked(x: jax.Array, w: PackedWeight, rows: int) -> jax.Array:
    k, n, bits, g = w.in_features, w.out_features, w.bits, w.group_len
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)  # (..., K) in stored row order
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k).astype(jnp.float32)  # (M, K); products are exact in f32 (see _tile_product)
    s = w.scales.astype(jnp.float32)  # (G, N)
    n_groups = s.shape[0]
    # The zero points leave the per-weight work: x @ ((q - z) s) = sum_g ((x_g @ q_g) s_g - (sum x_g) (z_g s_g)).
    # The second term is one small (M, G) @ (G, N) product, subtracted up front.
    zs = unpack_cols_jnp(w.qzeros, bits).astype(jnp.float32) * s  # (G, N)
    x_sums = jnp.pad(x2, ((0, 0), (0, n_groups * g - k))).reshape(-1, n_groups, g).sum(-1)  # (M, G)
    words = rows * bits // 32  # packed rows per chunk

    def step(x_c, q_words, r0):
        """f32 ``(M, N)``: ``x_c @ (codes * scales)`` of rows ``[r0, r0 + len)``; the f32 tile goes from a fusion
        to the dot through the cache.

        In one group (rows <= g): the codes are small integers, exact in f32, and the scale is applied after the
        dot (as in the GPU kernels), so each weight costs only its unpack and convert. Whole groups (rows > g):
        ``q * s`` per weight.
        """
        length = x_c.shape[1]
        gi = r0 // g
        q = unpack_rows_jnp(q_words, bits).astype(jnp.float32)  # (len, N)
        if rows > g:
            ng = -(-length // g)
            a = lax.dynamic_slice_in_dim(s, gi, ng)  # (ng, N): each group's row repeated over its g rows
            q = q * jnp.broadcast_to(a[:, None, :], (ng, g, n)).reshape(ng * g, n)[:length]
        part = jnp.dot(x_c, q, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # (M, N)
        return part * lax.dynamic_slice_in_dim(s, gi, 1) if rows <= g else part

    full = k // rows

    def body(c, acc):
        r0 = c * rows
        q_c = lax.dynamic_slice_in_dim(w.qweight, c * words, words)  # (words, N)
        return acc + step(lax.dynamic_slice_in_dim(x2, r0, rows, axis=1), q_c, r0)

    def tied(q_words, dep):
        """``q_words`` made data-dependent on ``dep`` (values unchanged): a step outside the loop would otherwise
        be dequantized as soon as the program starts, not just before its product (see ``_reference``)."""
        return q_words + jnp.nan_to_num(dep.reshape(-1)[0] * 0.0).astype(jnp.int32)

    acc = -jnp.dot(x_sums, zs, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # (M, N)
    if full == 1:  # one whole chunk (and perhaps a tail): no loop
        acc = acc + step(x2[:, :rows], tied(w.qweight[:words], x2), 0)
    elif full > 1:  # the loop starts once x is ready, and dequantizes each chunk just before its product
        acc = lax.fori_loop(0, full, body, acc)
    if full * rows < k:  # the last rows (fewer than a chunk; K need only be whole words): one more step
        r0 = full * rows
        acc = acc + step(x2[:, r0:], tied(w.qweight[r0 * bits // 32:], acc), r0)
    return acc.astype(x.dtype).reshape(*lead, n)


def gptq_matmul_chunked(x: jax.Array, w: PackedWeight, *, rows: int | None = None) -> jax.Array:
    """``x @ dequant(w)`` for small M on CPU, one K chunk at a time; same contract as ``gptq_matmul``.

    ``gptq_matmul_reference`` writes the whole ``(K, N)`` f32 weight and reads it back for the dot: about 8.5
    bytes of traffic per weight against the float model's 4, and the dequantization's subtract and multiply on
    every weight. Here a ``fori_loop`` over chunks of ``rows`` input rows unpacks one chunk's codes, converts
    them to f32 (a tile that stays in cache) and accumulates ``x_chunk @ tile`` in f32; the zero points never touch
    a weight: ``sum_g (x_g @ q_g) s_g - (sum x_g) z_g s_g``, the second sum one small product up front. A chunk
    inside one group (``rows`` divides the group length) is scaled after the dot; a chunk of whole groups (``rows``
    a multiple of it) carries its scales in the tile. ``rows`` is whole packed words; ``cpu_chunk_rows`` picks it
    (None: that choice). Rows left after the last whole chunk are one more step. Act-order layers (``w.perm``) work
    as in the reference; uneven groups (``w.g_idx`` set) raise ``NotImplementedError`` (use the reference).
    """
    check_inputs(x, w)
    if rows is None:
        rows = cpu_chunk_rows(w)
        if rows is None:
            raise NotImplementedError(
                f"gptq_matmul_chunked: {w.bits}-bit group_size={w.group_size} (g_idx "
                f"{'set' if w.g_idx is not None else 'None'}) has no chunk of whole words inside one group")
    unit, _ = chunk_shape(w.bits)
    g = w.group_len
    if rows <= 0 or rows % unit or (g % rows and rows % g) or w.g_idx is not None:
        raise ValueError(f"rows={rows} must be a positive multiple of {unit} that divides or is a multiple of the "
                         f"group length {g}, and the groups contiguous (g_idx None)")
    return _chunked(x, w, rows)
