"""A block's quantization plan: its stages in the order they run, and the compiled slices between them.

From the flat program of a block (``trace.trace``) and the rules, parameters that are quantized are grouped into
stages: parameters whose matmuls read the same activations share one Hessian and form one stage (q/k/v, then o,
then gate/up, then down, in a Llama layer; whatever the block does, in any other model). A stage's cut is the
equation of its first matmul. True-sequential quantization runs slice j of the program, equations
``[cut_{j-1}, cut_j)``, from the carry the previous slice left, folding into the Hessians every activation it
meets (including the one feeding equation ``cut_j``), then quantizes stage j, and continues. A weight that several
matmuls read on different activations gets a look-ahead run past its cut, with its float value, for the later
activations, before it is quantized. Per block, the
calibration data goes through the block slice by slice as it gets quantized, and its first batches (the engine's
error sample) once more in float, the reference for the block's output error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.hessian import (
    accumulate_cross,
    accumulate_expert_hessians,
    accumulate_hessian,
    init_cross,
    init_expert_hessians,
    init_hessian,
)
from gptq_jax.engine.experts import expert_rows
from gptq_jax.engine.trace import Traced, Use, activation_rows, find_uses, live_at, matrix_shape, run


@dataclasses.dataclass
class Stage:
    params: list[int]  # parameter leaves quantized together after this stage's slice
    captures: list[Use]  # one matmul per distinct activation the stage's Hessian sums over
    cut: int  # equation of the stage's first matmul: everything before it runs with the stage's weights unused
    k: int  # Hessian width
    experts: int = 0  # E: a stack of experts, one Hessian each (engine.experts); 0 for plain weights

    @property
    def lookahead(self) -> int:
        """Last equation whose activation the stage still needs after its cut (a weight read by several matmuls
        on different activations), else ``cut``."""
        return max(u.eqn for u in self.captures)


class Window(NamedTuple):
    """Slice ``j`` of a pass: it runs equations ``[start, stop)`` (``stop=None``: to the outputs) from the carry live
    at ``start`` (the inputs when ``start == 0``) and folds the activations of equations ``[lo, hi]`` into the
    Hessians of ``stages``."""

    start: int
    stop: int | None
    lo: int
    hi: int
    stages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The true-sequential windows of a block: slice ``j`` ends at stage j's cut, so stage j can be quantized
    before anything reads its weights; the last slice (``j == len(stages)``) runs on to the outputs. ``window(None)``
    is the one-pass window: the whole block, folding every stage."""

    cuts: tuple[int, ...]  # stage j's cut
    reads: tuple[tuple[int, ...], ...]  # stage j's capture equations
    num_eqns: int

    def __len__(self) -> int:
        return len(self.cuts) + 1

    def window(self, j: int | None) -> Window:
        if j is None:
            return Window(0, None, 0, self.num_eqns, tuple(range(len(self.cuts))))
        start = 0 if j == 0 else self.cuts[j - 1]
        stop = self.cuts[j] if j < len(self.cuts) else None
        lo = 0 if j == 0 else start + 1
        hi = self.num_eqns if stop is None else stop
        stages = tuple(s for s in range(j, len(self.cuts)) if any(lo <= e <= hi for e in self.reads[s]))
        return Window(start, stop, lo, hi, stages)


@dataclasses.dataclass
class Plan:
    traced: Traced
    stages: list[Stage]
    w_axes: dict[int, tuple[int, ...]]  # contracting axes of every quantized parameter
    configs: dict[int, QuantConfig]
    skipped: dict[int, str]  # parameter -> why it stays float
    expert_axis: dict[int, int] = dataclasses.field(default_factory=dict)  # stacked experts: their axis
    fns: dict[Any, Any] = dataclasses.field(default_factory=dict)

    @property
    def schedule(self) -> Schedule:
        return Schedule(tuple(st.cut for st in self.stages), tuple(tuple(u.eqn for u in st.captures)
                                                                    for st in self.stages), len(self.traced.eqns))


def make_plan(
    traced: Traced, paths: Sequence[str], shapes: Sequence[tuple[int, ...]], candidates: Sequence[int],
    not_candidates: dict[int, str], configs_in: Sequence[QuantConfig | None],
) -> Plan:
    """Group the quantizable parameters of a traced block into stages (see module docstring)."""
    uses = find_uses(traced, candidates)
    skipped = dict(not_candidates)
    configs: dict[int, QuantConfig] = {}
    for p in candidates:
        if p in uses.problems:
            skipped[p] = uses.problems[p]
        elif p not in uses.matmuls:
            skipped[p] = "not read by any matmul"
        else:
            qc = configs_in[p]
            if qc is None:
                skipped[p] = "kept in float by quant_config"
                continue
            n, k = matrix_shape(shapes[p], uses.matmuls[p][0].w_axes)
            if qc.group_size > k:
                raise ValueError(
                    f"{paths[p]}: group_size={qc.group_size} is larger than its input width K={k}; "
                    "use a smaller group size or -1 (per channel), or a rule that keeps it in float"
                )
            configs[p] = qc
    alias = _cast_roots(traced)
    key_of = lambda u: (alias.get(u.x, u.x), u.x.aval.dtype, u.x_axes, u.x_batch, u.groups)  # noqa: E731
    groups: dict[frozenset, list[int]] = {}
    for p in configs:
        groups.setdefault(frozenset(key_of(u) for u in uses.matmuls[p]), []).append(p)
    first_use: dict[Any, Use] = {}
    for p in configs:
        for u in uses.matmuls[p]:
            k = key_of(u)
            if k not in first_use or u.eqn < first_use[k].eqn:
                first_use[k] = u
    stages = []
    for keys, params in groups.items():
        cut = min(u.eqn for p in params for u in uses.matmuls[p])
        caps = sorted((first_use[k] for k in keys), key=lambda u: u.eqn)
        k = math.prod(caps[0].x.aval.shape[a] for a in caps[0].x_axes)
        stages.append(Stage(sorted(params), caps, cut, k, _experts(caps[0])))
    stages.sort(key=lambda s: s.cut)
    w_axes = {p: uses.matmuls[p][0].w_axes for p in configs}
    axis = {p: uses.matmuls[p][0].w_batch for p in configs if uses.matmuls[p][0].experts}
    return Plan(traced, stages, w_axes, configs, skipped, axis)


def _experts(use: Use) -> int:
    """How many experts a stack read by ``use`` holds (0: not a stack)."""
    if not use.experts:
        return 0
    return int(use.groups.aval.shape[0] if use.groups is not None else use.x.aval.shape[use.x_batch])


def _cast_roots(traced: Traced) -> dict[Any, Any]:
    """var -> the var it is a dtype cast of (followed to the root): casts of one activation share a Hessian."""
    alias: dict[Any, Any] = {}
    for eqn in traced.eqns:
        if eqn.primitive.name == "convert_element_type" and not hasattr(eqn.invars[0], "val"):
            alias[eqn.outvars[0]] = alias.get(eqn.invars[0], eqn.invars[0])
    return alias


def _token_mask(x_shape: Sequence[int], use: Use, mask: jax.Array | None) -> jax.Array | None:
    if mask is None:
        return None
    free = tuple(d for a, d in enumerate(x_shape) if a not in use.x_axes)
    if free == tuple(mask.shape):
        return mask
    if math.prod(free) == mask.size and free[: 1] == tuple(mask.shape[:1]):
        return mask.reshape(free)
    return None


def _captures_by_eqn(plan: Plan, stage_ids: Sequence[int], lo: int, hi: int) -> dict[int, list[tuple[int, Use]]]:
    """The captures of ``stage_ids`` at equations ``[lo, hi]``, by equation: one activation feeds every stage (and
    weight) that reads it."""
    by_eqn: dict[int, list[tuple[int, Use]]] = {}
    for s in stage_ids:
        for u in plan.stages[s].captures:
            if lo <= u.eqn <= hi:
                by_eqn.setdefault(u.eqn, []).append((s, u))
    return by_eqn


def _fold(use: Use, x: Any, stages: Sequence[int], hess: dict, mask: Any, cross: dict | None = None,
          float_rows: Any = None) -> None:
    """Fold activation ``x`` of capture ``use`` into the Hessians of ``stages`` (per expert for an expert matmul)
    and, given the float stream's rows of the same activation, into their cross terms."""
    if use.experts:  # routing differs between the streams: experts get their Hessians, no cross term
        rows, m = expert_rows(use, x, mask)
        for s in stages:
            hess[s] = accumulate_expert_hessians(*hess[s], rows, m)
        return
    rows = activation_rows(x, use.x_axes)
    m = _token_mask(x.shape, use, mask)
    m = None if m is None else m.reshape(-1)
    for s in stages:
        hess[s] = accumulate_hessian(*hess[s], rows, m)
        if cross is not None:
            cross[s] = accumulate_cross(*cross[s], float_rows, rows, m)


def _hooks(plan: Plan, stage_ids: Sequence[int], lo: int, hi: int, hess: dict[int, Any], mask: Any) -> dict:
    """``on_use`` hooks folding the activations at equations ``[lo, hi]`` into the Hessians of ``stage_ids``."""
    hooks = {}
    for e, items in _captures_by_eqn(plan, stage_ids, lo, hi).items():
        stages = [s for s, _ in items]
        hooks[e] = (items[0][1], lambda use, x, stages=stages: _fold(use, x, stages, hess, mask))
    return hooks


def slice_fn(plan: Plan, j: int | None) -> Any:
    """The compiled slice ``j`` of a true-sequential pass (``j == len(stages)``: the last slice, to the outputs),
    or, for ``j=None``, the whole block folding every stage's activations (the one-pass mode).

    ``fn(params, start_values, hess, mask) -> (outputs or None, carry, hess)``; ``start_values`` are the input
    leaves for the first slice, else the previous slice's carry. ``hess`` maps stage -> ``(h, n)``."""
    if j in plan.fns:
        return plan.fns[j]
    traced = plan.traced
    start, stop, lo, hi, _ = plan.schedule.window(j)
    ids = list(range(len(plan.stages)))
    keep = live_at(traced, stop) if stop is not None else []
    first = start == 0
    start_vars = None if first else live_at(traced, start)

    def fn(params, values, hess, mask):
        hess = dict(hess)
        hooks = _hooks(plan, [s for s in ids if s in hess], lo, hi, hess, mask)
        out, kept = run(
            traced, params, inputs=values if first else None,
            carry=None if first else dict(zip(start_vars, values, strict=True)),
            start=start, stop=stop if stop is not None else len(traced.eqns), keep=keep, on_use=hooks,
        )
        return out, [kept[v] for v in keep], hess

    plan.fns[j] = jax.jit(fn)
    return plan.fns[j]


def lookahead_fn(plan: Plan, j: int) -> Any:
    """``fn(params, carry_at_cut_j, hess, mask) -> hess``: runs on from stage j's cut to its last activation,
    folding only stage j's Hessian (see ``Stage.lookahead``)."""
    key = ("lookahead", j)
    if key in plan.fns:
        return plan.fns[key]
    traced, st = plan.traced, plan.stages[j]
    start_vars = live_at(traced, st.cut)

    def fn(params, values, hess, mask):
        hess = dict(hess)
        hooks = _hooks(plan, [j], st.cut + 1, st.lookahead, hess, mask)
        run(traced, params, carry=dict(zip(start_vars, values, strict=True)), start=st.cut, stop=st.lookahead,
            on_use=hooks)
        return hess

    plan.fns[key] = jax.jit(fn)
    return plan.fns[key]


def _pair_hooks(plan: Plan, stage_ids: Sequence[int], lo: int, hi: int, hess: dict, cross: dict, mask: Any):
    """Hooks for a float run and a quantized run of the same equations: the float run records each activation at
    ``[lo, hi]``, the quantized run folds its own into the Hessians and the pair into the cross terms (GPTAQ,
    Qronos). The float run must go first."""
    seen: dict[int, Any] = {}
    float_hooks, quant_hooks = {}, {}
    for e, items in _captures_by_eqn(plan, stage_ids, lo, hi).items():
        stages = [s for s, _ in items]

        def record(use, x, e=e):
            seen[e] = activation_rows(x, use.x_axes)

        def fold(use, x, e=e, stages=stages):
            _fold(use, x, stages, hess, mask, cross, seen.get(e))

        if not items[0][1].experts:
            float_hooks[e] = (items[0][1], record)
        quant_hooks[e] = (items[0][1], fold)
    return float_hooks, quant_hooks


def pair_slice_fn(plan: Plan, j: int | None) -> Any:
    """``slice_fn`` for a float stream beside the quantized one: ``fn(params, float_params, values, float_values,
    hess, cross, mask) -> (outputs, carry, float_outputs, float_carry, hess, cross)``. Each slice runs the float
    parameters on the float stream and the current ones on the quantized stream, folding ``H`` from the quantized
    activations and the cross term ``D`` from the pair (``hess``, ``cross``: stage -> ``(matrix, n)``)."""
    key = ("pair", j)
    if key in plan.fns:
        return plan.fns[key]
    traced = plan.traced
    start, stop, lo, hi, _ = plan.schedule.window(j)
    end = stop if stop is not None else len(traced.eqns)
    keep = live_at(traced, stop) if stop is not None else []
    first = start == 0
    start_vars = None if first else live_at(traced, start)

    def go(params, values, hooks):
        out, kept = run(traced, params, inputs=values if first else None,
                        carry=None if first else dict(zip(start_vars, values, strict=True)),
                        start=start, stop=end, keep=keep, on_use=hooks)  # fmt: skip
        return out, [kept[v] for v in keep]

    def fn(params, float_params, values, float_values, hess, cross, mask):
        hess, cross = dict(hess), dict(cross)
        f_hooks, q_hooks = _pair_hooks(plan, [s for s in range(len(plan.stages)) if s in hess], lo, hi, hess, cross,
                                       mask)  # fmt: skip
        f_out, f_carry = go(float_params, float_values, f_hooks)
        out, carry = go(params, values, q_hooks)
        return out, carry, f_out, f_carry, hess, cross

    plan.fns[key] = jax.jit(fn)
    return plan.fns[key]


def pair_lookahead_fn(plan: Plan, j: int) -> Any:
    """``lookahead_fn`` for the pair of streams: ``fn(params, float_params, carry, float_carry, hess, cross, mask)
    -> (hess, cross)``."""
    key = ("pair-lookahead", j)
    if key in plan.fns:
        return plan.fns[key]
    traced, st = plan.traced, plan.stages[j]
    start_vars = live_at(traced, st.cut)

    def fn(params, float_params, values, float_values, hess, cross, mask):
        hess, cross = dict(hess), dict(cross)
        f_hooks, q_hooks = _pair_hooks(plan, [j], st.cut + 1, st.lookahead, hess, cross, mask)
        for p, v, hooks in ((float_params, float_values, f_hooks), (params, values, q_hooks)):
            run(traced, p, carry=dict(zip(start_vars, v, strict=True)), start=st.cut, stop=st.lookahead,
                on_use=hooks)
        return hess, cross

    plan.fns[key] = jax.jit(fn)
    return plan.fns[key]


def empty_cross(plan: Plan, stage_ids: Sequence[int]) -> dict[int, Any]:
    return {s: init_cross(plan.stages[s].k) for s in stage_ids}


def empty_hessians(plan: Plan, stage_ids: Sequence[int]) -> dict[int, Any]:
    """Stage -> ``(H, n)``: ``[K, K]`` and ``[]``, or ``[E, K, K]`` and ``[E]`` for a stack of experts."""
    return {s: init_expert_hessians(plan.stages[s].experts, plan.stages[s].k) if plan.stages[s].experts
            else init_hessian(plan.stages[s].k) for s in stage_ids}


class Stats(NamedTuple):
    """What a pass folds per stage: ``hess`` (stage -> ``(H, n)``) and, with a float stream, ``cross`` (stage ->
    ``(D, n)``, see ``pair_slice_fn``; None without one)."""

    hess: dict[int, Any]
    cross: dict[int, Any] | None


def empty_stats(plan: Plan, stage_ids: Sequence[int], cross: bool) -> Stats:
    return Stats(empty_hessians(plan, stage_ids), empty_cross(plan, stage_ids) if cross else None)


def run_slice(plan: Plan, j: int | None, leaves: list[Any], float_leaves: list[Any] | None, values: list[Any],
              float_values: list[Any] | None, stats: Stats, mask: Any) -> tuple[Any, Any, Any, Any, Stats]:
    """Slice ``j`` on one batch: ``(outputs, carry, float outputs, float carry, stats)``. Without a float stream
    (``float_values`` None) it is ``slice_fn`` and the float parts are None; with one, ``pair_slice_fn``."""
    if float_values is None:
        out, carry, hess = slice_fn(plan, j)(leaves, values, stats.hess, mask)
        return out, carry, None, None, Stats(hess, None)
    out, carry, f_out, f_carry, hess, cross = pair_slice_fn(plan, j)(leaves, float_leaves, values, float_values,
                                                                     stats.hess, stats.cross, mask)  # fmt: skip
    return out, carry, f_out, f_carry, Stats(hess, cross)


def run_lookahead(plan: Plan, j: int, leaves: list[Any], float_leaves: list[Any] | None, values: list[Any],
                  float_values: list[Any] | None, stats: Stats, mask: Any) -> Stats:
    """Stage j's lookahead on one batch (``lookahead_fn``, or ``pair_lookahead_fn`` with a float stream)."""
    if float_values is None:
        return Stats(lookahead_fn(plan, j)(leaves, values, stats.hess, mask), None)
    return Stats(*pair_lookahead_fn(plan, j)(leaves, float_leaves, values, float_values, stats.hess, stats.cross,
                                             mask))  # fmt: skip


def float_outputs_fn(plan: Plan) -> Any:
    if "float" not in plan.fns:
        plan.fns["float"] = jax.jit(lambda params, values: run(plan.traced, params, inputs=values)[0])
    return plan.fns["float"]


@jax.jit
def squared_error(a: jax.Array, b: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``sum (a - b)^2`` and ``sum b^2`` in f32 over unmasked tokens (mask over a's leading axes, if it fits)."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    b = b.astype(jnp.float32)
    if mask is not None and tuple(mask.shape) == tuple(a.shape[: mask.ndim]):
        m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)).astype(jnp.float32)
        d, b = d * m, b * m
    return jnp.sum(d * d), jnp.sum(b * b)
