"""Llama-family decoder-only transformers in Flax NNX: Llama 2/3 (TinyLlama, SmolLM), Mistral, Qwen2, Qwen3.

One file, in reading order: the config, the layers (``Linear``, ``Embedding``, ``RMSNorm``), rotary embeddings,
masks and the KV cache, attention, MLP, the decoder layer, the model, and the jitted-forward helper.

The four architectures differ only in switches that ``ModelConfig.from_hf_dict`` reads off ``config.json``:

=====================  =========  ==============  ========  ============================
architecture           qkv bias   o_proj bias     qk_norm   sliding window
=====================  =========  ==============  ========  ============================
LlamaForCausalLM       attention_bias (both)      no        no
MistralForCausalLM     no         no              no        ``sliding_window`` (all layers)
Qwen2ForCausalLM       yes        no              no        if ``use_sliding_window``
Qwen3ForCausalLM       attention_bias (both)      yes       if ``use_sliding_window``
=====================  =========  ==============  ========  ============================

Every projection is a ``Linear`` reached through a module attribute (``layer.self_attn.q_proj``...), so the GPTQ
pipeline can swap in a quantized layer with the same ``__call__(x)`` without touching this file.

Running the model:

    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))          # or models.load_pretrained(path)
    logits, _ = model(tokens, attention_mask=mask)               # eager (slow: one dispatch per op)
    forward = make_forward(model)                                # jitted; rebuild after swapping layers
    logits, _ = forward(tokens, attention_mask=mask)

Decoding with a KV cache:

    cache = init_cache(config, batch=B, max_len=S)
    logits, cache = forward(prompt, attention_mask=prompt_mask, cache=cache)
    logits, cache = forward(next_tok[:, None], cache=cache)      # one step; positions follow the cache
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.models.checkpoint_dir import read_json_file
from gptq_jax.models.config_schema import MODEL_CONFIG, check_config

# ----------------------------------------------------------------------------------------------------------------------
# Config

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# config.json files written by bare `Config.save_pretrained` have no "architectures" list; model_type names the family.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ARCH_TO_MODEL_TYPE = {v: k for k, v in _MODEL_TYPE_TO_ARCH.items()}
# RoPE variants we implement. Others (yarn, dynamic, longrope) change the attention scale or depend on the sequence
# length; we reject them rather than silently compute something else.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the forward pass needs, in one hashable value (usable as a static argument to ``jax.jit``)."""

    architecture: str  # HF class name; one of SUPPORTED_ARCHITECTURES. Kept so save_pretrained can round-trip.
    vocab_size: int
    hidden_size: int  # D, the residual stream width
    intermediate_size: int  # I, the SwiGLU MLP width
    num_hidden_layers: int
    num_attention_heads: int  # H query heads
    num_key_value_heads: int  # KVH <= H; H // KVH query heads share one K/V head (GQA; KVH == H is plain MHA)
    head_dim: int  # hd; Qwen3 sets it independently of hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # RoPE base period
    # Non-default RoPE as sorted (key, value) pairs so the config stays hashable, e.g. (("factor", 8.0), ...,
    # ("rope_type", "llama3")). None means plain RoPE. See `rope_scaling_dict`.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048  # informational: RoPE itself works at any position; llama3 scaling reads
    # its own original_max_position_embeddings from rope_scaling.
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens (SmolLM, Qwen2.5 small models)
    attention_bias: bool = False  # bias on q/k/v_proj (Qwen2 always; Llama/Qwen3 when config says attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; never Qwen2/Mistral)
    mlp_bias: bool = False  # bias on gate/up/down_proj (Llama's mlp_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Sliding-window attention: a query at slot q sees keys at slots k with q - window < k <= q. None: full causal.
    sliding_window: int | None = None
    # Per-layer attention kind ("full_attention" / "sliding_attention"); None means every layer is full, or, with a
    # sliding_window set, every layer slides (Mistral). Qwen2/3 mix the two via max_window_layers / layer_types.
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None  # Llama 3 instruct models list several

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs of dimensions)")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries, num_hidden_layers={self.num_hidden_layers}"
                )
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ValueError(f"layer_types may hold 'full_attention' or 'sliding_attention', got {bad}")
        rope = self.rope_scaling_dict
        if rope is not None:
            kind = rope.get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
            needed = {
                "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            }.get(kind, ())
            missing = [k for k in needed if k not in rope]
            if missing:
                raise ValueError(f"rope_scaling of type {kind!r} lacks {missing}: {rope}")
            bad = [k for k in needed if not _is_positive_number(rope[k])]
            if bad:
                raise ValueError(f"rope_scaling fields {bad} must be positive numbers: {rope}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[i] == "sliding_attention":
            return self.sliding_window
        return None

    # -- HF config.json ------------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Reads a transformers ``config.json`` dict (v4 ``rope_scaling``/``rope_theta`` or v5 ``rope_parameters``)."""
        check_config(d, MODEL_CONFIG, "")
        arch = _architecture_of(d)
        _check_unsupported(d)
        get = _ConfigFields(d, arch)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        if not hidden > 0 or not heads > 0:
            raise ValueError(f"hidden_size={hidden} and num_attention_heads={heads} must be positive")
        theta, rope_scaling = _rope_of(d)
        qkv_bias, o_bias, mlp_bias, qk_norm = _biases_of(get, arch)
        window, layer_types = _sliding_window_of(get, d, arch)
        bos, eos = _token_ids_of(d)
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim", hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6, (int, float))),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 2048),
            tie_word_embeddings=get("tie_word_embeddings", False, bool),
            attention_bias=qkv_bias,
            attention_out_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            sliding_window=window,
            layer_types=layer_types,
            bos_token_id=bos,
            eos_token_id=eos,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads ``config.json``; ``path`` is the file or the checkpoint directory holding it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        d = read_json_file(path, max_bytes=16 * 2**20, what="config.json")
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` for this model (readable by transformers v4 and v5)."""
        arch = self.architecture
        expect = {
            "LlamaForCausalLM": (self.attention_bias, self.attention_bias, self.mlp_bias, False),
            "MistralForCausalLM": (False, False, False, False),
            "Qwen2ForCausalLM": (True, False, False, False),
            "Qwen3ForCausalLM": (self.attention_bias, self.attention_bias, False, True),
        }[arch]
        have = (self.attention_bias, self.attention_out_bias, self.mlp_bias, self.qk_norm)
        if have != expect:
            raise ValueError(
                f"{arch} cannot express (attention_bias, attention_out_bias, mlp_bias, qk_norm)={have} in config.json"
            )
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": _ARCH_TO_MODEL_TYPE[arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            d["attention_bias"] = self.attention_bias
        if arch == "LlamaForCausalLM":
            d["mlp_bias"] = self.mlp_bias
        elif arch == "MistralForCausalLM":
            if self.layer_types is not None and "full_attention" in self.layer_types:
                raise ValueError("MistralForCausalLM cannot express per-layer attention kinds in config.json")
            d["sliding_window"] = self.sliding_window
        elif self.sliding_window is not None:
            d["use_sliding_window"] = True
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types or ["sliding_attention"] * self.num_hidden_layers)
            d["max_window_layers"] = self.num_hidden_layers
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        elif self.layer_types is not None:
            raise ValueError(f"{arch} has no sliding window attention")
        return d


class _ConfigFields:
    """``get(key, default, kind)``: a config.json field of type ``kind``, ``default`` when absent or null (a required
    field when there is no default), an error naming the field otherwise."""

    def __init__(self, d: Mapping[str, Any], arch: str):
        self.d, self.arch = d, arch

    def __call__(self, key: str, default: Any = ..., kind: type | tuple[type, ...] = int) -> Any:
        if key not in self.d or self.d[key] is None:
            if default is ...:
                raise ValueError(f"config for {self.arch} lacks required field {key!r}")
            return default
        v = self.d[key]
        if not isinstance(v, kind) or (isinstance(v, bool) and bool not in _as_tuple(kind)):
            raise ValueError(f"config field {key!r} must be {_type_names(kind)}, got {v!r}")
        return v


def _check_unsupported(d: Mapping[str, Any]) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (the Llama family uses 'silu')")
    if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise ValueError(f"partial_rotary_factor={d['partial_rotary_factor']} is not supported (only 1.0)")


def _biases_of(get: _ConfigFields, arch: str) -> tuple[bool, bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias, q/k norm) as each architecture's modeling code decides them."""
    qkv_bias = o_bias = mlp_bias = qk_norm = False
    if arch == "LlamaForCausalLM":
        qkv_bias = o_bias = get("attention_bias", False, bool)
        mlp_bias = get("mlp_bias", False, bool)
    elif arch == "Qwen2ForCausalLM":
        qkv_bias = True  # fixed by Qwen2's modeling code, whatever attention_bias says
    elif arch == "Qwen3ForCausalLM":
        qkv_bias = o_bias = get("attention_bias", False, bool)
        qk_norm = True
    return qkv_bias, o_bias, mlp_bias, qk_norm


def _sliding_window_of(
    get: _ConfigFields, d: Mapping[str, Any], arch: str
) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window, per-layer attention types): Mistral slides every layer; Qwen2/3 only with
    ``use_sliding_window``, and then per ``layer_types`` or from ``max_window_layers`` on."""
    if arch == "MistralForCausalLM":
        return (get("sliding_window", None) if "sliding_window" in d else 4096), None  # MistralConfig's default
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") or not get("use_sliding_window", False, bool):
        return None, None
    window = get("sliding_window", None)
    if window is None:
        return None, None
    lt = d.get("layer_types")
    if lt is None:
        first = get("max_window_layers", 28)
        lt = ["sliding_attention" if i >= first else "full_attention" for i in range(get("num_hidden_layers"))]
    if not isinstance(lt, list | tuple) or not all(isinstance(x, str) for x in lt):
        raise ValueError(f"config field 'layer_types' must be a list of strings, got {lt!r}")
    return window, tuple(lt)


def _token_ids_of(d: Mapping[str, Any]) -> tuple[Any, Any]:
    """(bos_token_id, eos_token_id); Llama 3 instruct lists several stop tokens, kept as a tuple."""
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    for key, ids in (("bos_token_id", d.get("bos_token_id")), ("eos_token_id", eos)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in _as_tuple(ids or ())):
            raise ValueError(f"config field {key!r} must be an int or a list of ints, got {ids!r}")
    return d.get("bos_token_id"), eos


def _is_positive_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _architecture_of(d: Mapping[str, Any]) -> str:
    archs = d.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ValueError(f"config field 'architectures' must be a non-empty list of strings, got {archs!r}")
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return archs[0]
    model_type = d.get("model_type")
    if model_type is None:
        raise ValueError(
            "config has neither 'architectures' nor 'model_type'; cannot tell which model it describes "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if model_type not in _MODEL_TYPE_TO_ARCH:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(_MODEL_TYPE_TO_ARCH)} "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return _MODEL_TYPE_TO_ARCH[model_type]


def _rope_of(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, hashable rope_scaling) from either the v4 fields or v5's ``rope_parameters``."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters are not supported: {dict(params)}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if not _is_positive_number(theta):
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if scaling["rope_type"] == "default":
        return float(theta), None
    if scaling["rope_type"] == "llama3" and "original_max_position_embeddings" not in scaling:
        if "max_position_embeddings" in d:  # transformers' fallback
            scaling["original_max_position_embeddings"] = d["max_position_embeddings"]
    for k, v in scaling.items():
        if isinstance(v, list | dict):
            raise ValueError(f"rope_scaling field {k!r}={v!r} is not supported (rope_type {scaling['rope_type']!r})")
    return float(theta), tuple(sorted(scaling.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Layers


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    # HF's initializer_range: random models get sensible activations, which tests need.
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; the one layer type for every projection (the quantizer swaps these)."""

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = False, dtype: Any = jnp.float32, rngs: nnx.Rngs
    ):
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype))  # (in, out): torch weight.T
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        # Accumulate in f32 so bf16/f16 models sum long dot products without losing digits; f32 is unchanged.
        y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)  # (..., out)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(kernel.dtype)


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), dtype))  # (V, D)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)  # (B, T, D)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output head: logits = h @ embedding.T, in f32."""
        emb = self.embedding[...]
        return jnp.dot(h.astype(emb.dtype), emb.T, preferred_element_type=jnp.float32)  # (B, T, V)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: Any = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in f32, cast back, then scale: the order HF uses, which matters for bf16 agreement.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


@functools.lru_cache(maxsize=32)
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``(hd/2,)`` float32, computed in float32 like transformers so logits agree to ~1e-6."""
    hd = config.head_dim
    inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    inv = inv.astype(np.float32)
    rope = config.rope_scaling_dict
    if rope is None:
        return inv
    if rope["rope_type"] == "linear":
        return (inv / np.float32(rope["factor"])).astype(np.float32)
    # llama3 (Llama 3.1 report, sec. "long context"): keep high frequencies, divide low ones by `factor`, and blend
    # smoothly in between, with wavelength thresholds derived from the pretraining context length.
    factor, lo, hi = (np.float32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_len = np.float32(rope["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``(B, T, hd/2)`` float32 for integer ``positions (B, T)``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))  # (B, T, hd/2)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (B, T, heads, hd)``; pairs are (i, i + hd/2) — HF's "rotate_half" layout, not interleaved."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, h, hd/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, hd/2)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)  # (B, T, h, hd)


# ----------------------------------------------------------------------------------------------------------------------
# Positions, masks and the KV cache


class KVCache(NamedTuple):
    """One layer's cache. Slots fill left to right; ``end`` is the number written so far (same for every row).

    ``valid`` marks slots that hold real tokens, so left- or right-padded prompts can share one cache.
    """

    k: jax.Array  # (B, KVH, S, hd): heads before slots, the layout attention multiplies in (no per-step transpose)
    v: jax.Array  # (B, KVH, S, hd)
    valid: jax.Array  # (B, S) bool
    end: jax.Array  # () int32


Cache = tuple[KVCache, ...]  # one per layer


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated) in every layer."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"batch={batch} and max_len={max_len} must be positive")
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    return tuple(
        KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, max_len), bool),
            jnp.zeros((), jnp.int32),
        )
        for _ in range(config.num_hidden_layers)
    )


def make_positions(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids ``(B, T)`` int32: real tokens count 0, 1, 2, ... from ``offset`` (per row ``(B,)`` or scalar),
    skipping padding, so left- and right-padded rows get the positions they would have unpadded. Padding
    positions are clamped to ``offset`` (their value does not matter: padding is never attended to)."""
    m = attention_mask.astype(jnp.int32)  # (B, T)
    offset = jnp.asarray(offset, jnp.int32).reshape(-1, 1)  # (B or 1, 1)
    return offset + jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)  # (B, T)


def attention_allowed(q_slots: jax.Array, k_slots: jax.Array, k_valid: jax.Array, window: int | None) -> jax.Array:
    """Boolean ``(B, T, S)``: query at slot q may see key at slot k (causal, real key, inside the window)."""
    q = q_slots[:, None]  # (T, 1)
    k = k_slots[None, :]  # (1, S)
    ok = k <= q  # (T, S)
    if window is not None:
        ok &= k > q - window  # transformers' sliding_window_overlay
    return ok[None] & k_valid[:, None, :]  # (B, T, S)


# ----------------------------------------------------------------------------------------------------------------------
# Attention

# Queries are processed in blocks of this many tokens: the (block, S) score matrix stays cache-sized, and without a KV
# cache a block only multiplies against the keys causality lets it see (about half the work of the full square).
ATTENTION_BLOCK = 256


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_slots: jax.Array,
    k_valid: jax.Array,
    *,
    window: int | None = None,
    causal_prefix: bool = False,
    block: int = ATTENTION_BLOCK,
) -> jax.Array:
    """Softmax attention, grouped-query, in f32; the plain-jnp reference and the CPU implementation.

    ``q (B, T, H, hd)`` (RoPE applied), ``k, v (B, KVH, S, hd)``; query t sits at slot ``q_slots[t]`` and key s at
    slot s; ``k_valid (B, S)`` marks real keys. ``causal_prefix=True`` promises ``q_slots == arange(T)`` and
    ``S == T`` (no cache), so block i may skip every key after its last query. Returns ``(B, T, H, hd)`` in v's dtype.
    """
    B, T, H, hd = q.shape
    KVH, S = k.shape[1], k.shape[2]
    G = H // KVH  # query heads per K/V head; HF's head h is (h // G, h % G)
    # One batched matmul per K/V head with the G query heads folded into the rows: no repeated K/V in memory.
    # The softmax scale goes on q (T x hd values) rather than on the scores (T x S).
    q = (q * jnp.asarray(hd**-0.5, q.dtype)).reshape(B, T, KVH, G, hd).transpose(0, 2, 1, 3, 4)  # (B, KVH, T, G, hd)
    outs = []
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        s0, s1 = 0, S
        if causal_prefix:
            s1 = t1
            if window is not None:
                s0 = max(0, t0 - window + 1)
        qb = q[:, :, t0:t1].reshape(B, KVH, (t1 - t0) * G, hd)  # (B, KVH, Tb*G, hd)
        scores = jnp.einsum("bkqd,bksd->bkqs", qb, k[:, :, s0:s1].astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores.reshape(B, KVH, t1 - t0, G, s1 - s0)  # (B, KVH, Tb, G, Sb)
        allowed = attention_allowed(q_slots[t0:t1], jnp.arange(s0, s1, dtype=jnp.int32), k_valid[:, s0:s1], window)
        # A large finite negative, not -inf: a query with no visible key (left padding) gets a harmless uniform
        # row instead of NaNs, and real queries always see themselves so they are unaffected.
        scores = jnp.where(allowed[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
        # Softmax with the normalisation deferred to after the PV product: one pass fewer over the (Tb, Sb) scores
        # (a quarter of the attention time at seqlen 2048 on CPU). The row maximum contributes exp(0) = 1, so the
        # denominator is >= 1.
        p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        denom = jnp.sum(p, axis=-1)  # (B, KVH, Tb, G)
        p = p.astype(v.dtype).reshape(B, KVH, (t1 - t0) * G, s1 - s0)
        out = jnp.einsum("bkqs,bksd->bkqd", p, v[:, :, s0:s1], preferred_element_type=jnp.float32)
        outs.append(out.reshape(B, KVH, t1 - t0, G, hd) / denom[..., None])  # (B, KVH, Tb, G, hd)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)  # (B, KVH, T, G, hd)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H, hd).astype(v.dtype)  # (B, T, H, hd)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, window: int | None, dtype: Any, rngs: nnx.Rngs):
        c = config
        self.config, self.window = c, window
        d, h, kvh, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(d, h * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kvh * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kvh * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * hd, d, use_bias=c.attention_out_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(hd, eps=c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=c.rms_norm_eps, dtype=dtype) if c.qk_norm else None

    def __call__(
        self, x: jax.Array, *, positions: jax.Array, attention_mask: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns (output (B, T, D), updated cache)."""
        c = self.config
        B, T, _ = x.shape
        kvh, hd = c.num_key_value_heads, c.head_dim
        q = self.q_proj(x).reshape(B, T, c.num_attention_heads, hd)  # (B, T, H, hd)
        k = self.k_proj(x).reshape(B, T, kvh, hd)  # (B, T, KVH, hd)
        v = self.v_proj(x).reshape(B, T, kvh, hd)  # (B, T, KVH, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(c, positions)  # (B, T, hd/2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        no_cache = cache is None  # then keys are exactly this call's tokens, in slots 0..T-1
        k = k.transpose(0, 2, 1, 3)  # (B, KVH, T, hd)
        v = v.transpose(0, 2, 1, 3)  # (B, KVH, T, hd)
        valid = attention_mask.astype(bool)  # (B, T)
        q_slots = jnp.arange(T, dtype=jnp.int32)  # (T,)
        if cache is not None:
            start = cache.end
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, start, 0))  # (B, KVH, S, hd)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, start, 0))  # (B, KVH, S, hd)
            valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))  # (B, S)
            cache = KVCache(k, v, valid, start + T)
            q_slots = q_slots + start
        out = attend(q, k, v, q_slots, valid, window=self.window, causal_prefix=no_cache)  # (B, T, H, hd)
        o_in = out.reshape(B, T, c.num_attention_heads * hd).astype(x.dtype)  # (B, T, H*hd)
        return self.o_proj(o_in), cache


# ----------------------------------------------------------------------------------------------------------------------
# MLP and decoder layer


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, i, use_bias=b, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, i, use_bias=b, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, d, use_bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU: (B, T, D) -> (B, T, D)."""
        a = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)
        return self.down_proj(a)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: Any, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(c, window=c.layer_window(layer_idx), dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(c, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        h: jax.Array,
        *,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Pre-norm block on ``h (B, T, D)``: returns the new hidden states and the updated cache."""
        if attention_mask is None:
            attention_mask = jnp.ones(h.shape[:2], jnp.int32)
        x = self.input_layernorm(h)  # (B, T, D)
        a, cache = self.self_attn(x, positions=positions, attention_mask=attention_mask, cache=cache)
        h = h + a  # (B, T, D)
        y = self.post_attention_layernorm(h)  # (B, T, D)
        h = h + self.mlp(y)  # (B, T, D)
        return h, cache


# ----------------------------------------------------------------------------------------------------------------------
# The model


# Tile of the output head in LlamaForCausalLM.token_nll: HEAD_ROWS positions x HEAD_VOCAB vocabulary entries (16 MB
# of f32 logits). Measured alone on a 2-core CPU for a 2048-token window of SmolLM2: 0.93 s against 1.8 s for the
# full (2047, 49152) logits and their log-sum-exp, most of the difference being the 200k fresh pages those 400 MB
# fault in per call.
HEAD_ROWS, HEAD_VOCAB = 1024, 4096


def _rows(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, y: jax.Array, rows: int) -> jax.Array:
    """``fn`` over chunks of ``rows`` rows of ``x (N, D)``, ``y (N,)`` in a ``lax.map``; the last chunk is padded and
    its padding dropped. Returns ``(N,)``."""
    N = x.shape[0]
    rows = min(rows, N)
    steps = -(-N // rows)
    pad = steps * rows - N
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(steps, rows, x.shape[1])
    ys = jnp.pad(y, (0, pad)).reshape(steps, rows)
    return jax.lax.map(lambda a: fn(*a), (xs, ys)).reshape(-1)[:N]


class LlamaForCausalLM(nnx.Module):
    """Decoder-only LM for every architecture in SUPPORTED_ARCHITECTURES (the config switches the differences)."""

    # The repeated blocks, for ``gptq_jax.quantize``: all it needs to know about this model to quantize it
    # layer by layer (it finds the matmuls and their order itself).
    gptq_blocks = "layers.*"

    def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config, self.dtype = c, jnp.dtype(dtype)
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, i, dtype=dtype, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, dtype=dtype, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)  # (B, T, D)

    def head(self, h: jax.Array) -> jax.Array:
        """Final norm and output projection: ``h (B, T, D)`` -> logits ``(B, T, V)`` float32."""
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h).astype(jnp.float32)

    def token_nll(self, h: jax.Array, targets: jax.Array) -> jax.Array:
        """``-log softmax(head(h))[target]`` per position, without ever holding all the logits.

        ``h (N, D)`` hidden states (before the final norm), ``targets (N,)`` int -> ``(N,)`` float32. The head runs
        on tiles of HEAD_ROWS positions x HEAD_VOCAB vocabulary entries with a running log-sum-exp, so about 16 MB
        of logits are live instead of N x V (400 MB for one 2048-token window of a 49k vocabulary, which every call
        would allocate and fault in afresh). Each tile's logits are the ones ``head`` computes, so the result equals
        the full-logits value up to f32 summation order.
        """
        N, D = h.shape
        x = self.norm(h)  # (N, D)
        tied = self.lm_head is None  # else a float Linear: lm_head is never quantized
        if tied:
            w = self.embed_tokens.embedding[...]  # (V, D)
            V, bias = w.shape[0], None
        else:
            w = self.lm_head.kernel[...]  # (D, V)
            V, bias = w.shape[1], self.lm_head.bias
        vc = min(HEAD_VOCAB, V)
        n_tiles = -(-V // vc)

        def row_chunk(xc: jax.Array, yc: jax.Array) -> jax.Array:  # (R, D), (R,) -> (R,)
            def tile(i, carry):
                m, s, picked = carry  # (R,) running max, sum of exp(logit - m), target logit
                # The last tile is moved back to end at V; the entries it shares with the one before are masked.
                start = jnp.minimum(i * vc, V - vc)
                if tied:
                    wt = jax.lax.dynamic_slice_in_dim(w, start, vc, axis=0)  # (vc, D)
                    logits = jnp.dot(xc.astype(w.dtype), wt.T, preferred_element_type=jnp.float32)  # (R, vc)
                else:
                    wt = jax.lax.dynamic_slice_in_dim(w, start, vc, axis=1)  # (D, vc)
                    logits = jnp.dot(xc.astype(w.dtype), wt, preferred_element_type=jnp.float32)  # (R, vc)
                    if bias is not None:
                        logits = logits + jax.lax.dynamic_slice_in_dim(bias[...], start, vc).astype(jnp.float32)
                    logits = logits.astype(w.dtype).astype(jnp.float32)  # the rounding Linear applies
                cols = start + jnp.arange(vc, dtype=jnp.int32)  # (vc,)
                fresh = cols >= i * vc  # (vc,)
                picked = picked + jnp.sum(jnp.where(fresh & (cols == yc[:, None]), logits, 0.0), axis=-1)
                logits = jnp.where(fresh, logits, -jnp.inf)  # (R, vc)
                m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
                s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
                return m_new, s, picked

            R = xc.shape[0]
            init = (jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R,), jnp.float32))
            m, s, picked = jax.lax.fori_loop(0, n_tiles, tile, init)
            return m + jnp.log(s) - picked

        return _rows(row_chunk, x, targets, HEAD_ROWS)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """``tokens (B, T)`` -> (logits ``(B, T, V)`` float32, updated cache or None).

        ``attention_mask (B, T)``: 1 for real tokens, 0 for padding (left or right). ``positions`` default to
        ``make_positions(attention_mask)`` continued from the tokens already in ``cache``.
        """
        h, new_cache = self.hidden_states(tokens, attention_mask=attention_mask, positions=positions, cache=cache)
        return self.head(h), new_cache

    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """The decoder stack without the head: ``tokens (B, T)`` -> (``h (B, T, D)`` before the final norm, cache).
        ``head(h)`` turns it into logits; callers that only need a reduction of the logits (perplexity) can apply the
        head to a few positions at a time instead of holding all ``(B, T, V)`` logits at once."""
        B, T = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        if cache is not None:
            if len(cache) != len(self.layers):
                raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
            end, S = cache[0].end, cache[0].valid.shape[1]
            if not isinstance(end, jax.core.Tracer) and int(end) + T > S:
                raise ValueError(f"KV cache overflow: {int(end)} slots used + {T} new tokens > max_len={S}")
        if positions is None:
            offset = 0 if cache is None else jnp.sum(cache[0].valid, axis=-1, dtype=jnp.int32)  # (B,)
            positions = make_positions(attention_mask, offset)  # (B, T)
        h = self.embed(tokens)  # (B, T, D)
        new_cache = []
        for i, layer in enumerate(self.layers):
            h, c = layer(
                h, positions=positions, attention_mask=attention_mask, cache=None if cache is None else cache[i]
            )
            new_cache.append(c)
        return h, (None if cache is None else tuple(new_cache))


# Aliases so code can name the architecture it means; the class is the same.
MistralForCausalLM = Qwen2ForCausalLM = Qwen3ForCausalLM = LlamaForCausalLM


def make_forward(model: LlamaForCausalLM, *, donate_cache: bool = False) -> Callable[..., tuple[jax.Array, Any]]:
    """A jitted ``forward(tokens, *, attention_mask=None, positions=None, cache=None) -> (logits, cache)``.

    The model's parameters are captured once (split into graph + state, so each call is a plain ``jax.jit``
    dispatch with no NNX graph traversal). Call it again after modifying the model (e.g. swapping in quantized
    layers). It recompiles for each new input shape and for None vs. given optional arguments. With
    ``donate_cache=True`` the input cache's buffers are reused for the output (faster decoding; the old cache
    becomes invalid).
    """
    graphdef, state = nnx.split(model)

    def fwd(state, tokens, attention_mask, positions, cache):
        m = nnx.merge(graphdef, state)
        return m(tokens, attention_mask=attention_mask, positions=positions, cache=cache)

    jitted = jax.jit(fwd, donate_argnums=(4,) if donate_cache else ())

    def forward(tokens, *, attention_mask=None, positions=None, cache=None):
        return jitted(state, jnp.asarray(tokens, jnp.int32), attention_mask, positions, cache)

    return forward
