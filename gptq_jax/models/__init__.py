"""Flax NNX models of the Llama family and Hugging Face checkpoint I/O.

- ``ModelConfig``: frozen, hashable; ``ModelConfig.from_json(path)`` / ``from_hf_dict(d)`` / ``to_hf_dict()``.
- ``LlamaForCausalLM(config, *, dtype, rngs)``: Llama 2/3, Mistral, Qwen2, Qwen3. ``model(tokens, attention_mask=,
  positions=, cache=) -> (logits, cache)``; ``model.embed`` / ``model.layers[i](h, positions=, attention_mask=,
  cache=)`` / ``model.head`` for layer-by-layer work.
- ``Linear``: the single projection layer type (what quantization replaces).
- ``make_forward(model)``: jitted forward. ``init_cache``, ``make_positions``: decoding helpers.
- ``load_pretrained(path, *, dtype) -> (model, config)``, ``open_pretrained(path, *, dtype) -> (abstract model,
  config, load)`` for streaming, ``save_pretrained(model, config, out_dir)``,
  ``load_tokenizer(path)``.
"""

from gptq_jax.models.llama import (
    SUPPORTED_ARCHITECTURES,
    Attention,
    DecoderLayer,
    Embedding,
    KVCache,
    Linear,
    LlamaForCausalLM,
    MistralForCausalLM,
    ModelConfig,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    RMSNorm,
    init_cache,
    make_forward,
    make_positions,
)
from gptq_jax.models.params import (
    PARAM_TABLE,
    hf_to_nnx,
    load_pretrained,
    load_tokenizer,
    nnx_to_hf,
    open_pretrained,
    save_pretrained,
)

__all__ = [
    "PARAM_TABLE",
    "SUPPORTED_ARCHITECTURES",
    "Attention",
    "DecoderLayer",
    "Embedding",
    "KVCache",
    "Linear",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "ModelConfig",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "RMSNorm",
    "hf_to_nnx",
    "init_cache",
    "load_pretrained",
    "open_pretrained",
    "load_tokenizer",
    "make_forward",
    "make_positions",
    "nnx_to_hf",
    "save_pretrained",
]
