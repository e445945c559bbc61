"""``quantize(model, calib, ...)``: GPTQ of any Flax model, block by block, as the paper does.

1. The model is a parameter pytree and a function of it (an NNX model, split; a Linen ``apply``; any
   ``f(params, batch)``). It runs on the first calibration batch as a traced program: every matmul that reads a
   parameter is found (``engine.trace``), whatever module or plain ``jnp.einsum`` does it.
2. Its repeated blocks (``engine.blocks``) are quantized one after another, each on the outputs of the already
   quantized ones; each block's inputs are caught once per batch. Inside a block, true-sequential: stage by stage
   in the order its matmuls run (``engine.plan``), each stage's weights solved (``engine.solve``) before anything
   reads them.
3. Without blocks, one shot: all Hessians from the float model, then every weight.

Placement on a mesh (``engine.placement``), the report (``engine.report``) and the work directory that lets a run
resume (``engine.workdir``) live in their own modules; this one is the loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.methods import GPTAQ_ALPHA
from gptq_jax.engine import blocks as blocks_mod
from gptq_jax.engine import regions
from gptq_jax.engine.batches import calibration_batches
from gptq_jax.engine.experts import split_expert
from gptq_jax.engine.job import Job
from gptq_jax.engine.memory import release_freed_memory
from gptq_jax.engine.placement import batches_on_mesh
from gptq_jax.engine.plan import (
    Plan,
    empty_hessians,
    empty_stats,
    float_outputs_fn,
    run_lookahead,
    run_slice,
    slice_fn,
    squared_error,
)
from gptq_jax.engine.report import QuantizeResult, QuantReport, progress_reporter
from gptq_jax.engine.resume import StoredWeights, fingerprint
from gptq_jax.engine.rules import Rule, Rules, compile_rules, config_for, describe
from gptq_jax.engine.solve import Solver, as_solver
from gptq_jax.engine.subject import Params
from gptq_jax.engine.workdir import WorkDir, weights_digest

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUANT_CONFIG", "METHODS", "QuantReport", "QuantizeResult", "Rule", "Solver", "quantize"]

METHODS = ("gptq", "gptaq", "qronos", "rtn")
DEFAULT_QUANT_CONFIG = QuantConfig()  # 4-bit, group 128, symmetric: the common published setting
# A block's relative output error (a diagnostic in the report) is measured on the first calibration batches up to
# this many tokens: the float reference pass it needs would otherwise cost a third of every block's compute. One
# window of 512 tokens is enough to show a block whose error stands out.
ERROR_SAMPLE_TOKENS = 512


def _check_arguments(method: str, batch_size: Any, calib: Any, flags: dict[str, Any]) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    for name, value in flags.items():  # a truthy string ("False") must not turn donation or sequencing on
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}={value!r} must be True or False")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if calib is None:
        raise ValueError("calib is required: at least one batch, to find the model's matmuls (and, for GPTQ, "
                         "their Hessians)")


def quantize(
    model: Any,
    calib: Any,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    apply_fn: Callable[..., Any] | None = None,
    blocks: str | bool | None = None,
    quant_config: Rules = DEFAULT_QUANT_CONFIG,
    method: str = "gptq",
    gptaq_alpha: float = GPTAQ_ALPHA,
    solver: Solver | Callable[..., Any] | None = None,
    true_sequential: bool = True,
    batch_size: int = 1,
    work_dir: str | None = None,
    fingerprint_extra: str = "",
    progress: bool | Callable[[str], None] = False,
    mesh: Any = None,
    load: Callable[[list[str]], Mapping[str, Any]] | None = None,
    donate: bool = False,
) -> QuantizeResult:
    """Quantize the matmul weights of a Flax model with GPTQ (or round-to-nearest, or ``solver``).

    ``model`` is an ``nnx.Module`` (changed in place: each quantized weight becomes its dequantized value), or a
    parameter pytree run by ``apply_fn`` (a Linen ``apply``: ``apply_fn({"params": params}, batch)``) or by
    ``forward(params, batch)`` (a new pytree is returned). Returns ``QuantizeResult(model, weights, report, axes)``,
    weights keyed by parameter path (``layers.3.self_attn.q_proj.kernel``), once every result is computed.

    ``blocks``: None finds the repeated blocks (an ``nnx.List`` of layers; parameters under ``layers_0 ..
    layers_N`` or ``layers.0 .. N``; each iteration of a ``lax.scan`` over stacked parameters, its slices named
    ``path[i]``); a pattern such as ``"layers.*"`` (or a scanned stack's path, ``"layers"``) names them; False is
    the one-shot mode.
    ``quant_config``: a ``QuantConfig``, or rules ``[Rule(regex on the whole path, QuantConfig | None)]``
    (``engine.rules``). ``method``: ``"gptq"``, ``"gptaq"`` (``gptaq_alpha`` in [0, 1]), ``"qronos"`` (both fit
    to the float model's outputs: docs/methods.md) or ``"rtn"``; ``solver``: replaces GPTQ's per-weight solve
    (``engine.solve.Solver``, or a callable ``solve(ws, h, config)``). The other options (``true_sequential``,
    ``batch_size``, ``work_dir`` to resume, ``mesh``, ``load`` to stream an abstract NNX model, ``progress``)
    are described in docs/engine.md.
    ``donate``: the caller gives the float parameters up (as with ``jax.jit``'s ``donate_argnums``): a parameter
    pytree's arrays (a scanned NNX model's stacks) are deleted or overwritten as their quantized values replace them,
    so the run holds one copy of the model, as an NNX model changed in place does, not the caller's and the result.
    """
    _check_arguments(method, batch_size, calib, {"donate": donate, "true_sequential": true_sequential})
    rules, the_solver = compile_rules(quant_config), as_solver(solver, method, gptaq_alpha)
    batches, masks, desc = calibration_batches(calib, batch_size)
    calib_leaves = [np.asarray(x) for b in batches for x in jax.tree.leaves(b)] if work_dir is not None else []
    if mesh is not None:
        batches, masks = batches_on_mesh(batches, masks, mesh)
    report = QuantReport(method=method, quant_config=describe(quant_config), calibration=desc)
    t_start = time.perf_counter()
    bar, say = progress_reporter(progress, method)
    job = Job(rules, the_solver, true_sequential, report, say, mesh=mesh)
    subject = _open_subject(model, forward, apply_fn, blocks, load, work_dir, mesh, batches, donate)
    for path, reason in subject.outside:
        job.note_unquantized(path, reason)
    if not any(config_for(rules, p) is not None for p in subject.matrices):
        log.warning("quant_config keeps every matrix parameter in float: nothing to quantize, no calibration pass")
        report.mode = "none"
        for p in subject.matrices:
            job.note_unquantized(p, "kept in float by quant_config")
    elif not subject.blocks:
        report.mode = "one-shot"
        _one_shot(job, subject, batches, masks)
    else:
        fp = None
        if work_dir is not None:
            tag = method + (f":{gptaq_alpha!r}" if method == "gptaq" else "")
            fp = fingerprint((subject.name, repr(report.quant_config), tag, str(true_sequential),
                              fingerprint_extra, subject.shapes), calib_leaves)
        stored = _by_blocks(job, subject, batches, masks, WorkDir(work_dir, fp) if fp else None, bar)
        if stored is not None:
            job.weights = stored
    if bar is not None:
        bar.close()
    model_out = subject.result()
    if not subject.streamed:  # JAX dispatches asynchronously: return when the work is done, and time all of it
        jax.block_until_ready((subject.arrays(), list(job.weights.values())))
    report.seconds = time.perf_counter() - t_start
    if report.fallbacks:
        log.warning("%d weight(s) fell back to round-to-nearest: %s", len(report.fallbacks), report.fallbacks)
    return QuantizeResult(model_out, job.weights, report, job.axes)


def _open_subject(model: Any, forward: Callable | None, apply_fn: Callable | None, blocks: str | bool | None,
                  load: Callable | None, work_dir: str | None, mesh: Any, batches: list,
                  donate: bool = False) -> blocks_mod.Subject:
    if load is not None and (work_dir is None or blocks is False):
        raise ValueError("load= streams a model block by block and keeps each finished block only in work_dir: "
                         "pass work_dir=, and not blocks=False")
    if isinstance(model, nnx.Module):
        if apply_fn is not None:
            raise TypeError("apply_fn= is for a Linen parameter pytree; an nnx.Module runs as model(batch) or by "
                            "forward=")
        return regions.nnx_subject(model, forward, blocks, batches, donate=donate, load=load, mesh=mesh)
    if apply_fn is None and forward is None:
        raise TypeError(f"model must be an nnx.Module, or a parameter pytree with apply_fn= (a Linen apply) or "
                        f"forward=f(params, batch); got {type(model).__name__} with neither")
    if forward is None:
        return regions.pytree_subject(model, lambda p, b: apply_fn({"params": p}, b), blocks, batches, True,
                                      donate=donate, load=load, mesh=mesh)
    return regions.pytree_subject(model, forward, blocks, batches, False, donate=donate, load=load, mesh=mesh)


def _by_blocks(job: Job, subject: blocks_mod.Subject, batches: list, masks: list, work: WorkDir | None,
               bar: Any) -> StoredWeights | None:
    """Quantize the blocks in order; a streamed run returns its weights as a ``StoredWeights`` (else None)."""
    values = subject.catch_inputs(batches)
    float_values = list(values) if job.solver.needs_cross else None  # the float model's stream (GPTAQ, Qronos)
    if bar is not None:
        bar.total = len(subject.blocks)
        bar.refresh()
    stored: dict[str, int] = {}  # name -> block, for a streamed run
    for i, block in enumerate(subject.blocks):
        t0 = time.perf_counter()
        opened = block.open()
        params = opened.params
        # The block's float parameters, taken before a resumed block's quantized weights are put back.
        float_leaves = None if float_values is None else [*params.leaves, *opened.extra]
        plans = [job.plan(opened.call, params, opened.extra, opened.inputs(v), opened.key) for v in values]
        for p, why in plans[0].skipped.items():
            job.note_unquantized(params.paths[p], why)
        digest = weights_digest(params.paths, params.leaves) if work is not None else None
        saved = work.reusable(i, block.path, digest) if work is not None else None
        first = len(job.report.linears)
        if saved is not None:
            job.restore(plans[0], params, saved[0])
            job.report.linears.extend(saved[1]["linears"])
            job.report.layers.append(saved[1]["layer"])
            job.report.resumed_layers += 1
        outs, float_outs, num, den = _quantize_block(job, plans, opened, values, masks, saved is not None,
                                                     float_leaves, float_values)
        if saved is None:
            err = num / max(den, 1e-30) if job.solver.needs_calibration else None
            rec = {"layer": i, "path": block.path, "relative_output_error": err, "seconds": time.perf_counter() - t0}
            job.report.layers.append(rec)
            if work is not None:
                done = job.report.linears[first:]
                work.save(i, {r["name"]: job.weights[r["name"]] for r in done},
                          {"linears": done, "layer": rec, "weights_digest": digest})
        values = [opened.next_inputs(None if outs is None else o, v)
                  for o, v in zip(outs or [None] * len(values), values, strict=True)]
        if float_values is not None:
            float_values = [opened.next_inputs(o, v) for o, v in zip(float_outs, float_values, strict=True)]
        mine = set(params.paths)
        owner = {n: n if n in mine else (split_expert(n) or (n,))[0] for n in job.weights}  # parameter of each weight
        names = [n for n in job.weights if owner[n] in mine] if subject.streamed else []
        drop = [n for n in params.paths if n in {owner[m] for m in names}]
        stored.update(dict.fromkeys(names, i))
        for n in names:
            del job.weights[n]
        opened.close(drop)
        release_freed_memory()
        if bar is not None:
            bar.update(1)
    return StoredWeights(work.store, stored) if subject.streamed else None


def _quantize_block(job: Job, plans: list[Plan], opened: blocks_mod.OpenBlock, inputs: list[list[Any]],
                    masks: list[Any], replay: bool, float_leaves: list[Any] | None = None,
                    float_inputs: list[list[Any]] | None = None) -> tuple[list | None, list | None, float, float]:
    """Quantize one block (or replay a finished one, whose ``params`` already hold its dequantized weights).

    ``plans[b]`` is the block's plan for batch b's shapes (one per distinct shape; their stages are the same).
    ``float_leaves`` and ``float_inputs``: the block's float parameters and the float model's stream, for a solver
    that needs the cross term (each slice then runs on both streams). Returns (the block's outputs per batch, or
    None when nothing ran; the float stream's outputs, or None; and over the first batches
    (``ERROR_SAMPLE_TOKENS``) the squared error of the watched outputs vs float and their squared norm)."""
    plan, params = plans[0], opened.params
    leaves = [*params.leaves, *opened.extra]
    n_p = len(params.leaves)
    if not job.solver.needs_calibration:  # no Hessians: nothing runs
        if not replay:
            job.quantize_stages(plan, params, leaves, range(len(plan.stages)), None)
            params.leaves[:] = leaves[:n_p]
        return None, None, 0.0, 0.0
    watch = opened.watch(plan.traced.jaxpr.out_avals, inputs[0])
    batches = list(zip(plans, inputs, float_inputs or [None] * len(inputs), masks, strict=True))
    float_out = None if replay else [float_outputs_fn(b[0])(leaves, b[1]) for b in batches[: _error_sample(inputs)]]
    if plan.stages and job.true_sequential:
        outs, float_outs = _true_sequential(job, plan, params, leaves, float_leaves, batches, replay)
    else:
        stats = empty_stats(plan, range(len(plan.stages)), float_leaves is not None)
        for pl, x, fx, m in [] if replay or not plan.stages else batches:
            stats = run_slice(pl, None, leaves, float_leaves, x, fx, stats, m)[4]
        if plan.stages and not replay:
            job.quantize_stages(plan, params, leaves, range(len(plan.stages)), *stats)
        del stats
        outs = [float_outputs_fn(pl)(leaves, x) for pl, x, _, _ in batches]
        float_outs = None if float_leaves is None else [float_outputs_fn(pl)(float_leaves, fx)
                                                        for pl, _, fx, _ in batches]  # fmt: skip
    params.leaves[:] = leaves[:n_p]
    num = den = 0.0
    for a, b, m in zip(outs, float_out or [], masks, strict=False):
        for k in watch:
            e, s = squared_error(a[k], b[k], m)
            num, den = num + float(e), den + float(s)
    return outs, float_outs, num, den


def _true_sequential(job: Job, plan: Plan, params: Params, leaves: list[Any], float_leaves: list[Any] | None,
                     batches: list, replay: bool) -> tuple[list, list | None]:
    """Run the block slice by slice (``plan.schedule``), quantizing stage j once slice j has folded its statistics
    (with a float stream, both streams run each slice). A replay folds (and drops) the same statistics, so it runs
    the very programs of the first run and a resumed job is bit-identical to an uninterrupted one."""
    schedule, n = plan.schedule, len(plan.stages)
    values = [(x, fx) for _, x, fx, _ in batches]
    for j in range(len(schedule)):
        stats = empty_stats(plan, schedule.window(j).stages, float_leaves is not None)
        outs = []
        for (pl, _, _, m), (v, fv) in zip(batches, values, strict=True):
            out, carry, f_out, f_carry, stats = run_slice(pl, j, leaves, float_leaves, v, fv, stats, m)
            outs.append((out, f_out) if j == n else (carry, f_carry))
        values = outs
        if j < n and plan.stages[j].lookahead > plan.stages[j].cut:
            for (pl, _, _, m), (v, fv) in zip(batches, values, strict=True):
                stats = run_lookahead(pl, j, leaves, float_leaves, v, fv, stats, m)
        if j < n and not replay:
            job.quantize_stages(plan, params, leaves, [j], *stats)
        del stats
    return [v for v, _ in values], None if float_leaves is None else [fv for _, fv in values]


def _error_sample(inputs: list[list[Any]]) -> int:
    """How many leading batches make up the output-error sample: ``ERROR_SAMPLE_TOKENS`` tokens (at least one
    batch), counting a batch's tokens as its first input's size over its last axis."""
    tokens = 0
    for b, leaves in enumerate(inputs):
        tokens += math.prod(jnp.shape(leaves[0])[:-1])
        if tokens >= ERROR_SAMPLE_TOKENS:
            return b + 1
    return len(inputs)


def _one_shot(job: Job, subject: blocks_mod.Subject, batches: list, masks: list) -> None:
    """All Hessians from the float model in one pass over the calibration data, then every weight. No pass runs
    when nothing can be quantized."""
    call, params = subject.one_shot()
    if job.solver.needs_cross:
        log.info("method %s in one-shot mode: every input comes from the float model, so it is GPTQ", job.report.method)

    def f(params_and_extra, batch):
        return call(params_and_extra[0], batch)

    plan = blocks_mod.call_checked(lambda: job.plan(f, params, [], (batches[0],), "one-shot"), "calibration batch 0",
                                   subject.default_forward)
    for p, why in plan.skipped.items():
        job.note_unquantized(params.paths[p], why)
    gptq = job.solver.needs_calibration and bool(plan.stages)
    hess = empty_hessians(plan, range(len(plan.stages))) if gptq else None
    for b, batch in enumerate(batches if gptq else []):
        fn = slice_fn(job.plan(f, params, [], (batch,), "one-shot"), None)
        args = (params.leaves, jax.tree.leaves((batch,)), hess, masks[b])
        _, _, hess = blocks_mod.call_checked(lambda fn=fn, args=args: fn(*args), f"calibration batch {b}")
    leaves = list(params.leaves)
    job.quantize_stages(plan, params, leaves, range(len(plan.stages)), hess)
    params.leaves[:] = leaves
    subject.write(params)
