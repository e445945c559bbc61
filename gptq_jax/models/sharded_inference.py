"""Tensor-parallel inference of a packed model: the packed arrays themselves are split over a ``model`` axis.

The Megatron split of a decoder layer (Shoeybi et al. 2019, Sec. 3), applied to GPTQ's packed layout
(``pallas_kernels.packing``):

- column-parallel ``q/k/v/gate/up`` (``x @ W`` with ``W`` split by output columns N): ``qweight`` ``[K*b/32, N]``,
  ``qzeros`` ``[G, N*b/32]``, ``scales`` ``[G, N]`` and ``bias`` ``[N]`` are split on their N dim, so every device
  unpacks and multiplies only its own columns and no communication is needed;
- row-parallel ``o/down`` (split by input rows K): ``qweight`` is split on its packed-row dim and ``qzeros`` /
  ``scales`` on G when the shards fall on group boundaries; each device computes a partial product and XLA adds
  them with one all-reduce.

The arrays get ``NamedSharding``s and the ordinary jitted forward (``models.make_forward``) runs on them: XLA's
SPMD partitioner follows the shardings through ``gptq_matmul``'s jnp reference (the unpack is elementwise per
column, and the reshape of packed rows keeps shard boundaries on word boundaries), so no model code changes. An
array whose dim does not split evenly (e.g. ``qzeros`` of 4 columns per device at 4 bits, less than one int32
word) stays replicated, which is always correct; ``shard_packed_model`` reports which arrays were split.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptq_jax.engine.sharding import MODEL, mesh_shape
from gptq_jax.models.qlinear import QuantLinear
from pallas_kernels import PackedWeight, packing

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def packed_weight_specs(w: PackedWeight, kind: str, shards: int, axis: str = MODEL) -> PackedWeight:
    """``PartitionSpec``s for each array of ``w`` (a ``PackedWeight`` of specs, None where ``w`` has None).

    ``kind`` is ``"column"`` (split N) or ``"row"`` (split K). A dim is split over ``axis`` only when each of the
    ``shards`` pieces holds whole int32 words (and, for rows, whole groups); otherwise that array is replicated.
    """
    if kind not in ("column", "row"):
        raise ValueError(f"kind={kind!r} must be 'column' or 'row'")
    k, n, b = w.in_features, w.out_features, w.bits
    _, chunk_words = packing.chunk_shape(b)  # 3-bit codes come in runs of 3 words that must stay together
    rep = P()
    if kind == "column":
        col = P(None, axis)
        qweight = col if n % shards == 0 else rep
        qzeros = col if (n * b // 32) % shards == 0 and (n * b // 32 // shards) % chunk_words == 0 else rep
        scales = col if n % shards == 0 else rep
    else:
        row = P(axis, None)
        packed_rows = k * b // 32
        rows_ok = packed_rows % shards == 0 and (packed_rows // shards) % chunk_words == 0
        qweight = row if rows_ok else rep
        groups_ok = w.num_groups % shards == 0 and (k // shards) % w.group_len == 0 and w.g_idx is None
        qzeros = row if rows_ok and groups_ok else rep
        scales = qzeros
    return dataclasses.replace(
        w,
        qweight=qweight,
        qzeros=qzeros,
        scales=scales,
        g_idx=None if w.g_idx is None else rep,
        perm=None if w.perm is None else rep,
    )


def _linear_paths(model: nnx.Module):
    for i, layer in enumerate(model.layers):
        for kind, names in (("column", COLUMN_PARALLEL), ("row", ROW_PARALLEL)):
            for sub in names:
                mod = layer
                for part in sub.split("."):
                    mod = getattr(mod, part)
                yield f"model.layers.{i}.{sub}", kind, mod


def shard_packed_model(model: nnx.Module, mesh: Mesh, *, axis: str = MODEL) -> dict[str, dict[str, str]]:
    """Put a packed Llama-family model (``qlinear.pack_model``) on ``mesh``, tensor-parallel over ``axis``.

    Every array is first replicated; then each ``QuantLinear``'s packed arrays (and bias) are split as the module
    docstring says. Modifies ``model`` in place; build the forward (``models.make_forward``) afterwards. Inputs may
    be split over ``data`` (batch) or replicated.

    Returns ``{layer name: {array: "split" | "replicated"}}`` for the quantized linears.
    """
    shards = mesh_shape(mesh)[axis] if axis in mesh.axis_names else None
    if shards is None:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh_shape(mesh)}")
    rep = NamedSharding(mesh, P())
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: jax.device_put(a, rep), state))
    report: dict[str, dict[str, str]] = {}
    for name, kind, mod in _linear_paths(model):
        if not isinstance(mod, QuantLinear):
            continue
        packed = mod.packed
        specs = packed_weight_specs(packed, kind, shards, axis)
        placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), packed, specs)
        for var, value in zip(mod.packed_leaves, jax.tree.leaves(placed), strict=True):
            var.value = value
        report[name] = {
            f: ("split" if getattr(specs, f) not in (None, P()) else "replicated")
            for f in ("qweight", "qzeros", "scales")
        }
        if mod.bias is not None:
            split = kind == "column" and mod.out_features % shards == 0
            mod.bias.value = jax.device_put(mod.bias[...], NamedSharding(mesh, P(axis) if split else P()))
            report[name]["bias"] = "split" if split else "replicated"
    return report
