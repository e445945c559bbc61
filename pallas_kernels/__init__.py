"""Packed low-bit weights and the dequant-matmul: Pallas GPU kernels and a pure-jnp reference.

- ``packing``: the checkpoint layout (``pack_rows``/``unpack_rows`` along the input dim, ``pack_cols``/
  ``unpack_cols`` along the output dim, the v1/v2 zero-point conventions, act-order reordering) and
  ``PackedWeight``, one packed linear layer as a JAX pytree.
- ``gptq_matmul(x, w)``: ``x [..., K] @ dequant(w) -> [..., N]`` in x's dtype, f32 accumulation; a Pallas kernel
  on GPU (by M: split-K decode or tiled prefill), the jnp reference elsewhere.
- ``gptq_matmul_reference(x, w)``: the same in plain jnp; the CPU path and the kernels' test oracle.
- ``gptq_matmul_chunked(x, w)``: the same over K chunks, never materializing the float weight; CPU decode.
- ``select_plan``/``tuning``: which kernel and tiles a call gets (the tile table ``tiles.json``).

This package never imports ``gptq_jax``.
"""

from pallas_kernels import packing, tuning
from pallas_kernels.matmul import (
    DecodeTiles,
    KernelConfig,
    PrefillTiles,
    gptq_matmul,
    gptq_matmul_chunked,
    gptq_matmul_pallas,
    gptq_matmul_reference,
    select_plan,
)
from pallas_kernels.packing import PackedWeight, pack_cols, pack_rows, unpack_cols, unpack_rows

__all__ = [
    "DecodeTiles",
    "KernelConfig",
    "PackedWeight",
    "PrefillTiles",
    "gptq_matmul",
    "gptq_matmul_chunked",
    "gptq_matmul_pallas",
    "gptq_matmul_reference",
    "pack_cols",
    "pack_rows",
    "packing",
    "select_plan",
    "tuning",
    "unpack_cols",
    "unpack_rows",
]
