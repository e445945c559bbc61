"""GPTQ over a device mesh: Hessians summed over a ``data`` axis, the solve split by output rows over ``model``.

GPTQ splits cleanly (Frantar et al. 2022, Sec. 3): ``H = 2/n sum x x^T`` is a sum over calibration tokens, so
each device folds its share of the batch and one all-reduce per linear group (one psum of ``X^T X`` and the token
count) gives every device the same ``H``; and given ``H`` the rows of ``W`` are independent (the Cholesky factor,
the act-order permutation and the damping depend on ``H`` only, each row's grid on that row only), so each device
solves its own output rows with the same ``H``. Both run inside ``jax.jit`` + ``jax.shard_map`` on a
``jax.sharding.Mesh`` with axes ``("data", "model")``; a mesh may span several processes
(``gptq_jax.engine.multihost``), the code is the same.

- ``parse_mesh_spec("data=2,model=4")``, ``mesh_sizes(spec, num_devices)``, ``make_mesh(spec=None,
  devices=None)``: the mesh, all devices on ``data`` by default.
- ``check_batch(batch, mesh)``, ``padded_rows(rows, mesh)``: the divisibility rules, with messages naming both.
- ``accumulate_hessian_sharded(h, n, x, mask=None, *, mesh)``: the fold of ``gptq_jax.core.hessian`` with ``x``
  split over ``data``; returns the replicated ``(h, n)``.
- ``quantize_weight_sharded(w, h, config, *, mesh, axes=("model",))``: ``gptq_jax.quantize_weight`` with the
  rows of ``w`` split over ``axes``; rows that do not divide are padded with zero rows and cut off again.
- ``global_batch(local, mesh)``: a process's share of the calibration windows as one global array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.gptq import (
    CPU_SOLVE_OPTIONS,
    check_hessian,
    check_weight,
    fused_parts,
    log_damping,
    split_rows,
)
from gptq_jax.core.hessian import token_xtx
from gptq_jax.core.methods import Method, check_cross, method_factor, method_sweep
from gptq_jax.core.quantizer import QuantizedWeight

MESH_AXES = ("data", "model")
GPTQ = Method()
DATA, MODEL = MESH_AXES


# ---------------------------------------------------------------------------------------------------------------
# The mesh
# ---------------------------------------------------------------------------------------------------------------


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``. None or "" -> ``{}`` (all devices on ``data``).

    An axis may be left out or given as ``-1``; ``make_mesh`` then fills it with the devices left over.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            name, eq, size = part.partition("=")
            if not eq:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size (e.g. 'data=2,model=4')")
            try:
                items.append((name, int(size)))
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {size!r} of axis {name!r} is not an integer") from None
    out: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {MESH_AXES}")
        if name in out:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        if not isinstance(size, int) or isinstance(size, bool) or (size <= 0 and size != -1):
            raise ValueError(f"mesh spec {spec!r}: axis {name}={size!r} must be a positive integer (or -1: the rest)")
        out[name] = size
    return out


def mesh_sizes(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """``{"data": d, "model": m}`` with ``d * m == num_devices``: ``spec`` (``parse_mesh_spec``) completed.

    An axis left out or ``-1`` takes the devices left over, so ``None`` puts every device on ``data`` and
    ``"model=4"`` on 8 devices means ``data=2,model=4``. Raises ``ValueError`` naming the sizes and the device
    count when they do not fit.
    """
    sizes = parse_mesh_spec(spec)
    free = [a for a in MESH_AXES if sizes.get(a, -1) == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % fixed:
        raise ValueError(f"mesh {_fmt(sizes)} needs a multiple of {fixed} devices, but there are {num_devices}")
    if len(free) == 2:
        sizes = {DATA: num_devices, MODEL: 1}
    elif len(free) == 1:
        sizes = {**sizes, free[0]: num_devices // fixed}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {_fmt(sizes)} has {math.prod(sizes.values())} devices but there are {num_devices}; "
            f"give sizes whose product is {num_devices} (or leave one axis out to take the rest)"
        )
    return {a: sizes[a] for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "model")`` over ``devices`` (default: ``jax.devices()``, every process's).

    Sizes as ``mesh_sizes``: by default every device on ``data``. Devices are laid out in ``jax.devices()`` order
    with ``model`` the fast axis, so with several processes the ``model`` axis stays inside a process (fast links)
    and ``data`` spans processes (one all-reduce of ``H`` per linear group).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(spec, len(devices))
    grid = np.array(devices, dtype=object).reshape(sizes[DATA], sizes[MODEL])
    return Mesh(grid, MESH_AXES)


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in sizes.items()) or "(all devices on data)"


def mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """``{axis: size}`` of a mesh (a concrete ``Mesh`` or an ``AbstractMesh``)."""
    return dict(mesh.shape)


def _axis_size(mesh: Mesh, axes: str | Sequence[str]) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shape = mesh_shape(mesh)
    for a in axes:
        if a not in shape:
            raise ValueError(f"axis {a!r} is not an axis of the mesh {shape}")
    return math.prod(shape[a] for a in axes)


def check_batch(batch: int, mesh: Mesh) -> None:
    """Raise unless the calibration batch (leading dim of the activations) splits evenly over ``data``."""
    d = _axis_size(mesh, DATA)
    if batch % d:
        raise ValueError(
            f"calibration batch of {batch} windows does not split over the mesh's data axis of {d} devices; "
            f"use a batch that is a multiple of {d} (e.g. {max(d, batch // d * d)}) or a smaller data axis"
        )


def padded_rows(rows: int, mesh: Mesh, axes: str | Sequence[str] = (MODEL,)) -> int:
    """``rows`` rounded up to a multiple of the devices on ``axes`` (the solve pads W with zero rows)."""
    m = _axis_size(mesh, axes)
    return -(-rows // m) * m


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dim over ``data``, the rest replicated: how calibration activations live on the mesh."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def global_batch(local: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """This process's calibration windows ``[b, ...]`` as its part of one global array ``[b * processes, ...]``
    split over ``data``. With one process it is a plain ``device_put``. Every process must call it, with the
    same shape."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(data_sharding(mesh, local.ndim), local)


# ---------------------------------------------------------------------------------------------------------------
# Hessians: data parallel
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _hessian_fold(mesh: Mesh, with_mask: bool):
    def local(h, n, x, mask=None):
        xtx, t = token_xtx(x, mask)  # (K, K), ()
        k = xtx.shape[0]
        if mask is None:
            t = t * lax.axis_size(DATA)  # every device holds as many tokens: no count to add up
            xtx = lax.psum(xtx, DATA)  # the one all-reduce of this linear group
        else:
            # The token count rides along in the same all-reduce (as f32: exact up to 2^24 tokens per call).
            flat = jnp.concatenate([xtx.reshape(-1), t.astype(jnp.float32)[None]])
            flat = lax.psum(flat, DATA)  # the one all-reduce of this linear group
            xtx, t = flat[:-1].reshape(k, k), flat[-1].astype(jnp.int32)
        n_new = n + t
        denom = jnp.maximum(n_new, 1).astype(jnp.float32)
        return h * (n.astype(jnp.float32) / denom) + (2.0 / denom) * xtx, n_new

    specs = (P(), P(), P(DATA), P(DATA)) if with_mask else (P(), P(), P(DATA))
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    return jax.jit(fn, out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P())))


def accumulate_hessian_sharded(
    h: jax.Array, n: jax.Array, x: jax.Array, mask: jax.Array | None = None, *, mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """``gptq_jax.accumulate_hessian`` with the activations split over the mesh's ``data`` axis.

    Args:
      h: f32 ``[K, K]``, the Hessian of the ``n`` tokens so far (replicated on the mesh, or a host array).
      n: int32 ``[]``.
      x: ``[B, ..., K]`` activations, B windows split over ``data`` (a global array from ``global_batch``, or
        any array, which ``jit`` then splits). Devices along ``model`` hold the same windows.
      mask: optional ``[B, ...]``, nonzero for real tokens.
      mesh: from ``make_mesh``.

    Returns:
      ``(h', n')`` replicated on every device: ``h' = (n h + 2 sum x x^T) / n'``. Each device sums its windows and
      one psum adds the partial sums, so ``h'`` equals the one-device fold up to summation order.
    """
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"x must be [batch, ..., K] with the batch split over data, got shape {shape}")
    check_batch(shape[0], mesh)
    k = shape[-1]
    if tuple(h.shape) != (k, k):
        raise ValueError(f"h has shape {tuple(h.shape)} but x has K={k} features, so h must be ({k}, {k})")
    if mask is not None and tuple(mask.shape) != tuple(shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; x {tuple(shape)} needs {tuple(shape[:-1])}")
    fold = _hessian_fold(mesh, mask is not None)
    args = (h, n, x) if mask is None else (h, n, x, mask)
    return fold(*args)


def init_hessian_sharded(in_features: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """Zeros ``[K, K]`` f32 and count 0, replicated on ``mesh``."""
    rep = NamedSharding(mesh, P())
    return (
        jax.device_put(jnp.zeros((in_features, in_features), jnp.float32), rep),
        jax.device_put(jnp.zeros((), jnp.int32), rep),
    )


# ---------------------------------------------------------------------------------------------------------------
# The solve: output rows split over the model axis
# ---------------------------------------------------------------------------------------------------------------


def replicate(tree, mesh: Mesh):
    """``tree`` with every array copied whole to every device of ``mesh`` (an all-gather when it is split): after
    this, each process can read it (``np.asarray``) even when the mesh spans several processes."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(leaves))


@functools.cache
def _sharded_solver(mesh: Mesh, axes: tuple[str, ...], config: QuantConfig):
    rows = P(axes)

    def local(w, factor):  # w (N_local, K); the factor of H (and D) is the same on every device
        q, row_loss = method_sweep(w, factor, config)
        loss = lax.psum(q.loss, axes)  # the proxy loss is a sum over rows
        return q.codes, q.scales, q.zeros, q.g_idx, q.perm, loss, q.damp, q.fallback, row_loss

    perm_spec = P() if config.act_order else None
    out_specs = (rows, rows, rows, P(), perm_spec, P(), P(), P(), rows)
    # check_vma=False: g_idx, perm, damp and fallback depend on the factor alone, which every device holds whole,
    # so they are the same on every device; the type system cannot see that through the solver's loops.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, P()), out_specs=out_specs, check_vma=False)
    opts = CPU_SOLVE_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None  # halves the temp buffer
    return jax.jit(fn, compiler_options=opts)


@functools.cache
def _factor_fn(config: QuantConfig, method: Method):
    return jax.jit(functools.partial(method_factor, config=config, method=method))


def _shared_factor(h: jax.Array, d: jax.Array | None, config: QuantConfig, method: Method, mesh: Mesh):
    """``method_factor(h, d)`` computed once, on this process's first device of ``mesh``, then copied to each of
    the mesh's devices. Not inside the per-device program: there every device would run the same LAPACK kernels at
    once, and on XLA:CPU, whose batched LAPACK kernels wait for work they queue on the pool that runs the devices'
    programs, that took every pool thread and hung (SmolLM2 at --mesh data=4,model=2 on 8 host devices)."""
    local = [dev for dev in mesh.devices.flat if dev.process_index == jax.process_index()]

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # Over several processes H may be split over the mesh: gathered whole first (every process runs this
            # solve, so the all-gather is collective), then any local shard is the whole matrix.
            x = replicate(x, mesh).addressable_data(0)
        return jax.device_put(x, local[0])

    factor = _factor_fn(config, method)(whole(h), None if d is None else whole(d))
    where = NamedSharding(mesh, P())

    def copy(x):
        return jax.make_array_from_single_device_arrays(x.shape, where, [jax.device_put(x, dev) for dev in local])

    return jax.tree.map(copy, factor)


def quantize_weight_sharded(
    w: jax.Array, h: jax.Array, config: QuantConfig, *, mesh: Mesh, axes: str | Sequence[str] = (MODEL,)
) -> QuantizedWeight:
    """``gptq_jax.quantize_weight`` with the output rows of ``w`` split over the mesh axes ``axes``.

    Args:
      w: float ``[N out, K in]``; best already sharded by rows over ``axes`` (a large layer then never sits whole
        on one device), else ``jit`` splits it.
      h: float ``[K, K]``, the same on every device (e.g. from ``accumulate_hessian_sharded``).
      config: any ``QuantConfig`` (act-order, groups, static groups, sym/asym, MSE grids).
      mesh: from ``make_mesh``.
      axes: mesh axes the rows are split over; ``("data", "model")`` uses every device for the solve.

    Returns:
      A ``QuantizedWeight`` whose ``codes``/``scales``/``zeros`` stay split by rows over ``axes`` and whose
      ``g_idx``/``perm``/``loss``/``damp``/``fallback`` are replicated. When N is not a multiple of the devices on
      ``axes`` the rows are padded with zeros (which change no other row and add no loss) and cut off again.
      Same codes as ``quantize_weight`` on one device up to float rounding in the feedback matmuls.
    """
    check_weight(w, config)
    check_hessian(w, h)
    return _solve_sharded(w, h, config, mesh, axes)[0]


def quantize_weights_sharded(
    ws: Sequence[jax.Array], h: jax.Array, config: QuantConfig, *, mesh: Mesh, axes: str | Sequence[str] = (MODEL,),
    method: Method = GPTQ, d: jax.Array | None = None,
) -> list[QuantizedWeight]:  # fmt: skip
    """``gptq_jax.core.gptq.quantize_weights`` (weights sharing a Hessian, solved stacked) with the stacked rows
    split over the mesh axes ``axes``, as ``quantize_weight_sharded`` does for one weight; ``method`` and the cross
    term ``d`` as in ``core.methods.quantize_weights_method``."""
    if not ws:
        return []
    for w in ws:
        check_weight(w, config)
        check_hessian(w, h)
    if method.needs_cross:
        check_cross(h, d)
    out: list[QuantizedWeight] = []
    for part in fused_parts([int(w.shape[0]) for w in ws], int(h.shape[0])):
        w = ws[part[0]] if len(part) == 1 else jnp.concatenate([jnp.asarray(ws[i]) for i in part], axis=0)
        out.extend(split_rows(*_solve_sharded(w, h, config, mesh, axes, method, d),
                              [int(ws[i].shape[0]) for i in part]))  # fmt: skip
    return out


def _solve_sharded(
    w: jax.Array, h: jax.Array, config: QuantConfig, mesh: Mesh, axes: str | Sequence[str], method: Method = GPTQ,
    d: jax.Array | None = None,
) -> tuple[QuantizedWeight, jax.Array]:  # fmt: skip
    """The checked solve of ``quantize_weight_sharded``: the weight and the loss of each of its rows."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    n = w.shape[0]
    n_pad = padded_rows(n, mesh, axes)
    if n_pad != n:
        w = jnp.pad(jnp.asarray(w), ((0, n_pad - n), (0, 0)))
    factor = _shared_factor(h, d if method.needs_cross else None, config, method, mesh)
    codes, scales, zeros, g_idx, perm, loss, damp, fallback, row_loss = _sharded_solver(mesh, axes, config)(
        w, factor)
    if n_pad != n:
        codes, scales, zeros, row_loss = codes[:n], scales[:n], zeros[:n], row_loss[:n]
    out = QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        perm=perm,
        loss=loss,
        damp=damp,
        fallback=fallback,
        bits=config.bits,
        group_size=config.effective_group_size(w.shape[1]),
        sym=config.sym,
    )
    log_damping(out, (n, w.shape[1]), config)
    return out, row_loss
