"""The per-weight solve of the engine, and the ``solver=`` hook of ``quantize`` that replaces it.

After a stage's slice has run, the weights of the stage that share its Hessian and its config are handed to the
solver together, each as the paper's float32 ``[N, K]`` matrix (``trace.to_matrix``); what it returns is stored
and written back (dequantized) into the model, so the next stages and blocks see it. GPTQ's
``core.gptq.quantize_weights`` is the default; round-to-nearest (``RTN``) needs no statistics, so the engine runs
no calibration pass for it.

A method that needs more than the Hessian of the quantized model's inputs declares it in ``Solver.statistics``:
each name beyond ``"hessian"`` would arrive as a keyword argument of ``solve``. The engine gathers only the
Hessian today and refuses other names with a clear error, so a new method (for instance one that also needs the
float model's inputs to the same stage) adds its statistic to the engine's passes, not a patch of the driver.
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
from gptq_jax.core.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.engine import placement, sharding
from gptq_jax.engine.trace import from_matrix, to_matrix

STATISTICS = ("hessian",)  # what the engine's passes gather


def dequantized(qw: QuantizedWeight, scale_dtype: Any = jnp.float16) -> jax.Array:
    """``[N, K]`` f32 weight a quantized weight stands for, with scales rounded to ``scale_dtype`` as checkpoints
    store them (so calibration sees exactly what inference computes)."""
    qw = dataclasses.replace(qw, scales=qw.scales.astype(scale_dtype).astype(jnp.float32))
    return qw.dequantize()


def _rtn(ws: Sequence[jax.Array], h: Any, config: QuantConfig) -> list[QuantizedWeight]:
    return [rtn_quantize(w, config) for w in ws]


@dataclasses.dataclass(frozen=True)
class Solver:
    """``solve(ws, h, config) -> [QuantizedWeight]``: the weights of one stage (f32 ``[N, K]`` each, same ``K``),
    the stage's Hessian ``h`` ``[K, K]`` (None when ``statistics`` is empty) and their config; one result per weight.
    ``write(qw) -> [N, K]``: the value the model computes with afterwards (default: ``dequantized``, scales rounded
    to float16 as checkpoints store them). ``statistics``: what ``solve`` needs (see module docstring)."""

    solve: Callable[..., list[QuantizedWeight]] = quantize_weights
    write: Callable[[QuantizedWeight], jax.Array] | None = None
    statistics: tuple[str, ...] = STATISTICS

    def __post_init__(self) -> None:
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise NotImplementedError(f"solver statistics {unknown} are not gathered by the engine (it gathers "
                                      f"{list(STATISTICS)})")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics)


GPTQ = Solver()
RTN = Solver(solve=_rtn, statistics=())


def as_solver(solver: Solver | Callable[..., Any] | None, method: str) -> Solver:
    """The ``Solver`` of ``quantize(method=..., solver=...)``: a callable is ``Solver(solve=callable)``."""
    if solver is None:
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
                w_axes: dict[int, tuple[int, ...]], h: Any, qc: QuantConfig, mesh: Any) -> list[Solved]:
    """Solve parameters ``ps`` (one stage, one config) of ``leaves``, write them back in place, and report.

    Each record gives the solve's time shared out by rows."""
    t0 = time.perf_counter()
    wms = [as_matrix(jnp.asarray(leaves[p]), w_axes[p]) for p in ps]  # (N, K)
    if mesh is not None and solver == GPTQ:
        # Gathered, so that every process can store, digest and pack the whole weight.
        qws = [sharding.replicate(qw, mesh) for qw in sharding.quantize_weights_sharded(wms, h, qc, mesh=mesh)]
    else:
        qws = list(solver.solve(wms, h, qc))
    if len(qws) != len(wms):
        raise ValueError(f"the solver returned {len(qws)} results for {len(wms)} weights ({', '.join(names)})")
    for p, qw in zip(ps, qws, strict=True):
        leaves[p] = write_back(solver, qw, leaves[p], w_axes[p], mesh)
    jax.block_until_ready([leaves[p] for p in ps])
    seconds = time.perf_counter() - t0
    rows = sum(int(wm.shape[0]) for wm in wms)
    return [Solved(name, qw, w_axes[p], {
        "name": name, "shape": [int(d) for d in wm.shape], "bits": qc.bits, "group_size": qc.group_size,
        "loss": float(qw.loss), "damp": float(qw.damp), "fallback": bool(qw.fallback),
        "seconds": seconds * int(wm.shape[0]) / rows,
    }) for p, name, wm, qw in zip(ps, names, wms, qws, strict=True)]
