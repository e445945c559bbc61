"""Operation-level view of a model: which matmuls read which parameters, found in the traced program.

A model is any function ``f(params, *inputs)`` of a parameter pytree (an NNX state, a Linen ``params`` dict).
``trace(f, params, *inputs)`` turns it into one flat jaxpr: every call-like primitive (``jit``, ``remat``,
``custom_jvp_call``, ...) is inlined, so each ``dot_general`` of the model is an equation at top level, in the order
the program runs. ``find_uses`` then follows each parameter through dtype casts and transposes to the matmuls that
read it, and records which of its axes contract with the activation; everything else a parameter is used for is a
reason not to quantize it.

``run`` evaluates the flat program again, equation by equation, with two hooks: one that sees the activation of
a chosen matmul just before it runs (to fold it into a Hessian), and one that replaces a matmul (to compute it
from packed weights). It can also run a slice of the equations from a carry of live values: that is how a block is
cut into true-sequential stages without any knowledge of what the block is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# Primitives whose body is a jaxpr that runs once, with the equation's inputs as its inputs: inlined by ``trace``.
_INLINE = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Primitives a parameter may pass through on its way to a matmul without changing what it holds.
CASTS = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
# Control flow we do not trace into: a parameter used inside is reported, not quantized.
_OPAQUE = {"scan", "while", "cond", "shard_map", "xla_pmap", "custom_lin"}


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def bind_eqn(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


# hook(eqn, invals) -> the equation's outputs, or None to evaluate it as it is.
Hook = Callable[[Any, list[Any]], list[Any] | None]


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], hook: Hook | None = None) -> list[Any]:
    """Evaluate ``jaxpr`` with every call-like primitive inlined (its body evaluated here, recursively), and
    ``hook`` offered every other equation first (to unroll a scan, or to compute a matmul from packed weights)."""
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        key = _INLINE.get(eqn.primitive.name)
        sub = eqn.params.get(key) if key else None
        if sub is not None:
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            outs = eval_jaxpr(closed.jaxpr, closed.consts, invals, hook)
        else:
            outs = hook(eqn, invals) if hook is not None else None
            if outs is None:
                outs = bind_eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


@dataclasses.dataclass(frozen=True)
class Traced:
    """A flat program: ``jaxpr`` (closed), the first ``num_params`` invars are the parameter leaves, the rest the
    input leaves; ``out_tree`` rebuilds the output pytree."""

    jaxpr: Any
    num_params: int
    out_tree: Any

    @property
    def eqns(self) -> list[Any]:
        return self.jaxpr.jaxpr.eqns


def trace(f: Callable[..., Any], param_leaves: Sequence[Any], param_tree: Any, *inputs: Any) -> Traced:
    """Trace ``f(params, *inputs)`` (arrays or ``ShapeDtypeStruct``s) to a flat program (see module docstring)."""
    in_leaves, in_tree = jax.tree.flatten(inputs)
    out_tree_box = []

    def flat(*leaves):
        params = jax.tree.unflatten(param_tree, leaves[: len(param_leaves)])
        args = jax.tree.unflatten(in_tree, leaves[len(param_leaves) :])
        out = f(params, *args)
        out_leaves, out_tree = jax.tree.flatten(out)
        out_tree_box.append(out_tree)
        return out_leaves

    avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in (*param_leaves, *in_leaves)]
    nested = jax.make_jaxpr(flat)(*avals)
    flat_jaxpr = jax.make_jaxpr(lambda *a: eval_jaxpr(nested.jaxpr, nested.consts, a))(*avals)
    return Traced(flat_jaxpr, len(param_leaves), out_tree_box[0])


# ----------------------------------------------------------------------------------------------------------------------
# Where the parameters go


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A value that is parameter ``param`` with its axes permuted: axis j of the value is axis ``axes[j]``."""

    param: int
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Use:
    """One matmul reading parameter ``param``: equation ``eqn`` of the flat program, the activation ``x`` (a var),
    its axes ``x_axes`` that contract with the parameter's axes ``w_axes`` (ascending, paired in order)."""

    eqn: int
    param: int
    w_axes: tuple[int, ...]
    x: Any
    x_axes: tuple[int, ...]
    param_is_lhs: bool
    # MoE experts: the parameter's expert axis and, for a batched ``dot_general``, the activation's matching batch
    # axis; for ``ragged_dot``, the group sizes (a var) and the activation's ragged (row) axis instead.
    w_batch: int | None = None
    x_batch: int | None = None
    groups: Any = None

    @property
    def key(self) -> tuple[Any, ...]:
        """Uses with the same key read the same values the same way: they share one Hessian."""
        return (self.x, self.x_axes, self.x_batch, self.groups)

    @property
    def experts(self) -> bool:
        return self.w_batch is not None


@dataclasses.dataclass
class Uses:
    """``matmuls[p]``: the matmuls reading parameter p; ``problems[p]``: why p cannot be quantized (if it can't)."""

    matmuls: dict[int, list[Use]]
    problems: dict[int, str]


def find_uses(traced: Traced, candidates: Sequence[int]) -> Uses:
    """Follow parameters ``candidates`` (indices of parameter leaves) to the matmuls that read them."""
    jaxpr = traced.jaxpr.jaxpr
    cand = set(candidates)
    refs: dict[Any, _Ref] = {}
    for i, v in enumerate(jaxpr.invars[: traced.num_params]):
        if i in cand:
            refs[v] = _Ref(i, tuple(range(len(v.aval.shape))))
    matmuls: dict[int, list[Use]] = {}
    problems: dict[int, str] = {}
    for idx, eqn in enumerate(jaxpr.eqns):
        ins = [(k, refs[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in refs]
        if not ins:
            continue
        name = eqn.primitive.name
        if name in CASTS and len(eqn.invars) == 1:
            refs[eqn.outvars[0]] = ins[0][1]
            continue
        if name == "transpose":
            ref = ins[0][1]
            refs[eqn.outvars[0]] = _Ref(ref.param, tuple(ref.axes[p] for p in eqn.params["permutation"]))
            continue
        if name == "dot_general" and len(ins) == 1:
            use = _dot_use(idx, eqn, *ins[0])
            if isinstance(use, str):
                problems.setdefault(ins[0][1].param, use)
            else:
                matmuls.setdefault(use.param, []).append(use)
            continue
        if name == "ragged_dot_general" and [k for k, _ in ins] == [1]:
            use = _ragged_use(idx, eqn, ins[0][1])
            if isinstance(use, str):
                problems.setdefault(ins[0][1].param, use)
            else:
                matmuls.setdefault(use.param, []).append(use)
            continue
        for k, ref in ins:
            what = "inside " + name if name in _OPAQUE else f"by '{name}'"
            if name == "dot_general":
                what = "by a matmul with another parameter"
            if name == "scan":
                what = f"inside scan ({scan_role(eqn, k)})"
            problems.setdefault(ref.param, f"used {what} (not only as a matmul weight)")
    for p in list(matmuls):
        axes = {u.w_axes for u in matmuls[p]}
        if len(axes) > 1:
            problems.setdefault(p, f"contracted over different axes by different matmuls: {sorted(axes)}")
        if len({u.w_batch for u in matmuls[p]}) > 1:
            problems.setdefault(p, "read both as a whole weight and as a stack of experts")
    return Uses(matmuls, problems)


def _dot_use(idx: int, eqn: Any, side: int, ref: _Ref) -> Use | str:
    """The ``Use`` of a ``dot_general`` reading parameter ``ref`` on ``side``, or why it cannot be quantized. One
    batch dimension is an expert axis: each slice along it is a weight of its own (MoE experts)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_dims, x_dims, w_batch, x_batch = (rc, lc, rb, lb) if side == 1 else (lc, rc, lb, rb)
    if len(w_batch) > 1:
        return f"used by a matmul with {len(w_batch)} batch dimensions (dot_general at equation {idx}); one, an " \
               "expert axis, is supported"
    pairs = sorted((ref.axes[d], xd) for d, xd in zip(w_dims, x_dims, strict=True))
    if not pairs or len(pairs) + len(w_batch) == len(ref.axes):
        return "used by a matmul that contracts none or all of its axes"
    eb, xb = (ref.axes[w_batch[0]], x_batch[0]) if w_batch else (None, None)
    return Use(idx, ref.param, tuple(p for p, _ in pairs), eqn.invars[1 - side], tuple(x for _, x in pairs),
               side == 0, eb, xb)


def _ragged_use(idx: int, eqn: Any, ref: _Ref) -> Use | str:
    """The ``Use`` of ``lax.ragged_dot`` (``ragged_dot_general``) whose right operand, ``[G, K, N]``-like, is the
    parameter: rows of the left operand in group g's range meet slice g (a grouped matmul over sorted tokens)."""
    rdn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    simple = (not lb and not rb and len(rdn.lhs_ragged_dimensions) == 1 and len(rdn.rhs_group_dimensions) == 1
              and len(eqn.invars[0].aval.shape) == len(lc) + 1 and rdn.lhs_ragged_dimensions[0] not in lc
              and eqn.params.get("group_offset") is None)
    if not simple:
        return f"used by a ragged_dot of a form other than tokens [M, K] x experts [G, K, N] (equation {idx})"
    pairs = sorted((ref.axes[d], xd) for d, xd in zip(rc, lc, strict=True))
    if not pairs or len(pairs) + 1 == len(ref.axes):
        return "used by a matmul that contracts none or all of its axes"
    return Use(idx, ref.param, tuple(p for p, _ in pairs), eqn.invars[0], tuple(x for _, x in pairs), False,
               ref.axes[rdn.rhs_group_dimensions[0]], rdn.lhs_ragged_dimensions[0], eqn.invars[2])


def scan_layout(eqn: Any) -> tuple[int, int]:
    """``(constants, carried values)``: how many of a ``scan`` equation's operands come before its scanned-over
    ones. JAX up to 0.10 names the counts (``num_consts``, ``num_carry``); 0.12 gives the operand groups
    (``ft_in``: constants, carry, scanned-over)."""
    p = eqn.params
    if "num_consts" in p:
        return p["num_consts"], p["num_carry"]
    groups = p["ft_in"]
    consts, carry, _ = groups.unpack() if hasattr(groups, "unpack") else groups
    return len(consts), len(carry)


def scan_body(eqn: Any) -> tuple[Any, Sequence[Any]]:
    """A ``scan`` equation's body as ``(jaxpr, consts)``: a closed jaxpr up to JAX 0.10, an open one in 0.12."""
    body = eqn.params["jaxpr"]
    return (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())


def scan_role(eqn: Any, k: int) -> str:
    """What operand ``k`` of a ``scan`` equation is to the scan, in words for a report."""
    nc, nk = scan_layout(eqn)
    if k < nc:
        return ("a constant of its body: a scan over something other than stacked layers, e.g. time steps, "
                "which the engine does not quantize")
    if k < nc + nk:
        return "its carried state: a parameter the scan changes is not a weight the engine can quantize"
    return (f"scanned over on a leading axis of {eqn.params['length']} layers, but the scan could not be unrolled "
            "into one block per layer (see the log)")


# ----------------------------------------------------------------------------------------------------------------------
# Running the program again, with hooks


def matrix_shape(shape: Sequence[int], w_axes: Sequence[int]) -> tuple[int, int]:
    """``(N, K)`` of a parameter seen as the paper's ``[out, in]`` matrix (see ``to_matrix``)."""
    k = math.prod(shape[a] for a in w_axes)
    return math.prod(shape) // k, k


def to_matrix(w: jax.Array, w_axes: Sequence[int]) -> jax.Array:
    """Parameter -> ``[N, K]``: free axes (ascending) flattened into rows, contracting axes into columns."""
    free = [a for a in range(w.ndim) if a not in w_axes]
    n, k = matrix_shape(w.shape, w_axes)
    return jnp.transpose(w, (*free, *w_axes)).reshape(n, k)


def from_matrix(m: jax.Array, shape: Sequence[int], w_axes: Sequence[int]) -> jax.Array:
    """Inverse of ``to_matrix``."""
    free = [a for a in range(len(shape)) if a not in w_axes]
    order = (*free, *w_axes)
    t = m.reshape([shape[a] for a in order])
    return jnp.transpose(t, [order.index(a) for a in range(len(shape))])


def activation_rows(x: jax.Array, x_axes: Sequence[int]) -> jax.Array:
    """Activation -> ``[tokens, K]``, contracting axes last in ``x_axes`` order (matching ``to_matrix``'s K)."""
    free = [a for a in range(x.ndim) if a not in x_axes]
    k = math.prod(x.shape[a] for a in x_axes)
    return jnp.transpose(x, (*free, *x_axes)).reshape(-1, k)


# on_use(use, x) is called before matmul `use` runs (x is (x, group sizes) for a ragged_dot); replace(eqn_index,
# invals) -> outvals or None.
OnUse = Callable[[Use, jax.Array], None]
Replace = Callable[[int, list[Any]], list[Any] | None]


def live_at(traced: Traced, cut: int) -> list[Any]:
    """Vars defined before equation ``cut`` (or inputs) that equations from ``cut`` on, or the outputs, read.
    Parameter invars are excluded: each slice gets the parameters afresh."""
    jaxpr = traced.jaxpr.jaxpr
    params = set(jaxpr.invars[: traced.num_params])
    defined = set(jaxpr.invars[traced.num_params :]) | set(jaxpr.constvars)
    for eqn in jaxpr.eqns[:cut]:
        defined.update(v for v in eqn.outvars if not isinstance(v, jcore.DropVar))
    needed: list[Any] = []
    seen = set()
    later = [v for eqn in jaxpr.eqns[cut:] for v in eqn.invars] + list(jaxpr.outvars)
    for v in later:
        if isinstance(v, jcore.Literal) or v in seen or v in params or v not in defined:
            continue
        seen.add(v)
        needed.append(v)
    return needed


def run(
    traced: Traced,
    param_leaves: Sequence[Any],
    *,
    inputs: Sequence[Any] | None = None,
    carry: dict[Any, Any] | None = None,
    start: int = 0,
    stop: int | None = None,
    keep: Sequence[Any] = (),
    on_use: dict[int, tuple[Use, OnUse]] | None = None,
    replace: Replace | None = None,
) -> tuple[list[Any] | None, dict[Any, Any]]:
    """Evaluate equations ``[start, stop)`` of ``traced``.

    The environment starts from the input leaves (``inputs``, when ``start == 0``) or from ``carry`` (var -> value,
    as returned by an earlier slice). ``on_use[i]`` sees the activation of the matmul at equation ``i`` before it
    runs, also for ``i == stop`` (a slice ends just before a matmul whose weight is about to change). Returns
    ``(output leaves if the slice reached the end else None, {var: value for var in keep})``.
    """
    jaxpr = traced.jaxpr.jaxpr
    stop = len(jaxpr.eqns) if stop is None else stop
    on_use = on_use or {}
    env: dict = {}
    for v, x in zip(jaxpr.constvars, traced.jaxpr.consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars[: traced.num_params], param_leaves, strict=True):
        env[v] = x
    if inputs is not None:
        for v, x in zip(jaxpr.invars[traced.num_params :], inputs, strict=True):
            env[v] = x
    if carry:
        env.update(carry)
    for idx in range(start, stop + 1):
        if idx in on_use:
            use, fn = on_use[idx]
            x = _read(env, use.x)
            fn(use, x if use.groups is None else (x, _read(env, use.groups)))
        if idx == stop or idx >= len(jaxpr.eqns):
            break
        eqn = jaxpr.eqns[idx]
        invals = [_read(env, v) for v in eqn.invars]
        outs = replace(idx, invals) if replace is not None else None
        if outs is None:
            outs = bind_eqn(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    out = [_read(env, v) for v in jaxpr.outvars] if stop >= len(jaxpr.eqns) else None
    return out, {v: env[v] for v in keep}
