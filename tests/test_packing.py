"""The packed layout (docs/checkpoints.md): bit-exact packing for 2/3/4/8 bits, zero conventions, act-order,
PackedWeight."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import PackedWeight, packing
from pallas_kernels.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


def bitstream_words(codes: list[int], bits: int) -> list[int]:
    """Oracle: the codes as one little-endian bit stream (code i at bit bits*i), cut into uint32 words."""
    value = sum(int(c) << (bits * i) for i, c in enumerate(codes))
    return [(value >> (32 * j)) & 0xFFFFFFFF for j in range(len(codes) * bits // 32)]


def test_four_bit_rows_zero_to_seven_pack_to_0x76543210():
    codes = np.zeros((8, 3), np.int64)
    codes[:, 1] = np.arange(8)  # input rows 0..7 of output column 1 hold codes 0..7
    qweight = pack_rows(codes, 4)
    assert qweight.shape == (1, 3) and qweight.dtype == np.int32
    assert int(qweight[0, 1]) == 0x76543210
    assert int(qweight[0, 0]) == 0 and int(qweight[0, 2]) == 0


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_the_bit_stream_oracle(bits):
    rng = np.random.default_rng(bits)
    k = 64 if bits != 3 else 96
    codes = rng.integers(0, 1 << bits, (k, 5))
    words = pack_rows(codes, bits).view(np.uint32)  # (k * bits / 32, 5)
    for col in range(5):
        assert words[:, col].tolist() == bitstream_words(codes[:, col].tolist(), bits)


def test_three_bit_codes_straddle_words_at_10_and_21():
    for i, expect in ((10, [0xC0000000, 0x00000001, 0]), (21, [0, 0x80000000, 0x00000003])):
        codes = np.zeros((32, 1), np.int64)
        codes[i] = 7  # all three bits set
        assert pack_rows(codes, 3).view(np.uint32)[:, 0].tolist() == expect, i


@pytest.mark.parametrize(
    "bits,k,n",
    [*[(b, k, n) for b in BITS for k, n in ((96, 32), (576, 192), (4096, 4096))],
     pytest.param(4, 11008, 4096, marks=pytest.mark.slow)],
)
def test_rows_round_trip_bit_exact_numpy_and_jnp(bits, k, n):
    rng = np.random.default_rng(k + n + bits)
    codes = rng.integers(0, 1 << bits, (k, n))
    qweight = pack_rows(codes, bits)
    assert qweight.shape == (k * bits // 32, n)
    np.testing.assert_array_equal(unpack_rows(qweight, bits, k), codes)
    if k * n <= 576 * 192:  # jnp on the small shapes only: the Llama shapes take seconds to compile for 3-bit
        np.testing.assert_array_equal(np.asarray(packing.unpack_rows_jnp(jnp.asarray(qweight), bits)), codes)


@pytest.mark.parametrize("bits", BITS)
def test_cols_round_trip_bit_exact_and_pack_along_the_output_dim(bits):
    rng = np.random.default_rng(bits)
    zeros = rng.integers(0, 1 << bits, (5, 96))
    qzeros = pack_cols(zeros, bits)
    assert qzeros.shape == (5, 96 * bits // 32)
    np.testing.assert_array_equal(unpack_cols(qzeros, bits, 96), zeros)
    np.testing.assert_array_equal(np.asarray(packing.unpack_cols_jnp(jnp.asarray(qzeros), bits)), zeros)
    np.testing.assert_array_equal(qzeros, pack_rows(zeros.T, bits).T)  # same stream, transposed


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: pack_rows(np.full((8, 4), 16), 4), r"\[0, 15\].*\[16, 16\]"),
        (lambda: pack_rows(np.full((8, 4), -1), 4), r"\[0, 15\]"),
        (lambda: pack_rows(np.zeros((12, 4), np.int32), 4), r"K \(rows of codes\)=12 must be a multiple of 8"),
        (lambda: pack_rows(np.zeros((16, 4), np.int32), 3), r"=16 must be a multiple of 32"),
        (lambda: pack_rows(np.zeros((8, 4), np.float32), 4), r"integers.*float32"),
        (lambda: pack_rows(np.zeros((8, 4), np.int32), 5), r"bits=5 is not supported"),
        (lambda: pack_cols(np.zeros((2, 6), np.int32), 4), r"N \(columns of zeros\)=6"),
        (lambda: unpack_rows(np.zeros((2, 4), np.int32), 4, 8), r"does not hold k=8 4-bit rows; expected \[1, N\]"),
        (lambda: unpack_cols(np.zeros((2, 4), np.int32), 4, 16), r"expected \[G, 2\]"),
    ],
)
def test_packing_rejects_bad_input_with_the_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- zero-point conventions ----


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (4, 0x11111111), (8, 0x01010101)])
def test_v1_to_v2_adds_one_per_field_like_the_word_constant(bits, word):
    rng = np.random.default_rng(bits)
    zeros = rng.integers(0, (1 << bits) - 1, (3, 64))  # no field all ones: the whole-word add cannot carry
    v1 = pack_cols(zeros, bits)
    v2 = packing.qzeros_v1_to_v2(v1, bits)
    np.testing.assert_array_equal(v2.view(np.uint32), v1.view(np.uint32) + np.uint32(word))
    np.testing.assert_array_equal(packing.qzeros_v2_to_v1(v2, bits), v1)


@pytest.mark.parametrize("bits", BITS)
def test_zero_conversions_are_per_field_inverses(bits):
    rng = np.random.default_rng(bits)
    zeros = rng.integers(0, 1 << bits, (4, 96))
    zeros[0, :3] = (1 << bits) - 1  # all-ones fields: a whole-word add would carry into the neighbour
    v1 = pack_cols(zeros, bits)
    v2 = packing.qzeros_v1_to_v2(v1, bits)
    np.testing.assert_array_equal(unpack_cols(v2, bits, 96), (zeros + 1) % (1 << bits))
    np.testing.assert_array_equal(packing.qzeros_v2_to_v1(v2, bits), v1)


def test_v1_field_of_all_ones_wraps_to_zero_without_touching_its_neighbour():
    v1 = pack_cols(np.array([[15, 3, 0, 0, 0, 0, 0, 0]]), 4)  # true zero 0 stored as -1 (0xF) next to a 3
    assert unpack_cols(packing.qzeros_v1_to_v2(v1, 4), 4, 8)[0, :2].tolist() == [0, 4]
    naive = (v1.view(np.uint32) + np.uint32(0x11111111)).view(np.int32)  # the whole-word add carries
    assert unpack_cols(naive, 4, 8)[0, :2].tolist() == [0, 5]


def test_v1_lossiness_is_reported_and_refused():
    assert packing.v1_is_lossless(np.array([[8, 8], [1, 15]]))
    assert not packing.v1_is_lossless(np.array([[8, 0]]))
    w = PackedWeight.from_codes(np.zeros((32, 8), np.int32), np.ones((1, 8), np.float16),
                                np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), None, bits=4, group_size=-1)
    with pytest.raises(ValueError, match=r"1 zero points are 0.*gptq_v2"):
        packing.to_checkpoint(w, "gptq")
    assert packing.to_checkpoint(w, "gptq_v2")["qzeros"].shape == (1, 1)


# ---- act-order and PackedWeight ----


def make_parts(k, n, bits, group_size, *, act_order, seed=0, scale_dtype=np.float16):
    """Random codes/scales/zeros and a GPTQ-style g_idx (act-order: groups formed along a random permutation)."""
    rng = np.random.default_rng(seed)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    codes = rng.integers(0, 1 << bits, (k, n))
    zeros = rng.integers(0, 1 << bits, (groups, n))
    scales = (rng.uniform(0.5, 1.5, (groups, n)) / (1 << bits)).astype(scale_dtype)
    g_idx = np.arange(k) // g
    if act_order:
        order = rng.permutation(k)  # visiting order of the solver
        g_idx = np.empty(k, np.int64)
        g_idx[order] = np.arange(k) // g
    return codes, scales, zeros, g_idx.astype(np.int32)


def dequant64(codes, scales, zeros, g_idx):
    return scales.astype(np.float64)[g_idx] * (codes - zeros[g_idx])  # (K, N)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,n,group_size", [(576, 96, 128), (256, 64, -1), (384, 32, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_packed_weight_dequantizes_to_the_float64_oracle(bits, k, n, group_size, act_order):
    codes, scales, zeros, g_idx = make_parts(k, n, bits, group_size, act_order=act_order, seed=bits + k)
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, bits, group_size)
    assert (w.perm is not None) == (act_order and group_size != -1)
    assert w.g_idx is None  # GPTQ-style groups are contiguous after sorting
    assert w.num_groups == -(-k // (k if group_size == -1 else group_size))
    np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float64), dequant64(codes, scales, zeros, g_idx))


def test_reorder_for_act_order_makes_groups_contiguous_and_returns_the_activation_permutation():
    codes, scales, zeros, g_idx = make_parts(128, 16, 4, 32, act_order=True, seed=3)
    qweight, g_sorted, perm = packing.reorder_for_act_order(pack_rows(codes, 4), g_idx, 4)
    np.testing.assert_array_equal(g_sorted, np.arange(128) // 32)
    np.testing.assert_array_equal(unpack_rows(qweight, 4, 128), codes[perm])
    np.testing.assert_array_equal(g_idx[perm], g_sorted)
    # Within a group the original order is kept (stable sort).
    for gr in range(4):
        rows = perm[gr * 32:(gr + 1) * 32]
        assert np.all(np.diff(rows) > 0)
    x = np.random.default_rng(0).standard_normal((3, 128))
    w_sorted = dequant64(unpack_rows(qweight, 4, 128), scales, zeros, g_sorted)
    np.testing.assert_allclose(x[:, perm] @ w_sorted, x @ dequant64(codes, scales, zeros, g_idx), rtol=1e-12)


def test_monotone_g_idx_needs_no_reordering():
    codes, scales, zeros, g_idx = make_parts(64, 16, 4, 32, act_order=False)
    _, _, perm = packing.reorder_for_act_order(pack_rows(codes, 4), g_idx, 4)
    assert perm is None
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, 4, 32)
    assert w.perm is None and w.g_idx is None


def test_uneven_groups_keep_their_sorted_g_idx():
    codes, scales, zeros, _ = make_parts(64, 16, 4, 32, act_order=False)
    g_idx = np.array([1, 0] * 8 + [0] * 8 + [1] * 40, np.int32)  # 24 rows in group 0, 40 in group 1
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, 4, 32)
    assert w.perm is not None
    np.testing.assert_array_equal(np.asarray(w.g_idx), np.sort(g_idx))
    np.testing.assert_array_equal(np.asarray(w.dequantize(), np.float64), dequant64(codes, scales, zeros, g_idx))


def test_packed_weight_is_a_pytree_with_static_metadata():
    codes, scales, zeros, g_idx = make_parts(64, 32, 4, 32, act_order=True)
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, 4, 32)
    leaves, treedef = jax.tree.flatten(w)
    assert len(leaves) == 4  # qweight, qzeros, scales, perm (g_idx is None)
    w2 = jax.tree.unflatten(treedef, leaves)
    assert (w2.bits, w2.group_size, w2.in_features, w2.out_features) == (4, 32, 64, 32)
    doubled = jax.jit(lambda w: w.dequantize() * 2)(w)
    np.testing.assert_array_equal(np.asarray(doubled), 2 * np.asarray(w.dequantize()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.bits = 8


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_checkpoint_round_trip(bits, fmt, act_order):
    codes, scales, zeros, g_idx = make_parts(128, 64, bits, 32, act_order=act_order, seed=bits)
    if fmt == "gptq":
        zeros = np.full_like(zeros, 1 << (bits - 1))  # symmetric: v1 is lossless
    w = PackedWeight.from_codes(codes, scales, zeros, g_idx, bits, 32)
    tensors = packing.to_checkpoint(w, fmt)
    np.testing.assert_array_equal(tensors["qweight"], pack_rows(codes, bits))  # checkpoint row order restored
    np.testing.assert_array_equal(tensors["g_idx"], g_idx)
    stored = unpack_cols(tensors["qzeros"], bits, 64)
    np.testing.assert_array_equal(stored, zeros - 1 if fmt == "gptq" else zeros)
    w2 = PackedWeight.from_checkpoint(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                                      bits=bits, group_size=32, checkpoint_format=fmt)
    np.testing.assert_array_equal(np.asarray(w2.dequantize()), np.asarray(w.dequantize()))
    for a, b in zip(packing.checkpoint_arrays(w2), packing.checkpoint_arrays(w), strict=True):
        np.testing.assert_array_equal(a, b)


def test_symmetric_v1_checkpoint_stores_seven_for_4_bit():
    codes, scales, _, _ = make_parts(64, 16, 4, 32, act_order=False)
    w = PackedWeight.from_codes(codes, scales, np.full((2, 16), 8), None, 4, 32)
    assert np.all(packing.to_checkpoint(w, "gptq")["qzeros"].view(np.uint32) == 0x77777777)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(qweight=np.zeros((8, 16), np.int32)), r"qweight has shape \(8, 16\).*needs \(16, 16\)"),
        (dict(qzeros=np.zeros((3, 2), np.int32)), r"qzeros has shape \(3, 2\).*needs \(2, 2\)"),
        (dict(scales=np.ones((2, 16), np.int32)), r"scales must be float16, bfloat16 or float32, got int32"),
        (dict(qweight=np.zeros((16, 16), np.uint32)), r"must be int32"),
        (dict(g_idx=np.full(128, 2, np.int32)), r"g_idx holds groups in \[2, 2\], outside \[0, 2\)"),
        (dict(g_idx=np.zeros(100, np.int32)), r"g_idx must be integer \[128\]"),
        (dict(checkpoint_format="awq"), r"checkpoint_format='awq' is not one of"),
        (dict(group_size=0), r"group_size=0 must be -1 or positive"),
        (dict(bits=5), r"bits=5 is not supported"),
    ],
)
def test_from_checkpoint_rejects_bad_tensors_naming_them(kwargs, match):
    args = dict(qweight=np.zeros((16, 16), np.int32), qzeros=np.zeros((2, 2), np.int32),
                scales=np.ones((2, 16), np.float16), g_idx=None, bits=4, group_size=64, in_features=128,
                out_features=16, checkpoint_format="gptq_v2")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PackedWeight.from_checkpoint(args.pop("qweight"), args.pop("qzeros"), args.pop("scales"), args.pop("g_idx"),
                                     **args)


def test_validate_names_the_malformed_array():
    codes, scales, zeros, _ = make_parts(64, 16, 4, 32, act_order=False)
    w = PackedWeight.from_codes(codes, scales, zeros, None, 4, 32)
    bad = dataclasses.replace(w, scales=w.scales[:1])
    with pytest.raises(ValueError, match=r"PackedWeight.scales is float16 \(1, 16\).*needs \(2, 16\)"):
        bad.validate()
    with pytest.raises(ValueError, match=r"PackedWeight.qweight is float32"):
        dataclasses.replace(w, qweight=w.qweight.astype(jnp.float32)).validate()
