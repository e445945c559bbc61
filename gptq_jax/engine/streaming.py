"""Streaming the weights of a model larger than memory: ``quantize(..., load=...)`` fills an abstract model's
parameters block by block and drops each finished block's weights again."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptq_jax.engine import placement, subject


def load_params(node: nnx.Module, prefix: str, load: Callable, mesh: Any, skip: Sequence[str] = ()) -> None:
    """Fill the abstract parameters of ``node`` (paths ``prefix.*``, except under ``skip``) with ``load(paths)``."""
    params = subject.Params.of(nnx.state(node, nnx.Param), prefix)
    want = [p for p, x in zip(params.paths, params.leaves, strict=True)
            if isinstance(x, jax.ShapeDtypeStruct) and not any(p.startswith(s + ".") for s in skip)]
    if not want:
        return
    got = dict(load(want))
    missing = [p for p in want if p not in got]
    if missing:
        raise ValueError(f"load() returned no array for {len(missing)} parameter(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    leaves = []
    for p, x in zip(params.paths, params.leaves, strict=True):
        if p in want:
            a = got.pop(p)  # each host copy is released as soon as it is on the device
            if tuple(jnp.shape(a)) != tuple(x.shape):
                raise ValueError(f"load() returned shape {tuple(jnp.shape(a))} for {p}, the model has {tuple(x.shape)}")
            x = jnp.asarray(a, x.dtype)
        leaves.append(x)
    nnx.update(node, params.unflatten(leaves))
    if mesh is not None:
        nnx.update(node, (placement.replicated if skip else placement.spread)(nnx.state(node), mesh))


def drop(params: subject.Params, names: Iterable[str]) -> subject.Params:
    """``params`` with the leaves at ``names`` made abstract again (their memory released)."""
    names = set(names)
    leaves = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) if p in names else x
              for p, x in zip(params.paths, params.leaves, strict=True)]
    return subject.Params(leaves, params.paths, params.tree)
