"""The packed layout of GPTQ weights: the one contract between quantizer, checkpoint and kernels.

Everything follows the checkpoint format written by AutoGPTQ / GPTQModel and read by vLLM and transformers
(see docs/checkpoints.md). For one linear layer with K = in_features, N = out_features,
group length g (g = K when group_size is -1) and G = ceil(K / g) groups:

==========  =======  ======================  ===============================================================
array       dtype    shape                   content
==========  =======  ======================  ===============================================================
``qweight`` int32    ``[K * bits / 32, N]``  codes packed along the input dim (``pack_rows``)
``qzeros``  int32    ``[G, N * bits / 32]``  zero points packed along the output dim (``pack_cols``)
``scales``  float    ``[G, N]``              one scale per group and output column (f16 in checkpoints)
``g_idx``   int32    ``[K]``                 group of each input row: ``k // g`` unless act-order
==========  =======  ======================  ===============================================================

Bit layout. Codes are written into a little-endian bit stream, least significant bits first: code ``i`` of a
run of codes starts at bit ``bits * i`` of the concatenation of the run's words. For 2, 4 and 8 bits a code never
straddles a word (16, 8 and 4 codes per word; for 4-bit, input row k sits in word ``k // 8`` at bit offset
``4 * (k % 8)``, so rows 0..7 holding codes 0..7 pack to ``0x76543210``). For 3 bits 32 codes fill 3 words
(96 bits): codes 0-9 in word 0, code 10 split (2 bits in word 0, 1 bit in word 1), codes 11-20 in word 1, code 21
split (1 bit in word 1, 2 bits in word 2), codes 22-31 in word 2. One routine (``_pack``/``_unpack``) serves all
widths by walking a chunk of ``bits / gcd(bits, 32)`` words holding ``32 / gcd(bits, 32)`` codes.

Zero points. A ``gptq`` (v1) checkpoint stores ``zero - 1``; a ``gptq_v2`` checkpoint stores the true zero.
``PackedWeight`` always holds true zeros; ``qzeros_v1_to_v2`` / ``qzeros_v2_to_v1`` convert packed words field by
field. See ``qzeros_v2_to_v1`` for why asymmetric v1 checkpoints are lossy for other readers.

Act-order. With ``desc_act`` the checkpoint's ``g_idx`` is not monotone. ``reorder_for_act_order`` sorts the
input rows by group at load time so every group is contiguous again, and returns the permutation to apply to the
activations (``x[..., perm]``); kernels then never gather by ``g_idx``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------------------------------------------
# Bit packing (numpy on the host at save/load time; jnp for the reference kernel)
# ---------------------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; GPTQ checkpoints use one of {SUPPORTED_BITS}")


def chunk_shape(bits: int) -> tuple[int, int]:
    """``(codes, words)`` of the smallest run of codes that fills whole int32 words: (16, 1) for 2-bit,
    (32, 3) for 3-bit, (8, 1) for 4-bit, (4, 1) for 8-bit."""
    _check_bits(bits)
    words = bits // math.gcd(bits, 32)
    return 32 * words // bits, words


def _layout(bits: int):
    """For code ``i`` of a chunk: ``(word, bit offset, straddles into the next word)``."""
    codes, _ = chunk_shape(bits)
    out = []
    for i in range(codes):
        word, off = divmod(bits * i, 32)
        out.append((word, off, off + bits > 32))
    return out


def _pack(codes, bits: int, xp):
    """Pack ``codes`` ``[L, C]`` (0 <= code < 2**bits) along axis 0 into uint32 ``[L * bits / 32, C]``."""
    n_codes, n_words = chunk_shape(bits)
    length, cols = codes.shape
    q = codes.astype(xp.uint32).reshape(length // n_codes, n_codes, cols)  # (chunks, codes per chunk, C)
    words = [xp.zeros((length // n_codes, cols), xp.uint32) for _ in range(n_words)]
    for i, (word, off, straddles) in enumerate(_layout(bits)):
        words[word] = words[word] | (q[:, i] << xp.uint32(off))  # bits above 32 fall off: they go to word + 1
        if straddles:
            words[word + 1] = words[word + 1] | (q[:, i] >> xp.uint32(32 - off))
    return xp.stack(words, axis=1).reshape(length * bits // 32, cols)  # (L * bits / 32, C)


def _unpack(words, bits: int, xp):
    """Inverse of ``_pack``: uint32 ``[L * bits / 32, C]`` -> int32 codes ``[L, C]``."""
    n_codes, n_words = chunk_shape(bits)
    rows, cols = words.shape
    mask = xp.uint32((1 << bits) - 1)
    if n_words == 1:  # 2/4/8-bit: one broadcast shift, which XLA fuses into whatever consumes the codes
        shifts = (xp.arange(n_codes, dtype=xp.uint32) * xp.uint32(bits))[None, :, None]
        codes = (words[:, None, :] >> shifts) & mask  # (rows, codes per word, C)
        return codes.reshape(rows * n_codes, cols).astype(xp.int32)
    # 3-bit: every code at once, as (its word >> offset) | (next word << (32 - offset)) where it straddles.
    # One gather per operand instead of 32 slices: XLA compiles this ~10x faster.
    w = words.reshape(rows // n_words, n_words, cols)  # (chunks, words per chunk, C)
    layout = _layout(bits)
    word = np.array([wd for wd, _, _ in layout])
    off = np.array([o for _, o, _ in layout], np.uint32)[None, :, None]
    straddles = np.array([s for _, _, s in layout])[None, :, None]
    lo = xp.take(w, word, axis=1) >> off  # (chunks, codes per chunk, C)
    hi = xp.take(w, np.minimum(word + 1, n_words - 1), axis=1) << ((32 - off) % 32)
    codes = xp.where(straddles, lo | hi, lo) & mask
    return codes.reshape(rows // n_words * n_codes, cols).astype(xp.int32)


def _check_packable(length: int, bits: int, what: str) -> None:
    n_codes, _ = chunk_shape(bits)
    if length % n_codes:
        raise ValueError(f"{what}={length} must be a multiple of {n_codes} to pack {bits}-bit codes into int32 words")


def _check_codes(codes: np.ndarray, bits: int, what: str) -> None:
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > (1 << bits) - 1):
        raise ValueError(
            f"{what} must lie in [0, {(1 << bits) - 1}] for {bits}-bit, got [{codes.min()}, {codes.max()}]"
        )


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """int codes ``[K, N]`` -> int32 ``qweight`` ``[K * bits / 32, N]``, packed along the input dim (numpy)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}")
    _check_packable(codes.shape[0], bits, "K (rows of codes)")
    _check_codes(codes, bits, "codes")
    return _pack(codes, bits, np).view(np.int32)


def unpack_rows(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """int32 ``qweight`` ``[K * bits / 32, N]`` -> int32 codes ``[K, N]`` (numpy)."""
    qweight = np.asarray(qweight)
    _check_packable(k, bits, "k")
    if qweight.ndim != 2 or qweight.shape[0] * 32 != k * bits:
        raise ValueError(f"qweight of shape {qweight.shape} does not hold k={k} {bits}-bit rows; "
                         f"expected [{k * bits // 32}, N]")
    return _unpack(qweight.astype(np.int32).view(np.uint32), bits, np)


def pack_cols(zeros: np.ndarray, bits: int) -> np.ndarray:
    """int zero points ``[G, N]`` -> int32 ``qzeros`` ``[G, N * bits / 32]``, packed along the output dim (numpy)."""
    zeros = np.asarray(zeros)
    if zeros.ndim != 2:
        raise ValueError(f"zeros must be 2-D [G, N], got shape {zeros.shape}")
    _check_packable(zeros.shape[1], bits, "N (columns of zeros)")
    _check_codes(zeros, bits, "zeros")
    return np.ascontiguousarray(_pack(zeros.T, bits, np).T).view(np.int32)


def unpack_cols(qzeros: np.ndarray, bits: int, n: int) -> np.ndarray:
    """int32 ``qzeros`` ``[G, N * bits / 32]`` -> int32 zero points ``[G, N]`` (numpy)."""
    qzeros = np.asarray(qzeros)
    _check_packable(n, bits, "n")
    if qzeros.ndim != 2 or qzeros.shape[1] * 32 != n * bits:
        raise ValueError(f"qzeros of shape {qzeros.shape} does not hold n={n} {bits}-bit columns; "
                         f"expected [G, {n * bits // 32}]")
    return np.ascontiguousarray(_unpack(qzeros.astype(np.int32).view(np.uint32).T, bits, np).T)


def unpack_rows_jnp(qweight: jax.Array, bits: int) -> jax.Array:
    """jnp ``unpack_rows``: int32 ``[K * bits / 32, N]`` -> int32 codes ``[K, N]``; traceable, no validation."""
    return _unpack(jax.lax.bitcast_convert_type(qweight, jnp.uint32), bits, jnp)


def unpack_cols_jnp(qzeros: jax.Array, bits: int) -> jax.Array:
    """jnp ``unpack_cols``: int32 ``[G, N * bits / 32]`` -> int32 zero points ``[G, N]``; traceable."""
    words = jax.lax.bitcast_convert_type(qzeros, jnp.uint32)
    n_codes, n_words = chunk_shape(bits)
    if n_words == 1:
        # 2/4/8-bit: shift along the last axis directly. No transposes, so when XLA fuses this into a (K, N)
        # dequantization loop (it does on CPU) each element costs a shift and a mask, not a transposed copy.
        g, w = words.shape
        shifts = jnp.arange(n_codes, dtype=jnp.uint32) * jnp.uint32(bits)  # (codes per word,)
        codes = (words[:, :, None] >> shifts) & jnp.uint32((1 << bits) - 1)  # (G, words, codes per word)
        return codes.reshape(g, w * n_codes).astype(jnp.int32)
    return _unpack(words.T, bits, jnp).T


# ---------------------------------------------------------------------------------------------------------------
# Zero-point conventions
# ---------------------------------------------------------------------------------------------------------------


def _shift_zero_fields(qzeros: np.ndarray, bits: int, delta: int) -> np.ndarray:
    qzeros = np.asarray(qzeros)
    if qzeros.dtype != np.int32 or qzeros.ndim != 2:
        raise ValueError(f"qzeros must be int32 [G, N * bits / 32], got {qzeros.dtype} {qzeros.shape}")
    _check_bits(bits)
    n = qzeros.shape[1] * 32 // bits
    fields = unpack_cols(qzeros, bits, n)
    # Field by field, modulo 2**bits: a whole-word add (0x11111111 for 4-bit) would carry out of a field
    # holding all ones into its neighbour.
    return pack_cols((fields + delta) & ((1 << bits) - 1), bits)


def qzeros_v1_to_v2(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """``gptq`` (v1, stored ``zero - 1``) packed zeros -> ``gptq_v2`` (true zero): +1 to every field.

    Each field wraps modulo ``2**bits``, so a v1 field of all ones (a true zero of 0 that the v1 packer
    stored as -1) comes back as 0 rather than overflowing into its neighbour. What cannot be undone: packers that
    OR'ed a sign-extended -1 into the word also set every higher field of that word to all ones; those fields
    read back as zero 0 here, as the information is gone from the file.
    """
    return _shift_zero_fields(qzeros, bits, +1)


def qzeros_v2_to_v1(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """``gptq_v2`` (true zero) packed zeros -> ``gptq`` (v1, ``zero - 1``): -1 from every field, modulo ``2**bits``.

    Lossy for other readers when any true zero is 0, which only asymmetric quantization produces (symmetric
    zeros are ``2**(bits-1)``): 0 - 1 = -1 does not fit a field. We store it wrapped (all ones), and our
    ``qzeros_v1_to_v2`` wraps it back to 0, but AutoGPTQ-family readers add 1 without wrapping (reading
    ``2**bits`` instead of 0) or add ``0x11111111`` to the whole word (carrying into the next field). Write
    asymmetric layers as ``gptq_v2``; ``v1_is_lossless`` says whether a v1 file would be safe.
    """
    return _shift_zero_fields(qzeros, bits, -1)


def v1_is_lossless(zeros: np.ndarray) -> bool:
    """Whether true zero points ``[G, N]`` survive a ``gptq`` (v1) checkpoint in every reader: no zero is 0."""
    return bool(np.all(np.asarray(zeros) > 0))


# ---------------------------------------------------------------------------------------------------------------
# Act-order
# ---------------------------------------------------------------------------------------------------------------


def default_g_idx(k: int, group_size: int) -> np.ndarray:
    """int32 ``[K]``: ``k // g``, the group of each input row without act-order (g = K for group_size -1)."""
    g = k if group_size == -1 else group_size
    return (np.arange(k) // g).astype(np.int32)


def reorder_for_act_order(
    qweight: np.ndarray, g_idx: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sort the input rows of a packed layer by group (stable) so each group is contiguous.

    Args:
      qweight: int32 ``[K * bits / 32, N]`` in checkpoint row order.
      g_idx: int ``[K]``, group of each input row (non-monotone with act-order).
      bits: code width.

    Returns:
      ``(qweight_sorted, g_idx_sorted, perm)``: int32 ``[K * bits / 32, N]`` whose row ``i`` is checkpoint row
      ``perm[i]``; int32 ``[K]`` sorted groups; and int32 ``[K]`` ``perm`` (None when the rows were already in
      order). The layer then computes ``x[..., perm] @ dequant(qweight_sorted)``.
    """
    g_idx = np.asarray(g_idx)
    k = g_idx.shape[0]
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if np.array_equal(perm, np.arange(k)):
        return np.asarray(qweight, np.int32), g_idx.astype(np.int32), None
    codes = unpack_rows(qweight, bits, k)  # (K, N)
    return pack_rows(codes[perm], bits), g_idx[perm].astype(np.int32), perm


# ---------------------------------------------------------------------------------------------------------------
# One packed linear layer
# ---------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One GPTQ-quantized linear layer, packed: ``y = x @ W`` with ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])``.

    A JAX pytree: the arrays are children, ``bits``/``group_size``/``in_features``/``out_features`` are static.
    K = in_features, N = out_features, G = ceil(K / g) with g = K when ``group_size`` is -1.

    Attributes:
      qweight: int32 ``[K * bits / 32, N]``, codes packed along the input dim (module docstring). Its row order
        is the *stored* order: checkpoint order, or sorted by group when ``perm`` is set.
      qzeros: int32 ``[G, N * bits / 32]``, TRUE zero points (``gptq_v2`` convention) packed along the output dim.
      scales: float16/bfloat16/float32 ``[G, N]``.
      g_idx: int32 ``[K]`` group of each stored row, or None when it is ``k // g`` (the kernels' fast case).
      perm: int32 ``[K]`` or None. Stored row ``i`` is the layer's input row ``perm[i]``: the layer computes
        ``x[..., perm] @ W_stored``. Set by act-order reordering at load time.
    """

    qweight: Any
    qzeros: Any
    scales: Any
    g_idx: Any
    perm: Any
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))

    @property
    def group_len(self) -> int:
        """g: rows per group (K for group_size -1)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_len)

    def validate(self) -> None:
        """Raise ``ValueError`` naming any array whose shape or dtype breaks the layout above."""
        _check_bits(self.bits)
        k, n, b, g = self.in_features, self.out_features, self.bits, self.num_groups
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be -1 or positive")
        want = {
            "qweight": ((k * b // 32, n), (jnp.int32,)),
            "qzeros": ((g, n * b // 32), (jnp.int32,)),
            "scales": ((g, n), (jnp.float16, jnp.bfloat16, jnp.float32)),
            "g_idx": ((k,), (jnp.int32,)),
            "perm": ((k,), (jnp.int32,)),
        }
        for name, (shape, dtypes) in want.items():
            a = getattr(self, name)
            if a is None and name in ("g_idx", "perm"):
                continue
            if tuple(a.shape) != shape or jnp.dtype(a.dtype) not in [jnp.dtype(d) for d in dtypes]:
                raise ValueError(
                    f"PackedWeight.{name} is {jnp.dtype(a.dtype)} {tuple(a.shape)}, but {b}-bit group_size="
                    f"{self.group_size} with in_features={k}, out_features={n} needs {shape} in one of "
                    f"{[jnp.dtype(d).name for d in dtypes]}"
                )

    # ---- construction (host side, at quantize or load time) ----

    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray,
        g_idx: np.ndarray | None,
        bits: int,
        group_size: int,
    ) -> PackedWeight:
        """From unpacked parts in the layer's own row order.

        Args:
          codes: int ``[K, N]`` in ``[0, 2**bits)``.
          scales: float ``[G, N]`` (dtype kept; f16 is what checkpoints hold).
          zeros: int ``[G, N]`` true zero points in ``[0, 2**bits)``.
          g_idx: int ``[K]`` or None (= ``k // g``). A non-monotone ``g_idx`` (act-order) is sorted away here.
          bits: 2, 3, 4 or 8.
          group_size: rows per group, or -1 for one group over all of K.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}")
        k, n = codes.shape
        return cls.from_checkpoint(
            pack_rows(codes, bits), pack_cols(np.asarray(zeros), bits), scales, g_idx,
            bits=bits, group_size=group_size, checkpoint_format="gptq_v2", in_features=k, out_features=n,
        )

    @classmethod
    def from_checkpoint(
        cls,
        qweight: np.ndarray,
        qzeros: np.ndarray,
        scales: np.ndarray,
        g_idx: np.ndarray | None,
        *,
        bits: int,
        group_size: int,
        checkpoint_format: str = "gptq",
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> PackedWeight:
        """From a layer's checkpoint tensors (docs/checkpoints.md): converts v1 zeros to true zeros and sorts
        act-order rows.

        ``in_features``/``out_features`` default to what ``qweight``'s shape implies; pass them to have the
        shapes checked against the model's config.
        """
        _check_bits(bits)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format={checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
        qweight, qzeros, scales = np.asarray(qweight), np.asarray(qzeros), np.asarray(scales)
        if qweight.ndim != 2:
            raise ValueError(f"qweight must be 2-D [K * bits / 32, N], got shape {qweight.shape}")
        k = qweight.shape[0] * 32 // bits if in_features is None else in_features
        n = qweight.shape[1] if out_features is None else out_features
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size={group_size} must be -1 or positive")
        _check_packable(k, bits, "in_features")
        _check_packable(n, bits, "out_features")
        if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
            raise ValueError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
        if scales.dtype not in (np.float16, np.float32, jnp.bfloat16):
            raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
        g = k if group_size == -1 else group_size
        groups = -(-k // g)
        for name, a, shape in (("qweight", qweight, (k * bits // 32, n)), ("qzeros", qzeros, (groups, n * bits // 32)),
                               ("scales", scales, (groups, n))):
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, but {bits}-bit group_size={group_size} with "
                                 f"in_features={k}, out_features={n} needs {shape}")
        if checkpoint_format == "gptq":
            qzeros = qzeros_v1_to_v2(qzeros, bits)
        perm = None
        if g_idx is not None:
            g_idx = np.asarray(g_idx)
            if g_idx.shape != (k,) or not np.issubdtype(g_idx.dtype, np.integer):
                raise ValueError(f"g_idx must be integer [{k}], got {g_idx.dtype} {g_idx.shape}")
            if g_idx.min() < 0 or g_idx.max() >= groups:
                raise ValueError(f"g_idx holds groups in [{g_idx.min()}, {g_idx.max()}], outside [0, {groups})")
            qweight, g_idx, perm = reorder_for_act_order(qweight, g_idx, bits)
            if np.array_equal(g_idx, default_g_idx(k, group_size)):
                g_idx = None  # contiguous groups of g rows: the kernels need no g_idx at all
        w = cls(
            qweight=jnp.asarray(qweight),
            qzeros=jnp.asarray(qzeros),
            scales=jnp.asarray(scales),
            g_idx=None if g_idx is None else jnp.asarray(g_idx, jnp.int32),
            perm=None if perm is None else jnp.asarray(perm),
            bits=bits,
            group_size=group_size,
            in_features=k,
            out_features=n,
        )
        w.validate()
        return w

    # ---- back to plain arrays ----

    def dequantize(self, dtype: Any = jnp.float32, *, stored_order: bool = False) -> jax.Array:
        """``W`` ``[K, N]``, computed in f32 and cast to ``dtype``.

        Rows in the layer's input order (``x @ W`` is the layer), or with ``stored_order`` in ``qweight``'s row
        order (``x[..., perm] @ W``), which needs no scatter.
        """
        return _dequantize(self, jnp.dtype(dtype), stored_order)


@functools.partial(jax.jit, static_argnames=("dtype", "stored_order"))
def _dequantize(w: PackedWeight, dtype: Any, stored_order: bool) -> jax.Array:
    q = unpack_rows_jnp(w.qweight, w.bits)  # (K, N) stored row order
    z = unpack_cols_jnp(w.qzeros, w.bits)  # (G, N)
    s, z = w.scales.astype(jnp.float32), z.astype(jnp.float32)  # (G, N) each
    if w.g_idx is None:
        # Contiguous groups of g rows (the last may be partial): a broadcast and a reshape, which XLA fuses into
        # the (K, N) loop as plain index arithmetic. (A gather, or jnp.repeat, which lowers to one through a
        # cumulative sum, costs ~10x more per element on CPU.)
        k, g, n = w.in_features, w.group_len, w.out_features

        def rows(a):
            return jnp.broadcast_to(a[:, None, :], (a.shape[0], g, n)).reshape(a.shape[0] * g, n)[:k]

        s, z = rows(s), rows(z)
    else:
        s, z = s[w.g_idx], z[w.g_idx]
    wd = (q.astype(jnp.float32) - z) * s  # (K, N); q - z is an exact small integer in f32
    if w.perm is not None and not stored_order:
        wd = jnp.zeros_like(wd).at[w.perm].set(wd)  # stored row i is input row perm[i]
    return wd.astype(dtype)


def checkpoint_arrays(w: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Undo the load-time reordering: ``(qweight, zeros, scales, g_idx)`` in the layer's input-row order.

    ``qweight`` int32 ``[K * bits / 32, N]`` packed; ``zeros`` int32 ``[G, N]`` TRUE zeros, unpacked;
    ``scales`` ``[G, N]`` as held; ``g_idx`` int32 ``[K]``. ``to_checkpoint`` packs them for a given format.
    """
    k = w.in_features
    qweight = np.asarray(w.qweight)
    g_idx = default_g_idx(k, w.group_size) if w.g_idx is None else np.asarray(w.g_idx)
    if w.perm is not None:
        perm = np.asarray(w.perm)
        codes = np.empty((k, w.out_features), np.int32)
        codes[perm] = unpack_rows(qweight, w.bits, k)
        qweight = pack_rows(codes, w.bits)
        g_orig = np.empty_like(g_idx)
        g_orig[perm] = g_idx
        g_idx = g_orig
    zeros = unpack_cols(np.asarray(w.qzeros), w.bits, w.out_features)
    return qweight, zeros, np.asarray(w.scales), g_idx.astype(np.int32)


def to_checkpoint(w: PackedWeight, checkpoint_format: str) -> dict[str, np.ndarray]:
    """The layer's checkpoint tensors ``{qweight, qzeros, scales, g_idx}`` (docs/checkpoints.md) in ``gptq``
    or ``gptq_v2``.

    Raises ``ValueError`` for ``gptq`` (v1) when a zero point is 0 (see ``qzeros_v2_to_v1``): write ``gptq_v2``.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
    qweight, zeros, scales, g_idx = checkpoint_arrays(w)
    if checkpoint_format == "gptq":
        if not v1_is_lossless(zeros):
            raise ValueError(
                f"{int(np.sum(zeros == 0))} zero points are 0, which checkpoint_format='gptq' (v1, stored zero - 1) "
                "cannot represent for other readers; write checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return {"qweight": qweight, "qzeros": pack_cols(zeros, w.bits), "scales": scales, "g_idx": g_idx}
