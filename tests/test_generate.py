"""Generation with the KV cache against step-by-step full forwards on a tiny random Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_models import write_hf_checkpoint, write_tiny_tokenizer

from gptq_jax.models import load_pretrained, load_tokenizer, make_forward
from gptq_jax.tasks.generate import SamplingConfig, eos_ids, generate, generate_tokens, sample_next

PROMPT = np.array([5, 17, 99, 42, 8], np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("gen"), "llama", seed=3, with_tokenizer=True)
    model, config = load_pretrained(path)
    return path, model, config


def _greedy_by_full_forward(model, prompt: np.ndarray, n: int) -> list[int]:
    """Greedy decoding with no cache: each step a full causal forward of the whole sequence so far. The sequence
    lives in a fixed-size buffer (one compilation); causality makes the unfilled tail irrelevant to position t."""
    forward = make_forward(model)
    T = len(prompt)
    buf = np.zeros((1, T + n), np.int32)
    buf[0, :T] = prompt
    for t in range(T, T + n):
        logits, _ = forward(buf)  # (1, T + n, V)
        buf[0, t] = int(np.argmax(np.asarray(logits)[0, t - 1]))
    return buf[0, T:].tolist()


def test_greedy_equals_full_forward_argmax(tiny):
    _, model, _ = tiny
    result = generate_tokens(model, PROMPT, max_new_tokens=12)
    assert result.tokens.tolist() == _greedy_by_full_forward(model, PROMPT, 12)
    assert result.stop_reason == "max_new_tokens"
    assert result.prompt_tokens == len(PROMPT)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.prefill_tokens_per_second > 0 and result.decode_tokens_per_second > 0


def test_eos_stops(tiny):
    _, model, _ = tiny
    free = generate_tokens(model, PROMPT, max_new_tokens=12).tokens.tolist()
    eos = free[3]
    first = free.index(eos)
    stopped = generate_tokens(model, PROMPT, max_new_tokens=12, eos_token_ids=[1000, eos])
    assert stopped.tokens.tolist() == free[: first + 1]
    assert stopped.stop_reason == "eos"


def test_single_new_token(tiny):
    _, model, _ = tiny
    result = generate_tokens(model, PROMPT, max_new_tokens=1)
    assert result.tokens.tolist() == _greedy_by_full_forward(model, PROMPT, 1)


def test_tiny_top_p_equals_greedy(tiny):
    _, model, _ = tiny
    greedy = generate_tokens(model, PROMPT, max_new_tokens=10).tokens.tolist()
    for seed in (0, 1, 2):
        nucleus = SamplingConfig(temperature=1.5, top_p=1e-6)
        assert generate_tokens(model, PROMPT, max_new_tokens=10, sampling=nucleus, seed=seed).tokens.tolist() == greedy


def test_sampling_is_seeded(tiny):
    _, model, _ = tiny
    hot = SamplingConfig(temperature=2.0)
    a = generate_tokens(model, PROMPT, max_new_tokens=16, sampling=hot, seed=7).tokens.tolist()
    b = generate_tokens(model, PROMPT, max_new_tokens=16, sampling=hot, seed=7).tokens.tolist()
    c = generate_tokens(model, PROMPT, max_new_tokens=16, sampling=hot, seed=8).tokens.tolist()
    assert a == b
    assert a != c


def test_sample_next_respects_top_p():
    # Probabilities 0.5, 0.3, 0.15, 0.05: the nucleus for top_p=0.7 is the first two tokens.
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda k: sample_next(logits, k, SamplingConfig(temperature=1.0, top_p=0.7))[0])(keys)
    counts = np.bincount(np.asarray(draw), minlength=4)
    assert counts[0] == counts[2] == 0
    assert 0.5 < counts[1] / 2000 < 0.75  # 0.5 / 0.8 = 0.625 after renormalising
    full = jax.vmap(lambda k: sample_next(logits, k, SamplingConfig(temperature=1.0))[0])(keys)
    assert np.all(np.bincount(np.asarray(full), minlength=4) > 0)
    assert int(sample_next(logits, keys[0], SamplingConfig())[0]) == 1  # greedy


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_prompt_and_length(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="non-empty 1-D"):
        generate_tokens(model, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_tokens(model, PROMPT, max_new_tokens=0)


def test_generate_text_and_eos_ids(tiny):
    path, model, config = tiny
    tok = load_tokenizer(path)
    assert eos_ids(config, tok) == {2}
    assert eos_ids(type("C", (), {"eos_token_id": (2, 7)})()) == {2, 7}
    result = generate(model, tok, "w1 w2 w3", max_new_tokens=6)
    ids = tok("w1 w2 w3")["input_ids"]
    want = generate_tokens(model, np.asarray(ids, np.int32), max_new_tokens=6, eos_token_ids=[2]).tokens
    assert result.tokens.tolist() == want.tolist()
    assert result.text == tok.decode(want.tolist(), skip_special_tokens=True)
    with pytest.raises(ValueError, match="no chat template"):
        generate(model, tok, "w1", chat=True)


def test_chat_template_is_used(tmp_path, tiny):
    _, model, _ = tiny
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    tok.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8 {% endfor %}w9"
    from gptq_jax.tasks.generate import encode_prompt

    assert encode_prompt(tok, "w1 w2", chat=True).tolist() == tok("w7 w1 w2 w8 w9")["input_ids"]
    result = generate(model, tok, "w1 w2", chat=True, max_new_tokens=3)
    assert result.prompt_tokens == 5
