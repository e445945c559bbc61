"""Scanned stacks of layers: parameters stacked on a leading layer axis and run under ``lax.scan``.

``nn.scan`` in Linen, ``nnx.vmap``-made layers run by ``nnx.scan`` and a hand-written ``lax.scan`` over a stacked
parameter pytree all reach the traced program as one ``scan`` equation whose scanned-over operands (``xs``)
include parameter leaves ``[L, ...]``. ``find_scans`` finds them; ``unroll`` turns the model into an ordinary one:

- its parameters are the stacked leaves split into their slices, named ``path[i]`` (``layers.mlp.up.kernel[3]``),
  beside the other leaves;
- its forward runs the model's own program with each such scan unrolled into L copies of its body, copy i reading
  slice i, so iteration i is a block of its own (``<prefix>[i]``, the prefix the stacked paths share), cut out of
  the program as any block is (``engine.regions``). The copies are the same program on the same shapes, so they
  share one plan and its compiled passes: compile time does not grow with depth.

A slice is cut out of its stack only when its block opens (``Unrolled.take``) and written back into the stack
when the block is done (``Unrolled.put``, in place once the engine holds its own copy of the stack), so the caller
keeps its scanned model and the run holds no second copy of the layers (``Unrolled.restack``: the stacks as
written). A stacked parameter the unrolling cannot follow (read outside the scan, or a scan's constant or carried
state) raises ``ScanError`` naming it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.engine.subject import Params
from gptq_jax.engine.trace import CASTS, Traced, bind_eqn, eval_jaxpr, scan_body, scan_layout

_SLICE = re.compile(r"(?P<path>.*)\[(?P<i>\d+)\]")


class ScanError(ValueError):
    """A scan over stacked parameters that cannot be unrolled into one block per layer."""


def slice_name(path: str, i: int) -> str:
    """The name of slice ``i`` of the stacked parameter ``path``: ``path[i]``."""
    return f"{path}[{i}]"


def split_slice_name(name: str) -> tuple[str, int] | None:
    """``("path", i)`` for a slice name ``path[i]``, else None."""
    m = _SLICE.fullmatch(name)
    return (m.group("path"), int(m.group("i"))) if m else None


@dataclasses.dataclass(frozen=True)
class Scan:
    """A ``scan`` equation of the flat program (``eqn``) scanning over parameter ``leaves`` stacked on ``length``
    layers; ``prefix``: the dotted path the stacked leaves share (the block name is ``prefix[i]``)."""

    eqn: int
    length: int
    reverse: bool
    leaves: tuple[int, ...]
    prefix: str


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(paths) > 1 or not common:
        return ".".join(common) or "scan"
    return ".".join(common[:-1]) or common[0]


def find_scans(traced: Traced, paths: Sequence[str]) -> list[Scan]:
    """The scans of ``traced`` (a flat program, ``trace.trace``) over stacked parameters, in the order they run."""
    jaxpr = traced.jaxpr.jaxpr
    roots = {v: i for i, v in enumerate(jaxpr.invars[: traced.num_params])}
    scans: list[Scan] = []
    owner: dict[int, int] = {}
    for idx, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if name in CASTS and len(eqn.invars) == 1 and eqn.invars[0] in roots:
            roots[eqn.outvars[0]] = roots[eqn.invars[0]]
        if name != "scan":
            continue
        first_x = sum(scan_layout(eqn))
        leaves = tuple(dict.fromkeys(roots[v] for v in eqn.invars[first_x:] if not hasattr(v, "val") and v in roots))
        for p in leaves:
            if p in owner:
                raise ScanError(f"{paths[p]}: scanned over by two scans (equations {owner[p]} and {idx}); a "
                                "stacked parameter must belong to one stack of layers")
            owner[p] = idx
        if leaves:
            prefix = _common_prefix([paths[p] for p in leaves])
            scans.append(Scan(idx, eqn.params["length"], bool(eqn.params["reverse"]), leaves, prefix))
    return scans


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """A stacked parameter on its way to the scan over it: its slices, and the casts to apply to each slice when
    its iteration runs (so that a cast of the whole stack is read inside each layer's block, not before the first)."""

    path: str
    slices: tuple[Any, ...]
    casts: tuple[Any, ...] = ()

    def at(self, i: int) -> Any:
        x = self.slices[i]
        for eqn in self.casts:
            x = bind_eqn(eqn, [x])[0]
        return x


def _unroll_hook(eqn: Any, invals: list[Any]) -> list[Any] | None:
    stacked = [x for x in invals if isinstance(x, _Stacked)]
    if not stacked:
        return None
    name = eqn.primitive.name
    if name in CASTS and len(invals) == 1:
        return [dataclasses.replace(stacked[0], casts=(*stacked[0].casts, eqn))]
    if name == "scan":
        return _unrolled_scan(eqn, invals)
    raise ScanError(f"{stacked[0].path}: stacked on a leading layer axis and scanned over, but also read by "
                    f"'{name}' outside the scan; the engine unrolls the scan into one block per layer, which needs "
                    "every read of a stacked parameter to be inside it")


def _unrolled_scan(eqn: Any, invals: list[Any]) -> list[Any]:
    """The scan's body run once per iteration, iteration i on slice i of each stacked operand."""
    p = eqn.params
    (nc, nk), n = scan_layout(eqn), p["length"]
    consts, carry, xs = invals[:nc], list(invals[nc : nc + nk]), invals[nc + nk :]
    for where, vals in (("a constant of a scan's body", consts), ("a scan's carried state", carry)):
        for x in vals:
            if isinstance(x, _Stacked):
                raise ScanError(f"{x.path}: scanned over as a stack of layers by one scan but {where} in another; "
                                "the engine cannot cut that into blocks")
    body_jaxpr, body_consts = scan_body(eqn)
    # The other scanned-over operands (per-layer keys, ids) are sliced, and the per-iteration outputs (ys) written,
    # at a counter carried from copy to copy, not at a constant index: the copies stay one program, which is what
    # lets the blocks share one plan.
    step = -1 if p["reverse"] else 1
    k = jnp.asarray(n - 1 if p["reverse"] else 0, jnp.int32)
    ys = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[nk:]]
    for t, i in enumerate(range(n - 1, -1, -1) if p["reverse"] else range(n)):
        k = k if t == 0 else k + step
        x_i = [x.at(i) if isinstance(x, _Stacked) else lax.dynamic_index_in_dim(x, k, keepdims=False) for x in xs]
        outs = eval_jaxpr(body_jaxpr, body_consts, [*consts, *carry, *x_i], _unroll_hook)
        carry = outs[:nk]
        ys = [lax.dynamic_update_index_in_dim(y, out, k, 0) for y, out in zip(ys, outs[nk:], strict=True)]
    return [*carry, *ys]


# Slice i of a stack written in place: the stack is donated, so only the engine's own copy of it is (see ``put``).
_write_slice = jax.jit(lambda stack, x, i: lax.dynamic_update_index_in_dim(stack, x.astype(stack.dtype), i, 0),
                       donate_argnums=0)
_copy_slice = jax.jit(lambda stack, x, i: lax.dynamic_update_index_in_dim(stack, x.astype(stack.dtype), i, 0))


@dataclasses.dataclass
class Unrolled:
    """A model with its scans over stacked parameters unrolled (see module docstring).

    ``params``: the parameter leaves with each stacked one split into slices ``path[i]`` (a flat list tree); a
    slice is held there only as its shape (``jax.ShapeDtypeStruct``): ``take`` cuts it out of its stack when its
    block opens and ``put`` writes it back, so the run holds the stacks and one block's slices, not a second copy
    of every layer. ``forward(leaves, *inputs)``: the model on the expanded leaves; ``blocks[s]``: for scan s,
    ``(name, leaf indices)`` per iteration in the order they run; ``origin[k]``: expanded leaf k is ``(original
    leaf, slice or None)``; ``stacks[j]``: original leaf j as it is now (the stacks with the slices put so far).
    ``donate``: the caller gives its stacks up, so the first ``put`` into each may write in place too."""

    params: Params
    forward: Callable[..., Any]
    blocks: list[list[tuple[str, list[int]]]]
    scans: list[Scan]
    origin: list[tuple[int, int | None]]
    stacks: list[Any]
    donate: bool = False
    owned: set[int] = dataclasses.field(default_factory=set)  # stacks written in place from now on

    def stacked(self, k: int) -> bool:
        return self.origin[k][1] is not None

    def take(self, k: int) -> Any:
        """Expanded leaf ``k``: its slice of the stack as it is now."""
        j, i = self.origin[k]
        return self.stacks[j] if i is None else self.stacks[j][i]

    def put(self, k: int, x: Any) -> bool:
        """Write slice leaf ``k`` back into its stack. The first write into a stack the caller still holds copies
        it (``.at[i].set``); later ones, and every one with ``donate``, update the engine's copy in place. True
        where this write copied the stack (the caller's float stack is then no longer needed by the run)."""
        j, i = self.origin[k]
        copy = j not in self.owned and not self.donate
        self.stacks[j] = (_copy_slice if copy else _write_slice)(self.stacks[j], x, i)
        self.owned.add(j)
        return copy

    def restack(self, leaves: Sequence[Any]) -> list[Any]:
        """The original leaves: the stacks as written so far, the others from expanded ``leaves``."""
        out = list(self.stacks)
        for x, (j, i) in zip(leaves, self.origin, strict=True):
            if i is None:
                out[j] = x
        return out


def unroll(params: Params, fwd: Callable[..., Any], scans: list[Scan], donate: bool = False) -> Unrolled:
    """``fwd(params_tree, *inputs)`` as a model of the stacked leaves' slices (see module docstring)."""
    length = {p: s.length for s in scans for p in s.leaves}
    leaves, paths, origin = [], [], []
    for j, (x, path) in enumerate(zip(params.leaves, params.paths, strict=True)):
        for i in range(length[j]) if j in length else [None]:
            leaves.append(x if i is None else jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)))
            paths.append(path if i is None else slice_name(path, i))
            origin.append((j, i))
    expanded = Params(leaves, paths, jax.tree.structure([0] * len(leaves)))
    position = {o: k for k, o in enumerate(origin)}
    blocks = [[(slice_name(s.prefix, i), [position[(j, i)] for j in s.leaves])
               for i in (range(s.length - 1, -1, -1) if s.reverse else range(s.length))] for s in scans]
    tree, stacked_paths = params.tree, {j: params.paths[j] for j in length}  # not params: it holds the stacks

    def forward(flat: list[Any], *inputs: Any) -> Any:
        by_leaf: dict[int, list[Any]] = {}
        for x, (j, _) in zip(flat, origin, strict=True):
            by_leaf.setdefault(j, []).append(x)
        values = [_Stacked(stacked_paths[j], tuple(xs)) if j in length else xs[0] for j, xs in sorted(by_leaf.items())]
        avals = [jax.ShapeDtypeStruct((length[j], *jnp.shape(v.slices[0])), jnp.result_type(v.slices[0]))
                 if isinstance(v, _Stacked) else jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v))
                 for j, v in enumerate(values)]
        in_leaves, in_tree = jax.tree.flatten(inputs)
        out_tree: list[Any] = []

        def program(*a: Any) -> list[Any]:
            out, tree_out = jax.tree.flatten(fwd(jax.tree.unflatten(tree, a[: len(values)]),
                                                 *jax.tree.unflatten(in_tree, a[len(values) :])))
            out_tree.append(tree_out)
            return out

        in_avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in in_leaves]
        closed = jax.make_jaxpr(program)(*avals, *in_avals)
        out = eval_jaxpr(closed.jaxpr, closed.consts, [*values, *in_leaves], _unroll_hook)
        return jax.tree.unflatten(out_tree[0], out)

    return Unrolled(expanded, forward, blocks, scans, origin, list(params.leaves), donate)
