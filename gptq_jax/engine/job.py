"""One ``quantize`` call's state: its options, the plans made so far (shared by blocks of one structure), and
what it has produced (the quantized weights, their axes, the report)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gptq_jax.core.config import QuantConfig
from gptq_jax.engine.experts import slice_axes, solve_experts, split_expert
from gptq_jax.engine.plan import Plan, make_plan
from gptq_jax.engine.report import QuantReport
from gptq_jax.engine.rules import Rule, config_for
from gptq_jax.engine.solve import Solver, solve_group, write_back
from gptq_jax.engine.subject import Params, candidates
from gptq_jax.engine.trace import trace


@dataclasses.dataclass
class Job:
    """One ``quantize`` call: its options, the plans made so far (shared by blocks of one structure), the results."""

    rules: list[Rule]
    solver: Solver
    true_sequential: bool
    report: QuantReport
    say: Callable[[str], None]
    mesh: Any = None
    weights: dict[str, Any] = dataclasses.field(default_factory=dict)
    axes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    plans: dict[Any, Plan] = dataclasses.field(default_factory=dict)
    reported: set = dataclasses.field(default_factory=set)

    def plan(self, f: Callable, params: Params, extra: Sequence[Any], inputs: Any, key: Any) -> Plan:
        """The plan of a program ``f((params, extra), *inputs)``, cached by ``key``, the shapes and the configs."""
        leaves = [*params.leaves, *extra]
        avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((leaves, inputs)))
        configs = tuple(config_for(self.rules, path) for path in params.paths)
        try:
            hash(key)
        except TypeError:  # a graph with an unhashable static attribute (e.g. a plain dataclass config)
            key = ("repr", repr(key))
        full_key = (key, jax.tree.structure(inputs), avals, configs)
        if full_key not in self.plans:
            tree = jax.tree.structure((params.unflatten(), list(extra)))
            traced = trace(f, leaves, tree, *inputs)
            cands, not_cands = candidates(params)
            self.plans[full_key] = make_plan(
                traced, params.paths, [jnp.shape(x) for x in params.leaves], cands, not_cands, configs
            )
        return self.plans[full_key]

    def note_unquantized(self, path: str, reason: str) -> None:
        if path not in self.reported:
            self.reported.add(path)
            self.report.unquantized.append({"path": path, "reason": reason})

    def quantize_stages(self, plan: Plan, params: Params, leaves: list[Any], stages: Sequence[int],
                        hess: dict[int, Any] | None, cross: dict[int, Any] | None = None) -> None:
        """Solve the parameters of ``stages`` in ``leaves`` in place. A stage's weights with the same config share
        its Hessian (and cross term, for a solver that needs one) and are solved together (their rows stacked)."""
        for s in stages:
            h = None if hess is None else hess[s][0]
            d = None if cross is None else cross[s][0]
            if h is not None:
                jax.block_until_ready(h)  # charge the calibration pass to the block, not to the first solve
            by_config: dict[QuantConfig, list[int]] = {}
            for p in plan.stages[s].params:
                by_config.setdefault(plan.configs[p], []).append(p)
            for qc, ps in by_config.items():
                names = [params.paths[p] for p in ps]
                self.say(", ".join(names))
                if plan.stages[s].experts:
                    solved = solve_experts(self.solver, names, leaves, ps, plan.w_axes, plan.expert_axis, h,
                                           None if hess is None else hess[s][1], qc, self.mesh)
                else:
                    solved = solve_group(self.solver, names, leaves, ps, plan.w_axes, h, qc, self.mesh, d)
                for done in solved:
                    self.weights[done.name], self.axes[done.name] = done.weight, done.axes
                    self.report.linears.append(done.record)

    def restore(self, plan: Plan, params: Params, weights: dict[str, Any]) -> None:
        """Put a finished block's stored weights back (dequantized) into ``params``: whole parameters, a scanned
        layer's slice (a parameter of its block) or one expert of a stack."""
        index = {path: i for i, path in enumerate(params.paths)}
        for name, qw in weights.items():
            expert = None if name in index else split_expert(name)
            if expert is None:
                p = index[name]
                params.leaves[p] = write_back(self.solver, qw, params.leaves[p], plan.w_axes[p], self.mesh)
                self.weights[name], self.axes[name] = qw, plan.w_axes[p]
                continue
            path, axis, e = expert
            p, axes = index[path], slice_axes(plan.w_axes[index[path]], axis)
            part = write_back(self.solver, qw, lax.index_in_dim(params.leaves[p], e, axis, keepdims=False), axes,
                              self.mesh)  # fmt: skip
            params.leaves[p] = lax.dynamic_update_index_in_dim(params.leaves[p], part, e, axis)
            self.weights[name], self.axes[name] = qw, axes
