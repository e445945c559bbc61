"""End to end: GPTQ on a small model trained here with optax, and on SmolLM2-135M at 3 bits with few windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers_models import tiny_config

from gptq_jax import QuantConfig, quantize
from gptq_jax.core.calibration import random_windows
from gptq_jax.io.checkpoint import load_quantized, save_quantized
from gptq_jax.models import LlamaForCausalLM, ModelConfig
from gptq_jax.models.llama import make_forward
from gptq_jax.models.qlinear import pack_model
from gptq_jax.tasks.eval import perplexity

VOCAB = 128


def _markov_stream(n: int, seed: int) -> np.ndarray:
    """Tokens from a fixed random first-order Markov chain with peaked transitions: learnable structure."""
    rng = np.random.default_rng(1234)  # the chain is fixed; `seed` picks the sample path
    logits = rng.standard_normal((VOCAB, VOCAB)) * 3.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cum = probs.cumsum(1)
    path = np.random.default_rng(seed)
    out = np.empty(n, np.int32)
    out[0] = 0
    u = path.random(n)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(cum[out[i - 1]], u[i])), VOCAB - 1)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer Llama trained for a few hundred Adam steps on the Markov stream (weights saved once)."""
    config = ModelConfig.from_hf_dict(tiny_config("llama", initializer_range=0.02))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    train = _markov_stream(40_000, seed=1)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        def loss_fn(m):
            logits, _ = m(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        starts = rng.integers(0, train.size - 65, 16)
        loss = step(model, opt, jnp.asarray(np.stack([train[s : s + 65] for s in starts])))
    assert float(loss) < 3.5  # uniform guessing is ln(128) = 4.85: it learned the chain
    state = nnx.state(model, nnx.Param)
    return config, jax.tree.map(np.asarray, state)


def _model(trained):
    config, state = trained
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, state))
    return model


def test_gptq_beats_rtn_on_a_trained_model(trained, tmp_path):
    held_out = _markov_stream(4096, seed=2)
    calib = random_windows(_markov_stream(8192, seed=3), nsamples=32, seqlen=64)
    qc = QuantConfig(bits=2, group_size=32)  # 2 bits: this small, well-trained model shrugs off 3-bit RTN

    def ppl(model):
        return perplexity(model, held_out, seqlen=64, batch_size=16, progress=False).perplexity

    p_float = ppl(_model(trained))
    rtn = _model(trained)
    quantize(rtn, calib, quant_config=qc, method="rtn")
    g = _model(trained)
    res = quantize(g, calib, quant_config=qc)
    p_rtn, p_gptq = ppl(rtn), ppl(g)
    print(f"trained tiny model perplexity: float {p_float:.3f}, RTN {p_rtn:.3f}, GPTQ {p_gptq:.3f}")
    assert p_gptq < p_rtn
    # GPTQ closes a good part of RTN's gap. Measured: GPTQ 11.304 with float16 scales (11.306 with float32 ones),
    # RTN 11.355 (11.441): at 2 bits RTN itself moves with the rounding of its scales, hence the margin.
    assert p_gptq - p_float < 0.7 * (p_rtn - p_float)

    # Packed inference, save and load give identical logits.
    pack_model(g, res.weights)
    tok = held_out[:256].reshape(4, 64)
    before = np.asarray(make_forward(g)(tok)[0])
    out = save_quantized(g, tmp_path / "q", quant_config=qc)
    loaded, _ = load_quantized(out)
    np.testing.assert_array_equal(np.asarray(make_forward(loaded)(tok)[0]), before)
    assert ppl(loaded) == pytest.approx(p_gptq, rel=1e-4)


@pytest.mark.slow
def test_smollm2_3bit_gptq_beats_rtn(smollm2_dir):
    from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
    from gptq_jax.models import load_pretrained, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    held_out = tokenize(tok, default_eval_text())
    # 4096 tokens: more than the widest input (1536), so no Hessian is left to damping alone. With 1024 tokens
    # GPTQ was measured barely ahead of RTN (149 vs 152); the paper's 128 x 2048 is far more than this.
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=16, seqlen=256, seed=0)
    qc = QuantConfig(bits=3, group_size=128)

    def ppl(model):
        return perplexity(model, held_out, seqlen=256, batch_size=4, max_windows=8, progress=False).perplexity

    rtn, _ = load_pretrained(smollm2_dir)
    quantize(rtn, calib, quant_config=qc, method="rtn")
    g, _ = load_pretrained(smollm2_dir)
    res = quantize(g, calib, quant_config=qc, batch_size=8)
    p_rtn, p_gptq = ppl(rtn), ppl(g)
    print(f"SmolLM2 3-bit perplexity: RTN {p_rtn:.3f}, GPTQ {p_gptq:.3f}")
    assert not res.report.fallbacks
    assert p_gptq < 0.6 * p_rtn
