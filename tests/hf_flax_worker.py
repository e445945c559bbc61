"""Child process of tests/test_engine_hf_flax.py, with transformers 4.x first on its path: Hugging Face's own
``FlaxLlamaForCausalLM`` (tiny, random), passed to ``gptq_jax.quantize`` as its params and a forward."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from transformers import FlaxLlamaForCausalLM, LlamaConfig
from transformers.models.llama.modeling_flax_llama import FlaxLlamaRMSNorm

import gptq_jax
from gptq_jax import QuantConfig, quantize_weight
from gptq_jax.core.hessian import accumulate_hessian, init_hessian

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def main() -> int:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = FlaxLlamaForCausalLM(cfg, seed=0)
    params = jax.tree.map(jnp.asarray, model.params)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 16))
    qc = QuantConfig(bits=4, group_size=16)
    # The default forward (apply with the batch alone) is not how this model runs: it must say so.
    try:
        gptq_jax.quantize(params, tokens, apply_fn=model.module.apply, quant_config=qc, batch_size=2)
    except ValueError as e:
        assert "pass forward=" in str(e), e
    else:
        raise AssertionError("the default forward should have failed on FlaxLlamaForCausalLM")
    res = gptq_jax.quantize(params, tokens, forward=lambda p, ids: model(ids, params=p).logits, quant_config=qc,
                            batch_size=2)
    assert res.report.mode == "blocks", res.report.mode
    assert [r["path"] for r in res.report.blocks] == [f"model.layers.{i}" for i in range(3)]
    want = sorted(f"model.layers.{i}.{p}.kernel" for i in range(3) for p in PROJ)
    assert sorted(res.weights) == want, sorted(res.weights)
    # Layer 0's q/k/v: quantize_weight on the Hessian of its inputs, computed by hand.
    norm = FlaxLlamaRMSNorm(cfg)
    emb = params["model"]["embed_tokens"]["embedding"]
    ln = {"params": params["model"]["layers"]["0"]["input_layernorm"]}
    h, n = init_hessian(cfg.hidden_size)
    for rows in (tokens[:2], tokens[2:]):
        x = norm.apply(ln, emb[rows])
        h, n = accumulate_hessian(h, n, x.reshape(-1, cfg.hidden_size))
    for p in ("q_proj", "k_proj", "v_proj"):
        w = params["model"]["layers"]["0"]["self_attn"][p]["kernel"].T
        got = res.weights[f"model.layers.0.self_attn.{p}.kernel"]
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(quantize_weight(w, h, qc).codes))
    print("OK", len(res.weights), "weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
