"""The model-agnostic engine on models it was not written for: einsum weights with one and two contracting axes,
a raw ``jnp.einsum`` on a parameter, a weight read by two matmuls, weights it cannot handle (reported), rules,
packed inference, Orbax, and a Linen model."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptq_jax
from gptq_jax import QuantConfig
from gptq_jax.core.hessian import accumulate_hessian, init_hessian
from gptq_jax.engine.packed import load_packed, pack, save_packed
from gptq_jax.engine.trace import to_matrix

D, N, H, F, V = 32, 4, 8, 64, 50
QC = QuantConfig(bits=4, group_size=16)


class Einsum(nnx.Module):
    """A projection kept as an einsum weight, as google-tunix writes them."""

    def __init__(self, spec: str, shape: tuple[int, ...], rngs: nnx.Rngs):
        self.spec = spec
        self.w = nnx.Param(0.2 * jax.random.normal(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.spec, x, self.w[...])


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = Einsum("btd,dnh->btnh", (D, N, H), rngs)  # one contracting axis, two free ones
        self.o = Einsum("btnh,nhd->btd", (N, H, D), rngs)  # two contracting axes
        self.up = nnx.Param(0.2 * jax.random.normal(rngs.params(), (D, F)))  # read by a raw jnp.einsum
        self.down = nnx.Linear(F, D, rngs=rngs)
        self.experts = nnx.Param(0.2 * jax.random.normal(rngs.params(), (2, D, D)))  # a stack of experts
        self.table = nnx.Param(jnp.arange(D * 2, dtype=jnp.int32).reshape(D, 2))  # integer parameter

    def __call__(self, h, scale):
        a = jnp.tanh(self.q(h))  # (B, T, N, H)
        h = h + self.o(a) * scale
        u = jax.nn.gelu(jnp.einsum("btd,df->btf", h, self.up[...]))  # (B, T, F)
        h = h + self.down(u)
        e = jnp.einsum("ebd,edf->ebf", jnp.stack([h[0], h[-1]]), self.experts[...])  # (2, T, D)
        return h + 0.01 * e.mean(0)[None] + 0.0 * self.table[...].sum()


class TinyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, tie: bool = False):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.shared = nnx.Param(0.2 * jax.random.normal(rngs.params(), (D, D)))  # read by two matmuls
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h, 0.5)
        h = jnp.tanh(h @ self.shared[...])
        h = h @ self.shared[...]
        return self.head(h)


def _tokens(n=8, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, V, (n, t)).astype(np.int32)


BLOCK_WEIGHTS = {f"blocks.{i}.{p}" for i in range(2)
                 for p in ("q.w", "o.w", "up", "down.kernel", "experts[0]", "experts[1]")}


def test_blocks_capture_every_matmul_weight_and_report_the_rest():
    model = TinyModel(nnx.Rngs(0))
    res = gptq_jax.quantize(model, _tokens(), quant_config=QC)
    assert res.report.mode == "blocks"
    assert set(res.weights) == BLOCK_WEIGHTS
    assert res.axes["blocks.0.o.w"] == (0, 1) and res.axes["blocks.0.q.w"] == (0,)
    assert res.weights["blocks.0.o.w"].shape == (D, N * H)
    assert res.weights["blocks.0.q.w"].shape == (N * H, D)
    reasons = {r["path"]: r["reason"] for r in res.report.unquantized}
    assert "blocks.0.experts" not in reasons and res.axes["blocks.0.experts[1]"] == (0,)
    assert "not a float" in reasons["blocks.1.table"]
    assert reasons["head.kernel"] == "outside the repeated blocks"
    # Each block's stages run in the order of its matmuls: q, o, up, down.
    order = [r["name"].split(".", 2)[2] for r in res.report.linears[:4]]
    assert order == ["q.w", "o.w", "up", "down.kernel"]


def test_one_shot_handles_a_weight_read_by_two_matmuls():
    model = TinyModel(nnx.Rngs(0))
    res = gptq_jax.quantize(model, _tokens(), quant_config=QC, blocks=False)
    assert res.report.mode == "one-shot"
    assert set(res.weights) == BLOCK_WEIGHTS | {"shared", "head.kernel"}
    reasons = {r["path"]: r["reason"] for r in res.report.unquantized}
    assert "'gather'" in reasons["embed.embedding"] or "not only as a matmul" in reasons["embed.embedding"]


def test_hessian_of_a_two_axis_einsum_weight_is_over_both_axes():
    """One-shot GPTQ of the o weight [N, H, D] equals quantize_weight on the Hessian of its input reshaped to
    [tokens, N*H] (computed here by hand from the float model)."""
    model = TinyModel(nnx.Rngs(1))
    tok = _tokens()
    block = model.blocks[0]
    h0 = model.embed(jnp.asarray(tok))
    a = jnp.tanh(block.q(h0))  # the o weight's input in block 0, (B, T, N, H)
    hess, n = init_hessian(N * H)
    hess, n = accumulate_hessian(hess, n, a.reshape(-1, N * H))
    want = gptq_jax.quantize_weight(to_matrix(block.o.w[...], (0, 1)), hess, QC)
    res = gptq_jax.quantize(model, tok, quant_config=QC, blocks=False, batch_size=8)
    got = res.weights["blocks.0.o.w"]
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)


def test_gptq_beats_rtn_and_packed_equals_dequantized(tmp_path):
    tok, held = _tokens(16, 12, 0), jnp.asarray(_tokens(4, 12, 9))
    ref = TinyModel(nnx.Rngs(0))(held)
    g = TinyModel(nnx.Rngs(0))
    res = gptq_jax.quantize(g, tok, quant_config=QuantConfig(bits=3, group_size=16))
    r = TinyModel(nnx.Rngs(0))
    gptq_jax.quantize(r, tok, quant_config=QuantConfig(bits=3, group_size=16), method="rtn")
    err = lambda m: float(jnp.mean((m(held) - ref) ** 2))  # noqa: E731
    assert err(g) < err(r)
    packed = pack(g, res)
    np.testing.assert_allclose(np.asarray(packed(held)), np.asarray(g(held)), rtol=2e-4, atol=2e-5)
    assert packed.nbytes() < sum(x.nbytes for x in jax.tree.leaves(nnx.state(g, nnx.Param)))
    save_packed(packed, tmp_path / "ckpt")
    again = load_packed(TinyModel(nnx.Rngs(5)), tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(again(held)), np.asarray(packed(held)))


def test_rules_keep_weights_float_and_vary_bits():
    model = TinyModel(nnx.Rngs(0))
    before = np.asarray(model.blocks[1].up[...]).copy()
    rules = [(r"blocks\.1\.up$", None), (r"\.o\.w$", QuantConfig(bits=8, group_size=-1)), (r"blocks", QC)]
    res = gptq_jax.quantize(model, _tokens(), quant_config=rules)
    assert "blocks.1.up" not in res.weights and "blocks.0.up" in res.weights
    np.testing.assert_array_equal(np.asarray(model.blocks[1].up[...]), before)
    assert res.weights["blocks.1.o.w"].bits == 8 and res.weights["blocks.1.q.w"].bits == 4


def test_forward_with_extra_arguments_and_bad_inputs(tmp_path):
    model = TinyModel(nnx.Rngs(0))
    batches = [{"ids": jnp.asarray(_tokens(2, 12, s))} for s in range(3)]
    res = gptq_jax.quantize(model, batches, forward=lambda m, b: m(b["ids"]), quant_config=QC)
    assert set(res.weights) == BLOCK_WEIGHTS
    with pytest.raises(ValueError, match="forward failed on calibration batch 0: KeyError"):
        gptq_jax.quantize(TinyModel(nnx.Rngs(0)), batches, forward=lambda m, b: m(b["tokens"]), quant_config=QC)
    no_match = r"blocks='layers\.\*' matches no parameter subtree; parameter paths: .*blocks\.\*"
    with pytest.raises(ValueError, match=no_match):
        gptq_jax.quantize(TinyModel(nnx.Rngs(0)), _tokens(), blocks="layers.*", quant_config=QC)
    with pytest.raises(ValueError, match="calibration is an empty iterable"):
        gptq_jax.quantize(TinyModel(nnx.Rngs(0)), [], quant_config=QC)
    for flag in ("donate", "true_sequential"):
        with pytest.raises(TypeError, match=f"{flag}='False' must be True or False"):
            gptq_jax.quantize(TinyModel(nnx.Rngs(0)), _tokens(), quant_config=QC, **{flag: "False"})
    with pytest.raises(TypeError, match="progress='yes' must be True, False or a function"):
        gptq_jax.quantize(TinyModel(nnx.Rngs(0)), _tokens(), quant_config=QC, progress="yes")
    work = tmp_path / "work"
    with pytest.raises(ValueError):
        gptq_jax.quantize(TinyModel(nnx.Rngs(0)), np.zeros((2, 3, 4), np.int32), work_dir=str(work))
    assert not work.exists()


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, tokens):
        h = linen.Embed(V, D)(tokens)
        for i in range(2):
            x = linen.LayerNorm()(h)
            w = self.param(f"wqk_{i}", linen.initializers.normal(0.2), (D, 2, D))  # a stacked weight, einsum
            qk = jnp.einsum("btd,dsk->btsk", x, w)
            h = h + jnp.tanh(qk[:, :, 0]) * qk[:, :, 1]
            h = h + linen.Dense(D)(jax.nn.relu(linen.Dense(F)(h)))
        return linen.Dense(V)(h)


def test_linen_model_one_shot_and_packed_apply():
    net = LinenNet()
    tok = jnp.asarray(_tokens())
    params = net.init(jax.random.key(0), tok)["params"]
    res = gptq_jax.quantize(params, _tokens(), apply_fn=net.apply, quant_config=QC)
    assert res.report.mode == "one-shot"
    assert "wqk_0" in res.weights and res.axes["wqk_0"] == (0,)
    assert {r["path"] for r in res.report.unquantized} >= {"Embed_0.embedding"}
    new_params = res.model
    deq = net.apply({"params": new_params}, tok)
    packed = pack(new_params, res, apply_fn=net.apply)
    np.testing.assert_allclose(np.asarray(packed(tok)), np.asarray(deq), rtol=2e-4, atol=2e-5)
