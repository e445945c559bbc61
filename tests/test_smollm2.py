"""The default model, SmolLM2-135M-Instruct, converted from its GGUF (fixture `smollm2_dir` in conftest.py).

Few and short on purpose: a 135M model forward costs seconds on 2 CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptq_jax.io.text import load_text, split_text, tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out_tokens(smollm2_dir):
    from gptq_jax.models import load_tokenizer

    _, held_out = split_text(load_text(), 0.1)
    return tokenize(load_tokenizer(smollm2_dir), held_out)


@pytest.fixture(scope="module")
def torch_smollm2(smollm2_dir):
    from helpers_models import torch_model

    return torch_model(smollm2_dir)


def _nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Mean next-token negative log-likelihood, in float64 numpy."""
    logits = logits[:, :-1].astype(np.float64)  # (B, T-1, V)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]  # (B, T-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]  # (B, T-1)
    return float(np.mean(logz - picked))


def test_converted_files(smollm2_dir):
    from gptq_jax.models import load_tokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    tok = load_tokenizer(smollm2_dir)
    assert tok.convert_ids_to_tokens(tok("Hello world, this is")["input_ids"]) == [
        "Hello",
        "Ġworld",
        ",",
        "Ġthis",
        "Ġis",
    ]
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_perplexity_is_sensible_and_matches_torch(smollm2_dir, torch_smollm2, held_out_tokens):
    """Validates the conversion independently of our JAX model (transformers' own Llama on the converted weights),
    then our evaluation (GPTQ protocol) against it on the same two windows of held-out Python-doc text.

    Measured: perplexity 8.70 on 4 x 512 held-out tokens, both with transformers and with ours (9.70 on the first
    256); with the Q/K rows left in llama.cpp's order, transformers gives 299 on those 256 tokens.
    """
    from helpers_models import torch_logits

    from gptq_jax.models import load_pretrained
    from gptq_jax.tasks.eval import perplexity

    tokens = held_out_tokens[: 2 * 512].reshape(2, 512)
    want = float(np.exp(_nll(torch_logits(torch_smollm2, tokens), tokens)))
    assert 3.0 < want < 20.0, want

    model, _ = load_pretrained(smollm2_dir)
    result = perplexity(model, held_out_tokens, seqlen=512, max_windows=2, progress=False)
    assert (result.windows, result.tokens, result.seqlen) == (2, 1024, 512)
    assert result.perplexity == pytest.approx(want, rel=1e-4)


def test_jax_logits_match_torch(smollm2_dir, torch_smollm2, held_out_tokens):
    from helpers_models import torch_logits

    from gptq_jax.models import load_pretrained, make_forward

    tokens = held_out_tokens[:128][None]  # (1, 128)
    want = torch_logits(torch_smollm2, tokens)
    model, _ = load_pretrained(smollm2_dir)
    got = np.asarray(make_forward(model)(tokens)[0])
    # Measured 1.6e-6 relative (Frobenius) on 256 tokens.
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
