"""The per-weight solve of the engine, and the ``solver=`` hook of ``quantize`` that replaces it.

After a stage's slice has run, the weights of the stage that share its Hessian and its config are handed to the
solver together, each as the paper's float32 ``[N, K]`` matrix (``trace.to_matrix``); what it returns is stored
and written back (dequantized) into the model, so the next stages and blocks see it. GPTQ's
``core.gptq.quantize_weights`` is the default; round-to-nearest (``RTN``) needs no statistics, so the engine runs
no calibration pass for it.

A method that needs more than the Hessian of the quantized model's inputs declares it in ``Solver.statistics``;
each name beyond ``"hessian"`` arrives as a keyword argument of ``solve``. The engine gathers ``"cross"``:
``D = 2/n (X_fp - X_q) X_q^T`` per stage, from the float model's inputs to the stage beside the quantized ones.
For it the engine carries the float model's stream beside the quantized one and runs each slice on both
(``plan.pair_slice_fn``). GPTAQ and Qronos (``core.methods``, ``method_solver``) are such solvers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.gptq import quantize_weights
from gptq_jax.core.methods import GPTAQ_ALPHA, Method, objective_terms, quantize_weights_method
from gptq_jax.core.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.engine import placement, sharding
from gptq_jax.engine.trace import from_matrix, to_matrix

STATISTICS = ("hessian", "cross")  # what the engine's passes gather


def dequantized(qw: QuantizedWeight, scale_dtype: Any = None) -> jax.Array:
    """``[N, K]`` f32 weight a quantized weight stands for, with its scales as the solver fitted them (float16
    values under ``QuantConfig.fp16_scales``, as checkpoints store them, so calibration then sees exactly what
    inference computes; float32 without it, as the paper's code writes back), or rounded to ``scale_dtype``."""
    if scale_dtype is not None:
        qw = dataclasses.replace(qw, scales=qw.scales.astype(scale_dtype).astype(jnp.float32))
    return qw.dequantize()


def _rtn(ws: Sequence[jax.Array], h: Any, config: QuantConfig) -> list[QuantizedWeight]:
    return [rtn_quantize(w, config) for w in ws]


def _gptq_sharded(ws: Sequence[jax.Array], h: Any, config: QuantConfig, mesh: Any) -> list[QuantizedWeight]:
    return sharding.quantize_weights_sharded(ws, h, config, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class Solver:
    """``solve(ws, h, config) -> [QuantizedWeight]``: the weights of one stage (f32 ``[N, K]`` each, same ``K``),
    the stage's Hessian ``h`` ``[K, K]`` (None when ``statistics`` is empty) and their config; one result per weight.
    With ``"cross"`` in ``statistics`` it is called ``solve(ws, h, config, cross=D)``, or without ``cross`` where
    there is no quantized stream yet (one-shot mode: every input comes from the float model, ``D = 0``).
    ``write(qw) -> [N, K]``: the value the model computes with afterwards (default: ``dequantized``, the scales as
    fitted). ``statistics``: what ``solve`` needs (see module docstring). ``sharded(ws, h, config, mesh, **stats)``:
    the same solve with the rows split over the mesh (None: ``solve`` on one device; GPTQ's own solve gets the
    sharded GPTQ)."""

    solve: Callable[..., list[QuantizedWeight]] = quantize_weights
    write: Callable[[QuantizedWeight], jax.Array] | None = None
    statistics: tuple[str, ...] = ("hessian",)
    sharded: Callable[..., list[QuantizedWeight]] | None = None

    def __post_init__(self) -> None:
        if self.sharded is None and self.solve is quantize_weights:
            object.__setattr__(self, "sharded", _gptq_sharded)
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise NotImplementedError(f"solver statistics {unknown} are not gathered by the engine (it gathers "
                                      f"{list(STATISTICS)})")
        if self.statistics and "hessian" not in self.statistics:
            raise ValueError(f"solver statistics {list(self.statistics)}: every statistic comes with the Hessian; "
                             "add 'hessian'")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics)

    @property
    def needs_cross(self) -> bool:
        """Whether the engine carries the float model's stream for this solver (``"cross"``)."""
        return "cross" in self.statistics


GPTQ = Solver()
RTN = Solver(solve=_rtn, statistics=())


@functools.cache
def method_solver(method: Method) -> Solver:
    """The ``Solver`` of GPTAQ or Qronos (``core.methods``): it needs the cross term; without one (one-shot mode)
    it is GPTQ."""

    def solve(ws: Sequence[jax.Array], h: Any, config: QuantConfig, cross: Any = None) -> list[QuantizedWeight]:
        if cross is None:
            return quantize_weights(ws, h, config)
        return quantize_weights_method(ws, h, config, method, cross)

    def sharded(ws: Sequence[jax.Array], h: Any, config: QuantConfig, mesh: Any, cross: Any = None
                ) -> list[QuantizedWeight]:
        return sharding.quantize_weights_sharded(ws, h, config, mesh=mesh, method=method if cross is not None
                                                 else Method(), d=cross)  # fmt: skip

    return Solver(solve=solve, statistics=("hessian", "cross"), sharded=sharded)


def as_solver(solver: Solver | Callable[..., Any] | None, method: str, alpha: float = GPTAQ_ALPHA) -> Solver:
    """The ``Solver`` of ``quantize(method=..., solver=...)``: a callable is ``Solver(solve=callable)``."""
    if solver is None:
        if method in ("gptaq", "qronos"):
            return method_solver(Method(name=method, alpha=alpha))
        return RTN if method == "rtn" else GPTQ
    if method != "gptq":
        raise ValueError(f"solver= replaces GPTQ's solve; it cannot be combined with method={method!r}")
    if isinstance(solver, Solver):
        return solver
    if callable(solver):
        return Solver(solve=solver)
    raise TypeError(f"solver must be a Solver or a callable solve(ws, h, config), got {type(solver).__name__}")


@functools.partial(jax.jit, static_argnames=("w_axes",))
def as_matrix(w: jax.Array, w_axes: tuple[int, ...]) -> jax.Array:
    """A parameter as the solver's f32 ``[N, K]`` (one compiled program per shape, not one per eager op)."""
    return to_matrix(w.astype(jnp.float32), w_axes)


@functools.partial(jax.jit, static_argnames=("shape", "w_axes", "dtype"))
def written_back(qw: QuantizedWeight, shape: tuple[int, ...], w_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """The parameter of ``shape`` and ``dtype`` that the quantized weight stands for (see ``dequantized``)."""
    return from_matrix(dequantized(qw), shape, w_axes).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "w_axes", "dtype"))
def _from_matrix(m: jax.Array, shape: tuple[int, ...], w_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    return from_matrix(m, shape, w_axes).astype(dtype)


def write_back(solver: Solver, qw: QuantizedWeight, like: Any, w_axes: tuple[int, ...], mesh: Any) -> jax.Array:
    """The new value of the parameter ``like`` (its shape, dtype and placement) that ``qw`` stands for."""
    shape, dtype = tuple(jnp.shape(like)), jnp.result_type(like)
    if solver.write is None:
        out = written_back(qw, shape, w_axes, dtype)
    else:
        out = _from_matrix(jnp.asarray(solver.write(qw), jnp.float32), shape, w_axes, dtype)
    return placement.like(out, like) if mesh is not None else out


class Solved(NamedTuple):
    """One quantized weight: its parameter ``name``, the result, its contracting axes and its report record."""

    name: str
    weight: QuantizedWeight
    axes: tuple[int, ...]
    record: dict[str, Any]


def solve_group(solver: Solver, names: Sequence[str], leaves: list[Any], ps: Sequence[int],
                w_axes: dict[int, tuple[int, ...]], h: Any, qc: QuantConfig, mesh: Any, cross: Any = None
                ) -> list[Solved]:
    """Solve parameters ``ps`` (one stage, one config) of ``leaves``, write them back in place, and report.

    Each record gives the solve's time shared out by rows; with a cross term ``D`` also the objective GPTQ
    minimises and the one GPTAQ and Qronos minimise (``core.methods.cross_objective``)."""
    t0 = time.perf_counter()
    wms = [as_matrix(jnp.asarray(leaves[p]), w_axes[p]) for p in ps]  # (N, K)
    stats = {} if cross is None else {"cross": cross}
    if mesh is not None and solver.sharded is not None:
        # Gathered, so that every process can store, digest and pack the whole weight.
        qws = [sharding.replicate(qw, mesh) for qw in solver.sharded(wms, h, qc, mesh, **stats)]
    else:
        qws = list(solver.solve(wms, h, qc, **stats))
    if len(qws) != len(wms):
        raise ValueError(f"the solver returned {len(qws)} results for {len(wms)} weights ({', '.join(names)})")
    for p, qw in zip(ps, qws, strict=True):
        leaves[p] = write_back(solver, qw, leaves[p], w_axes[p], mesh)
    jax.block_until_ready([leaves[p] for p in ps])
    seconds = time.perf_counter() - t0
    rows = sum(int(wm.shape[0]) for wm in wms)
    out = [Solved(name, qw, w_axes[p], {
        "name": name, "shape": [int(d) for d in wm.shape], "bits": qc.bits, "group_size": qc.group_size,
        "loss": float(qw.loss), "damp": float(qw.damp), "fallback": bool(qw.fallback),
        "seconds": seconds * int(wm.shape[0]) / rows,
    }) for p, name, wm, qw in zip(ps, names, wms, qws, strict=True)]
    for done, wm in zip(out, wms, strict=True) if cross is not None else ():
        quad, lin = objective_terms(wm, done.weight.dequantize(), h, cross)
        done.record.update(gptq_objective=float(quad), cross_objective=float(quad - 2.0 * lin))
    return out
