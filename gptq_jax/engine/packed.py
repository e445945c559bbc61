"""Packed inference of any quantized model: the same model code, computing its matmuls from packed weights.

``pack(model, result)`` keeps the model's float parameters and, for every quantized one, a ``PackedWeight``
(``pallas_kernels.packing``, ``[K, N]`` with K the product of the parameter's contracting axes). Calling the
``PackedModel`` traces the model's own forward with the quantized parameters abstract, and runs that program with
each matmul on a quantized parameter replaced by ``pallas_kernels.gptq_matmul`` on the activation reshaped to
``[tokens, K]`` (and the result reshaped back): Pallas on GPU, the jnp reference on CPU. Works for NNX modules and
Linen ``apply`` functions alike; ``save_packed`` / ``load_packed`` keep it with Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.engine.subject import Params
from gptq_jax.engine.trace import _CASTS, activation_rows, run, trace
from pallas_kernels import PackedWeight, gptq_matmul

_ALIGN = 32  # K and N padded to a multiple of this, which every bit width packs into whole int32 words


def packed_weight(qw: QuantizedWeight, scale_dtype: Any = jnp.float16, *, pad: bool = False) -> PackedWeight:
    """A solver result (``[N, K]``) as a ``PackedWeight`` (``[K, N]``), scales stored in ``scale_dtype``.

    ``pad=True`` pads K and N up to a multiple of 32 so any shape packs (padded rows hold code 0 and meet zero
    activations; padded columns are sliced off the output): checkpoint layers never need it."""
    codes, scales, zeros, g_idx = (np.asarray(qw.codes).T, np.asarray(qw.scales).T.astype(scale_dtype),
                                   np.asarray(qw.zeros).T, np.asarray(qw.g_idx))  # (K, N), (G, N), (G, N), (K,)
    if pad:
        k, n = codes.shape
        kp, np_ = -(-k // _ALIGN) * _ALIGN, -(-n // _ALIGN) * _ALIGN
        gp = -(-kp // qw.group_size)
        codes = np.pad(codes, ((0, kp - k), (0, np_ - n)))
        scales = np.pad(scales, ((0, gp - scales.shape[0]), (0, np_ - n)), constant_values=1)
        zeros = np.pad(zeros, ((0, gp - zeros.shape[0]), (0, np_ - n)))
        g_idx = np.concatenate([g_idx, np.full(kp - k, g_idx[-1] if k else 0, g_idx.dtype)])
    return PackedWeight.from_codes(codes, scales, zeros, g_idx, bits=qw.bits, group_size=qw.group_size)


@dataclasses.dataclass(frozen=True)
class _PackedParam:
    """A quantized parameter while the program runs: its packed matrix, its shape and contracting axes, and how
    the program has permuted its axes so far."""

    packed: PackedWeight
    shape: tuple[int, ...]
    w_axes: tuple[int, ...]
    axes: tuple[int, ...]


def _packed_matmul(eqn: Any, invals: list[Any], side: int) -> list[Any]:
    ref: _PackedParam = invals[side]
    x = invals[1 - side]
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_dims, x_dims = (rc, lc) if side == 1 else (lc, rc)
    pairs = sorted((ref.axes[d], xd) for d, xd in zip(w_dims, x_dims, strict=True))
    if tuple(a for a, _ in pairs) != ref.w_axes:
        raise NotImplementedError(f"a quantized weight is contracted over axes {[a for a, _ in pairs]}, "
                                  f"not the {list(ref.w_axes)} it was quantized for")
    x_axes = [xd for _, xd in pairs]
    rows = activation_rows(x, x_axes)  # (tokens, K)
    k, n = rows.shape[1], math.prod(ref.shape) // rows.shape[1]
    if ref.packed.in_features != k:  # padded to pack (see packed_weight)
        rows = jnp.pad(rows, ((0, 0), (0, ref.packed.in_features - k)))
    y = gptq_matmul(rows, ref.packed)[:, :n]  # (tokens, N)
    x_free = [x.shape[a] for a in range(x.ndim) if a not in x_axes]
    w_free = [a for a in range(len(ref.shape)) if a not in ref.w_axes]  # ascending: N's layout
    y = y.reshape(*x_free, *[ref.shape[a] for a in w_free])
    op_free = [ref.axes[d] for d in range(len(ref.axes)) if d not in w_dims]  # the operand's order
    nx = len(x_free)
    order = list(range(nx)) + [nx + w_free.index(a) for a in op_free]
    if side == 0:  # the weight is the left operand: its free axes come first
        order = order[nx:] + order[:nx]
    return [jnp.transpose(y, order).astype(eqn.outvars[0].aval.dtype)]


def _replacer(traced: Any) -> Callable[[int, list[Any]], list[Any] | None]:
    eqns = traced.eqns

    def replace(idx: int, invals: list[Any]) -> list[Any] | None:
        sides = [i for i, v in enumerate(invals) if isinstance(v, _PackedParam)]
        if not sides:
            return None
        eqn = eqns[idx]
        name = eqn.primitive.name
        ref = invals[sides[0]]
        if name in _CASTS:
            return [ref]
        if name == "transpose":
            return [dataclasses.replace(ref, axes=tuple(ref.axes[p] for p in eqn.params["permutation"]))]
        if name == "dot_general" and len(sides) == 1:
            return _packed_matmul(eqn, invals, sides[0])
        raise NotImplementedError(f"a quantized weight is used by '{name}', which packed inference cannot compute")

    return replace


class PackedModel:
    """A quantized model computing from packed weights: ``packed(*args, **kwargs)`` is the model's own call
    (NNX: ``model(*args, **kwargs)``; Linen: ``apply_fn({"params": params}, *args, **kwargs)``), jitted."""

    def __init__(self, call: Callable[[Any, tuple, dict], Any], params: Params, packed: dict[str, PackedWeight],
                 w_axes: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any]):
        self._call, self.params, self.packed, self.w_axes = call, params, packed, w_axes
        self.shapes, self.dtypes = shapes, dtypes
        self._jit = jax.jit(self._run)

    def _run(self, float_leaves: list[Any], packed: dict[str, PackedWeight], args: tuple, kwargs: dict) -> Any:
        paths = self.params.paths
        avals = [
            jax.ShapeDtypeStruct(self.shapes[p], self.dtypes[p]) if p in packed else x
            for p, x in zip(paths, float_leaves, strict=True)
        ]
        traced = trace(lambda params, a, k: self._call(params, a, k), avals, self.params.tree, args, kwargs)
        leaves = [
            _PackedParam(packed[p], self.shapes[p], self.w_axes[p], tuple(range(len(self.shapes[p]))))
            if p in packed else x
            for p, x in zip(paths, float_leaves, strict=True)
        ]
        out, _ = run(traced, leaves, inputs=jax.tree.leaves((args, kwargs)), replace=_replacer(traced))
        return jax.tree.unflatten(traced.out_tree, out)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        float_leaves = [None if p in self.packed else x for p, x in zip(self.params.paths, self.params.leaves,
                                                                        strict=True)]
        return self._jit(float_leaves, self.packed, args, kwargs)

    def nbytes(self) -> int:
        """Bytes of the arrays it holds (packed weights and the float parameters)."""
        leaves = [x for p, x in zip(self.params.paths, self.params.leaves, strict=True) if p not in self.packed]
        return sum(int(np.prod(jnp.shape(x))) * jnp.dtype(jnp.result_type(x)).itemsize
                   for x in [*leaves, *jax.tree.leaves(self.packed)])


def _nnx_call(model: nnx.Module) -> tuple[Callable, Params]:
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = Params.of(state)

    def call(p: Any, args: tuple, kwargs: dict) -> Any:
        return nnx.merge(graphdef, p, rest)(*args, **kwargs)

    return call, params


def pack(model: Any, result: Any, *, apply_fn: Callable[..., Any] | None = None,
         scale_dtype: Any = jnp.float16) -> PackedModel:
    """The quantized model of ``result`` (``gptq_jax.quantize``'s ``QuantizeResult``) computing from packed weights.

    ``model``: the NNX module (``result.model``), or a Linen params pytree with ``apply_fn``."""
    if apply_fn is not None:
        params = Params.of(model)
        call = lambda p, args, kwargs: apply_fn({"params": p}, *args, **kwargs)  # noqa: E731
    elif isinstance(model, nnx.Module):
        call, params = _nnx_call(model)
    else:
        raise TypeError(f"pack expects an nnx.Module, or Linen params with apply_fn=; got {type(model).__name__}")
    known = set(params.paths)
    missing = [p for p in result.weights if p not in known]
    if missing:
        raise ValueError(f"quantized weights {missing[:5]} are not parameters of this model")
    index = {p: i for i, p in enumerate(params.paths)}
    shapes = {p: tuple(jnp.shape(params.leaves[index[p]])) for p in result.weights}
    dtypes = {p: jnp.result_type(params.leaves[index[p]]) for p in result.weights}
    packed = {p: packed_weight(qw, scale_dtype, pad=True) for p, qw in result.weights.items()}
    return PackedModel(call, params, packed, dict(result.axes), shapes, dtypes)


# ----------------------------------------------------------------------------------------------------------------------
# Orbax

_META = "gptq_jax_packed.json"


def save_packed(packed: PackedModel, directory: str | os.PathLike) -> str:
    """Save the packed and float arrays with Orbax, and what rebuilds the ``PackedWeight``s in a JSON beside."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    arrays = {
        "float": {p: np.asarray(x) for p, x in zip(packed.params.paths, packed.params.leaves, strict=True)
                  if p not in packed.packed},
        "packed": {p: {k: np.asarray(v) for k, v in _fields(w).items()} for p, w in packed.packed.items()},
    }
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, arrays)
    meta = {
        p: {"bits": w.bits, "group_size": w.group_size, "in_features": w.in_features, "out_features": w.out_features,
            "shape": list(packed.shapes[p]), "dtype": jnp.dtype(packed.dtypes[p]).name,
            "w_axes": list(packed.w_axes[p]), "fields": sorted(_fields(w))}
        for p, w in packed.packed.items()
    }
    tmp = os.path.join(directory, _META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, _META))
    return directory


def _fields(w: PackedWeight) -> dict[str, Any]:
    return {k: getattr(w, k) for k in ("qweight", "qzeros", "scales", "g_idx", "perm") if getattr(w, k) is not None}


def load_packed(model_like: Any, directory: str | os.PathLike, *, apply_fn: Callable[..., Any] | None = None
                ) -> PackedModel:
    """Restore a ``save_packed`` directory onto a model of the same structure (an NNX module, e.g. built with
    ``nnx.eval_shape``, or Linen params with ``apply_fn``)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, _META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not a packed model saved by save_packed (no {_META})")
    with open(meta_path) as f:
        meta = json.load(f)
    if apply_fn is not None:
        params = Params.of(model_like)
        call = lambda p, args, kwargs: apply_fn({"params": p}, *args, **kwargs)  # noqa: E731
    else:
        call, params = _nnx_call(model_like)
    missing = [p for p in meta if p not in set(params.paths)]
    if missing:
        raise ValueError(f"{directory} holds quantized weights {missing[:5]} that this model does not have")
    float_target = {p: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
                    for p, x in zip(params.paths, params.leaves, strict=True) if p not in meta}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory)
    floats = restored.get("float", {})
    bad = [p for p in float_target if p not in floats or tuple(np.shape(floats[p])) != float_target[p].shape]
    if bad:
        raise ValueError(f"{directory}: float parameters {bad[:5]} are missing or of another shape")
    params.leaves[:] = [jnp.asarray(floats[p], float_target[p].dtype) if p in float_target else None
                        for p in params.paths]
    packed = {}
    for p, m in meta.items():
        arrays = restored["packed"][p]
        packed[p] = PackedWeight(
            **{k: jnp.asarray(arrays[k]) if k in arrays else None for k in ("qweight", "qzeros", "scales", "g_idx",
                                                                          "perm")},
            bits=m["bits"], group_size=m["group_size"], in_features=m["in_features"], out_features=m["out_features"],
        )
    return PackedModel(call, params, packed, {p: tuple(m["w_axes"]) for p, m in meta.items()},
                       {p: tuple(m["shape"]) for p, m in meta.items()},
                       {p: jnp.dtype(m["dtype"]) for p, m in meta.items()})


__all__ = ["PackedModel", "load_packed", "pack", "packed_weight", "save_packed"]
