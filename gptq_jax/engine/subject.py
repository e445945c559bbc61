"""The parameters the engine quantizes, as it holds them: flat leaves with dotted paths
(``layers.3.mlp.up_proj.kernel``) and the tree that rebuilds them, and which of them may be matmul weights.
Nothing here knows any model family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


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
