"""Layer-by-layer GPTQ of a whole model: ``quantize(model, calib, quant_config=...)``.

Sequential, as in the paper (GPTQ, Sec. 4 and its reference code): the calibration batch is embedded and run
to the first decoder layer; for each layer, the Hessians of its linears are accumulated, the linears are
quantized, and the layer is run again with its quantized weights so the next layer sees quantized inputs.

Inside a layer the order is "true sequential": q/k/v, then o, then gate/up, then down, each group seeing the
inputs produced by the groups already quantized. Linears that read the same input (q/k/v; gate/up) share one
Hessian, computed once. Each stage continues from the activations the previous stage left (``stage_forward``),
so per layer the calibration set goes once through the float layer (the reference for the layer's output error)
and once through the quantized one.

Memory: one decoder layer's weights are touched at a time (in f32 for the solve), and the calibration
activations ``[S, T, D]`` live on the device when they fit and on the host otherwise. Rows of W are independent
and Hessians are sums over tokens, so both the solve and the accumulation shard cleanly across devices later.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptq_jax.calibration import Calibration
from gptq_jax.config import QuantConfig
from gptq_jax.gptq import quantize_weight
from gptq_jax.hessian import accumulate_hessian, init_hessian
from gptq_jax.models.llama import Linear, LlamaForCausalLM, ModelConfig, make_positions
from gptq_jax.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.resume import ResumeStore, fingerprint

log = logging.getLogger(__name__)

# True-sequential groups of a decoder layer: (name of the captured input, linears that read it).
LINEAR_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)
LAYER_LINEARS: tuple[str, ...] = tuple(name for _, names in LINEAR_GROUPS for name in names)
METHODS = ("gptq", "rtn")
DEFAULT_QUANT_CONFIG = QuantConfig()  # 4-bit, group 128, symmetric: the common published setting


def linear_name(layer: int, sub: str) -> str:
    """The Hugging Face module name of a linear, e.g. ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{sub}"


def get_submodule(module: nnx.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@dataclasses.dataclass
class QuantReport:
    """What happened, per linear and per layer; ``to_json()`` is the CLI's ``quant_report.json``."""

    method: str
    quant_config: dict[str, Any]
    calibration: dict[str, Any]
    linears: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    resumed_layers: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fallbacks(self) -> list[str]:
        return [r["name"] for r in self.linears if r["fallback"]]


class QuantizeResult(NamedTuple):
    """``model``: the input model with every decoder linear replaced by its dequantized weight (ready to evaluate,
    or to pack with ``gptq_jax.qlinear.pack_model``); ``weights``: HF module name -> ``QuantizedWeight``;
    ``report``: a ``QuantReport``."""

    model: LlamaForCausalLM
    weights: dict[str, QuantizedWeight]
    report: QuantReport


# ----------------------------------------------------------------------------------------------------------------------
# Jitted pieces: one decoder layer with Hessian accumulation for one group.


def stage_forward(
    layer: nnx.Module,
    stage: str,
    carry: jax.Array,
    *,
    positions: jax.Array,
    mask: jax.Array,
    residual: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One true-sequential stage of a decoder layer: ``(input of stage's linears, carry for the next stage)``.

    Mirrors ``DecoderLayer.__call__`` (pre-norm attention, then a SwiGLU MLP) cut at each linear group, so each
    stage starts from what the previous one left (``carry``) instead of from the layer input: over all
    true-sequential passes the quantized layer is computed once, not once per group. Only "gate_up" also reads
    the layer input ``h`` (as ``residual``), so the other stages never need it moved to the device.

      stage "qkv":     carry h            -> input_layernorm(h),                 carry h
      stage "o":       carry h            -> o_proj input (attention output),    carry o_in
      stage "gate_up": carry o_in, h      -> post_attention_layernorm(h1),       carry h1 = h + o_proj(o_in)
      stage "down":    carry h1           -> silu(gate(y)) * up(y),              carry the same (down's input)
      final:           ``stage_output(layer, h1, a)`` = h1 + down_proj(a)

    ``tests/test_pipeline.py`` checks that chaining the stages reproduces the layer.
    """
    if stage == "qkv":
        return layer.input_layernorm(carry), carry  # (B, T, D)
    if stage == "o":
        x = layer.input_layernorm(carry)
        _, _, o_in = layer.self_attn(x, positions=positions, attention_mask=mask)
        return o_in, o_in  # (B, T, H*hd)
    if stage == "gate_up":
        if residual is None:
            raise ValueError("stage 'gate_up' needs the layer input as residual=")
        h1 = residual + layer.self_attn.o_proj(carry)  # (B, T, D)
        return layer.post_attention_layernorm(h1), h1
    if stage == "down":
        y = layer.post_attention_layernorm(carry)
        a = jax.nn.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y)  # (B, T, I)
        return a, a
    raise ValueError(f"unknown linear group {stage!r}; expected one of {[g for g, _ in LINEAR_GROUPS]}")


def stage_output(layer: nnx.Module, h1: jax.Array, a: jax.Array) -> jax.Array:
    """The layer's output from the carries of the last two stages: ``h1 + down_proj(a)``."""
    return h1 + layer.mlp.down_proj(a)


def _per_window(step: Callable[[Any, Any], tuple[Any, Any]], hess: Any, xs: Any) -> tuple[Any, Any]:
    """``step(hess, window) -> (hess, out)`` over a batch one window at a time (a ``lax.scan`` over the leading axis
    of every array in ``xs``; each window keeps a batch axis of 1). Returns ``(hess, outs stacked on that axis)``.

    A batch of 8 x 2048 tokens through a whole SmolLM2 layer needs 840 MB of XLA temporaries, which XLA:CPU
    allocates afresh on every call and the kernel faults in page by page; a window at a time needs 144 MB, and
    the float pass ran 3.44 -> 2.65 s per batch on the 2-core CPU (same outputs and Hessians up to f32 rounding).
    """

    def body(hess, window):
        hess, out = step(hess, jax.tree.map(lambda a: a[None], window))
        return hess, jax.tree.map(lambda a: a[0], out)

    return jax.lax.scan(body, hess, xs)


@functools.partial(jax.jit, static_argnames=("graphdef", "groups"))
def _float_pass(graphdef, state, h, positions, mask, hess, groups):
    """The float layer on a batch ``h (B, T, D)``: its output, with the inputs of ``groups`` folded into ``hess``
    (a tuple of accumulators, one per group)."""
    layer = nnx.merge(graphdef, state)

    def step(hess, window):
        h, positions, mask = window
        out, _, captured = layer(h, positions=positions, attention_mask=mask, capture=True)
        return tuple(accumulate_hessian(*hg, captured[g], mask) for g, hg in zip(groups, hess, strict=True)), out

    hess, out = _per_window(step, hess, (h, positions, mask))
    return out, hess


@functools.partial(jax.jit, static_argnames=("graphdef", "stage"))
def _stage_pass(graphdef, state, carry, residual, positions, mask, hess, stage):
    """One true-sequential stage on a batch: the carry for the next stage, and ``hess`` with the stage's input."""
    layer = nnx.merge(graphdef, state)

    def step(hess, window):
        carry, residual, positions, mask = window
        x, carry = stage_forward(layer, stage, carry, positions=positions, mask=mask, residual=residual)
        return accumulate_hessian(*hess, x, mask), carry

    hess, carry = _per_window(step, hess, (carry, residual, positions, mask))
    return carry, hess


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _output_pass(graphdef, state, h1, a):
    return stage_output(nnx.merge(graphdef, state), h1, a)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_forward(graphdef, state, h, positions, mask):
    layer = nnx.merge(graphdef, state)

    def step(_, window):
        h, positions, mask = window
        return (), layer(h, positions=positions, attention_mask=mask)[0]

    return _per_window(step, (), (h, positions, mask))[1]


@jax.jit
def _sq_err(a, b, mask):
    m = mask[..., None].astype(jnp.float32)
    d = (a.astype(jnp.float32) - b.astype(jnp.float32)) * m
    return jnp.sum(d * d), jnp.sum(jnp.square(b.astype(jnp.float32)) * m)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state).embed(tokens)


def dequantized_kernel(qw: QuantizedWeight, dtype: Any, scale_dtype: Any = jnp.float16) -> jax.Array:
    """The Flax kernel ``[K, N]`` a quantized weight stands for, with scales rounded to ``scale_dtype`` as a
    checkpoint stores them (so calibration sees exactly what inference will compute)."""
    qw = dataclasses.replace(qw, scales=qw.scales.astype(scale_dtype).astype(jnp.float32))
    return qw.dequantize().T.astype(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The entry point


def _as_model(params: Any, config: ModelConfig | None) -> LlamaForCausalLM:
    if isinstance(params, LlamaForCausalLM):
        return params
    if isinstance(params, nnx.State):
        if config is None:
            raise ValueError("quantize(params=nnx.State, ...) needs config=ModelConfig to rebuild the model")
        dtype = jax.tree.leaves(params)[0].dtype
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, _ = nnx.split(abstract)
        return nnx.merge(graphdef, params)
    raise TypeError(
        f"quantize expects a LlamaForCausalLM (from gptq_jax.models.load_pretrained) or its nnx.State, "
        f"got {type(params).__name__}"
    )


def _activation_placement(calib: Calibration, mc: ModelConfig, dtype: Any, offload: bool | None) -> Any:
    """Where to keep the layer inputs: the device when they fit comfortably, else the host."""
    if offload is not None:
        return jax.devices("cpu")[0] if offload else None
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    # At the peak of a layer: inputs, float outputs, the last two stages' carries (h1: D wide, down's input: I
    # wide) and the new outputs.
    width = 4 * mc.hidden_size + mc.intermediate_size
    need = calib.tokens.size * width * jnp.dtype(dtype).itemsize
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is not None and need > 0.5 * (limit - stats.get("bytes_in_use", 0)):
        log.info("calibration activations (%.1f GiB) kept on the host", need / 2**30)
        return jax.devices("cpu")[0]
    return None


def quantize(
    params: Any,
    calib: Calibration | Any,
    *,
    quant_config: QuantConfig = DEFAULT_QUANT_CONFIG,
    config: ModelConfig | None = None,
    method: str = "gptq",
    true_sequential: bool = True,
    batch_size: int = 8,
    skip: Sequence[str] = (),
    work_dir: str | None = None,
    fingerprint_extra: str = "",
    offload_activations: bool | None = None,
    progress: bool | Callable[[str], None] = False,
) -> QuantizeResult:
    """Quantize every linear of every decoder layer of a Llama-family model.

    Args:
      params: a ``LlamaForCausalLM`` (as ``gptq_jax.models.load_pretrained`` returns it) or its ``nnx.State``
        (then pass ``config``). It is modified in place: each quantized linear's kernel becomes its dequantized
        weight. Embeddings, norms and ``lm_head`` stay in float, as the checkpoint format keeps them.
      calib: a ``Calibration`` (see ``gptq_jax.calibration``) or an int token array ``[S, T]``.
      quant_config: bits, group size, symmetry, act-order, static groups, damping.
      method: ``"gptq"`` or ``"rtn"`` (round-to-nearest: no calibration pass at all; ``calib`` may be None).
      true_sequential: quantize q/k/v, o, gate/up, down in turn, each seeing the inputs made by the already
        quantized ones (the paper's default); False takes all of a layer's Hessians from the float layer.
      batch_size: calibration samples per forward pass.
      skip: HF module names (or suffixes such as ``"mlp.down_proj"``) to leave in float.
      work_dir: if given, each finished decoder layer is saved there, and a run with the same model, options
        and calibration data resumes after the last finished layer. Other arguments there raise ``ValueError``.
      offload_activations: keep calibration activations on the host (True), the device (False), or decide
        by free device memory (None).
      progress: True for a progress bar on stderr, or a callable receiving one status line per linear.

    Returns:
      ``QuantizeResult(model, weights, report)``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"quant_config must be a QuantConfig, got {type(quant_config).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    model = _as_model(params, config)
    mc = model.config
    for sub in LAYER_LINEARS:
        k = get_submodule(model.layers[0], sub).in_features
        if quant_config.group_size > k:
            raise ValueError(
                f"group_size={quant_config.group_size} is larger than in_features={k} of {sub}; "
                "choose a smaller group size or -1 (per channel)"
            )
    if method == "gptq":
        if calib is None:
            raise ValueError("GPTQ needs calibration data (calib); only method='rtn' runs without it")
        if not isinstance(calib, Calibration):
            calib = Calibration.from_tokens(calib)
        if int(calib.tokens.max()) >= mc.vocab_size or int(calib.tokens.min()) < 0:
            raise ValueError(
                f"calibration token ids span [{int(calib.tokens.min())}, {int(calib.tokens.max())}], "
                f"outside the model's vocabulary of {mc.vocab_size}"
            )
    t_start = time.perf_counter()
    report = QuantReport(
        method=method,
        quant_config=dataclasses.asdict(quant_config),
        calibration=(
            {"samples": int(calib.tokens.shape[0]), "seqlen": int(calib.tokens.shape[1]), "tokens": calib.num_tokens}
            if method == "gptq"
            else {}
        ),
    )
    skipped = lambda name: any(name == s or name.endswith("." + s) for s in skip)  # noqa: E731
    weights: dict[str, QuantizedWeight] = {}
    n_layers = len(model.layers)

    bar = None
    say: Callable[[str], None] = lambda s: None  # noqa: E731
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers, desc=f"{method} {quant_config.bits}-bit", unit="layer")
        say = lambda s: bar.set_postfix_str(s, refresh=True)  # noqa: E731
    elif callable(progress):
        say = progress

    def quantize_linear(layer_idx: int, sub: str, hess: jax.Array | None) -> dict[str, Any] | None:
        name = linear_name(layer_idx, sub)
        lin = get_submodule(model.layers[layer_idx], sub)
        if not isinstance(lin, Linear) or skipped(name):
            return None
        say(name)
        # JAX dispatches the calibration pass that produced `hess` asynchronously: wait for it here, so that a
        # linear's "seconds" is its own solve and the pass is charged to the layer, not to the first linear.
        jax.block_until_ready(hess)
        t0 = time.perf_counter()
        w = lin.kernel[...].T.astype(jnp.float32)  # (N out, K in): the paper's orientation
        qw = rtn_quantize(w, quant_config) if hess is None else quantize_weight(w, hess, quant_config)
        lin.kernel.set_value(dequantized_kernel(qw, lin.kernel[...].dtype))
        jax.block_until_ready(lin.kernel[...])
        weights[name] = qw
        rec = {
            "name": name,
            "shape": [int(w.shape[0]), int(w.shape[1])],
            "loss": float(qw.loss),
            "damp": float(qw.damp),
            "fallback": bool(qw.fallback),
            "seconds": time.perf_counter() - t0,
        }
        report.linears.append(rec)
        return rec

    if method == "rtn":
        for li in range(n_layers):
            for sub in LAYER_LINEARS:
                quantize_linear(li, sub, None)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t_start
        return QuantizeResult(model, weights, report)

    # ---- GPTQ, layer by layer ----
    resume_from = 0
    if work_dir is not None:
        fp = fingerprint(
            (repr(mc), repr(quant_config), method, f"{true_sequential}|{sorted(skip)}|{fingerprint_extra}"),
            (calib.tokens, calib.mask),
        )
        store = ResumeStore(work_dir, fp)
        while (saved := store.load(resume_from)) is not None:
            layer_weights, layer_report = saved
            for name, qw in layer_weights.items():
                sub = name.split(".", 3)[3]
                lin = get_submodule(model.layers[resume_from], sub)
                lin.kernel.set_value(dequantized_kernel(qw, lin.kernel[...].dtype))
                weights[name] = qw
            report.linears.extend(layer_report["linears"])
            report.layers.append(layer_report["layer"])
            resume_from += 1
        report.resumed_layers = resume_from
        if resume_from:
            log.info("resuming after %d finished decoder layers in %s", resume_from, work_dir)

    placement = _activation_placement(calib, mc, model.dtype, offload_activations)
    put = (lambda x: jax.device_put(x, placement)) if placement is not None else (lambda x: x)  # noqa: E731
    batches = []
    gd_model, st_model = nnx.split(model)
    for i in range(0, calib.tokens.shape[0], batch_size):
        tok = jnp.asarray(calib.tokens[i : i + batch_size])
        mask = jnp.asarray(calib.mask[i : i + batch_size])
        batches.append((put(_embed(gd_model, st_model, tok)), mask, make_positions(mask)))
    del gd_model, st_model

    dev0 = jax.devices()[0]
    batch_meta = [(mask, pos) for _, mask, pos in batches]

    def float_pass(layer, groups, hidden):
        """The float layer over all batches: its outputs, and the Hessians of ``groups``' inputs."""
        graphdef, state = nnx.split(layer)
        hess = tuple(init_hessian(captured_width(layer, g)) for g in groups)
        outs = []
        for (mask, pos), h in zip(batch_meta, hidden, strict=True):
            out, hess = _float_pass(graphdef, state, jax.device_put(h, dev0), pos, mask, hess, groups)
            outs.append(put(out))
        return outs, [hg[0] for hg in hess]

    def stage_pass(layer, stage, hidden, carries):
        """One stage of the (partly quantized) layer over all batches: next carries and the stage's Hessian."""
        graphdef, state = nnx.split(layer)
        hess = init_hessian(captured_width(layer, stage))
        out = []
        for (mask, pos), h, c in zip(batch_meta, hidden, carries, strict=True):
            residual = jax.device_put(h, dev0) if stage == "gate_up" else None
            c, hess = _stage_pass(graphdef, state, jax.device_put(c, dev0), residual, pos, mask, hess, stage)
            out.append(put(c))
        return out, hess[0]

    def forward(layer, hidden):
        graphdef, state = nnx.split(layer)
        return [
            put(_layer_forward(graphdef, state, jax.device_put(h, dev0), pos, mask))
            for (mask, pos), h in zip(batch_meta, hidden, strict=True)
        ]

    def output(layer, h1, a):
        graphdef, state = nnx.split(layer)
        return [
            put(_output_pass(graphdef, state, jax.device_put(r, dev0), jax.device_put(x, dev0)))
            for r, x in zip(h1, a, strict=True)
        ]

    def replay(layer, hidden):
        """A finished layer's outputs computed by the very programs the first run used, so that a resumed run
        is bit-identical to an uninterrupted one (the Hessians they also fold are discarded)."""
        if not true_sequential:
            return forward(layer, hidden)
        carries = hidden
        for stage in groups[1:]:
            carries, _ = stage_pass(layer, stage, hidden, carries)
            if stage == "gate_up":
                h1 = carries
        return output(layer, h1, carries)

    groups = tuple(g for g, _ in LINEAR_GROUPS)
    hidden = [b[0] for b in batches]
    del batches
    for li in range(resume_from):
        hidden = replay(model.layers[li], hidden)

    for li in range(resume_from, n_layers):
        t_layer = time.perf_counter()
        layer = model.layers[li]
        first = len(report.linears)
        if true_sequential:
            # The float pass gives the reference output (for the layer error) and q/k/v's Hessian; each later
            # stage continues from the previous stage's carry with the linears quantized so far.
            carries, h1 = hidden, None
            for stage, subs in LINEAR_GROUPS:
                if stage == groups[0]:
                    float_out, (hess,) = float_pass(layer, (stage,), hidden)
                else:
                    carries, hess = stage_pass(layer, stage, hidden, carries)
                    if stage == "gate_up":
                        h1 = carries  # h + attention output: the residual the MLP adds to
                for sub in subs:
                    quantize_linear(li, sub, hess)
                del hess
            new_hidden = output(layer, h1, carries)
            del carries, h1
        else:
            float_out, hs = float_pass(layer, groups, hidden)
            for (_, subs), hess in zip(LINEAR_GROUPS, hs, strict=True):
                for sub in subs:
                    quantize_linear(li, sub, hess)
            del hs
            new_hidden = forward(layer, hidden)
        hidden = new_hidden
        num = den = 0.0
        for (mask, _), a, b in zip(batch_meta, hidden, float_out, strict=True):
            e, s = _sq_err(a, b, mask)
            num, den = num + float(e), den + float(s)
        del float_out
        layer_rec = {
            "layer": li,
            "relative_output_error": num / max(den, 1e-30),
            "seconds": time.perf_counter() - t_layer,
        }
        report.layers.append(layer_rec)
        if work_dir is not None:
            names = [r["name"] for r in report.linears[first:]]
            store.save(
                li, {n: weights[n] for n in names}, {"linears": report.linears[first:], "layer": layer_rec}
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - t_start
    if report.fallbacks:
        log.warning("%d linear(s) fell back to round-to-nearest: %s", len(report.fallbacks), report.fallbacks)
    return QuantizeResult(model, weights, report)


def captured_width(layer: nnx.Module, group: str) -> int:
    """Input width K of the linears in ``group``."""
    subs = dict(LINEAR_GROUPS)[group]
    return get_submodule(layer, subs[0]).in_features
