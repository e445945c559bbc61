"""The blocks of every model, found in its parameters and cut out of its traced program: an NNX model as its
parameter state and a function of it (``nnx_subject``), a Linen ``apply`` or any ``f(params, batch)``.

The blocks are subtrees of the parameters: ``layers.0 .. N`` (an NNX list of layers), ``layers_0 .. layers_N``
(Linen's default names), ``layers/0 .. N`` (nested dict keys, Hugging Face Flax), or those whose dotted path
matches ``blocks=`` (``fnmatch``, e.g. ``"model.layers.*"``). The forward is traced once to one flat program
(``trace.trace``) and cut before the first equation that reads each block's parameters, where the fewest bytes
are live (after the previous block's residual sum, not inside the next one's norm): block i is equations
``[cut_i, cut_{i+1})`` (the last block stops before the program's tail), run from the values live at its cut. The
program before the first cut (the embedding, masks, positions) runs once per calibration batch: that is how each
block's inputs are caught, without knowing what they are. Each block is then an ordinary program of its own
parameters, which the driver quantizes stage by stage, on the outputs of the blocks already quantized. Blocks
whose programs are the same (the same equations on the same shapes) share one plan and its compiled passes.

A model that scans over stacked parameters is first unrolled (``engine.scanned``): its stacked leaves split into
slices ``path[i]``, each iteration of the scan a block ``<prefix>[i]`` of those slices, cut like any other; the
result is stacked back, so the caller keeps its scanned model (an NNX model's layers made by ``nnx.vmap`` and run
by ``nnx.scan`` too).

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
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.engine.blocks import (
    Block,
    Subject,
    call_checked,
    default_forward,
    matrix_paths,
    outside_blocks,
    params_shapes,
)
from gptq_jax.engine.leaves import Leaves
from gptq_jax.engine.scanned import ScanError, Unrolled, find_scans, unroll
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


def _tail(traced: Traced, members: list[list[int]]) -> int | None:
    """Where the program after the last block begins: its first equation, after the last block's last read of its
    own parameters, that reads a parameter outside the blocks (a final norm, an output head). The last block stops
    there; None when nothing after it reads a parameter (it then runs to the outputs). Nothing after the last block
    is needed to quantize, and an output head would make each batch's logits (``[B, T, vocab]``) the block's
    outputs, held for every batch at once."""
    reads = _reads(traced)
    mine = {p for m in members for p in m}
    last = max(e for p in members[-1] for e in reads.get(p, []))
    after = [e for p, es in reads.items() if p not in mine for e in es if e > last]
    return min(after) if after else None


def _aval_key(xs: Sequence[Any]) -> tuple:
    return tuple((tuple(jnp.shape(x)), jnp.dtype(jnp.result_type(x)).name) for x in xs)


def _var_key(vs: Sequence[Any]) -> tuple:
    return tuple((tuple(v.aval.shape), jnp.dtype(v.aval.dtype).name) for v in vs)


@dataclasses.dataclass(eq=False)
class _Cut:
    """The forward traced for one batch shape, cut at the blocks' first equations ``cuts``."""

    traced: Traced
    cuts: list[int]
    end: int | None = None  # where the last block stops (``_tail``); None: at the outputs
    last_outs: list[Any] | None = None  # the last block's outputs where it mirrors the one before (``_mirror``)

    def prefix(self, leaves: list[Any], inputs: list[Any]) -> list[Any]:
        """The values live at the first cut (the first block's inputs) from the parameter and batch leaves. Run
        op by op, not compiled: it is a few operations (the embedding, positions, masks), whose executables JAX
        keeps from one batch shape, and one run, to the next."""
        kept = run(self.traced, leaves, inputs=inputs, stop=self.cuts[0], keep=self.ins(0))[1]
        return [kept[v] for v in self.ins(0)]

    @functools.cached_property
    def prefix_reads(self) -> set[int]:
        """The parameter leaves the program before the first block reads."""
        return {p for p, es in _reads(self.traced).items() if min(es) < self.cuts[0]}

    def span(self, b: int) -> tuple[int, int | None]:
        return self.cuts[b], self.cuts[b + 1] if b + 1 < len(self.cuts) else self.end

    @functools.cache  # noqa: B019 - one per batch shape, alive as long as the run
    def ins(self, b: int) -> list[Any]:
        return live_at(self.traced, self.cuts[b])

    @functools.cache  # noqa: B019
    def outs(self, b: int) -> list[Any]:
        stop = self.span(b)[1]
        if stop is None:
            return list(self.traced.jaxpr.jaxpr.outvars)
        if b + 1 == len(self.cuts) and self.last_outs is not None:
            return self.last_outs
        return live_at(self.traced, stop)


def _mirror(cut: _Cut, members: list[int]) -> None:
    """End the last block where a block like the one before it would end, handing on what that one does (the
    positions and masks too), where its equations from its cut on are that block's on the same shapes and it reads
    no parameter of its own past them: it is then their program, and shares their plan and compiled passes instead
    of compiling its own (it would otherwise stop before the tail, where less is live)."""
    b, traced = len(cut.cuts) - 1, cut.traced
    if b == 0 or cut.end is None:
        return
    (start, stop), ins_b = cut.span(b - 1), cut.ins(b)
    end = cut.cuts[b] + stop - start
    reads = _reads(traced)
    if end > cut.end or any(e >= end for p in members for e in reads.get(p, [])):
        return
    eqns_a, eqns_b = traced.eqns[start:stop], traced.eqns[cut.cuts[b] : end]
    if len(cut.ins(b - 1)) != len(ins_b):
        return
    same = dict(zip(cut.ins(b - 1), ins_b, strict=True))
    for ea, eb in zip(eqns_a, eqns_b, strict=True):
        if (ea.primitive is not eb.primitive or _var_key(ea.invars) != _var_key(eb.invars)
                or _var_key(ea.outvars) != _var_key(eb.outvars)):
            return
        same.update(zip(ea.outvars, eb.outvars, strict=True))
    mapped = [same.get(v) for v in cut.outs(b - 1)]
    if all(v is not None for v in mapped):
        cut.end, cut.last_outs = end, mapped


@dataclasses.dataclass
class _Region:
    """Block ``path`` (the ``b``-th): in each batch shape's program, equations ``[cuts[b], cuts[b+1])`` (the last
    block runs to ``_tail`` or the outputs), run from the values live at its cut. ``own``: its parameter leaves;
    ``others``: parameters outside the blocks that it reads. ``params`` and ``extra`` are taken from ``store`` when
    the block opens and let go of when it closes."""

    path: str
    b: int
    programs: list[_Cut]
    store: Leaves
    all_paths: list[str]
    own: list[int]
    others: list[int]
    params: Params | None = None
    extra: list[Any] = dataclasses.field(default_factory=list)

    def open(self) -> _Region:
        own = self.store.fetch(self.own, spread=True)
        self.params = Params(own, [self.all_paths[p] for p in self.own], jax.tree.structure([0] * len(self.own)))
        self.extra = self.store.fetch(self.others, spread=False)
        self._taken = list(own)
        return self

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
        """Write the block's parameters back; those at paths ``drop`` (a streamed run, kept in the work directory)
        as their shapes only."""
        gone = set(drop)
        for p, x, was in zip(self.own, self.params.leaves, self._taken, strict=True):
            if self.all_paths[p] in gone:
                self.store.drop(p)
            elif x is not was:  # a leaf the block left as it was (a norm's scale) is not written back
                self.store.put(p, x)
        self.store.sync()
        self.params, self.extra, self._taken = None, [], []


def _cut_programs(params: Params, fwd: Callable, names: list[str], members: list[list[int]], batches: list[Any],
                  default_forward: bool, first: Traced) -> tuple[list[_Cut], dict[tuple, _Cut]]:
    """The forward traced once per distinct batch shape (``first``: batch 0's), each program cut at the blocks."""
    by_shape: dict[tuple, _Cut] = {}
    for b, x in enumerate(batches):
        sig = _aval_key(jax.tree.leaves(x))
        if sig not in by_shape:
            traced = first if b == 0 else call_checked(lambda x=x: trace(fwd, params.leaves, params.tree, x),
                                                       f"calibration batch {b}", default_forward)
            cut = _Cut(traced, *_settle(traced, _cuts(traced, params.paths, members, names), _tail(traced, members)))
            _mirror(cut, members[-1])
            by_shape[sig] = cut
    return list(by_shape.values()), by_shape


def _live_bytes(traced: Traced, cut: int) -> int:
    """The bytes of the arrays live at ``cut``; scalars (a loop counter) count for nothing."""
    return sum(math.prod(v.aval.shape) * jnp.dtype(v.aval.dtype).itemsize for v in live_at(traced, cut)
               if v.aval.shape)


def _settle(traced: Traced, cuts: list[int], end: int | None) -> tuple[list[int], int | None]:
    """Each cut (and the last block's end) moved back over the equations before it that read no parameter, to
    the last place where the fewest bytes are live: the values handed from block to block are held for every
    calibration batch. A block's first parameter read often comes after work on its input that reads none (a
    norm's mean square before its scale): cut there, both the hidden states and their normalized copy would be
    handed on; cut after the residual sum, only the hidden states are, and the block is the layer as its module
    runs it."""
    reading = sorted({e for es in _reads(traced).values() for e in es})

    def back(hi: int) -> int:
        lo = max((e for e in reading if e < hi), default=-1) + 1
        return min(range(hi, lo - 1, -1), key=lambda c: _live_bytes(traced, c))

    return [back(c) for c in cuts], None if end is None else back(end)


def _selects(pattern: str, prefix: str) -> bool:
    """``blocks=`` names a scanned stack by the path its parameters share: ``"layers"``, ``"layers.*"`` or
    ``"layers[*]"``."""
    return any(fnmatch.fnmatchcase(prefix, p) for p in {pattern, pattern.removesuffix(".*"),
                                                        pattern.removesuffix("[*]")})


def _blocks(params: Params, view: Unrolled | None, blocks: str | bool | None) -> tuple[list[str], list[list[int]]]:
    """The blocks' names and parameter leaves: a scan's iterations (all scans, or those ``blocks=`` names), else
    the numbered subtrees ``find_param_blocks`` finds."""
    if blocks is False:
        return [], []
    pattern = blocks if isinstance(blocks, str) else None
    if view is not None:
        chosen = [g for s, g in zip(view.scans, view.blocks, strict=True) if pattern is None
                  or _selects(pattern, s.prefix)]
        if chosen:
            return [n for g in chosen for n, _ in g], [m for g in chosen for _, m in g]
    names = find_param_blocks(params.paths, pattern)
    return names, [[i for i, p in enumerate(params.paths) if p.startswith(n + ".")] for n in names]


def _unrolled(params: Params, fwd: Callable, blocks: str | bool | None, batch: Any, default_forward: bool,
              donate: bool) -> tuple[Unrolled | None, Traced]:
    """The model with its scans over stacked parameters unrolled (``engine.scanned``) and its program for
    ``batch``; ``(None, program as it is)`` when it has none or they cannot be unrolled (they then stay float,
    reported)."""
    first = call_checked(lambda: trace(fwd, params.leaves, params.tree, batch), "calibration batch 0",
                         default_forward)
    try:
        scans = find_scans(first, params.paths)
        if not scans:
            return None, first
        view = unroll(params, fwd, scans, donate)
        return view, call_checked(lambda: trace(view.forward, view.params.leaves, view.params.tree, batch),
                                  "calibration batch 0", default_forward)
    except ScanError as e:
        if isinstance(blocks, str):
            raise
        log.info("the scans over stacked parameters cannot be unrolled into blocks (%s): they stay float", e)
        return None, first


def _regions(params: Params, fwd: Callable, blocks: str | bool | None, batches: list[Any], default_forward: bool,
             first: Traced, store: Leaves) -> tuple[list[_Region], dict[tuple, _Cut]]:
    """The blocks (``_blocks``) cut out of the program traced for each batch shape, and those programs by shape;
    none (one-shot mode) where the program cannot be cut at blocks found without ``blocks=``."""
    names, members = _blocks(params, store.view, blocks)
    if not names:
        return [], {}
    try:
        programs, by_shape = _cut_programs(params, fwd, names, members, batches, default_forward, first)
    except CutError as e:
        if isinstance(blocks, str):
            raise
        log.info("the blocks %s ... are not blocks the program can be cut at (%s): one-shot mode", names[:3], e)
        return [], {}
    mine = {p for m in members for p in m}
    reads = _reads(programs[0].traced)
    regions = []
    for b, n in enumerate(names):
        start, stop = programs[0].span(b)
        end = len(programs[0].traced.eqns) if stop is None else stop
        others = sorted(p for p, es in reads.items() if p not in mine and any(start <= e < end for e in es))
        regions.append(_Region(n, b, programs, store, params.paths, members[b], others))
    return regions, by_shape


def _catch_inputs(store: Leaves, by_shape: dict[tuple, _Cut], default_forward: bool,
                  batches: list[Any]) -> list[list[Any]]:
    """The first block's input leaves per batch: the program before its cut, run on the parameters it reads (the
    others may be abstract, or slices still in their stacks)."""
    out = []
    for b, x in enumerate(batches):
        leaves = jax.tree.leaves(x)
        cut = by_shape[_aval_key(leaves)]
        taken = [store.take(p) if p in cut.prefix_reads else None for p in range(len(store.leaves))]
        out.append(call_checked(lambda cut=cut, leaves=leaves, taken=taken: cut.prefix(taken, leaves),
                                f"calibration batch {b}", default_forward))
    return out


def pytree_subject(tree: Any, fwd: Callable[[Any, Any], Any], blocks: str | bool | None, batches: list[Any],
                   default_forward: bool, *, finish: Callable[[Any], Any] | None = None, name: str | None = None,
                   donate: bool = False, update: Callable[[Any], None] | None = None, load: Callable | None = None,
                   mesh: Any = None) -> Subject:
    """A ``Subject`` of a parameter pytree run by ``fwd(params, batch)`` (see module docstring); a model that
    scans over stacked parameters is quantized as its unrolled view, one block per iteration
    (``engine.scanned``). ``finish(tree)`` makes the result from the quantized tree (default: the tree itself).
    ``donate`` and ``update(tree)``: see ``engine.leaves``. ``load(paths)`` (a streamed run): the tree's abstract
    leaves are loaded, those outside the blocks at once, a block's when it opens. On a ``mesh`` the blocks'
    parameters are split over it (``engine.placement``) and the others replicated."""
    original = Params.of(tree)
    view, first = _unrolled(original, fwd, blocks, batches[0], default_forward, donate)
    params, run_fwd = (view.params, view.forward) if view is not None else (original, fwd)
    treedef = original.tree
    del original  # its leaves are the float stacks, which the run lets go of as it writes them
    store = Leaves(list(params.leaves), params.paths, view, donate,
                    None if update is None else lambda leaves: update(jax.tree.unflatten(treedef, leaves)), load, mesh)
    regions, by_shape = _regions(params, run_fwd, blocks, batches, default_forward, first, store)
    if load is not None and (not regions or view is not None):
        raise ValueError("load= needs a model with repeated blocks of their own parameters (found "
                         + ("a scanned stack, one parameter for all its layers" if view is not None else
                            "none; name them with blocks=") + ")")
    mine = {p for r in regions for p in r.own}
    if load is not None or mesh is not None:  # the parameters outside the blocks: loaded, replicated, up front
        store.fetch([p for p in range(len(params.leaves)) if p not in mine and not store.stacked(p)], spread=False)
        store.sync()

    def write(new: Params) -> None:
        for p, x in enumerate(new.leaves):
            store.put(p, x)
        store.sync()

    def result() -> Any:
        out = jax.tree.unflatten(treedef, store.original())
        return out if finish is None else finish(out)

    mine_paths = {params.paths[p] for p in mine}
    outside = [(p, why) for p, why in outside_blocks(params, []) if regions and p not in mine_paths]
    paths, ptree = params.paths, params.tree  # not ``params``: a closure over it would keep every float leaf alive
    return Subject(
        name=name or type(tree).__name__, shapes=params_shapes(tree),
        blocks=[Block(r.path, r.open) for r in regions], outside=outside,
        one_shot=lambda: (run_fwd, Params(store.all(), paths, ptree)), write=write,
        catch_inputs=functools.partial(_catch_inputs, store, by_shape, default_forward), result=result,
        arrays=store.original, matrices=matrix_paths(params), streamed=load is not None,
        default_forward=default_forward,
    )


def nnx_subject(model: nnx.Module, forward: Callable | None, blocks: str | bool | None, batches: list[Any], *,
                donate: bool = False, load: Callable | None = None, mesh: Any = None) -> Subject:
    """An NNX model as its parameter state and a function of it (``forward(model, batch)``, by default
    ``model(batch)``), quantized through ``pytree_subject``. ``blocks`` as there; by default the model's
    ``gptq_blocks`` attribute, if it has one (a pattern such as ``"layers.*"``)."""
    fwd = forward or default_forward
    if blocks is None or blocks is True:
        blocks = getattr(model, "gptq_blocks", None)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def finish(new_state: Any) -> nnx.Module:
        nnx.update(model, new_state)
        return model

    # The model is changed in place: it holds each parameter as written so far, so the float ones are let go of as
    # the engine writes its own (one copy of the layers, not two), and a streamed run's finished blocks are abstract.
    return pytree_subject(state, lambda st, batch: fwd(nnx.merge(graphdef, st, rest), batch), blocks, batches,
                          forward is None, finish=finish, name=type(model).__name__, donate=donate,
                          update=lambda st: nnx.update(model, st), load=load, mesh=mesh)
