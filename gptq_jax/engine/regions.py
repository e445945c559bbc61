"""Blocks of any parameter pytree and function (a Linen ``apply``, or any ``f(params, batch)``), found in the
parameter tree and cut out of the traced program.

The blocks are subtrees of the parameters: ``layers_0 .. layers_N`` (Linen's default names), ``layers/0 .. N``
(nested dict keys, Hugging Face Flax), or those whose dotted path matches ``blocks=`` (``fnmatch``, e.g.
``"model.layers.*"``). The forward is traced once to one flat program (``trace.trace``), and cut at the first
equation that reads each block's parameters: block i is equations ``[cut_i, cut_{i+1})`` (the last block runs to
the outputs), run from the values live at its cut. The program before the first cut (the embedding, masks,
positions) runs once per calibration batch: that is how each block's inputs are caught, without knowing what they
are. Each block is then an ordinary program of its own parameters, and the driver quantizes it as it does an NNX
block: stage by stage, on the outputs of the blocks already quantized. Blocks whose programs are the same (the
same equations on the same shapes) share one plan and its compiled passes.

The cut needs each block to read its parameters only between its own cut and the next one; a model that reads a
later block's parameter early (for instance, casting every weight up front) is refused with the parameter named,
and runs in one shot (``blocks=False``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.engine.blocks import Block, Subject, call_checked, matrix_paths, outside_blocks, params_shapes
from gptq_jax.engine.subject import Params
from gptq_jax.engine.trace import Traced, live_at, run, trace

log = logging.getLogger(__name__)
_NUMBERED = re.compile(r"(?P<name>.*?)_(?P<i>\d+)")


def _natural(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def find_param_blocks(paths: Sequence[str], pattern: str | None) -> list[str]:
    """The block prefixes among dotted parameter ``paths``: those matching ``pattern`` at its depth, or, with no
    pattern, the largest set of sibling keys numbered ``name_<i>`` or ``<i>`` (at least two). Natural order."""
    if pattern is not None:
        depth = pattern.count(".") + 1
        hits = {".".join(p.split(".")[:depth]) for p in paths if p.count(".") >= depth}
        hits = {h for h in hits if fnmatch.fnmatchcase(h, pattern)}
        if not hits:
            shown = ", ".join(sorted({re.sub(r"(^|\.)(\w*?_?)\d+(\.|$)", r"\1\2*\3", p) for p in paths})[:30])
            raise ValueError(f"blocks={pattern!r} matches no parameter subtree; parameter paths: {shown}")
        return sorted(hits, key=_natural)
    groups: dict[tuple[str, str], set[str]] = {}
    for p in paths:
        parts = p.split(".")
        for k, part in enumerate(parts[:-1]):
            m = _NUMBERED.fullmatch(part)
            name = "" if part.isdigit() else (m.group("name") if m else None)
            if name is not None:
                groups.setdefault((".".join(parts[:k]), name), set()).add(".".join(parts[: k + 1]))
    # The group covering the most parameters: the layers, not the numbered sublayers inside each of them.
    best = max(groups.values(), key=lambda g: (sum(any(p.startswith(h + ".") for h in g) for p in paths), len(g)),
               default=set())
    return sorted(best, key=_natural) if len(best) >= 2 else []


class CutError(ValueError):
    """The program cannot be cut at the blocks (see module docstring)."""


def _reads(traced: Traced) -> dict[int, list[int]]:
    """Parameter leaf -> the equations that read it (directly)."""
    index = {v: i for i, v in enumerate(traced.jaxpr.jaxpr.invars[: traced.num_params])}
    out: dict[int, list[int]] = {}
    for e, eqn in enumerate(traced.eqns):
        for v in eqn.invars:
            if not hasattr(v, "val") and v in index:
                out.setdefault(index[v], []).append(e)
    return out


def _cuts(traced: Traced, paths: Sequence[str], members: list[list[int]], names: list[str]) -> list[int]:
    """Each block's first equation, checked: every read of a block's parameters lies within its span."""
    reads = _reads(traced)
    firsts = []
    for b, leaves in enumerate(members):
        eqns = [e for p in leaves for e in reads.get(p, [])]
        if not eqns:
            raise CutError(f"block {names[b]}: the forward reads none of its parameters")
        firsts.append(min(eqns))
    order = sorted(range(len(members)), key=lambda b: firsts[b])
    if order != list(range(len(members))):
        raise CutError(f"the blocks run in another order than their names ({[names[b] for b in order][:4]} ...); "
                         "name them with blocks= or use blocks=False")
    for b, leaves in enumerate(members):
        end = firsts[b + 1] if b + 1 < len(members) else len(traced.eqns)
        for p in leaves:
            late = [e for e in reads.get(p, []) if not firsts[b] <= e < end]
            if late:
                raise CutError(
                    f"{paths[p]}: read at equation {late[0]} of the traced forward, outside its block {names[b]} "
                    f"(equations {firsts[b]}..{end - 1}); the engine cuts the program where each block first reads "
                    "its parameters, so a weight used elsewhere (cast up front, shared) cannot be cut out: pass "
                    "blocks=False for one-shot quantization"
                )
    return firsts


def _aval_key(xs: Sequence[Any]) -> tuple:
    return tuple((tuple(jnp.shape(x)), jnp.dtype(jnp.result_type(x)).name) for x in xs)


def _var_key(vs: Sequence[Any]) -> tuple:
    return tuple((tuple(v.aval.shape), jnp.dtype(v.aval.dtype).name) for v in vs)


@dataclasses.dataclass(eq=False)
class _Cut:
    """The forward traced for one batch shape, cut at the blocks' first equations ``cuts``."""

    traced: Traced
    cuts: list[int]

    @functools.cached_property
    def prefix(self) -> Callable[[list[Any], list[Any]], list[Any]]:
        """``prefix(param_leaves, batch_leaves)`` -> the values live at the first cut: the first block's inputs."""
        first = self.ins(0)

        @jax.jit
        def fn(leaves: list[Any], inputs: list[Any]) -> list[Any]:
            kept = run(self.traced, leaves, inputs=inputs, stop=self.cuts[0], keep=first)[1]
            return [kept[v] for v in first]

        return fn

    def span(self, b: int) -> tuple[int, int | None]:
        return self.cuts[b], self.cuts[b + 1] if b + 1 < len(self.cuts) else None

    @functools.cache  # noqa: B019 - one per batch shape, alive as long as the run
    def ins(self, b: int) -> list[Any]:
        return live_at(self.traced, self.cuts[b])

    @functools.cache  # noqa: B019
    def outs(self, b: int) -> list[Any]:
        stop = self.span(b)[1]
        return live_at(self.traced, stop) if stop is not None else list(self.traced.jaxpr.jaxpr.outvars)


@dataclasses.dataclass
class _Region:
    """Block ``path`` (the ``b``-th): in each batch shape's program, equations ``[cuts[b], cuts[b+1])`` (the last
    block runs to the outputs), run from the values live at its cut. ``own``: its parameter leaves; ``others``:
    parameters outside the blocks that it reads."""

    path: str
    b: int
    programs: list[_Cut]
    all_leaves: list[Any]
    all_paths: list[str]
    own: list[int]
    others: list[int]

    def __post_init__(self) -> None:
        self.params = Params([self.all_leaves[p] for p in self.own], [self.all_paths[p] for p in self.own],
                             jax.tree.structure([0] * len(self.own)))
        self.extra = [self.all_leaves[p] for p in self.others]

    def _program(self, values: Sequence[Any]) -> _Cut:
        want = _aval_key(values)
        for cut in self.programs:
            if _var_key(cut.ins(self.b)) == want:
                return cut
        raise ValueError(f"block {self.path}: no traced program takes inputs shaped {want}")

    def call(self, params_and_extra: Any, values: list[Any]) -> list[Any]:
        own, extra = params_and_extra
        cut = self._program(values)
        full: list[Any] = [None] * cut.traced.num_params
        for p, x in zip([*self.own, *self.others], [*jax.tree.leaves(own), *extra], strict=True):
            full[p] = x
        start, stop = cut.span(self.b)
        out, kept = run(cut.traced, full, carry=dict(zip(cut.ins(self.b), values, strict=True)), start=start,
                        stop=stop, keep=cut.outs(self.b) if stop is not None else ())
        return out if stop is None else [kept[v] for v in cut.outs(self.b)]

    @functools.cached_property
    def key(self) -> str:
        """The region's program as text, with the digest of its constants: equal keys, equal programs."""
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.programs[0].ins(self.b)]
        closed = jax.make_jaxpr(self.call)((self.params.unflatten(), self.extra), avals)
        h = hashlib.sha256(str(closed.jaxpr).encode())
        for c in closed.consts:
            h.update(np.ascontiguousarray(np.asarray(c)).tobytes())
        return h.hexdigest()

    def inputs(self, values: list[Any]) -> tuple:
        return (values,)

    def watch(self, out_avals: Sequence[Any], values: list[Any]) -> list[int]:
        """The float outputs the block computes (not those it passes through): its new hidden states."""
        cut = self._program(values)
        ins = set(cut.ins(self.b))
        return [i for i, v in enumerate(cut.outs(self.b)) if not hasattr(v, "val") and v not in ins
                and jnp.issubdtype(v.aval.dtype, jnp.floating)]

    def next_inputs(self, outputs: list[Any] | None, values: list[Any]) -> list[Any]:
        if outputs is None:  # nothing ran (round-to-nearest): the next block only needs the shapes
            return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self._program(values).outs(self.b)]
        return list(outputs)

    def close(self, drop: Sequence[str]) -> None:
        for p, x in zip(self.own, self.params.leaves, strict=True):
            self.all_leaves[p] = x


def _cut_programs(params: Params, fwd: Callable, names: list[str], batches: list[Any], default_forward: bool
                  ) -> tuple[list[_Cut], list[list[int]], dict[tuple, _Cut]]:
    """The forward traced once per distinct batch shape, each program cut at the blocks."""
    members = [[i for i, p in enumerate(params.paths) if p.startswith(n + ".")] for n in names]
    by_shape: dict[tuple, _Cut] = {}
    for b, x in enumerate(batches):
        sig = _aval_key(jax.tree.leaves(x))
        if sig not in by_shape:
            traced = call_checked(lambda x=x: trace(fwd, params.leaves, params.tree, x), f"calibration batch {b}",
                                  default_forward)
            by_shape[sig] = _Cut(traced, _cuts(traced, params.paths, members, names))
    return list(by_shape.values()), members, by_shape


def pytree_subject(tree: Any, fwd: Callable[[Any, Any], Any], blocks: str | bool | None, batches: list[Any],
                   default_forward: bool) -> Subject:
    """A ``Subject`` of a parameter pytree run by ``fwd(params, batch)`` (see module docstring)."""
    params = Params.of(tree)
    all_leaves = list(params.leaves)
    names = [] if blocks is False else find_param_blocks(params.paths, blocks if isinstance(blocks, str) else None)
    if names:
        try:
            programs, members, by_shape = _cut_programs(params, fwd, names, batches, default_forward)
        except CutError as e:
            if isinstance(blocks, str):
                raise
            log.info("the numbered subtrees %s ... are not blocks the program can be cut at (%s): one-shot mode",
                     names[:3], e)
            names = []
    regions: list[_Region] = []
    if names:
        mine = {p for m in members for p in m}
        reads = _reads(programs[0].traced)
        for b, n in enumerate(names):
            start, stop = programs[0].span(b)
            end = len(programs[0].traced.eqns) if stop is None else stop
            others = sorted(p for p, es in reads.items() if p not in mine and any(start <= e < end for e in es))
            regions.append(_Region(n, b, programs, all_leaves, params.paths, members[b], others))

    def catch_inputs(batches: list[Any]) -> list[list[Any]]:
        out = []
        for b, x in enumerate(batches):
            leaves = jax.tree.leaves(x)
            cut = by_shape[_aval_key(leaves)]
            out.append(call_checked(lambda cut=cut, leaves=leaves: cut.prefix(all_leaves, leaves),
                                    f"calibration batch {b}", default_forward))
        return out

    def write(new: Params) -> None:
        all_leaves[:] = new.leaves

    return Subject(
        name=type(tree).__name__, shapes=params_shapes(tree),
        blocks=[Block(r.path, (lambda r=r: r)) for r in regions],
        outside=outside_blocks(params, names) if names else [],
        one_shot=lambda: (fwd, Params(list(all_leaves), params.paths, params.tree)), write=write,
        catch_inputs=catch_inputs, result=lambda: params.unflatten(all_leaves), arrays=lambda: list(all_leaves),
        matrices=matrix_paths(params), default_forward=default_forward,
    )
