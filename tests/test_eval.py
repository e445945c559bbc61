"""Perplexity protocol and text data."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_models import torch_model, write_hf_checkpoint

from gptq_jax.io.text import (
    default_calibration_text,
    default_eval_text,
    default_text,
    load_text,
    split_text,
    tokenize,
)
from gptq_jax.tasks.eval import perplexity

# ---------------------------------------------------------------------------------------------------------------------
# A model whose NLL is computable by hand: logits depend only on the current token (a bigram table).


@dataclasses.dataclass(frozen=True)
class _Cfg:
    max_position_embeddings: int


class Bigram(nnx.Module):
    def __init__(self, table: np.ndarray, max_len: int = 1024):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))  # (V, V)
        self.config = _Cfg(max_len)

    def __call__(self, tokens, *, attention_mask=None, positions=None, cache=None):
        return self.table[...][tokens], cache  # (B, T, V)


def _hand_nll(table: np.ndarray, tokens: np.ndarray, seqlen: int) -> float:
    table = table.astype(np.float64)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))  # (V, V) log-softmax of each row
    windows = len(tokens) // seqlen
    total, count = 0.0, 0
    for w in range(windows):
        win = tokens[w * seqlen : (w + 1) * seqlen]
        for t in range(seqlen - 1):
            total -= logp[win[t], win[t + 1]]
            count += 1
    return total / count


@pytest.mark.parametrize("seqlen,batch_size,n", [(8, 1, 50), (8, 3, 50), (5, 2, 23), (16, 4, 64), (7, 100, 30)])
def test_bigram_matches_hand_computation(seqlen, batch_size, n):
    rng = np.random.default_rng(seqlen * 100 + n)
    table = rng.standard_normal((11, 11)) * 2
    tokens = rng.integers(0, 11, size=n)
    result = perplexity(Bigram(table), tokens, seqlen=seqlen, batch_size=batch_size, progress=False)
    want = _hand_nll(table, tokens, seqlen)
    assert result.windows == n // seqlen
    assert result.tokens == (n // seqlen) * seqlen
    assert result.seqlen == seqlen
    assert result.nll == pytest.approx(want, rel=1e-6)
    assert result.perplexity == pytest.approx(np.exp(want), rel=1e-6)
    assert result.seconds > 0


def test_trailing_partial_window_is_dropped():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 7))
    tokens = rng.integers(0, 7, size=40)
    full = perplexity(Bigram(table), tokens, seqlen=10, progress=False)
    # Changing tokens after the last full window must not change the result.
    longer = np.concatenate([tokens, rng.integers(0, 7, size=9)])
    assert perplexity(Bigram(table), longer, seqlen=10, progress=False).nll == full.nll
    assert perplexity(Bigram(table), tokens, seqlen=10, max_windows=2, progress=False).windows == 2


def test_seqlen_capped_at_model_context():
    table = np.zeros((5, 5))
    result = perplexity(Bigram(table, max_len=8), np.zeros(100, np.int32), seqlen=2048, progress=False)
    assert result.seqlen == 8 and result.windows == 12
    assert result.perplexity == pytest.approx(5.0)  # uniform over 5 tokens


@pytest.mark.parametrize(
    "kwargs,tokens,match",
    [
        ({"seqlen": 16}, np.zeros(10, np.int32), "fewer than one window"),
        ({"seqlen": 1}, np.zeros(10, np.int32), "seqlen=1"),
        ({"batch_size": 0}, np.zeros(10, np.int32), "batch_size=0"),
        ({}, np.zeros((2, 10), np.int32), "1-D integer"),
        ({}, np.zeros(10, np.float32), "1-D integer"),
    ],
)
def test_bad_arguments(kwargs, tokens, match):
    with pytest.raises(ValueError, match=match):
        perplexity(Bigram(np.zeros((3, 3))), tokens, progress=False, **{"seqlen": 4, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# A tiny random Llama: our perplexity equals one computed by transformers' PyTorch model with the same protocol.


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
@pytest.mark.parametrize("tiles", [None, (7, 48)])
def test_tiny_llama_matches_torch(tmp_path, monkeypatch, arch, tiles):
    import torch

    from gptq_jax.models import llama, load_pretrained

    seqlen = 32
    if tiles is not None:  # the head in many small tiles, the last one overlapping the one before (128 = 48 + 48 + 32)
        monkeypatch.setattr(llama, "HEAD_ROWS", tiles[0])
        monkeypatch.setattr(llama, "HEAD_VOCAB", tiles[1])
        seqlen = 24  # another shape, so the evaluation is traced again with the patched tiles
    path = write_hf_checkpoint(tmp_path, arch, seed=1)
    tokens = np.random.default_rng(0).integers(0, 128, size=5 * seqlen + 7).astype(np.int32)
    model, _ = load_pretrained(path)
    ours = perplexity(model, tokens, seqlen=seqlen, batch_size=2, progress=False)

    ref = torch_model(path)
    x = torch.tensor(tokens[: 5 * seqlen].reshape(5, seqlen), dtype=torch.long)
    with torch.no_grad():
        logits = ref(x).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1)).item()
    assert ours.windows == 5
    assert ours.nll == pytest.approx(nll, rel=1e-5)
    assert ours.perplexity == pytest.approx(np.exp(nll), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiled_head_nll_equals_full_logits(monkeypatch, arch, dtype):
    """LlamaForCausalLM.token_nll (the head in tiles with a running log-sum-exp) against the NLL of the full logits,
    for tied and untied heads, with row chunks that need padding and a last vocabulary tile that overlaps the one
    before it (128 = 48 + 48 + 32). Targets include every id of the overlap (80..95)."""
    from helpers_models import tiny_config

    from gptq_jax.models import llama

    monkeypatch.setattr(llama, "HEAD_ROWS", 7)
    monkeypatch.setattr(llama, "HEAD_VOCAB", 48)
    model = llama.LlamaForCausalLM(llama.ModelConfig.from_hf_dict(tiny_config(arch)), dtype=dtype, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    targets = np.concatenate([np.arange(80, 96), [0, 47, 48, 127], rng.integers(0, 128, 30)]).astype(np.int32)
    h = jnp.asarray(rng.standard_normal((len(targets), 64)) * 2, dtype)  # (50, D)
    got = np.asarray(model.token_nll(h, jnp.asarray(targets)))
    logits = np.asarray(model.head(h[None])[0], np.float64)  # (50, V)
    want = np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(targets)), targets]
    assert got.shape == (len(targets),) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Text data


def test_default_text_is_deterministic_prose():
    text = default_text()
    assert text == default_text()
    assert len(text) > 100_000
    assert "def " in text and "The " in text


def test_load_text(tmp_path):
    assert load_text() == default_text()
    f = tmp_path / "t.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(f) == "héllo wörld\n"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")


def test_split_text():
    text = default_text()
    head, tail = split_text(text, 0.1)
    assert head + tail == text
    assert 0.09 < len(tail) / len(text) < 0.12
    assert head.endswith("\n")  # cut at a line break
    assert split_text(text, 0.1) == (head, tail)
    no_breaks = "x" * 1000
    assert split_text(no_breaks, 0.25) == ("x" * 750, "x" * 250)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="held_out_fraction"):
            split_text(text, bad)
    assert (default_calibration_text(), default_eval_text()) == (head, tail)


def test_tokenize_adds_no_special_tokens(tmp_path):
    from helpers_models import write_tiny_tokenizer

    from gptq_jax.models import load_tokenizer

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    ids = tokenize(tok, "w0 w1 w5")
    assert ids.dtype == np.int32 and ids.tolist() == [4, 5, 9]


def test_repeated_evaluation_compiles_once():
    from gptq_jax.tasks import eval as ev

    table = np.random.default_rng(0).standard_normal((13, 13))  # a vocabulary size no other test uses
    tokens = np.arange(40) % 13
    before = ev._module_nll_jit._cache_size()
    first = perplexity(Bigram(table), tokens, seqlen=8, progress=False)
    second = perplexity(Bigram(table), tokens, seqlen=8, progress=False)  # a new, identical model object
    assert ev._module_nll_jit._cache_size() == before + 1
    assert first.nll == second.nll
