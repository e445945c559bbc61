"""The parameter leaves of a run (``Leaves``), as the blocks of ``engine.regions`` take them and put them back:
where each one lives while the engine works, and when the caller's model is made to hold what was written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from gptq_jax.engine import placement, streaming
from gptq_jax.engine.scanned import Unrolled


class Leaves:
    """The parameter leaves of a run, as the blocks take and put them back: a scanned stack's slice is cut out of
    its stack only while its block is open (``Unrolled.take``), so no second copy of the layers is held. With
    ``donate`` the caller gives its float parameters up: each one replaced by its quantized value is deleted, so the
    run holds one copy of the model, as an NNX model changed in place does. ``update(tree)``, by ``sync`` once a
    block's writes are done: the caller's model (an NNX model changed in place) made to hold the parameters as they
    are now, so that it lets go of the float arrays that were replaced. ``load`` (a streamed run) fills abstract
    leaves as they are fetched; on a ``mesh`` fetched leaves are placed (``engine.placement``)."""

    def __init__(self, leaves: list[Any], paths: list[str], view: Unrolled | None, donate: bool,
                 update: Callable[[list[Any]], None] | None, load: Callable | None = None, mesh: Any = None) -> None:
        self.leaves, self.paths, self.view, self.donate, self.update = leaves, paths, view, donate, update
        self.load, self.mesh = load, mesh

    def stacked(self, p: int) -> bool:
        return self.view is not None and self.view.stacked(p)

    def take(self, p: int) -> Any:
        return self.view.take(p) if self.stacked(p) else self.leaves[p]

    def put(self, p: int, x: Any) -> None:
        if self.stacked(p):
            if self.view.put(p, x):  # a first copy of a stack: let the caller's model drop its float one now,
                self.sync()  # before the next stack is copied, not at the end of the block (two copies of each)
        else:
            old, self.leaves[p] = self.leaves[p], x
            if self.donate and isinstance(old, jax.Array) and old is not x and all(y is not old for y in self.leaves):
                old.delete()

    def fetch(self, ps: Sequence[int], spread: bool) -> list[Any]:
        """Leaves ``ps`` ready to run: the abstract ones loaded (one ``load`` call), placed on the mesh (a block's
        split over it with ``spread``, else replicated). A whole leaf is written back, so the model holds it while
        it is in use; a stack's slice is not (writing it would copy the stack)."""
        xs = [self.take(p) for p in ps]
        if self.load is not None:
            xs = streaming.load_leaves([self.paths[p] for p in ps], xs, self.load)
        if self.mesh is not None:
            xs = (placement.spread if spread else placement.replicated)(xs, self.mesh)
        for p, x in zip(ps, xs, strict=True):
            if not self.stacked(p) and x is not self.leaves[p]:
                self.put(p, x)
        return xs

    def drop(self, p: int) -> None:
        """Leaf ``p`` made its shape only (a streamed run's finished weight, kept in the work directory)."""
        self.put(p, streaming.abstract(self.leaves[p]))

    def sync(self) -> None:
        """After a block's (or the one-shot mode's) writes: ``update`` the caller's model once with them."""
        if self.update is not None:
            self.update(self.original())

    def original(self) -> list[Any]:
        """The leaves of the caller's tree, as written so far."""
        return self.view.restack(self.leaves) if self.view is not None else list(self.leaves)

    def all(self) -> list[Any]:
        """Every leaf, each slice cut out of its stack (the one-shot mode runs the whole model at once)."""
        return [self.take(p) for p in range(len(self.leaves))]
