"""MoE experts through the engine: a stack ``[E, D, F]`` read by a batched einsum (dense dispatch) or by
``lax.ragged_dot`` (tokens sorted by expert). Tiny random models, a plain parameter pytree and a forward: each
expert's Hessian comes from the tokens routed to it only, an expert that gets none is rounded to nearest and
reported, and packed inference equals the dequantized model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax
from gptq_jax import QuantConfig, Rule
from gptq_jax.core.calibration import Calibration
from gptq_jax.core.hessian import accumulate_hessian, init_hessian
from gptq_jax.core.quantizer import rtn_quantize
from gptq_jax.engine.experts import NO_TOKENS
from gptq_jax.engine.packed import load_packed, pack, save_packed
from gptq_jax.engine.trace import to_matrix

V, D, F, E, LAYERS = 32, 32, 48, 4, 2
QC = QuantConfig(bits=4, group_size=16, sym=False, act_order=True)
RULES = [Rule(r".*router", None), Rule(r".*", QC)]  # the router stays float: quantizing it would move tokens
DEAD = E - 1  # the router never picks this expert


def _params(seed: int = 0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 2 + 3 * LAYERS)
    p = {"embed": jax.random.normal(ks[0], (V, D)), "head": jax.random.normal(ks[1], (D, V)) * 0.2}
    for i in range(LAYERS):
        k = ks[2 + 3 * i: 5 + 3 * i]
        p[f"layers_{i}"] = {
            "router": jax.random.normal(k[0], (D, E)),
            "router_bias": jnp.zeros((E,)).at[DEAD].set(-1e4),
            "w_up": jax.random.normal(k[1], (E, D, F)) * 0.2,
            "w_down": jax.random.normal(k[2], (E, F, D)) * 0.2,
        }
    return p


def _route(layer: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = x @ layer["router"] + layer["router_bias"]  # (T, E)
    idx = jnp.argmax(logits, axis=-1)  # top-1
    return idx, jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), idx[:, None], axis=1)[:, 0]


def _dense_moe(layer: dict, x: jax.Array) -> jax.Array:
    idx, gate = _route(layer, x)
    dispatch = jax.nn.one_hot(idx, E, dtype=x.dtype)  # (T, E)
    xe = jnp.einsum("te,td->etd", dispatch, x)  # (E, T, D): an unrouted slot is a zero row
    he = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, layer["w_up"]))
    ye = jnp.einsum("efd,etf->etd", layer["w_down"], he)  # the stack as the left operand
    return jnp.einsum("te,etd->td", dispatch * gate[:, None], ye)


def _ragged_moe(layer: dict, x: jax.Array) -> jax.Array:
    idx, gate = _route(layer, x)
    order = jnp.argsort(idx)
    sizes = jnp.bincount(idx, length=E).astype(jnp.int32)
    hs = jax.nn.silu(jax.lax.ragged_dot(x[order], layer["w_up"], sizes))
    ys = jax.lax.ragged_dot(hs, layer["w_down"], sizes)
    return jnp.zeros_like(x).at[order].set(ys) * gate[:, None]


def _forward(moe):
    def forward(params, tokens):
        b, s = tokens.shape
        h = params["embed"][tokens].reshape(b * s, D)
        for i in range(LAYERS):
            h = h + moe(params[f"layers_{i}"], h)
        return (h @ params["head"]).reshape(b, s, V)

    return forward


def _tokens(n: int = 8, s: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (n, s)).astype(np.int32)


@pytest.fixture(scope="module", params=["dense", "ragged"])
def quantized(request):
    forward = _forward(_dense_moe if request.param == "dense" else _ragged_moe)
    params = _params()
    res = gptq_jax.quantize(params, _tokens(), forward=forward, quant_config=RULES, batch_size=4)
    return request.param, forward, params, res


def test_every_expert_is_quantized_from_its_own_tokens(quantized):
    _, forward, params, res = quantized
    assert res.report.mode == "blocks"
    want = {f"layers_{i}.{w}[{e}]" for i in range(LAYERS) for w in ("w_up", "w_down") for e in range(E)}
    assert set(res.weights) == want
    assert {r["path"] for r in res.report.unquantized} >= {"layers_0.router", "layers_1.router"}
    records = {r["name"]: r for r in res.report.weights}
    x = params["embed"][_tokens()].reshape(-1, D)  # block 0's input: the float embeddings
    idx, _ = _route(params["layers_0"], x)
    counts = np.bincount(np.asarray(idx), minlength=E)
    assert counts[DEAD] == 0 and (counts[:DEAD] > 0).all()
    for e in range(E):
        assert records[f"layers_0.w_up[{e}]"]["tokens"] == counts[e]
    for i in range(LAYERS):  # top-1: every real token goes to exactly one expert
        assert sum(records[f"layers_{i}.w_down[{e}]"]["tokens"] for e in range(E)) == x.shape[0]
    # Expert 1 of layer 0, by hand: its Hessian from exactly the tokens routed to it.
    h, n = accumulate_hessian(*init_hessian(D), x[np.asarray(idx) == 1])
    ref = gptq_jax.quantize_weight(to_matrix(params["layers_0"]["w_up"][1], (0,)), h, QC)
    got = res.weights["layers_0.w_up[1]"]
    assert int(n) == counts[1]
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
    assert not bool(got.fallback) and res.axes["layers_0.w_up[1]"] == (0,)
    # ... and its w_down from the quantized w_up's outputs on those tokens.
    up = res.model["layers_0"]["w_up"][1]
    a = jax.nn.silu(x[np.asarray(idx) == 1] @ up)
    h2, _ = accumulate_hessian(*init_hessian(F), a)
    ref2 = gptq_jax.quantize_weight(to_matrix(params["layers_0"]["w_down"][1], (0,)), h2, QC)
    np.testing.assert_array_equal(np.asarray(res.weights["layers_0.w_down[1]"].codes), np.asarray(ref2.codes))


def test_an_expert_without_tokens_is_rounded_to_nearest_and_reported(quantized):
    _, _, params, res = quantized
    rec = {r["name"]: r for r in res.report.weights}[f"layers_0.w_up[{DEAD}]"]
    assert rec["tokens"] == 0 and rec["fallback"] and rec["fallback_reason"] == NO_TOKENS
    assert f"layers_0.w_up[{DEAD}]" in res.report.fallbacks
    got = res.weights[f"layers_0.w_up[{DEAD}]"]
    want = rtn_quantize(to_matrix(params["layers_0"]["w_up"][DEAD], (0,)), QC)
    assert bool(got.fallback)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    written = np.asarray(res.model["layers_0"]["w_up"][DEAD])  # (D, F), back in the stack
    np.testing.assert_allclose(written, np.asarray(want.dequantize()).T, rtol=1e-3, atol=1e-3)
    assert np.abs(written).max() > 0  # not zeroed as if every input were dead


def test_packed_logits_equal_dequantized_logits(quantized, tmp_path):
    _, forward, _, res = quantized
    held = jnp.asarray(_tokens(2, 16, seed=5))
    apply = lambda v, t: forward(v["params"], t)  # noqa: E731
    packed = pack(res.model, res, apply_fn=apply)
    assert set(packed.packed) == {f"layers_{i}.{w}" for i in range(LAYERS) for w in ("w_up", "w_down")}
    assert packed.packed["layers_0.w_up"].qweight.shape[0] == E
    deq = forward(res.model, held)
    np.testing.assert_allclose(np.asarray(packed(held)), np.asarray(deq), rtol=2e-4, atol=2e-5)
    save_packed(packed, tmp_path / "ckpt")
    again = load_packed(_params(seed=7), tmp_path / "ckpt", apply_fn=apply)
    np.testing.assert_array_equal(np.asarray(again(held)), np.asarray(packed(held)))


def test_rtn_quantizes_every_expert():
    res = gptq_jax.quantize(_params(), _tokens(), forward=_forward(_ragged_moe), quant_config=RULES, method="rtn")
    assert len(res.weights) == LAYERS * 2 * E
    want = rtn_quantize(to_matrix(_params()["layers_1"]["w_down"][2], (0,)), QC)
    np.testing.assert_array_equal(np.asarray(res.weights["layers_1.w_down[2]"].codes), np.asarray(want.codes))


def test_dense_slots_follow_the_calibration_mask():
    """A padding token routed like any other (the dense form's slots are the batch's tokens in order) does not
    count: the mask of a ``Calibration`` takes it out of its expert's Hessian and count."""
    tok = _tokens()
    mask = np.ones_like(tok)
    mask[:, -5:] = 0
    calib = Calibration(tok, mask)
    forward = _forward(_dense_moe)
    res = gptq_jax.quantize(_params(), calib, forward=lambda p, b: forward(p, b["tokens"]), quant_config=RULES)
    x = _params()["embed"][tok].reshape(-1, D)
    idx = np.asarray(_route(_params()["layers_0"], x)[0])[mask.reshape(-1) == 1]
    counts = np.bincount(idx, minlength=E)
    records = {r["name"]: r for r in res.report.weights}
    assert [records[f"layers_0.w_up[{e}]"]["tokens"] for e in range(E)] == list(counts)


def test_gptaq_and_a_resumed_run_quantize_the_experts(tmp_path):
    forward = _forward(_ragged_moe)
    res = gptq_jax.quantize(_params(), _tokens(), forward=forward, quant_config=RULES, method="gptaq")
    assert len(res.weights) == LAYERS * 2 * E  # experts solved with plain GPTQ (no cross term), the rest GPTAQ
    work = str(tmp_path / "w")
    first = gptq_jax.quantize(_params(), _tokens(), forward=forward, quant_config=RULES, work_dir=work)
    again = gptq_jax.quantize(_params(), _tokens(), forward=forward, quant_config=RULES, work_dir=work)
    assert again.report.resumed_layers == LAYERS
    for name, qw in first.weights.items():
        np.testing.assert_array_equal(np.asarray(again.weights[name].codes), np.asarray(qw.codes), err_msg=name)
    np.testing.assert_array_equal(np.asarray(again.model["layers_1"]["w_down"]),
                                  np.asarray(first.model["layers_1"]["w_down"]))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_gptq_matmul_vmapped_over_stacked_experts(impl):
    """What ``pack`` runs for the dense form: the matmul (the Pallas kernel in interpret mode here) batched over
    experts stacked by ``stack_packed``, one act-order expert beside plain ones, equals each expert on its own."""
    from gptq_jax.engine.experts import stack_packed
    from gptq_jax.engine.packed import packed_weight
    from pallas_kernels import gptq_matmul

    k, n = 128, 64
    ws = [jax.random.normal(jax.random.key(e), (n, k)) for e in range(3)]
    qc = QuantConfig(bits=4, group_size=32)
    qws = [rtn_quantize(w, qc) for w in ws[:2]]
    h = jnp.diag(jnp.linspace(0.5, 2.0, k))
    qws.append(gptq_jax.quantize_weight(ws[2], h, QuantConfig(bits=4, group_size=32, act_order=True)))
    stacked = stack_packed([packed_weight(q) for q in qws])
    x = jax.random.normal(jax.random.key(9), (3, 8, k))
    got = jax.vmap(lambda a, w: gptq_matmul(a, w, impl=impl, interpret=True))(x, stacked)
    for e, q in enumerate(qws):
        np.testing.assert_allclose(np.asarray(got[e]), np.asarray(x[e] @ packed_weight(q).dequantize()),
                                   rtol=1e-4, atol=1e-4)
