"""Llama with its layers stacked on a leading axis and run under a scan, the way MaxText and most large JAX models keep
compile time flat in depth, in both Flax APIs: a Linen module with ``nn.scan`` and an NNX module whose layers are made
by ``nnx.vmap`` and run by ``nnx.scan``. Both hold the weights of our ``LlamaForCausalLM`` (``from_llama``) and give
its logits; the numerics are its functions (``gptq_jax.models.llama``), so only the scan differs.

    python examples/scanned_llama.py     # a tiny random Llama in both forms, quantized, checked against the unscanned

``benchmarks/kinds_smollm2.py`` quantizes SmolLM2's trained weights in each form.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.models.llama import (
    DecoderLayer,
    Embedding,
    LlamaForCausalLM,
    ModelConfig,
    RMSNorm,
    apply_rope,
    attend,
    make_positions,
    rope_cos_sin,
)

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return scale * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LinenLayer(nn.Module):
    """One pre-norm Llama layer in Linen; ``__call__(carry, _)`` is the scan body: ``carry = (h, positions, mask)``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry: tuple, _: Any) -> tuple[tuple, None]:
        c = self.config
        h, positions, mask = carry
        B, T, D = h.shape
        hd, H, KVH = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        dense = partial(nn.Dense, use_bias=False)
        norm1 = self.param("input_layernorm", nn.initializers.ones, (D,))
        x = _rms(h, norm1, c.rms_norm_eps)
        q = dense(H * hd, name="q_proj")(x).reshape(B, T, H, hd)
        k = dense(KVH * hd, name="k_proj")(x).reshape(B, T, KVH, hd)
        v = dense(KVH * hd, name="v_proj")(x).reshape(B, T, KVH, hd)
        cos, sin = rope_cos_sin(c, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.arange(T, dtype=jnp.int32),
                     mask.astype(bool), causal_prefix=True)  # fmt: skip
        h = h + dense(D, name="o_proj")(out.reshape(B, T, H * hd))
        norm2 = self.param("post_attention_layernorm", nn.initializers.ones, (D,))
        y = _rms(h, norm2, c.rms_norm_eps)
        a = jax.nn.silu(dense(c.intermediate_size, name="gate_proj")(y)) * dense(c.intermediate_size, name="up_proj")(y)
        h = h + dense(D, name="down_proj")(a)
        return (h, positions, mask), None


class LinenScannedLlama(nn.Module):
    """``apply({"params": p}, tokens) -> logits``; the layers' parameters live under ``layers`` with a leading axis."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        emb = self.param("embed_tokens", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size))
        mask = jnp.ones(tokens.shape, jnp.int32)
        h = jnp.take(emb, tokens, axis=0)
        stack = nn.scan(LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=c.num_hidden_layers)  # fmt: skip
        (h, _, _), _ = stack(c, name="layers")((h, make_positions(mask), mask), None)
        h = _rms(h, self.param("norm", nn.initializers.ones, (c.hidden_size,)), c.rms_norm_eps)
        return jnp.dot(h, emb.T, preferred_element_type=jnp.float32)


class NNXScannedLlama(nnx.Module):
    """``model(tokens) -> (logits, None)`` like ``LlamaForCausalLM``; ``layers`` is one ``DecoderLayer`` whose
    parameters have a leading layer axis (made by ``nnx.vmap``), run by ``nnx.scan``. Tied embeddings only."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, 0, dtype=jnp.float32, rngs=rngs)

        self.layers = make(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, None]:
        mask = jnp.ones(tokens.shape, jnp.int32)
        positions = make_positions(mask)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h: jax.Array, layer: DecoderLayer) -> jax.Array:
            return layer(h, positions=positions, attention_mask=mask)[0]

        h = run(self.embed_tokens(tokens), self.layers)
        return self.embed_tokens.attend(self.norm(h)), None


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def linen_params_from_llama(model: LlamaForCausalLM) -> dict:
    """Our Llama's weights as ``LinenScannedLlama`` parameters (kernels ``(in, out)`` in both)."""
    if model.lm_head is not None:
        raise ValueError("the scanned examples tie the output head to the embedding, as SmolLM2 does")
    layers = [{
        "input_layernorm": layer.input_layernorm.scale[...],
        "post_attention_layernorm": layer.post_attention_layernorm.scale[...],
        **{p.split(".")[1]: {"kernel": getattr(getattr(layer, p.split(".")[0]), p.split(".")[1]).kernel[...]}
           for p in PROJ},
    } for layer in model.layers]  # fmt: skip
    return {"embed_tokens": model.embed_tokens.embedding[...], "layers": _stack(layers),
            "norm": model.norm.scale[...]}  # fmt: skip


def nnx_from_llama(model: LlamaForCausalLM) -> NNXScannedLlama:
    """An ``NNXScannedLlama`` holding our Llama's weights (each layer's state stacked on a new leading axis)."""
    if model.lm_head is not None:
        raise ValueError("the scanned examples tie the output head to the embedding, as SmolLM2 does")
    scanned = nnx.eval_shape(lambda: NNXScannedLlama(model.config, rngs=nnx.Rngs(0)))
    state = nnx.state(scanned)
    state["embed_tokens"] = nnx.state(model.embed_tokens)
    state["norm"] = nnx.state(model.norm)
    state["layers"] = _stack([nnx.state(layer) for layer in model.layers])
    nnx.update(scanned, state)
    return scanned


def main() -> None:
    import gptq_jax

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64,
                      tie_word_embeddings=True)  # fmt: skip
    llama = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 32)).astype(np.int32)
    ref = llama(jnp.asarray(tokens))[0]
    net = LinenScannedLlama(cfg)
    params = linen_params_from_llama(llama)
    np.testing.assert_allclose(net.apply({"params": params}, tokens), ref, rtol=1e-4, atol=1e-4)
    scanned = nnx_from_llama(llama)
    np.testing.assert_allclose(scanned(jnp.asarray(tokens))[0], ref, rtol=1e-4, atol=1e-4)
    qc = gptq_jax.QuantConfig(bits=4, group_size=32)
    for name, target, kw in (("linen nn.scan", params, {"apply_fn": net.apply}), ("nnx.scan", scanned, {})):
        result = gptq_jax.quantize(target, tokens, quant_config=qc, batch_size=4, **kw)
        print(f"{name}: {len(result.weights)} weights quantized, mode {result.report.mode}, "
              f"{len(result.report.unquantized)} left float")  # fmt: skip
        # Every projection of every layer, layer by layer; the embedding (tied head) stays float.
        assert len(result.weights) == len(PROJ) * cfg.num_hidden_layers and result.report.mode == "blocks"


if __name__ == "__main__":
    main()
