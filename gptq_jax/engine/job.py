"""One ``quantize`` call's state: its options, the plans made so far (shared by blocks of one structure), and
what it has produced (the quantized weights, their axes, the report)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gptq_jax.core.config import QuantConfig
from gptq_jax.engine.experts import solve_experts
from gptq_jax.engine.plan import Plan, make_plan
from gptq_jax.engine.report import QuantReport
from gptq_jax.engine.rules import Rule, config_for
from gptq_jax.engine.solve import Solver, solve_group
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
