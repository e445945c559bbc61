"""The Flax NNX Llama-family model against transformers' PyTorch models, plus cache and config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_models import (
    ARCHS,
    left_padding_mask,
    random_tokens,
    right_padding_mask,
    tiny_config,
    torch_logits,
    torch_model,
    write_hf_checkpoint,
)

from gptq_jax.models import (
    Linear,
    LlamaForCausalLM,
    ModelConfig,
    init_cache,
    load_pretrained,
    make_forward,
    make_positions,
)

RTOL = 1e-4  # float32, relative to the largest |logit|


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved random transformers checkpoint per tiny variant, written on first use."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(arch):
        if arch not in cache:
            path = write_hf_checkpoint(root, arch, seed=1)
            cache[arch] = (path, torch_model(path), *load_pretrained(path))
        return cache[arch]

    return get


def assert_close(ours, ref, rtol=RTOL, where=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    if where is not None:
        ours, ref = ours[where], ref[where]
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err < rtol, f"relative error {err:.2e} >= {rtol:.0e}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(checkpoints, arch):
    _, ref_model, model, config = checkpoints(arch)
    tokens = random_tokens(2, 20, seed=2)
    logits, cache = model(jnp.asarray(tokens))
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == (2, 20, config.vocab_size)
    assert_close(logits, torch_logits(ref_model, tokens))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_right_padding_matches_transformers(checkpoints, arch):
    _, ref_model, model, _ = checkpoints(arch)
    tokens = random_tokens(3, 20, seed=3)
    mask = right_padding_mask([20, 13, 5], 20)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert_close(logits, torch_logits(ref_model, tokens, mask), where=mask.astype(bool))
    # Each padded row equals the same row run alone, unpadded.
    alone, _ = model(jnp.asarray(tokens[1:2, :13]))
    np.testing.assert_allclose(np.asarray(logits)[1, :13], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)


def test_left_padding_matches_transformers(checkpoints):
    _, ref_model, model, _ = checkpoints("qwen2")
    tokens = random_tokens(2, 12, seed=4)
    mask = left_padding_mask([12, 7], 12)
    positions = make_positions(jnp.asarray(mask))
    np.testing.assert_array_equal(positions[1, 5:], np.arange(7))
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    ref = torch_logits(ref_model, tokens, mask, position_ids=np.asarray(positions))
    assert_close(logits, ref, where=mask.astype(bool))
    assert np.all(np.isfinite(np.asarray(logits)))  # padding queries see no key: must not produce NaN


@pytest.mark.parametrize(
    "arch, change",
    [("llama3", {"rope_scaling": None}), ("mistral", {"sliding_window": None}), ("qwen3", {"qk_norm": False})],
)
def test_features_matter(checkpoints, arch, change):
    """The variants really exercise their feature: switching it off moves the logits far beyond tolerance."""
    _, ref_model, model, config = checkpoints(arch)
    tokens = random_tokens(1, 20, seed=5)
    other = LlamaForCausalLM(dataclasses.replace(config, **change), rngs=nnx.Rngs(0))
    wanted = set(nnx.to_flat_state(nnx.state(other)).paths)  # without qk_norm there are no q/k norm params
    nnx.update(other, nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(nnx.state(model)) if p in wanted]))
    assert model.config == config  # the shared fixture model is untouched
    ref = torch_logits(ref_model, tokens)
    err = np.max(np.abs(np.asarray(other(jnp.asarray(tokens))[0]) - ref)) / np.max(np.abs(ref))
    assert err > 100 * RTOL


def test_layer_by_layer_equals_forward(checkpoints):
    _, _, model, _ = checkpoints("llama_bias")
    tokens = jnp.asarray(random_tokens(2, 10, seed=6))
    mask = jnp.asarray(right_padding_mask([10, 6], 10))
    positions = make_positions(mask)
    h = model.embed(tokens)
    for layer in model.layers:
        h, cache = layer(h, positions=positions, attention_mask=mask)
        assert cache is None
    np.testing.assert_allclose(model.head(h), model(tokens, attention_mask=mask)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3"])
def test_kv_cache_decoding_equals_full_forward(checkpoints, arch):
    """Prefill a left-padded prompt, then decode one token at a time: every step's logits equal the full forward's
    (mistral's window of 8 is shorter than the 14 tokens, so the cached sliding mask is exercised too)."""
    _, _, model, config = checkpoints(arch)
    tokens = jnp.asarray(random_tokens(2, 14, seed=8))
    prompt_mask = jnp.asarray(left_padding_mask([6, 4], 6))
    mask = jnp.concatenate([prompt_mask, jnp.ones((2, 8), jnp.int32)], axis=1)
    full, _ = model(tokens, attention_mask=mask)

    forward = make_forward(model)
    cache = init_cache(config, batch=2, max_len=16)
    logits, cache = forward(tokens[:, :6], attention_mask=prompt_mask, cache=cache)
    steps = [logits]
    for t in range(6, 14):
        logits, cache = forward(tokens[:, t : t + 1], cache=cache)
        steps.append(logits)
    decoded = jnp.concatenate(steps, axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], rtol=1e-4, atol=1e-5)
    assert int(cache[0].end) == 14


def test_kv_cache_overflow_is_an_error(checkpoints):
    _, _, model, config = checkpoints("llama")
    cache = init_cache(config, batch=1, max_len=4)
    with pytest.raises(ValueError, match=r"KV cache overflow: 0 slots used \+ 5 new tokens > max_len=4"):
        model(jnp.ones((1, 5), jnp.int32), cache=cache)


def test_jitted_forward_equals_eager(checkpoints):
    _, _, model, _ = checkpoints("llama_tied")
    tokens = jnp.asarray(random_tokens(2, 8, seed=9))
    mask = jnp.asarray(right_padding_mask([8, 3], 8))
    eager, _ = model(tokens, attention_mask=mask)
    jitted, _ = make_forward(model)(tokens, attention_mask=mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    assert model.lm_head is None


def test_untied_model_has_lm_head(checkpoints):
    _, _, model, _ = checkpoints("llama")
    assert isinstance(model.lm_head, Linear) and model.lm_head.kernel.shape == (64, 128)
    assert isinstance(model.layers[0].self_attn.q_proj, Linear)
    assert model.layers[0].self_attn.q_proj.kernel.shape == (64, 64)  # (in, out)


# ----------------------------------------------------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_config_round_trip(arch):
    config = ModelConfig.from_hf_dict(tiny_config(arch))
    assert hash(config) == hash(ModelConfig.from_hf_dict(config.to_hf_dict()))
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_config_fields_per_architecture():
    qwen2 = ModelConfig.from_hf_dict(tiny_config("qwen2"))
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = ModelConfig.from_hf_dict(tiny_config("qwen3"))
    assert (qwen3.head_dim, qwen3.qk_norm) == (24, True)
    mistral = ModelConfig.from_hf_dict(tiny_config("mistral"))
    assert mistral.layer_window(0) == 8
    # transformers v5 writes RoPE as rope_parameters; v4 as rope_theta + rope_scaling. Both read the same.
    v5 = {
        **tiny_config("llama"),
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    }
    del v5["rope_theta"]
    assert ModelConfig.from_hf_dict(v5) == ModelConfig.from_hf_dict(tiny_config("llama3"))
    # Qwen2/3 sliding window applies from max_window_layers on.
    sw = ModelConfig.from_hf_dict(tiny_config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert [sw.layer_window(i) for i in range(2)] == [None, 4]
    eos = ModelConfig.from_hf_dict(tiny_config("llama", eos_token_id=[2, 5]))
    assert eos.eos_token_id == (2, 5)
    hash(eos)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"architectures": ["GPT2LMHeadModel"]},
            r"unsupported architecture \['GPT2LMHeadModel'\]; supported: "
            r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ),
        ({"architectures": None, "model_type": "gemma"}, r"unsupported model_type 'gemma'; supported: llama"),
        ({"architectures": None, "model_type": None}, r"neither 'architectures' nor 'model_type'"),
        ({"hidden_size": None}, r"lacks required field 'hidden_size'"),
        ({"vocab_size": "128"}, r"field 'vocab_size' must be an integer, got '128'"),
        ({"num_key_value_heads": 3}, r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
        ({"num_hidden_layers": 0}, r"field 'num_hidden_layers' must be >= 1 and <= \d+, got 0"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"lacks \['low_freq_factor', 'high_freq_factor'\]"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, r"rope_scaling fields \['factor'\] must be positive"),
        ({"tie_word_embeddings": "yes"}, r"field 'tie_word_embeddings' must be true or false, got 'yes'"),
    ],
)
def test_config_errors(change, message):
    d = tiny_config("llama")
    for k, v in change.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(d)


def test_config_is_a_static_jit_argument():
    config = ModelConfig.from_hf_dict(tiny_config("llama"))
    f = jax.jit(lambda c, x: x * c.hidden_size, static_argnums=0)
    assert int(f(config, jnp.int32(2))) == 128


@pytest.mark.parametrize("window", [None, 3])
def test_blocked_attention_equals_one_block(window):
    """Query blocks that skip invisible keys (causal prefix, sliding window) give the same result as one block."""
    from gptq_jax.models.llama import attend

    B, T, H, KVH, hd = 2, 11, 6, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, hd))
    k = jax.random.normal(kk, (B, KVH, T, hd))
    v = jax.random.normal(kv, (B, KVH, T, hd))
    valid = jnp.asarray(right_padding_mask([11, 7], T)).astype(bool)
    slots = jnp.arange(T)
    one = attend(q, k, v, slots, valid, window=window, block=64)
    blocked = attend(q, k, v, slots, valid, window=window, causal_prefix=True, block=4)
    real = np.asarray(valid)  # padding queries may see no key at all; their output is arbitrary
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(one)[real], rtol=1e-6, atol=1e-6)
    # The reference: repeat K/V per query head, full score matrix, mask, softmax.
    rep = lambda x: jnp.repeat(x, H // KVH, axis=1)  # (B, H, T, hd)
    scores = jnp.einsum("bthd,bhsd->bhts", q, rep(k)) / np.sqrt(hd)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    ok = (s <= t) & ((s > t - window) if window else True) & np.asarray(valid)[:, None, None, :]
    ref = jnp.einsum("bhts,bhsd->bthd", jax.nn.softmax(jnp.where(ok, scores, -jnp.inf), -1), rep(v))
    np.testing.assert_allclose(np.asarray(one)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-6)


def test_qwen2_mixed_sliding_layers_match_transformers(tmp_path):
    """Qwen2/3 slide only from max_window_layers on: layer 0 full, layer 1 windowed (window 4 < 16 tokens)."""
    sliding = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    path = write_hf_checkpoint(tmp_path, "qwen2", seed=2, **sliding)
    model, config = load_pretrained(path)
    assert [config.layer_window(i) for i in range(2)] == [None, 4]
    tokens = random_tokens(2, 16, seed=10)
    mask = right_padding_mask([16, 10], 16)
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert_close(logits, torch_logits(path, tokens, mask), where=mask.astype(bool))
