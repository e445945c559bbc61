"""Sequential GPTQ of a parameter pytree and a function: a Linen model with ``layers_i`` blocks, and a plain
``f(params, batch)`` with ``layers/N`` dict keys. Blocks come from the parameter tree; each block's inputs are
caught once per batch; blocks are quantized one after another on the outputs of the quantized ones, and
true-sequential inside. The oracle is ``quantize_weight`` on Hessians computed by hand."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax
from gptq_jax import QuantConfig, quantize_weight
from gptq_jax.core.hessian import accumulate_hessian, init_hessian
from gptq_jax.engine.regions import find_param_blocks

D, F, V, T, LAYERS = 32, 48, 40, 12, 3
QC = QuantConfig(bits=4, group_size=16)


class Layer(linen.Module):
    """A Llama-like layer: norm, causal attention (q/k/v/o), norm, gated MLP (gate/up/down)."""

    @linen.compact
    def __call__(self, h, positions):
        x = linen.RMSNorm(name="norm1")(h)
        q, k, v = (linen.Dense(D, use_bias=False, name=n)(x) for n in ("q", "k", "v"))  # (B, T, D)
        q = q * jnp.cos(positions[..., None] / 10.0)  # needs the positions, as rotary embeddings do
        att = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
        causal = positions[:, :, None] >= positions[:, None, :]
        att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
        h = h + linen.Dense(D, use_bias=False, name="o")(jnp.einsum("bts,bsd->btd", att, v))
        x = linen.RMSNorm(name="norm2")(h)
        g = jax.nn.silu(linen.Dense(F, use_bias=False, name="gate")(x)) * linen.Dense(F, use_bias=False, name="up")(x)
        return h + linen.Dense(D, use_bias=False, name="down")(g)


class Net(linen.Module):
    @linen.compact
    def __call__(self, tokens, positions):
        h = linen.Embed(V, D, name="embed")(tokens)
        for i in range(LAYERS):
            h = Layer(name=f"layers_{i}")(h, positions)
        return linen.Dense(V, use_bias=False, name="lm_head")(linen.RMSNorm(name="norm")(h))


PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def _batches(n=3, rows=2):
    rng = np.random.default_rng(0)
    pos = jnp.broadcast_to(jnp.arange(T), (rows, T))
    return [{"tokens": jnp.asarray(rng.integers(0, V, (rows, T))), "positions": pos} for _ in range(n)]


def _forward(net):
    return lambda p, b: net.apply({"params": p}, b["tokens"], b["positions"])


def _hessian(xs):
    h, n = init_hessian(xs[0].shape[-1])
    for x in xs:
        h, n = accumulate_hessian(h, n, x.reshape(-1, x.shape[-1]))
    return h


def _layer_inputs(net, params, batches, upto):
    """The hidden states entering ``layers_{upto}``, computed by hand with ``params`` (float or quantized)."""
    out = []
    for b in batches:
        h = linen.Embed(V, D).apply({"params": params["embed"]}, b["tokens"])
        for i in range(upto):
            h = Layer().apply({"params": params[f"layers_{i}"]}, h, b["positions"])
        out.append(h)
    return out


def _norm1(params, i, hs):
    return [linen.RMSNorm().apply({"params": params[f"layers_{i}"]["norm1"]}, h) for h in hs]


def test_linen_layers_are_quantized_one_after_another_as_the_hand_computed_hessians_say():
    net = Net()
    batches = _batches()
    params = net.init(jax.random.key(0), batches[0]["tokens"], batches[0]["positions"])["params"]
    res = gptq_jax.quantize(params, batches, forward=_forward(net), quant_config=QC)
    assert res.report.mode == "blocks"
    assert [r["path"] for r in res.report.blocks] == [f"layers_{i}" for i in range(LAYERS)]
    assert sorted(res.weights) == sorted(f"layers_{i}.{p}.kernel" for i in range(LAYERS) for p in PROJ)
    assert {r["path"] for r in res.report.unquantized} == {"embed.embedding", "lm_head.kernel"}
    assert all(r["relative_output_error"] > 0 for r in res.report.blocks)
    new = res.model
    # Layer 0 from the float model's inputs; layer 2 from the inputs made by the quantized layers 0 and 1.
    for layer, source in ((0, params), (2, new)):
        h = _hessian(_norm1(params, layer, _layer_inputs(net, source, batches, layer)))
        for name in ("q", "k", "v"):
            w = params[f"layers_{layer}"][name]["kernel"].T  # [N, K]
            want = quantize_weight(w, h, QC)
            got = res.weights[f"layers_{layer}.{name}.kernel"]
            np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    # Not the one-shot result: layer 2 from the float model's inputs gives other codes.
    h_float = _hessian(_norm1(params, 2, _layer_inputs(net, params, batches, 2)))
    one_shot = quantize_weight(params["layers_2"]["q"]["kernel"].T, h_float, QC)
    assert not np.array_equal(np.asarray(one_shot.codes), np.asarray(res.weights["layers_2.q.kernel"].codes))
    # The returned pytree holds the dequantized weights, and only those changed.
    q0 = res.weights["layers_0.q.kernel"]
    np.testing.assert_allclose(np.asarray(new["layers_0"]["q"]["kernel"]).T, np.asarray(q0.dequantize()),
                               rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(new["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))


def test_the_default_forward_says_how_to_pass_forward():
    net = Net()
    batches = _batches(n=1)
    params = net.init(jax.random.key(0), batches[0]["tokens"], batches[0]["positions"])["params"]
    with pytest.raises(ValueError, match="forward failed on calibration batch 0.*pass forward=lambda"):
        gptq_jax.quantize(params, batches, apply_fn=net.apply, quant_config=QC)


def _plain_forward(p, tokens):
    h = p["embed"][tokens]  # (B, T, D)
    for i in range(len(p["layers"])):
        w = p["layers"][str(i)]
        h = h + jnp.tanh(h @ w["up"]) @ w["down"]
    return h @ p["head"]


def test_a_plain_function_with_nested_layer_keys_runs_block_by_block():
    k = iter(jax.random.split(jax.random.key(1), 16))
    params = {"embed": jax.random.normal(next(k), (V, D)), "head": jax.random.normal(next(k), (D, V)) * 0.2,
              "layers": {str(i): {"up": jax.random.normal(next(k), (D, F)) * 0.2,
                                  "down": jax.random.normal(next(k), (F, D)) * 0.2} for i in range(3)}}
    tokens = np.random.default_rng(0).integers(0, V, (4, T))
    res = gptq_jax.quantize(params, tokens, forward=_plain_forward, quant_config=QC, batch_size=2)
    assert res.report.mode == "blocks"
    assert [r["path"] for r in res.report.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert len(res.weights) == 6
    # Layer 1's up projection from the inputs made by the quantized layer 0.
    new = res.model
    hs = [new["embed"][tokens[i: i + 2]] for i in (0, 2)]
    hs = [h + jnp.tanh(h @ new["layers"]["0"]["up"]) @ new["layers"]["0"]["down"] for h in hs]
    want = quantize_weight(params["layers"]["1"]["up"].T, _hessian(hs), QC)
    np.testing.assert_array_equal(np.asarray(res.weights["layers.1.up"].codes), np.asarray(want.codes))
    one_shot = gptq_jax.quantize(params, tokens, forward=_plain_forward, quant_config=QC, batch_size=2, blocks=False)
    assert one_shot.report.mode == "one-shot" and len(one_shot.weights) == 7  # the head too, in one shot


def test_blocks_found_in_the_parameter_tree():
    linen_paths = ["embed.embedding", *[f"layers_{i}.{p}.kernel" for i in range(3) for p in ("Dense_0", "Dense_1")]]
    assert find_param_blocks(linen_paths, None) == ["layers_0", "layers_1", "layers_2"]
    hf = [f"model.layers.{i}.self_attn.q_proj.kernel" for i in (0, 1, 10, 2)] + ["model.embed_tokens.embedding"]
    assert find_param_blocks(hf, None) == ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.10"]
    assert find_param_blocks(hf, "model.layers.*") == find_param_blocks(hf, None)
    assert find_param_blocks(["a.kernel", "b.kernel"], None) == []
    with pytest.raises(ValueError, match="blocks='decoder.*' matches no parameter subtree"):
        find_param_blocks(hf, "decoder.*")


def test_nothing_to_quantize_runs_no_calibration_pass(monkeypatch):
    from gptq_jax.engine import driver

    calls = []
    for name in ("slice_fn", "float_outputs_fn"):
        real = getattr(driver, name)
        monkeypatch.setattr(driver, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    net = Net()
    batches = _batches(n=2)
    params = net.init(jax.random.key(0), batches[0]["tokens"], batches[0]["positions"])["params"]
    res = gptq_jax.quantize(params, batches, forward=_forward(net), quant_config=[gptq_jax.Rule(".*", None)])
    assert res.weights == {} and calls == [] and res.report.mode == "none"
    assert len(res.report.unquantized) == LAYERS * len(PROJ) + 2
    gptq_jax.quantize(params, batches, forward=_forward(net), quant_config=QC, blocks=False)
    assert "slice_fn" in calls  # the counting is live: a real run goes through it


def test_a_forward_that_reads_weights_out_of_block_order_is_named_or_falls_back_to_one_shot():
    def scaled_up_front(p, tokens):  # each layer also reads the next layer's weight: the program cannot be cut
        h = p["embed"][tokens]
        for i in range(2):
            w, nxt = p["layers"][str(i)], p["layers"][str((i + 1) % 2)]
            h = h + jnp.tanh(h @ w["up"]) @ w["down"] + 0.1 * jnp.tanh(h @ nxt["up"]).mean(-1, keepdims=True)
        return h @ p["head"]

    k = iter(jax.random.split(jax.random.key(2), 16))
    params = {"embed": jax.random.normal(next(k), (V, D)), "head": jax.random.normal(next(k), (D, V)) * 0.2,
              "layers": {str(i): {"up": jax.random.normal(next(k), (D, F)) * 0.2,
                                  "down": jax.random.normal(next(k), (F, D)) * 0.2} for i in range(2)}}
    tokens = np.random.default_rng(0).integers(0, V, (2, T))
    with pytest.raises(ValueError, match=r"layers\.\d\.\w+: read at equation \d+ of the traced forward, outside "
                                         r"its block layers\.\d .*blocks=False"):
        gptq_jax.quantize(params, tokens, forward=scaled_up_front, quant_config=QC, blocks="layers.*")
    res = gptq_jax.quantize(params, tokens, forward=scaled_up_front, quant_config=QC)
    assert res.report.mode == "one-shot"


def test_a_linen_parameter_pytree_streams_with_load_and_equals_the_whole_run(tmp_path):
    """``load=`` on a parameter pytree of ``jax.ShapeDtypeStruct`` leaves: what is outside the blocks is loaded
    first, then each block when it opens; its quantized weights are let go of again, and the codes are the whole
    run's."""
    from gptq_jax.engine.resume import StoredWeights
    from gptq_jax.engine.subject import Params

    net = Net()
    batches = _batches()
    params = net.init(jax.random.key(0), batches[0]["tokens"], batches[0]["positions"])["params"]
    whole = gptq_jax.quantize(params, batches, forward=_forward(net), quant_config=QC)
    flat = Params.of(params)
    arrays = dict(zip(flat.paths, (np.asarray(x) for x in flat.leaves), strict=True))
    asked: list[list[str]] = []

    def load(paths):
        asked.append(list(paths))
        return {p: arrays[p] for p in paths}

    abstract = jax.eval_shape(lambda: params)
    res = gptq_jax.quantize(abstract, batches, forward=_forward(net), quant_config=QC, load=load,
                            work_dir=str(tmp_path / "w"))
    assert [sorted({p.split(".")[0] for p in a}) for a in asked] == [
        ["embed", "lm_head", "norm"], *[[f"layers_{i}"] for i in range(LAYERS)]]
    assert isinstance(res.weights, StoredWeights) and sorted(res.weights) == sorted(whole.weights)
    for name, qw in whole.weights.items():
        np.testing.assert_array_equal(np.asarray(res.weights[name].codes), np.asarray(qw.codes), err_msg=name)
    assert isinstance(res.model["layers_1"]["q"]["kernel"], jax.ShapeDtypeStruct)
    assert not isinstance(res.model["embed"]["embedding"], jax.ShapeDtypeStruct)
    with pytest.raises(ValueError, match="load= streams a model block by block .* pass work_dir="):
        gptq_jax.quantize(abstract, batches, forward=_forward(net), quant_config=QC, load=load)
