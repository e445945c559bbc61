"""What the engine quantizes: a parameter pytree and a function of it, from an NNX model or a Linen ``apply``.

The engine sees a model as ``Subject``: flat parameter leaves with dotted paths (``layers.3.mlp.up_proj.kernel``),
a function ``call(params, batch)`` that runs the model on one calibration batch, and optionally its repeated
blocks. A block is itself a ``Subject`` (its own parameters and ``call(params, args, kwargs)``) plus a way to write
its parameters back. Nothing here knows any model family.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as dotted text: ``layers.3.self_attn.q_proj.kernel``."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(p for p in parts if p != "value")


@dataclasses.dataclass
class Params:
    """Flat parameter leaves with their paths and the tree that rebuilds them."""

    leaves: list[Any]
    paths: list[str]
    tree: Any

    @classmethod
    def of(cls, tree: Any, prefix: str = "") -> Params:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [(prefix + "." if prefix else "") + path_str(p) for p, _ in flat]
        return cls([x for _, x in flat], paths, treedef)

    def unflatten(self, leaves: Sequence[Any] | None = None) -> Any:
        return jax.tree.unflatten(self.tree, list(self.leaves if leaves is None else leaves))


def candidates(params: Params) -> tuple[list[int], dict[int, str]]:
    """Leaves that may be matmul weights (float, rank >= 2), and the reason each other rank >= 2 leaf is not."""
    ok, skipped = [], {}
    for i, x in enumerate(params.leaves):
        if jnp.ndim(x) < 2:
            continue
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            ok.append(i)
        else:
            skipped[i] = f"not a float parameter (dtype {jnp.result_type(x)})"
    return ok, skipped


# ----------------------------------------------------------------------------------------------------------------------
# NNX


class _Caught(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("block inputs captured")
        self.args_, self.kwargs_ = args, kwargs


class BlockNotReached(ValueError):
    """The model's forward returned without calling its first block: ``forward=`` or ``blocks=`` is wrong."""


class _Catcher(nnx.Module):
    """Stands in for the first block while the model runs on a batch: records its inputs and stops the run."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Caught(args, kwargs)


@dataclasses.dataclass
class NNXBlock:
    """One repeated block of an NNX model: ``path`` (e.g. ``layers.3``) and the module."""

    path: str
    module: nnx.Module

    def split(self) -> tuple[Any, Params, Any]:
        graphdef, params, rest = nnx.split(self.module, nnx.Param, ...)
        return graphdef, Params.of(params, self.path), rest

    def write(self, params: Params) -> None:
        nnx.update(self.module, params.unflatten())


class Found(NamedTuple):
    """A submodule found in a model: its dotted ``path``, the ``parent`` holding it under ``key``, and the module."""

    path: str
    parent: Any
    key: Any
    module: nnx.Module


def _module_paths(model: nnx.Module) -> list[Found]:
    """(dotted path, parent, key in parent, module) for every submodule, in graph order."""
    out = []

    def walk(node: Any, prefix: str) -> None:
        items: list[tuple[Any, Any]]
        if isinstance(node, (list, tuple, nnx.List)):
            items = list(enumerate(node))
        elif isinstance(node, nnx.Module):
            items = [(k, v) for k, v in vars(node).items() if not k.startswith("_")]
        elif isinstance(node, dict):
            items = list(node.items())
        else:
            return
        for k, v in items:
            p = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, nnx.Module):
                out.append(Found(p, node, k, v))
                walk(v, p)
            elif isinstance(v, (list, tuple, nnx.List, dict)):
                walk(v, p)

    walk(model, "")
    return out


def _natural(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_blocks(model: nnx.Module, pattern: str | None) -> list[Found]:
    """The repeated blocks of ``model``: the submodules whose path matches ``pattern`` (``fnmatch``, e.g.
    ``"layers.*"``, not matching deeper paths), or, with no pattern, the longest list of at least two modules of
    one type (an ``nnx.List`` of layers). Empty when the model has none."""
    mods = _module_paths(model)
    if pattern is not None:
        depth = pattern.count(".")
        hits = [m for m in mods if m.path.count(".") == depth and fnmatch.fnmatchcase(m.path, pattern)]
        if not hits:
            shown = ", ".join(sorted({re.sub(r"\.\d+(\.|$)", r".*\1", m.path) for m in mods})[:30])
            raise ValueError(f"blocks={pattern!r} matches no submodule of the model; candidate paths: {shown}")
        return sorted(hits, key=lambda m: _natural(m.path))
    groups: dict[tuple[int, str], list[Found]] = {}
    for m in mods:
        if isinstance(m.parent, (list, tuple, nnx.List)):
            groups.setdefault((id(m.parent), type(m.module).__name__), []).append(m)
    best = max(groups.values(), key=len, default=[])
    return best if len(best) >= 2 else []


def catch_block_inputs(first: Found, run: Callable[[], Any]) -> tuple:
    """Run ``run()`` (the model's forward on one batch) with the first block replaced by a catcher; returns that
    block's ``(args, kwargs)``."""
    _set(first.parent, first.key, _Catcher())
    try:
        run()
    except _Caught as c:
        return c.args_, c.kwargs_
    finally:
        _set(first.parent, first.key, first.module)
    raise BlockNotReached(f"the forward never called the first block ({first.path}); check forward= or blocks=")


def _set(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, (list, nnx.List, dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)
