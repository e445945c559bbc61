"""``quantize(model, calib, ...)``: GPTQ of any Flax model, block by block, as the paper does.

1. The model runs on the first calibration batch as a traced program: every matmul that reads a parameter is
   found (``engine.trace``), whatever module or plain ``jnp.einsum`` does it.
2. If the model has repeated blocks (an ``nnx.List`` of layers, or ``blocks="layers.*"``), the inputs of the first
   block are captured once per batch (hidden states, positions, masks, whatever the block takes), and the blocks
   are quantized one after another, each on the outputs of the already quantized ones; inside a block,
   true-sequential in the order its matmuls run (``engine.plan``).
3. Without blocks, one shot: all Hessians from the float model, then every weight.

The driver is a short loop over small pieces: ``_Job`` holds the options and the report, ``_quantize_block`` does one
block, ``resume.ResumeStore`` keeps finished blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.core.calibration import Calibration
from gptq_jax.core.config import QuantConfig
from gptq_jax.core.gptq import quantize_weights
from gptq_jax.core.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.engine import multihost, sharding, subject
from gptq_jax.engine.plan import (
    Plan,
    empty_hessians,
    float_outputs_fn,
    lookahead_fn,
    make_plan,
    slice_fn,
    squared_error,
    stages_in_slice,
)
from gptq_jax.engine.resume import ResumeStore, StoredWeights, fingerprint
from gptq_jax.engine.rules import Rules, compile_rules, config_for, describe
from gptq_jax.engine.trace import from_matrix, to_matrix, trace

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")
DEFAULT_QUANT_CONFIG = QuantConfig()  # 4-bit, group 128, symmetric: the common published setting
# A block's relative output error (a diagnostic in the report) is measured on the first calibration batches up to
# this many tokens: the float reference pass it needs would otherwise cost a third of every block's compute. One
# window of 512 tokens is 512 x hidden values, enough to show a block whose error stands out; at 2048 tokens the
# reference cost 4 s of a 66 s SmolLM2 quantization (32 x 512 windows, 2-core CPU).
ERROR_SAMPLE_TOKENS = 512


@dataclasses.dataclass
class QuantReport:
    """What happened: per weight (``linears``), per block (``layers``), and every matrix parameter left in float
    with the reason (``unquantized``). ``to_json()`` is the CLI's ``quant_report.json``."""

    method: str
    quant_config: Any
    calibration: dict[str, Any]
    mode: str = "blocks"
    linears: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unquantized: list[dict[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    resumed_layers: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fallbacks(self) -> list[str]:
        return [r["name"] for r in self.linears if r["fallback"]]


class QuantizeResult(NamedTuple):
    """``model``: the input model with every quantized weight replaced by its dequantized value (ready to evaluate,
    or to pack); ``weights``: parameter path -> ``QuantizedWeight`` (paper orientation ``[N, K]``, see
    ``engine.trace.to_matrix``); ``axes``: parameter path -> its contracting axes; ``report``: a ``QuantReport``."""

    model: Any
    weights: dict[str, QuantizedWeight]
    report: QuantReport
    axes: dict[str, tuple[int, ...]] = {}


# ----------------------------------------------------------------------------------------------------------------------
# Calibration batches


def _batches(calib: Any, batch_size: int) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(batches, token masks or None per batch, description). ``calib``: a ``Calibration``, an int array
    ``[samples, seqlen]``, or an iterable of batches (any pytree)."""
    if isinstance(calib, Calibration):
        out, masks = [], []
        for i in range(0, calib.tokens.shape[0], batch_size):
            tok, m = jnp.asarray(calib.tokens[i : i + batch_size]), jnp.asarray(calib.mask[i : i + batch_size])
            out.append({"tokens": tok, "attention_mask": m})
            masks.append(m)
        desc = {"samples": int(calib.tokens.shape[0]), "seqlen": int(calib.tokens.shape[1]),
                "tokens": calib.num_tokens}
        return out, masks, desc
    if isinstance(calib, (np.ndarray, jax.Array)):
        a = np.asarray(calib)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"calibration must be int token ids [samples, seqlen] (or a Calibration, or an iterable of batches); "
                f"got an array of shape {a.shape} and dtype {a.dtype}"
            )
        if a.size == 0:
            raise ValueError(f"calibration is empty (shape {a.shape})")
        if a.min() < 0:
            raise ValueError(f"calibration token ids must be >= 0, got a minimum of {a.min()}")
        out = [jnp.asarray(a[i : i + batch_size]) for i in range(0, a.shape[0], batch_size)]
        return out, [None] * len(out), {"samples": int(a.shape[0]), "seqlen": int(a.shape[1]), "tokens": int(a.size)}
    if isinstance(calib, Iterable) and not isinstance(calib, (str, bytes, dict)):
        out = list(calib)
        if not out:
            raise ValueError("calibration is an empty iterable: give at least one batch")
        return out, [None] * len(out), {"batches": len(out)}
    raise TypeError(
        f"calib must be a Calibration, an int array [samples, seqlen] or an iterable of batches, got {type(calib)}"
    )


def _on_mesh(batches: list[Any], masks: list[Any], mesh: Any) -> tuple[list[Any], list[Any]]:
    """Split each batch's leading (row) axis over the mesh's data axis."""
    from jax.sharding import NamedSharding, PartitionSpec

    out_b, out_m = [], []
    for b, (batch, m) in enumerate(zip(batches, masks, strict=True)):
        leaves = jax.tree.leaves(batch)
        rows = int(jnp.shape(leaves[0])[0]) if leaves and jnp.ndim(leaves[0]) else 0
        try:
            sharding.check_batch(rows, mesh)
        except ValueError as e:
            raise ValueError(f"calibration batch {b}: {e}") from None

        def put(x, rows=rows):
            spec = PartitionSpec("data") if jnp.ndim(x) and jnp.shape(x)[0] == rows else PartitionSpec()
            return jax.device_put(x, NamedSharding(mesh, spec))

        out_b.append(jax.tree.map(put, batch))
        out_m.append(None if m is None else put(m))
    return out_b, out_m


def _replicated(tree: Any, mesh: Any) -> Any:
    """Concrete arrays of ``tree`` copied to every device of ``mesh``; abstract leaves (not loaded yet) as they are."""
    from jax.sharding import NamedSharding, PartitionSpec

    where = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, where), tree)


def _spread(tree: Any, mesh: Any) -> Any:
    """A block's parameters on ``mesh``: each matrix split over the ``model`` axis along its largest axis that the
    axis divides (so a block never has to fit on one device), everything else replicated. The block's jitted
    passes then run partitioned (XLA inserts the collectives); abstract leaves stay as they are."""
    from jax.sharding import NamedSharding, PartitionSpec

    m = sharding.mesh_shape(mesh).get("model", 1)

    def place(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        spec = [None] * jnp.ndim(x)
        fits = [a for a in range(jnp.ndim(x)) if jnp.shape(x)[a] % m == 0] if m > 1 and jnp.ndim(x) >= 2 else []
        if fits:
            spec[max(fits, key=lambda a: jnp.shape(x)[a])] = "model"
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(place, tree)


def _load_params(node: nnx.Module, prefix: str, load: Callable, mesh: Any, skip: Sequence[str] = ()) -> None:
    """Fill the abstract parameters of ``node`` (paths ``prefix.*``, except under ``skip``) with ``load(paths)``."""
    params = subject.Params.of(nnx.state(node, nnx.Param), prefix)
    want = [p for p, x in zip(params.paths, params.leaves, strict=True)
            if isinstance(x, jax.ShapeDtypeStruct) and not any(p.startswith(s + ".") for s in skip)]
    if not want:
        return
    got = dict(load(want))
    missing = [p for p in want if p not in got]
    if missing:
        raise ValueError(f"load() returned no array for {len(missing)} parameter(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    leaves = []
    for p, x in zip(params.paths, params.leaves, strict=True):
        if p in want:
            a = got.pop(p)  # each host copy is released as soon as it is on the device
            if tuple(jnp.shape(a)) != tuple(x.shape):
                raise ValueError(f"load() returned shape {tuple(jnp.shape(a))} for {p}, the model has {tuple(x.shape)}")
            x = jnp.asarray(a, x.dtype)
        leaves.append(x)
    nnx.update(node, params.unflatten(leaves))
    if mesh is not None:
        nnx.update(node, (_replicated if skip else _spread)(nnx.state(node), mesh))


def _drop(params: subject.Params, names: Iterable[str]) -> subject.Params:
    """``params`` with the leaves at ``names`` made abstract again (their memory released)."""
    names = set(names)
    leaves = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) if p in names else x
              for p, x in zip(params.paths, params.leaves, strict=True)]
    return subject.Params(leaves, params.paths, params.tree)


def _default_forward(model: Any, batch: Any) -> Any:
    if isinstance(batch, dict) and "tokens" in batch:
        return model(batch["tokens"], attention_mask=batch["attention_mask"])
    return model(batch)


# ----------------------------------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class _Job:
    rules: list
    method: str
    true_sequential: bool
    report: QuantReport
    say: Callable[[str], None]
    mesh: Any = None
    weights: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)
    axes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    plans: dict[Any, Plan] = dataclasses.field(default_factory=dict)
    reported: set = dataclasses.field(default_factory=set)

    def plan(self, f: Callable, params: subject.Params, extra: Sequence[Any], inputs: Any, key: Any) -> Plan:
        """The plan of a program ``f(params_and_extra, *inputs)``, cached by ``key`` and the shapes."""
        leaves = [*params.leaves, *extra]
        avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves((leaves, inputs)))
        # Blocks of one structure share a plan (and its compiled programs) when the rules treat them alike.
        configs = tuple(config_for(self.rules, path) for path in params.paths)
        try:
            hash(key)
        except TypeError:  # a graph with an unhashable static attribute (e.g. a plain dataclass config)
            key = ("repr", repr(key))
        full_key = (key, jax.tree.structure(inputs), avals, configs)
        if full_key not in self.plans:
            tree = jax.tree.structure((params.unflatten(), list(extra)))
            traced = trace(f, leaves, tree, *inputs)
            cands, not_cands = subject.candidates(params)
            self.plans[full_key] = make_plan(
                traced, params.paths, [jnp.shape(x) for x in params.leaves], cands, not_cands, configs
            )
        return self.plans[full_key]

    def note_skipped(self, plan: Plan, params: subject.Params) -> None:
        for p, why in plan.skipped.items():
            path = params.paths[p]
            if path not in self.reported:
                self.reported.add(path)
                self.report.unquantized.append({"path": path, "reason": why})

    def quantize_stage(self, plan: Plan, params: subject.Params, leaves: list[Any], stage: int | None,
                       hess: dict[int, Any] | None) -> None:
        """Quantize the parameters of ``stage`` (or, with ``None``, of every stage) in ``leaves`` in place.

        A stage's weights with the same config share its Hessian and are solved together (``quantize_weights``:
        their rows stacked); each report line then gives that solve's time shared out by rows."""
        ids = range(len(plan.stages)) if stage is None else [stage]
        for s in ids:
            h = None if hess is None else hess[s][0]
            if h is not None:
                jax.block_until_ready(h)  # charge the calibration pass to the block, not to the first solve
            by_config: dict[QuantConfig, list[int]] = {}
            for p in plan.stages[s].params:
                by_config.setdefault(plan.configs[p], []).append(p)
            for qc, ps in by_config.items():
                names = [params.paths[p] for p in ps]
                self.say(", ".join(names))
                t0 = time.perf_counter()
                wms = [_as_matrix(jnp.asarray(leaves[p]), plan.w_axes[p]) for p in ps]  # (N, K)
                if h is None:
                    qws = [rtn_quantize(wm, qc) for wm in wms]
                elif self.mesh is not None:
                    # Gathered, so that every process can store, digest and pack the whole weight.
                    qws = [sharding.replicate(qw, self.mesh)
                           for qw in sharding.quantize_weights_sharded(wms, h, qc, mesh=self.mesh)]
                else:
                    qws = quantize_weights(wms, h, qc)
                for p, qw in zip(ps, qws, strict=True):
                    w = leaves[p]
                    leaves[p] = written_back(qw, tuple(jnp.shape(w)), plan.w_axes[p], jnp.result_type(w))
                    if self.mesh is not None:  # split again as the float weight was
                        leaves[p] = jax.jit(lambda x: x, out_shardings=w.sharding)(leaves[p])
                jax.block_until_ready([leaves[p] for p in ps])
                seconds = time.perf_counter() - t0
                rows = sum(int(wm.shape[0]) for wm in wms)
                for p, name, wm, qw in zip(ps, names, wms, qws, strict=True):
                    self.weights[name] = qw
                    self.axes[name] = plan.w_axes[p]
                    self.report.linears.append({
                        "name": name, "shape": [int(d) for d in wm.shape], "bits": qc.bits,
                        "group_size": qc.group_size, "loss": float(qw.loss), "damp": float(qw.damp),
                        "fallback": bool(qw.fallback), "seconds": seconds * int(wm.shape[0]) / rows,
                    })


def dequantized(qw: QuantizedWeight, scale_dtype: Any = jnp.float16) -> jax.Array:
    """``[N, K]`` f32 weight a quantized weight stands for, with scales rounded to ``scale_dtype`` as checkpoints
    store them (so calibration sees exactly what inference computes)."""
    qw = dataclasses.replace(qw, scales=qw.scales.astype(scale_dtype).astype(jnp.float32))
    return qw.dequantize()


@functools.partial(jax.jit, static_argnames=("w_axes",))
def _as_matrix(w: jax.Array, w_axes: tuple[int, ...]) -> jax.Array:
    """A parameter as the solver's f32 ``[N, K]`` (one compiled program per shape, not one per eager op)."""
    return to_matrix(w.astype(jnp.float32), w_axes)


@functools.partial(jax.jit, static_argnames=("shape", "w_axes", "dtype"))
def written_back(qw: QuantizedWeight, shape: tuple[int, ...], w_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """The parameter of ``shape`` and ``dtype`` that the quantized weight stands for (see ``dequantized``)."""
    return from_matrix(dequantized(qw), shape, w_axes).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# One block


def _quantize_block(job: _Job, plans: list[Plan], params: subject.Params, extra: list[Any], inputs: list[list[Any]],
                    masks: list[Any], hidden_out: int, replay: bool) -> tuple[list, float, float]:
    """Quantize one block (or replay a finished one, whose ``params`` already hold its dequantized weights).

    ``plans[b]`` is the block's plan for batch b's shapes (one per distinct shape; their stages are the same).
    Returns (the block's new hidden states per batch, and over the first batches (``ERROR_SAMPLE_TOKENS``) the
    squared error vs float and the squared norm of float)."""
    plan = plans[0]
    leaves = [*params.leaves, *extra]
    n_p = len(params.leaves)
    if job.method == "rtn":  # no Hessians: nothing runs, and the next block's inputs only need their shapes
        if not replay:
            job.quantize_stage(plan, params, leaves, None, None)
            params.leaves[:] = leaves[:n_p]
        return [h for h, *_ in inputs], 0.0, 0.0
    batches = list(zip(plans, inputs, masks, strict=True))
    float_out = None if replay else [float_outputs_fn(pl)(leaves, x)[hidden_out]
                                     for pl, x, _ in batches[: _error_sample(inputs)]]
    if not plan.stages:
        new = [float_outputs_fn(pl)(leaves, x)[hidden_out] for pl, x, _ in batches]
    elif job.true_sequential:
        values = list(inputs)
        for j in range(len(plan.stages) + 1):
            # A replay folds (and drops) the same Hessians, so it runs the very programs of the first run and a
            # resumed job is bit-identical to an uninterrupted one.
            hess = empty_hessians(plan, stages_in_slice(plan, j))
            outs = []
            for (pl, _, m), v in zip(batches, values, strict=True):
                out, carry, hess = slice_fn(pl, j)(leaves, v, hess, m)
                outs.append(out if j == len(plan.stages) else carry)
            values = outs
            if j < len(plan.stages) and plan.stages[j].lookahead > plan.stages[j].cut:
                for (pl, _, m), v in zip(batches, values, strict=True):
                    hess = lookahead_fn(pl, j)(leaves, v, hess, m)
            if j < len(plan.stages) and not replay:
                job.quantize_stage(plan, params, leaves, j, hess)
            del hess
        new = [o[hidden_out] for o in values]
    else:
        hess = empty_hessians(plan, range(len(plan.stages)))
        for pl, x, m in batches:
            if replay:
                break
            _, _, hess = slice_fn(pl, None)(leaves, x, hess, m)
        if not replay:
            job.quantize_stage(plan, params, leaves, None, hess)
        del hess
        new = [float_outputs_fn(pl)(leaves, x)[hidden_out] for pl, x, _ in batches]
    params.leaves[:] = leaves[:n_p]
    num = den = 0.0
    for a, b, m in zip(new, float_out or [], masks, strict=False):
        e, s = squared_error(a, b, m)
        num, den = num + float(e), den + float(s)
    return new, num, den


def _error_sample(inputs: list[list[Any]]) -> int:
    """How many leading batches make up the output-error sample: ``ERROR_SAMPLE_TOKENS`` tokens (at least one
    batch), counting a batch's tokens as its hidden states' size over their last axis."""
    tokens = 0
    for b, leaves in enumerate(inputs):
        h = leaves[0]
        tokens += math.prod(jnp.shape(h)[:-1])
        if tokens >= ERROR_SAMPLE_TOKENS:
            return b + 1
    return len(inputs)


# ----------------------------------------------------------------------------------------------------------------------
# The entry point


def quantize(
    model: Any,
    calib: Any,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    apply_fn: Callable[..., Any] | None = None,
    blocks: str | bool | None = None,
    quant_config: Rules = DEFAULT_QUANT_CONFIG,
    method: str = "gptq",
    true_sequential: bool = True,
    batch_size: int = 1,
    work_dir: str | None = None,
    fingerprint_extra: str = "",
    progress: bool | Callable[[str], None] = False,
    mesh: Any = None,
    load: Callable[[list[str]], Mapping[str, Any]] | None = None,
) -> QuantizeResult:
    """Quantize the matmul weights of a Flax model with GPTQ (or round-to-nearest).

    Args:
      model: an ``nnx.Module`` (modified in place: each quantized weight becomes its dequantized value), or, with
        ``apply_fn``, a Linen parameter pytree (the ``params`` collection; a new pytree is returned).
      calib: a ``Calibration`` (token windows with masks; batches are ``{"tokens", "attention_mask"}``), an int
        array ``[samples, seqlen]`` (batches are its rows, ``batch_size`` at a time) or an iterable of batches of
        any pytree. Needed for ``method="rtn"`` too: one batch shows which weights are matmul weights.
      forward: ``forward(model, batch)`` runs the model on a batch, for models whose call is not ``model(batch)``
        (default: ``model(tokens, attention_mask=mask)`` for ``Calibration`` batches, else ``model(batch)``).
        With ``apply_fn``: ``forward(params, batch)``, default ``apply_fn({"params": params}, batch)``.
      apply_fn: a Linen model's ``apply`` (then ``model`` is its params): one-shot mode.
      blocks: ``None`` finds the repeated blocks (the longest list of same-type modules, such as ``model.layers``);
        a pattern such as ``"layers.*"`` or ``"model.layers.*"`` names them; ``False`` is the one-shot mode (all
        Hessians from the float model). A model with no blocks falls back to one shot, with a log message.
      quant_config: a ``QuantConfig`` for every weight, or rules ``[(regex on the path, QuantConfig | None)]``,
        first match wins, ``None`` keeps a weight float (see ``engine.rules``).
      method: ``"gptq"`` or ``"rtn"`` (round-to-nearest on the same grids).
      true_sequential: inside a block, quantize the matmuls stage by stage in the order they run, each seeing the
        inputs made by those already quantized (the paper's default); False takes a block's Hessians in one pass.
      batch_size: rows of an int-array or ``Calibration`` calibration per forward pass.
      work_dir: each finished block is saved there; a rerun with the same job resumes after the last one.
      fingerprint_extra: text that identifies the job beyond the arguments (e.g. the model's path).
      progress: True for a progress bar on stderr, or a callable receiving a status line per weight.
      mesh: a ``jax.sharding.Mesh`` with axes ``("data", "model")`` (``engine.sharding.make_mesh("data=2,model=4")``):
        calibration batches split over ``data`` (the Hessians are summed across it inside the jitted passes) and
        each solve split by output rows over ``model``. Each batch's rows must be a multiple of the data axis.
      load: stream the weights, for models larger than memory. ``model`` is then abstract (built under
        ``nnx.eval_shape``: its parameters are shapes only) and ``load(paths)`` returns the arrays of those
        parameter paths (e.g. read from safetensors). The parameters outside the blocks are loaded first, each
        block's when it is reached; once a block is finished and saved in ``work_dir`` (required) its quantized
        weights are dropped again, so memory holds one block. ``result.weights`` then reads them back from
        ``work_dir`` one block at a time, and ``result.model`` keeps them abstract.

    Returns:
      ``QuantizeResult(model, weights, report, axes)``. Weights are keyed by parameter path, e.g.
      ``layers.3.self_attn.q_proj.kernel``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    rules = compile_rules(quant_config)
    if load is not None and (work_dir is None or apply_fn is not None or blocks is False):
        raise ValueError("load= streams an NNX model block by block and keeps each finished block only in work_dir: "
                         "pass work_dir=, and no apply_fn= or blocks=False")
    if calib is None:
        raise ValueError("calib is required: at least one batch, to find the model's matmuls (and, for GPTQ, "
                         "their Hessians)")
    batches, masks, desc = _batches(calib, batch_size)
    calib_leaves = [np.asarray(x) for b in batches for x in jax.tree.leaves(b)] if work_dir is not None else []
    if mesh is not None:
        batches, masks = _on_mesh(batches, masks, mesh)
    report = QuantReport(method=method, quant_config=describe(quant_config), calibration=desc)
    t_start = time.perf_counter()
    bar, say = _progress(progress, method)
    job = _Job(rules, method, true_sequential, report, say, mesh=mesh)
    if apply_fn is not None:
        model = _one_shot_linen(job, model, apply_fn, forward, batches, masks)
    else:
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"model must be an nnx.Module, or a Linen params pytree with apply_fn=...; got {type(model).__name__}"
            )
        fwd = forward or _default_forward
        pattern = blocks if isinstance(blocks, str) else getattr(model, "gptq_blocks", None)
        found = [] if blocks is False else subject.find_blocks(model, pattern)
        if load is not None:
            if not found:
                raise ValueError("load= needs a model with repeated blocks (found none; name them with blocks=)")
            _load_params(model, "", load, mesh, skip=[p for p, *_ in found])
        if mesh is not None:
            nnx.update(model, _replicated(nnx.state(model), mesh))
            for _, _, _, module in found:
                nnx.update(module, _spread(nnx.state(module), mesh))
        if not found:
            if blocks is None:
                log.info("no repeated blocks found in %s: one-shot mode", type(model).__name__)
            report.mode = "one-shot"
            _one_shot_nnx(job, model, fwd, batches, masks)
        else:
            fp = None
            if work_dir is not None:
                fp = fingerprint(
                    (type(model).__name__, repr(report.quant_config), method, str(true_sequential),
                     fingerprint_extra, repr(jax.tree.map(lambda a: (jnp.shape(a), str(jnp.result_type(a))),
                                                          nnx.state(model, nnx.Param)))),
                    calib_leaves,
                )
            stored = _by_blocks(job, model, fwd, found, batches, masks, work_dir, fp, bar, load)
            if stored is not None:
                job.weights = stored
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - t_start
    if report.fallbacks:
        log.warning("%d weight(s) fell back to round-to-nearest: %s", len(report.fallbacks), report.fallbacks)
    return QuantizeResult(model, job.weights, report, job.axes)


def _progress(progress: bool | Callable[[str], None], method: str) -> tuple[Any, Callable[[str], None]]:
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(desc=method, unit="block")
        return bar, lambda s: bar.set_postfix_str(s, refresh=True)
    if callable(progress):
        return None, progress
    return None, lambda s: None


def _call_checked(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except subject.BlockNotReached:
        raise
    except Exception as e:  # a user's forward can raise anything; name where it happened
        raise ValueError(f"the model's forward failed on {what}: {type(e).__name__}: {e}") from e


def _by_blocks(job: _Job, model: nnx.Module, fwd: Callable, found: list, batches: list, masks: list,
               work_dir: str | None, fp: str | None, bar: Any, load: Callable | None) -> StoredWeights | None:
    """Quantize the blocks in order. With ``load``, each block is loaded first and its quantized weights dropped
    once saved; returns them as a ``StoredWeights`` then (else None: they are in ``job.weights``)."""
    inputs = []
    for b, batch in enumerate(batches):
        args, kwargs = _call_checked(
            lambda batch=batch: subject.catch_block_inputs(model, found[0], lambda: fwd(model, batch)),
            f"calibration batch {b}",
        )
        if not args or not isinstance(args[0], (jax.Array, np.ndarray)):
            raise ValueError(f"the first block ({found[0][0]}) must take the hidden states as its first positional "
                             "argument")
        inputs.append((args, kwargs))
    _note_outside(job, model, [p for p, *_ in found])
    if bar is not None:
        bar.total = len(found)
        bar.refresh()
    store = ResumeStore(process_work_dir(work_dir), fp) if work_dir is not None else None
    hidden_in = 0  # the hidden states are the first leaf of (args, kwargs)
    resuming = True  # finished blocks are reused while each matches the weights it was made from
    hidden = [jax.tree.leaves(x)[hidden_in] for x in inputs]
    _, tree = jax.tree.flatten(inputs[0])
    others = [jax.tree.leaves(x) for x in inputs]
    stored: dict[str, int] = {}  # name -> block, for a streamed run
    for i, (path, _, _, module) in enumerate(found):
        t0 = time.perf_counter()
        if load is not None:
            _load_params(module, path, load, job.mesh)
        block = subject.NNXBlock(path, module)
        graphdef, params, rest = block.split()
        rest_leaves, rest_tree = jax.tree.flatten(rest)

        def f(state_and_rest, args, kwargs, graphdef=graphdef, rest_tree=rest_tree):
            state, extra = state_and_rest
            m = nnx.merge(graphdef, state, jax.tree.unflatten(rest_tree, extra))
            return m(*args, **kwargs)

        values = [[h, *o[1:]] for h, o in zip(hidden, others, strict=True)]
        plans = [job.plan(f, params, rest_leaves, jax.tree.unflatten(tree, v), graphdef) for v in values]
        plan = plans[0]
        job.note_skipped(plan, params)
        hidden_out = _hidden_output(plan.traced.jaxpr.out_avals, hidden[0], path)
        digest = _weights_digest(params) if store is not None else None
        saved = store.load(i) if store is not None and resuming else None
        if saved is not None and saved[1].get("weights_digest") not in (None, digest):
            log.warning("block %s: its weights differ from those of the run that saved it; redoing it and the "
                        "blocks after it", path)
            saved, resuming = None, False
        if resuming and store is not None and not _all_processes(saved is not None):
            # Every process must replay or redo the same blocks: the passes are one program over all of them.
            if saved is not None:
                log.warning("block %s: another process has no usable copy of it; redoing it and the blocks after it",
                            path)
            saved, resuming = None, False
        if saved is not None:
            weights, records = saved
            _restore(job, plan, params, weights)
            job.report.linears.extend(records["linears"])
            job.report.layers.append(records["layer"])
            job.report.resumed_layers += 1
            hidden, _, _ = _quantize_block(job, plans, params, rest_leaves, values, masks, hidden_out, replay=True)
        else:
            first = len(job.report.linears)
            hidden, num, den = _quantize_block(job, plans, params, rest_leaves, values, masks, hidden_out,
                                               replay=False)
            err = None if job.method == "rtn" else num / max(den, 1e-30)
            rec = {"layer": i, "path": path, "relative_output_error": err,
                   "seconds": time.perf_counter() - t0}
            job.report.layers.append(rec)
            if store is not None:
                names = [r["name"] for r in job.report.linears[first:]]
                store.save(i, {n: job.weights[n] for n in names},
                           {"linears": job.report.linears[first:], "layer": rec, "weights_digest": digest})
        if load is not None:
            names = [n for n in params.paths if n in job.weights]
            stored.update(dict.fromkeys(names, i))
            for n in names:
                del job.weights[n]
            params = _drop(params, names)
        block.write(params)
        release_freed_memory()
        if bar is not None:
            bar.update(1)
    return StoredWeights(store, stored) if load is not None else None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def release_freed_memory() -> bool:
    """Return the memory this process has freed to the OS (glibc's ``malloc_trim``), once per block.

    A block frees its calibration activations, Hessians and float weights, but glibc keeps freed chunks in its heaps
    for reuse, and reuse is partial: the next block's buffers rarely fit the holes. On SmolLM2 (32 x 512 windows)
    the quantizing process grew by about 40 MB a block and peaked at 2.4 GB with 0.9 GB of live arrays; trimmed
    after each block it peaks at 1.8 GB, for about 40 ms a block. False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def process_work_dir(work_dir: str) -> str:
    """Where this process keeps its finished blocks: ``work_dir`` itself for process 0 (the only one on one host),
    ``work_dir/process-<i>`` for the others, so that processes sharing a disk never write the same files."""
    i = jax.process_index()
    return work_dir if i == 0 else os.path.join(work_dir, f"process-{i}")


def _all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (itself alone on one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _weights_digest(params: subject.Params) -> str:
    """SHA-256 of a block's float parameters: a resumed block must have been made from these very weights."""
    h = hashlib.sha256()
    for path, x in zip(params.paths, params.leaves, strict=True):
        a = multihost.to_host(x) if isinstance(x, jax.Array) else np.asarray(x)  # gathered when split over hosts
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _note_outside(job: _Job, model: nnx.Module, block_paths: list[str]) -> None:
    """Matrix parameters outside the blocks (embeddings, output head) stay float, as GPTQ checkpoints keep them."""
    params = subject.Params.of(nnx.state(model, nnx.Param))
    cands, not_cands = subject.candidates(params)
    for i in [*cands, *not_cands]:
        path = params.paths[i]
        if not any(path.startswith(b + ".") for b in block_paths):
            job.reported.add(path)
            job.report.unquantized.append({"path": path, "reason": not_cands.get(i, "outside the repeated blocks")})


def _hidden_output(out_avals: Sequence[Any], hidden: Any, path: str) -> int:
    for i, a in enumerate(out_avals):
        if tuple(a.shape) == tuple(hidden.shape) and a.dtype == hidden.dtype:
            return i
    raise ValueError(
        f"block {path} returns no array shaped like its input hidden states {tuple(hidden.shape)} {hidden.dtype}: "
        "the engine needs the block's output hidden states to feed the next block"
    )


def _restore(job: _Job, plan: Plan, params: subject.Params, weights: dict[str, QuantizedWeight]) -> None:
    """Put a finished block's stored weights back (dequantized) into ``params``."""
    index = {path: i for i, path in enumerate(params.paths)}
    for name, qw in weights.items():
        p = index[name]
        w = params.leaves[p]
        params.leaves[p] = written_back(qw, tuple(jnp.shape(w)), plan.w_axes[p], jnp.result_type(w))
        if job.mesh is not None:
            params.leaves[p] = jax.jit(lambda x: x, out_shardings=w.sharding)(params.leaves[p])
        job.weights[name] = qw
        job.axes[name] = plan.w_axes[p]


def _one_shot(job: _Job, call: Callable, params: subject.Params, batches: list, masks: list) -> None:
    """All Hessians from the float model in one pass over the calibration data, then every weight."""

    def f(params_and_extra, batch):
        return call(params_and_extra[0], batch)

    plan = job.plan(f, params, [], (batches[0],), "one-shot")
    job.note_skipped(plan, params)
    hess = empty_hessians(plan, range(len(plan.stages))) if job.method == "gptq" else {}
    if job.method == "gptq":
        for b, batch in enumerate(batches):
            fn = slice_fn(job.plan(f, params, [], (batch,), "one-shot"), None)
            args = (params.leaves, jax.tree.leaves((batch,)), hess, masks[b])
            _, _, hess = _call_checked(lambda fn=fn, args=args: fn(*args), f"calibration batch {b}")
    leaves = list(params.leaves)
    job.quantize_stage(plan, params, leaves, None, hess if job.method == "gptq" else None)
    params.leaves[:] = leaves


def _one_shot_nnx(job: _Job, model: nnx.Module, fwd: Callable, batches: list, masks: list) -> None:
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = subject.Params.of(state)

    def f(state, batch):
        return fwd(nnx.merge(graphdef, state, rest), batch)

    _call_checked(lambda: jax.eval_shape(f, state, batches[0]), "calibration batch 0")
    _one_shot(job, f, params, batches, masks)
    nnx.update(model, params.unflatten())


def _one_shot_linen(job: _Job, params_tree: Any, apply_fn: Callable, forward: Callable | None, batches: list,
                    masks: list) -> Any:
    job.report.mode = "one-shot"
    fwd = forward or (lambda p, batch: apply_fn({"params": p}, batch))
    params = subject.Params.of(params_tree)
    _call_checked(lambda: jax.eval_shape(fwd, params_tree, batches[0]), "calibration batch 0")
    _one_shot(job, fwd, params, batches, masks)
    return params.unflatten()
