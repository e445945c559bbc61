"""Where the engine's arrays live on a ``("data", "model")`` mesh (``engine.sharding.make_mesh``).

Calibration batches are split by rows over ``data``; the parameters outside the blocks are replicated; a block's
parameters are split over ``model`` so that no block has to fit on one device. The jitted passes then run
partitioned and XLA inserts the collectives. Abstract leaves (``jax.ShapeDtypeStruct``, not loaded yet) are left
as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gptq_jax.engine import sharding


def batches_on_mesh(batches: list[Any], masks: list[Any], mesh: Any) -> tuple[list[Any], list[Any]]:
    """Split each batch's leading (row) axis over the mesh's data axis."""
    out_b, out_m = [], []
    for b, (batch, m) in enumerate(zip(batches, masks, strict=True)):
        leaves = jax.tree.leaves(batch)
        rows = int(jnp.shape(leaves[0])[0]) if leaves and jnp.ndim(leaves[0]) else 0
        try:
            sharding.check_batch(rows, mesh)
        except ValueError as e:
            raise ValueError(f"calibration batch {b}: {e}") from None

        def put(x, rows=rows):
            spec = PartitionSpec("data") if jnp.ndim(x) and jnp.shape(x)[0] == rows else PartitionSpec()
            return jax.device_put(x, NamedSharding(mesh, spec))

        out_b.append(jax.tree.map(put, batch))
        out_m.append(None if m is None else put(m))
    return out_b, out_m


def replicated(tree: Any, mesh: Any) -> Any:
    """Concrete arrays of ``tree`` copied to every device of ``mesh``."""
    where = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, where), tree)


def spread(tree: Any, mesh: Any) -> Any:
    """A block's parameters on ``mesh``: each matrix split over the ``model`` axis along its largest axis that the
    axis divides, everything else replicated."""
    m = sharding.mesh_shape(mesh).get("model", 1)

    def place(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        spec = [None] * jnp.ndim(x)
        fits = [a for a in range(jnp.ndim(x)) if jnp.shape(x)[a] % m == 0] if m > 1 and jnp.ndim(x) >= 2 else []
        if fits:
            spec[max(fits, key=lambda a: jnp.shape(x)[a])] = "model"
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(place, tree)


def like(x: jax.Array, template: Any) -> jax.Array:
    """``x`` placed as ``template`` is (a written-back weight split again as its float weight was)."""
    return jax.jit(lambda a: a, out_shardings=template.sharding)(x)
