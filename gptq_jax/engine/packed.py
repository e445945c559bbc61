"""Packed inference of any quantized model, and its one Orbax format.

``packed_weight(qw)`` is the one conversion from a solver result (``QuantizedWeight``, ``[N, K]``) to a
``PackedWeight`` (``pallas_kernels.packing``, ``[K, N]`` with K the product of the parameter's contracting axes).
Two ways run a model on it, both built on that conversion:

- ``pack(model, result)`` keeps the model's float parameters and a ``PackedWeight`` per quantized one. Calling the
  ``PackedModel`` traces the model's own forward with the quantized parameters abstract, and runs that program with
  each matmul on a quantized parameter replaced by ``pallas_kernels.gptq_matmul`` on the activation reshaped to
  ``[tokens, K]`` (and the result reshaped back): Pallas on GPU, the jnp reference on CPU. Any NNX module or Linen
  ``apply`` function; only the model's call is packed.
- ``QuantLinear`` is a module computing ``x @ W + bias`` from a ``PackedWeight``; swapping a model's linear layers
  for it (``gptq_jax.models.qlinear.pack_model`` for our Llama family) keeps every method of the model (KV-cache
  generation, tiled evaluation) working on packed weights.

``save_packed`` writes either with Orbax in one format (the float parameters by path, the packed arrays of each
quantized parameter, and a JSON of what rebuilds each ``PackedWeight``); ``load_packed`` restores it as a
``PackedModel``, or with ``modules=True`` as the model with ``QuantLinear`` layers.
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
from jax import lax

from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.engine.experts import dequantized_stack, split_expert, stack_packed
from gptq_jax.engine.scanned import split_slice_name
from gptq_jax.engine.subject import Params
from gptq_jax.engine.trace import CASTS, activation_rows, eval_jaxpr, run, scan_body, scan_layout, trace
from pallas_kernels import PackedWeight, gptq_matmul, packing

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


class QuantLinear(nnx.Module):
    """``y = x @ dequant(W) + bias`` with ``W`` packed (see ``pallas_kernels.packing.PackedWeight``).

    Arrays are ``nnx.Variable``s (not ``Param``: nothing here is trained) holding the fields of a
    ``PackedWeight``; ``bits``/``group_size`` are static. ``bias`` float ``[N]`` or None.
    """

    def __init__(self, packed: PackedWeight, bias: jax.Array | None, *, dtype: Any = jnp.float32):
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.dtype = jnp.dtype(dtype)
        children, self._treedef = jax.tree.flatten(packed)
        self.packed_leaves = nnx.List([nnx.Variable(c) for c in children])
        self.bias = None if bias is None else nnx.Variable(jnp.asarray(bias, dtype))

    @property
    def packed(self) -> PackedWeight:
        return jax.tree.unflatten(self._treedef, [v[...] for v in self.packed_leaves])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = gptq_matmul(x.astype(self.dtype), self.packed)  # (..., N) in x's dtype, f32 accumulation inside
        if self.bias is not None:
            y = (y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        return y

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: jax.Array | None = None, *, dtype: Any = jnp.float32,
                       scale_dtype: Any = jnp.float16) -> QuantLinear:
        """From the solver's ``QuantizedWeight`` (``[N, K]``) through ``packed_weight``; K and N must pack."""
        return cls(packed_weight(qw, scale_dtype), bias, dtype=dtype)

    @classmethod
    def from_hf_tensors(cls, name: str, tensors: dict[str, np.ndarray], *, in_features: int, out_features: int,
                        bits: int, group_size: int, checkpoint_format: str, dtype: Any = jnp.float32) -> QuantLinear:
        """From one layer's checkpoint tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``, ``bias``;
        docs/checkpoints.md)."""
        bias = tensors.get("bias")
        try:
            packed = PackedWeight.from_checkpoint(
                tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), bits=bits,
                group_size=group_size, checkpoint_format=checkpoint_format, in_features=in_features,
                out_features=out_features,
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"tensor {name}.bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        return cls(packed, None if bias is None else jnp.asarray(bias), dtype=dtype)

    def hf_tensors(self, name: str, *, checkpoint_format: str) -> dict[str, np.ndarray]:
        """This layer's checkpoint tensors under ``name.qweight`` etc. (docs/checkpoints.md); scales and bias in
        float16."""
        arrays = packing.to_checkpoint(self.packed, checkpoint_format)
        out = {f"{name}.{key}": np.asarray(a) for key, a in arrays.items()}
        out[f"{name}.scales"] = out[f"{name}.scales"].astype(np.float16)
        if self.bias is not None:
            out[f"{name}.bias"] = np.asarray(jax.device_get(self.bias[...])).astype(np.float16)
        return out


@dataclasses.dataclass(frozen=True)
class _PackedParam:
    """A quantized parameter while the program runs: its packed matrix, its shape and contracting axes, and how
    the program has permuted its axes so far."""

    packed: PackedWeight
    shape: tuple[int, ...]
    w_axes: tuple[int, ...]
    axes: tuple[int, ...]
    expert_axis: int | None = None  # a stack of experts: ``packed`` is stacked on a leading expert axis


def _expert_dot(eqn: Any, invals: list[Any], side: int) -> list[Any]:
    """A ``dot_general`` whose batch dimension is the expert axis of a stack: ``gptq_matmul`` vmapped over the
    experts, on each expert's slots reshaped to ``[slots, K]`` (the Pallas kernel on GPU, the jnp reference on CPU).
    """
    ref: _PackedParam = invals[side]
    x = invals[1 - side]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_dims, x_dims, xb = (rc, lc, lb[0]) if side == 1 else (lc, rc, rb[0])
    pairs = sorted((ref.axes[d], xd) for d, xd in zip(w_dims, x_dims, strict=True))
    if tuple(a for a, _ in pairs) != ref.w_axes:
        raise NotImplementedError(f"a quantized stack of experts is contracted over axes {[a for a, _ in pairs]}, "
                                  f"not the {list(ref.w_axes)} it was quantized for")
    x_axes = [xd - (xd > xb) for _, xd in pairs]
    xe = jnp.moveaxis(x, xb, 0)  # (E, ...)
    rows = jax.vmap(lambda s: activation_rows(s, x_axes))(xe)  # (E, slots, K)
    k = rows.shape[2]
    if ref.packed.in_features != k:  # padded to pack (see packed_weight)
        rows = jnp.pad(rows, ((0, 0), (0, 0), (0, ref.packed.in_features - k)))
    w_free = [a for a in range(len(ref.shape)) if a not in ref.w_axes and a != ref.expert_axis]  # N's layout
    n = math.prod(ref.shape[a] for a in w_free)
    y = jax.vmap(gptq_matmul)(rows, ref.packed)[:, :, :n]  # (E, slots, N)
    x_free = [xe.shape[1 + a] for a in range(xe.ndim - 1) if a not in x_axes]
    y = y.reshape(y.shape[0], *x_free, *[ref.shape[a] for a in w_free])
    op_free = [ref.axes[d] for d in range(len(ref.axes)) if d not in w_dims and ref.axes[d] != ref.expert_axis]
    nx = len(x_free)
    xs, ws = list(range(1, 1 + nx)), [1 + nx + w_free.index(a) for a in op_free]
    return [jnp.transpose(y, [0, *xs, *ws] if side == 1 else [0, *ws, *xs]).astype(eqn.outvars[0].aval.dtype)]


def _expert_matmul(eqn: Any, invals: list[Any], side: int) -> list[Any]:
    """A ``ragged_dot`` on a stack of experts, from the experts dequantized (pure jnp: the Pallas kernel runs one
    matrix, and there is no grouped kernel yet)."""
    ref: _PackedParam = invals[side]
    w = dequantized_stack(ref.packed, ref.shape, ref.w_axes, ref.expert_axis)
    invals = list(invals)
    invals[side] = jnp.transpose(w, ref.axes).astype(eqn.invars[side].aval.dtype)
    return [eqn.primitive.bind(*invals, **eqn.params)]


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


@dataclasses.dataclass(frozen=True)
class _PackedStack:
    """A quantized parameter stacked on a leading layer axis and scanned over: its slices' packed matrices stacked
    (every array of ``packed`` has the leading layer axis), and one slice's shape and contracting axes."""

    path: str
    packed: PackedWeight
    shape: tuple[int, ...]
    w_axes: tuple[int, ...]


def _packed_scan(eqn: Any, invals: list[Any]) -> list[Any]:
    """The scan run as ``lax.scan`` with the stacked packed weights scanned over and its body's matmuls on them
    replaced: the body is traced once, whatever the depth."""
    p = eqn.params
    nc, nk = scan_layout(eqn)
    consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    for x in (*consts, *carry):
        if isinstance(x, _PackedStack):
            raise NotImplementedError(f"{x.path}: a stacked quantized weight is a constant or the carried state of "
                                      "a scan, not scanned over; packed inference cannot slice it")
    stacked = [isinstance(x, _PackedStack) for x in xs]
    body_jaxpr, body_consts = scan_body(eqn)

    def step(c: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        args = [_PackedParam(v, st.shape, st.w_axes, tuple(range(len(st.shape)))) if k else v
                for v, k, st in zip(x, stacked, xs, strict=True)]
        outs = eval_jaxpr(body_jaxpr, body_consts, [*consts, *c, *args], _replace_eqn)
        return outs[:nk], outs[nk:]

    c, ys = lax.scan(step, list(carry), [x.packed if k else x for x, k in zip(xs, stacked, strict=True)],
                     length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*c, *ys]


def _replace_eqn(eqn: Any, invals: list[Any]) -> list[Any] | None:
    name = eqn.primitive.name
    stacks = [x for x in invals if isinstance(x, _PackedStack)]
    if stacks:
        if name == "scan":
            return _packed_scan(eqn, invals)
        if name in CASTS:
            return [stacks[0]]
        raise NotImplementedError(f"{stacks[0].path}: a stacked quantized weight is used by '{name}' outside the "
                                  "scan over it, which packed inference cannot compute")
    sides = [i for i, v in enumerate(invals) if isinstance(v, _PackedParam)]
    if not sides:
        return None
    ref = invals[sides[0]]
    if name in CASTS:
        return [ref]
    if name == "transpose":
        return [dataclasses.replace(ref, axes=tuple(ref.axes[p] for p in eqn.params["permutation"]))]
    if name == "dot_general" and len(sides) == 1 and ref.expert_axis is not None:
        return _expert_dot(eqn, invals, sides[0])
    if name == "ragged_dot_general" and len(sides) == 1 and ref.expert_axis is not None:
        return _expert_matmul(eqn, invals, sides[0])
    if name == "dot_general" and len(sides) == 1:
        return _packed_matmul(eqn, invals, sides[0])
    raise NotImplementedError(f"a quantized weight is used by '{name}', which packed inference cannot compute")


def _replacer(traced: Any) -> Callable[[int, list[Any]], list[Any] | None]:
    eqns = traced.eqns
    return lambda idx, invals: _replace_eqn(eqns[idx], invals)


class PackedModel:
    """A quantized model computing from packed weights: ``packed(*args, **kwargs)`` is the model's own call
    (NNX: ``model(*args, **kwargs)``; Linen: ``apply_fn({"params": params}, *args, **kwargs)``), jitted."""

    def __init__(self, call: Callable[[Any, tuple, dict], Any], params: Params, packed: dict[str, PackedWeight],
                 w_axes: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any],
                 experts: dict[str, int] | None = None, stacked: frozenset[str] = frozenset()):
        # experts: stacks of experts (parameter -> expert axis); stacked: parameters scanned over on a leading layer
        # axis, whose PackedWeight arrays carry that axis and whose w_axes are one slice's.
        self._call, self.params, self.packed, self.w_axes = call, params, packed, w_axes
        self.shapes, self.dtypes, self.experts = shapes, dtypes, dict(experts or {})
        self.stacked = frozenset(stacked)
        self._jit = jax.jit(self._run)

    def _run(self, float_leaves: list[Any], packed: dict[str, PackedWeight], args: tuple, kwargs: dict) -> Any:
        paths = self.params.paths
        avals = [
            jax.ShapeDtypeStruct(self.shapes[p], self.dtypes[p]) if p in packed else x
            for p, x in zip(paths, float_leaves, strict=True)
        ]
        traced = trace(lambda params, a, k: self._call(params, a, k), avals, self.params.tree, args, kwargs)
        leaves = [
            x if p not in packed
            else _PackedStack(p, packed[p], self.shapes[p][1:], self.w_axes[p]) if p in self.stacked
            else _PackedParam(packed[p], self.shapes[p], self.w_axes[p], tuple(range(len(self.shapes[p]))),
                              self.experts.get(p))
            for p, x in zip(paths, float_leaves, strict=True)
        ]
        out, _ = run(traced, leaves, inputs=jax.tree.leaves((args, kwargs)), replace=_replacer(traced))
        return jax.tree.unflatten(traced.out_tree, out)

    def _float_leaves(self) -> list[Any]:
        return [None if p in self.packed else x for p, x in zip(self.params.paths, self.params.leaves, strict=True)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jit(self._float_leaves(), self.packed, args, kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """The jitted call traced and lowered for these arguments (``jax.stages.Lowered``; ``.compile()`` it)."""
        return self._jit.lower(self._float_leaves(), self.packed, args, kwargs)

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


def _stack_slices(name: str, length: int, slices: dict[int, PackedWeight]) -> PackedWeight:
    """One ``PackedWeight`` of every slice of a stacked parameter, its arrays stacked on a leading layer axis."""
    missing = sorted(set(range(length)) - set(slices))
    if missing:
        raise ValueError(f"{name}: stacked on {length} layers but slices {missing[:5]} were not quantized; a stacked "
                         "parameter packs whole: quantize every slice of it or none")
    kinds = {(w.bits, w.group_size, w.in_features, w.out_features, w.perm is None) for w in slices.values()}
    if len(kinds) > 1:
        raise ValueError(f"{name}: its slices were quantized differently ({sorted(kinds)}: bits, group size, "
                         "K, N, no act-order); a stacked parameter packs with one config for every slice")
    return jax.tree.map(lambda *a: jnp.stack(a), *[slices[i] for i in range(length)])


def _packed_params(params: Params, result: Any, scale_dtype: Any) -> tuple[dict, dict, dict, frozenset[str]]:
    """Each quantized parameter's ``PackedWeight`` and contracting axes, with the slices of a parameter stacked into
    one: the experts of a stack of experts (``path[e]``, ``engine.experts``; their report records name the expert),
    and the layers of a stacked parameter scanned over (``path[i]``, ``engine.scanned``). Also each stack of
    experts' expert axis, and the scanned-over parameters."""
    index = {p: i for i, p in enumerate(params.paths)}
    expert_names = {r["name"] for r in result.report.linears if "expert" in r}
    packed, axes, experts, by_expert, by_layer = {}, {}, {}, {}, {}
    for name, qw in result.weights.items():
        pw = packed_weight(qw, scale_dtype, pad=True)
        found = split_expert(name) if name in expert_names else None
        whole = split_slice_name(name) if name not in index and found is None else None
        if name in index:
            packed[name], axes[name] = pw, tuple(result.axes[name])
        elif found is not None and found[0] in index:
            path, axis, e = found
            by_expert.setdefault(path, {})[e] = pw
            experts[path] = axis
            axes[path] = tuple(a + (a >= axis) for a in result.axes[name])
        elif whole is not None and whole[0] in index:
            by_layer.setdefault(whole[0], {})[whole[1]] = pw
            axes[whole[0]] = tuple(result.axes[name])
        else:
            raise ValueError(f"quantized weight {name!r} is not a parameter of this model")
    for path, by_e in by_expert.items():
        num = jnp.shape(params.leaves[index[path]])[experts[path]]
        if sorted(by_e) != list(range(num)):
            raise ValueError(f"{path}: quantized experts {sorted(by_e)} do not cover its {num} experts")
        packed[path] = stack_packed([by_e[e] for e in range(num)])
    for p, by_i in by_layer.items():
        packed[p] = _stack_slices(p, jnp.shape(params.leaves[index[p]])[0], by_i)
    return packed, axes, experts, frozenset(by_layer)


def pack(model: Any, result: Any, *, apply_fn: Callable[..., Any] | None = None,
         forward: Callable[..., Any] | None = None, scale_dtype: Any = jnp.float16) -> PackedModel:
    """The quantized model of ``result`` (``gptq_jax.quantize``'s ``QuantizeResult``) computing from packed weights.

    ``model``: the NNX module (``result.model``), or a params pytree with ``apply_fn`` (Linen) or with
    ``forward(params, *args, **kwargs)``. A scanned stack stays scanned: its packed weights are stacked on the layer
    axis and the matmuls inside the scan's body computed from them."""
    if apply_fn is not None or forward is not None:
        params = Params.of(model)
        run_fwd = forward if forward is not None else (lambda p, *a, **k: apply_fn({"params": p}, *a, **k))
        call = lambda p, args, kwargs: run_fwd(p, *args, **kwargs)  # noqa: E731
    elif isinstance(model, nnx.Module):
        call, params = _nnx_call(model)
    else:
        raise TypeError(f"pack expects an nnx.Module, or a params pytree with apply_fn= or forward=; got "
                        f"{type(model).__name__}")
    packed, axes, experts, stacked = _packed_params(params, result, scale_dtype)
    index = {p: i for i, p in enumerate(params.paths)}
    shapes = {p: tuple(jnp.shape(params.leaves[index[p]])) for p in packed}
    dtypes = {p: jnp.result_type(params.leaves[index[p]]) for p in packed}
    return PackedModel(call, params, packed, axes, shapes, dtypes, experts, stacked)


# ----------------------------------------------------------------------------------------------------------------------
# Orbax: one format for both ways of running packed weights

_META = "gptq_jax_packed.json"
_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "perm")


@dataclasses.dataclass
class _Record:
    """What a packed model is on disk: float parameters by path, and per quantized parameter (``<module>.kernel``
    for a ``QuantLinear``) its ``PackedWeight``, the parameter's shape and dtype and its contracting axes."""

    floats: dict[str, Any]
    packed: dict[str, PackedWeight]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, Any]
    w_axes: dict[str, tuple[int, ...]]
    experts: dict[str, int] = dataclasses.field(default_factory=dict)  # stacks of experts: their expert axis
    stacked: frozenset[str] = frozenset()  # scanned over on a leading layer axis (see PackedModel)


def _quant_linears(model: nnx.Module) -> dict[str, QuantLinear]:
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)}


def _record(obj: PackedModel | nnx.Module) -> _Record:
    if isinstance(obj, PackedModel):
        floats = {p: x for p, x in zip(obj.params.paths, obj.params.leaves, strict=True) if p not in obj.packed}
        return _Record(floats, dict(obj.packed), dict(obj.shapes), dict(obj.dtypes), dict(obj.w_axes),
                       dict(obj.experts), obj.stacked)
    if not isinstance(obj, nnx.Module):
        raise TypeError(f"save_packed expects a PackedModel or an nnx.Module, got {type(obj).__name__}")
    linears = _quant_linears(obj)
    if not linears:
        raise ValueError("the model has no QuantLinear layers: quantize it and pack it first")
    _, state, _ = nnx.split(obj, nnx.Param, ...)
    params = Params.of(state)
    floats = dict(zip(params.paths, params.leaves, strict=True))
    floats.update({f"{m}.bias": q.bias[...] for m, q in linears.items() if q.bias is not None})
    return _Record(floats, {f"{m}.kernel": q.packed for m, q in linears.items()},
                   {f"{m}.kernel": (q.in_features, q.out_features) for m, q in linears.items()},
                   {f"{m}.kernel": q.dtype for m, q in linears.items()}, {f"{m}.kernel": (0,) for m in linears})


def save_packed(packed: PackedModel | nnx.Module, directory: str | os.PathLike) -> str:
    """Save a ``PackedModel`` (``pack``) or a model with ``QuantLinear`` layers with Orbax: the float and packed
    arrays, and what rebuilds each ``PackedWeight`` in a JSON beside them. Returns the directory."""
    import orbax.checkpoint as ocp

    rec = _record(packed)
    directory = os.path.abspath(os.fspath(directory))
    arrays = {"float": {p: np.asarray(x) for p, x in rec.floats.items()},
              "packed": {p: {k: np.asarray(v) for k, v in _fields(w).items()} for p, w in rec.packed.items()}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, arrays)
    meta = {
        p: {"bits": w.bits, "group_size": w.group_size, "in_features": w.in_features, "out_features": w.out_features,
            "shape": list(rec.shapes[p]), "dtype": jnp.dtype(rec.dtypes[p]).name, "w_axes": list(rec.w_axes[p]),
            "fields": sorted(_fields(w)), "stacked": p in rec.stacked,
            **({"expert_axis": rec.experts[p]} if p in rec.experts else {})}
        for p, w in rec.packed.items()
    }
    tmp = os.path.join(directory, _META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, _META))
    return directory


def _fields(w: PackedWeight) -> dict[str, Any]:
    return {k: getattr(w, k) for k in _FIELDS if getattr(w, k) is not None}


def _read(directory: str) -> _Record:
    import orbax.checkpoint as ocp

    meta_path = os.path.join(directory, _META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not a packed model saved by save_packed (no {_META})")
    with open(meta_path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory)
    packed = {}
    for p, m in meta.items():
        arrays = restored["packed"][p]
        packed[p] = PackedWeight(**{k: jnp.asarray(arrays[k]) if k in arrays else None for k in _FIELDS},
                                 bits=m["bits"], group_size=m["group_size"], in_features=m["in_features"],
                                 out_features=m["out_features"])
    return _Record(restored.get("float", {}), packed, {p: tuple(m["shape"]) for p, m in meta.items()},
                   {p: jnp.dtype(m["dtype"]) for p, m in meta.items()},
                   {p: tuple(m["w_axes"]) for p, m in meta.items()},
                   {p: m["expert_axis"] for p, m in meta.items() if "expert_axis" in m},
                   frozenset(p for p, m in meta.items() if m.get("stacked")))


def _float_leaves(params: Params, rec: _Record, directory: str) -> list[Any]:
    """The model's float parameters from the record, checked against the model's shapes (quantized ones: None)."""
    want = {p: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
            for p, x in zip(params.paths, params.leaves, strict=True) if p not in rec.packed}
    bad = [p for p in want if p not in rec.floats or tuple(np.shape(rec.floats[p])) != want[p].shape]
    if bad:
        raise ValueError(f"{directory}: float parameters {bad[:5]} are missing or of another shape")
    return [jnp.asarray(rec.floats[p], want[p].dtype) if p in want else None for p in params.paths]


def _into_modules(model: nnx.Module, rec: _Record, directory: str) -> nnx.Module:
    """Puts a ``QuantLinear`` at each quantized ``<module>.kernel`` of ``model`` (in place) and returns the model
    with the record's float parameters everywhere else."""
    for p, w in rec.packed.items():
        mod = p.removesuffix(".kernel")
        if (mod == p or rec.w_axes[p] != (0,) or len(rec.shapes[p]) != 2
                or (w.in_features, w.out_features) != rec.shapes[p]):
            raise ValueError(f"{directory}: {p} is not the [K, N] kernel of a linear layer; load it with "
                             "modules=False (a PackedModel)")
        parent_path, _, attr = mod.rpartition(".")
        parent = model
        for part in filter(None, parent_path.split(".")):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        bias = rec.floats.get(f"{mod}.bias")
        setattr(parent, attr, QuantLinear(w, None if bias is None else jnp.asarray(bias), dtype=rec.dtypes[p]))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = Params.of(state)
    leaves = _float_leaves(params, rec, directory)
    return nnx.merge(graphdef, params.unflatten(leaves), rest)


def load_packed(model_like: Any, directory: str | os.PathLike, *, apply_fn: Callable[..., Any] | None = None,
                modules: bool = False) -> Any:
    """Restore a ``save_packed`` directory onto a model of the same structure (an NNX module, e.g. built with
    ``nnx.eval_shape``, or Linen params with ``apply_fn``).

    Returns a ``PackedModel``; with ``modules=True`` (NNX only) the model itself, each quantized linear kernel
    (``<module>.kernel``, ``[K, N]``) served by a ``QuantLinear``, so every method of the model runs packed."""
    directory = os.path.abspath(os.fspath(directory))
    rec = _read(directory)
    if modules:
        if apply_fn is not None or not isinstance(model_like, nnx.Module):
            raise TypeError("modules=True restores into an nnx.Module; a Linen model loads as a PackedModel")
        return _into_modules(model_like, rec, directory)
    if apply_fn is not None:
        params = Params.of(model_like)
        call = lambda p, args, kwargs: apply_fn({"params": p}, *args, **kwargs)  # noqa: E731
    else:
        call, params = _nnx_call(model_like)
    missing = [p for p in rec.packed if p not in set(params.paths)]
    if missing:
        raise ValueError(f"{directory} holds quantized weights {missing[:5]} that this model does not have")
    params.leaves[:] = _float_leaves(params, rec, directory)
    return PackedModel(call, params, rec.packed, rec.w_axes, rec.shapes, rec.dtypes, rec.experts, rec.stacked)


__all__ = ["PackedModel", "QuantLinear", "load_packed", "pack", "packed_weight", "save_packed"]
