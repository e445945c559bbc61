"""Streaming the weights of a model larger than memory: ``quantize(..., load=...)`` fills an abstract model's
parameters (``jax.ShapeDtypeStruct`` leaves) block by block, and a finished block's weights are made abstract again
(``engine.regions`` asks for them when a block opens and lets them go when it closes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def load_leaves(paths: Sequence[str], leaves: Sequence[Any], load: Callable) -> list[Any]:
    """``leaves`` with the abstract ones filled by one ``load(their paths)`` call, checked against their shapes."""
    want = [p for p, x in zip(paths, leaves, strict=True) if isinstance(x, jax.ShapeDtypeStruct)]
    if not want:
        return list(leaves)
    got = dict(load(want))
    missing = [p for p in want if p not in got]
    if missing:
        raise ValueError(f"load() returned no array for {len(missing)} parameter(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    out = []
    for p, x in zip(paths, leaves, strict=True):
        if isinstance(x, jax.ShapeDtypeStruct):
            a = got.pop(p)  # each host copy is released as soon as it is on the device
            if tuple(jnp.shape(a)) != tuple(x.shape):
                raise ValueError(f"load() returned shape {tuple(jnp.shape(a))} for {p}, the model has {tuple(x.shape)}")
            x = jnp.asarray(a, x.dtype)
        out.append(x)
    return out


def abstract(x: Any) -> jax.ShapeDtypeStruct:
    """``x`` as its shape only: a finished weight let go of (its values are kept in the work directory)."""
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
