"""Sequential GPTQ of models that scan over their layers: Linen ``nn.scan``, NNX layers made by ``nnx.vmap`` and run
by ``nnx.scan``, and a hand-written ``lax.scan`` over a stacked parameter pytree. Each iteration is a block:
slice i of every stacked weight gets its own Hessian from iteration i's inputs, the layers are quantized one after
another, and the results go back into the stacked arrays. The oracles: ``quantize_weight`` on Hessians computed by
hand, the same model unrolled (the same codes), and the dequantized model's logits for the packed one."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import gptq_jax
from gptq_jax import QuantConfig, Rule, quantize_weight
from gptq_jax.core.hessian import accumulate_hessian, init_hessian

H, KV, HD = 4, 2, 8  # query heads, key/value heads (grouped-query attention), head width
D, F, V, T, LAYERS = H * HD, 48, 40, 8, 3
QC = QuantConfig(bits=4, group_size=16)
OUT = {"q": H * HD, "k": KV * HD, "v": KV * HD, "o": D, "gate": F, "up": F, "down": D}
PROJ = tuple(OUT)


def _attend(q, k, v, positions):
    """Causal grouped-query attention: q (B, T, H*HD), k/v (B, T, KV*HD) -> (B, T, H*HD)."""
    b, t, _ = q.shape
    q = q.reshape(b, t, H, HD) * jnp.cos(positions[..., None, None] / 10.0)  # needs positions, as rotary does
    k, v = (jnp.repeat(a.reshape(b, t, KV, HD), H // KV, axis=2) for a in (k, v))
    att = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HD)
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, H * HD)


def _layer(lin, norm, h, positions, seen=None):
    """A Llama-like layer written once for the three model kinds: ``lin(name, x)`` a projection, ``norm(name, x)``
    an RMS norm. ``seen`` records the inputs of q (first stage) and down (last stage)."""
    x = norm("norm1", h)
    h = h + lin("o", _attend(lin("q", x), lin("k", x), lin("v", x), positions))
    g = norm("norm2", h)
    g = jax.nn.silu(lin("gate", g)) * lin("up", g)
    if seen is not None:
        seen.setdefault("q", []).append(x)
        seen.setdefault("down", []).append(g)
    return h + lin("down", g)


def _batches(n=3, rows=2):
    rng = np.random.default_rng(0)
    pos = jnp.broadcast_to(jnp.arange(T), (rows, T))
    return [{"tokens": jnp.asarray(rng.integers(0, V, (rows, T))), "positions": pos} for _ in range(n)]


def _hessian(xs):
    h, n = init_hessian(xs[0].shape[-1])
    for x in xs:
        h, n = accumulate_hessian(h, n, x.reshape(-1, x.shape[-1]))
    return h


def _codes(qw):
    return np.asarray(qw.codes)


# ----------------------------------------------------------------------------------------------------------------------
# The three model kinds, each scanned and unrolled


class LinenLayer(linen.Module):
    @linen.compact
    def __call__(self, h, positions, seen=None):
        def lin(name, x):
            return linen.Dense(OUT[name], use_bias=False, name=name)(x)

        def norm(name, x):
            return linen.RMSNorm(name=name)(x)

        return _layer(lin, norm, h, positions, seen), None


class LinenNet(linen.Module):
    layers: int = LAYERS
    scanned: bool = True

    @linen.compact
    def __call__(self, tokens, positions):
        h = linen.Embed(V, D, name="embed")(tokens)
        if self.scanned:
            stack = linen.scan(LinenLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                               in_axes=linen.broadcast, length=self.layers)
            h, _ = stack(name="layers")(h, positions)
        else:
            for i in range(self.layers):
                h, _ = LinenLayer(name=f"layers_{i}")(h, positions)
        return linen.Dense(V, use_bias=False, name="lm_head")(linen.RMSNorm(name="norm")(h))


class NNXLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        for name, n in OUT.items():
            setattr(self, name, nnx.Linear(F if name == "down" else D, n, use_bias=False, rngs=rngs))
        self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, h, positions, seen=None):
        return _layer(lambda n, x: getattr(self, n)(x), lambda n, x: getattr(self, n)(x), h, positions, seen)


class NNXNet(nnx.Module):
    def __init__(self, layers: int = LAYERS, scanned: bool = True, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.scanned = scanned
        self.embed = nnx.Embed(V, D, rngs=rngs)
        if scanned:
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(key):
                return NNXLayer(nnx.Rngs(key))

            self.layers = make(jax.random.split(rngs.params(), layers))
        else:
            self.layers = nnx.List([NNXLayer(rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions):
        h = self.embed(tokens)
        if self.scanned:
            @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
            def step(layer, h, positions):
                return layer(h, positions)

            h = step(self.layers, h, positions)
        else:
            for layer in self.layers:
                h = layer(h, positions)
        return self.lm_head(self.norm(h))


def _rms(x, scale):
    x32 = x.astype(jnp.float32)
    return x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * scale


def hand_layer(p, h, positions, seen=None):
    return _layer(lambda n, x: x @ p[n], lambda n, x: _rms(x, p[n]), h, positions, seen)


def hand_params(layers=LAYERS, seed=1):
    k = iter(jax.random.split(jax.random.key(seed), 16))
    stack = {n: jax.random.normal(next(k), (layers, F if n == "down" else D, o)) * 0.2 for n, o in OUT.items()}
    stack.update(norm1=jnp.ones((layers, D)), norm2=jnp.ones((layers, D)))
    return {"embed": jax.random.normal(next(k), (V, D)), "head": jax.random.normal(next(k), (D, V)) * 0.2,
            "layers": stack}


def hand_scanned(p, b):
    h = p["embed"][b["tokens"]]  # (B, T, D)
    h, _ = lax.scan(lambda h, lp: (hand_layer(lp, h, b["positions"]), None), h, p["layers"])
    return h @ p["head"]


def hand_unrolled(p, b):
    h = p["embed"][b["tokens"]]
    for i in range(len(p["layers"])):
        h = hand_layer(p["layers"][str(i)], h, b["positions"])
    return h @ p["head"]


def _slice(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# ----------------------------------------------------------------------------------------------------------------------
# Per model kind: quantize it scanned, its layer slices, the hand-computed inputs of one layer


def _sequential_checks(res, float_kernel, quant_layer, embed, batches, name):
    """Layer 1's q and down: the codes equal ``quantize_weight`` on Hessians from the inputs layer 1 gets after the
    quantized layer 0, and (down) after layer 1's own quantized q..up: sequential across and inside blocks."""
    seen, seen0 = {}, {}
    for b in batches:
        h = quant_layer(0, embed(b["tokens"]), b["positions"], seen0)
        quant_layer(1, h, b["positions"], seen)
    for proj in ("q", "down"):
        want = quantize_weight(float_kernel(proj, 1).T, _hessian(seen[proj]), QC)
        np.testing.assert_array_equal(_codes(res.weights[name(proj, 1)]), _codes(want))
    # Each slice has its own Hessian: layer 0's would give layer 1 other codes.
    other = quantize_weight(float_kernel("down", 1).T, _hessian(seen0["down"]), QC)
    assert not np.array_equal(_codes(res.weights[name("down", 1)]), _codes(other))


def _same_codes(res, name, res_u, name_u):
    for i in range(LAYERS):
        for p in PROJ:
            np.testing.assert_array_equal(_codes(res.weights[name(p, i)]), _codes(res_u.weights[name_u(p, i)]))


def _every_projection(res, name):
    assert res.report.mode == "blocks"
    assert sorted(res.weights) == sorted(name(p, i) for i in range(LAYERS) for p in PROJ)


@pytest.mark.slow
def test_linen_nn_scan_is_quantized_layer_by_layer():
    net, batches = LinenNet(), _batches()
    params = net.init(jax.random.key(0), batches[0]["tokens"], batches[0]["positions"])["params"]
    fwd = lambda p, b: net.apply({"params": p}, b["tokens"], b["positions"])  # noqa: E731
    res = gptq_jax.quantize(params, batches, forward=fwd, quant_config=QC)
    name = lambda p, i: f"layers.{p}.kernel[{i}]"  # noqa: E731
    _every_projection(res, name)
    assert [r["path"] for r in res.report.blocks] == [f"layers[{i}]" for i in range(LAYERS)]
    assert {r["path"] for r in res.report.unquantized} == {"embed.embedding", "lm_head.kernel"}
    assert jax.tree.map(jnp.shape, res.model) == jax.tree.map(jnp.shape, params)
    new = res.model

    def quant_layer(i, h, positions, seen):
        return LinenLayer().apply({"params": _slice(new["layers"], i)}, h, positions, seen)[0]

    _sequential_checks(res, lambda p, i: params["layers"][p]["kernel"][i], quant_layer,
                       lambda t: new["embed"]["embedding"][t], batches, name)
    # The stacked arrays hold each slice's dequantized weight; the rest is unchanged.
    np.testing.assert_allclose(np.asarray(new["layers"]["up"]["kernel"][2]).T,
                               np.asarray(res.weights[name("up", 2)].dequantize()), rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(new["layers"]["norm1"]["scale"]),
                                  np.asarray(params["layers"]["norm1"]["scale"]))
    # The same model unrolled (layers_0 .. layers_2) gets the same codes.
    unrolled = {"embed": params["embed"], "norm": params["norm"], "lm_head": params["lm_head"],
                **{f"layers_{i}": _slice(params["layers"], i) for i in range(LAYERS)}}
    net_u = LinenNet(scanned=False)
    res_u = gptq_jax.quantize(unrolled, batches, quant_config=QC,
                              forward=lambda p, b: net_u.apply({"params": p}, b["tokens"], b["positions"]))
    _same_codes(res, name, res_u, lambda p, i: f"layers_{i}.{p}.kernel")
    # Packed: the scan kept, its matmuls on packed weights stacked on the layer axis; logits = dequantized logits.
    packed = gptq_jax.pack(new, res, apply_fn=net.apply)
    b = batches[0]
    got, want = packed(b["tokens"], b["positions"]), fwd(new, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(want), np.asarray(fwd(params, b)), atol=1e-3)  # quantization changed them


def _nnx_params(model):
    return nnx.state(model, nnx.Param).to_pure_dict()


@pytest.mark.slow
def test_nnx_vmap_stacked_layers_run_by_nnx_scan_are_quantized_layer_by_layer():
    batches = _batches()
    model = NNXNet()
    float_params = _nnx_params(model)
    fwd = lambda m, b: m(b["tokens"], b["positions"])  # noqa: E731
    res = gptq_jax.quantize(model, batches, forward=fwd, quant_config=QC)
    name = lambda p, i: f"layers.{p}.kernel[{i}]"  # noqa: E731
    _every_projection(res, name)
    assert res.model is model  # changed in place, still scanned
    new = _nnx_params(model)
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, float_params)
    layer_def, _ = nnx.split(NNXLayer(nnx.Rngs(0)), nnx.Param)

    def quant_layer(i, h, positions, seen):
        layer = nnx.merge(layer_def, jax.tree.map(lambda a: a[i], nnx.state(model.layers, nnx.Param)))
        return layer(h, positions, seen)

    _sequential_checks(res, lambda p, i: float_params["layers"][p]["kernel"][i], quant_layer,
                       lambda t: new["embed"]["embedding"][t], batches, name)
    # The same model unrolled (an nnx.List of the same layers) gets the same codes.
    unrolled = NNXNet(scanned=False)
    state = nnx.state(unrolled, nnx.Param)
    pure = dict(float_params, layers={i: _slice(float_params["layers"], i) for i in range(LAYERS)})
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(unrolled, state)
    res_u = gptq_jax.quantize(unrolled, batches, forward=fwd, quant_config=QC)
    _same_codes(res, name, res_u, lambda p, i: f"layers.{i}.{p}.kernel")
    packed = gptq_jax.pack(model, res)
    b = batches[0]
    np.testing.assert_allclose(np.asarray(packed(b["tokens"], b["positions"])), np.asarray(fwd(model, b)),
                               rtol=1e-4, atol=1e-4)


def test_a_hand_written_lax_scan_over_stacked_params_is_quantized_layer_by_layer():
    batches = _batches()
    params = hand_params()
    res = gptq_jax.quantize(params, batches, forward=hand_scanned, quant_config=QC, blocks="layers")
    name = lambda p, i: f"layers.{p}[{i}]"  # noqa: E731
    _every_projection(res, name)
    new = res.model
    _sequential_checks(res, lambda p, i: params["layers"][p][i],
                       lambda i, h, pos, seen: hand_layer(_slice(new["layers"], i), h, pos, seen),
                       lambda t: new["embed"][t], batches, name)
    unrolled = dict(params, layers={str(i): _slice(params["layers"], i) for i in range(LAYERS)})
    res_u = gptq_jax.quantize(unrolled, batches, forward=hand_unrolled, quant_config=QC)
    _same_codes(res, name, res_u, lambda p, i: f"layers.{i}.{p}")
    packed = gptq_jax.pack(new, res, forward=hand_scanned)
    np.testing.assert_allclose(np.asarray(packed(batches[0])), np.asarray(hand_scanned(new, batches[0])),
                               rtol=1e-4, atol=1e-4)


def test_donate_lets_go_of_the_callers_float_weights_and_gives_the_same_model():
    """Without ``donate`` the caller's parameters stay as they were; with it each replaced float weight is given up
    (a stack written in place, an unscanned leaf deleted), so the run holds one copy of the layers, and the result
    is the same. Leaves the run does not replace (embedding, norms) stay the caller's."""
    batches = _batches(n=1)
    unrolled = lambda p: dict(p, layers={str(i): _slice(p["layers"], i) for i in range(LAYERS)})  # noqa: E731
    for make, fwd, block in ((hand_params, hand_scanned, lambda t: t["layers"]),
                             (lambda: unrolled(hand_params()), hand_unrolled, lambda t: t["layers"]["1"])):
        kept, given = make(), make()
        res = gptq_jax.quantize(kept, batches, forward=fwd, quant_config=QC)
        res_d = gptq_jax.quantize(given, batches, forward=fwd, quant_config=QC, donate=True)
        assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
        np.testing.assert_array_equal(np.asarray(block(kept)["q"]), np.asarray(block(make())["q"]))
        assert all(block(given)[p].is_deleted() for p in PROJ)
        assert not any(x.is_deleted() for x in (given["embed"], given["head"], block(given)["norm1"]))
        for x, y in zip(jax.tree.leaves(res.model), jax.tree.leaves(res_d.model), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------------------------------
# Blocks, rules, order, and what cannot be handled


def _with_layer_ids(p, b):  # another scanned-over operand beside the stacked parameters
    h = p["embed"][b["tokens"]]
    body = lambda h, xs: (hand_layer(xs[0], h, b["positions"]) * (1.0 + 0.01 * xs[1]), None)  # noqa: E731
    h, _ = lax.scan(body, h, (p["layers"], jnp.arange(len(p["layers"]["q"]), dtype=jnp.float32)))
    return h @ p["head"]


def _with_per_layer_outputs(p, b):  # the scan's body also returns something per layer (ys)
    h = p["embed"][b["tokens"]]
    body = lambda h, lp: (hand_layer(lp, h, b["positions"]), jnp.mean(h))  # noqa: E731
    h, means = lax.scan(body, h, p["layers"])
    return h @ p["head"] + 0.01 * jnp.sum(means)


@pytest.mark.parametrize("forward", [hand_scanned, _with_layer_ids, _with_per_layer_outputs])
def test_the_iterations_share_their_plans_whatever_the_depth(monkeypatch, forward):
    """The unrolled iterations are one program on the same shapes, so they share one plan (a few blocks have their
    own: the last, which runs on to the outputs; with other scanned-over operands, the one before it, whose slicing
    counter dies there): the number of plans, and so the compile time, does not grow with depth."""
    import gptq_jax.engine.job as job_mod

    real = job_mod.make_plan
    counts = []
    for layers in (4, 7):
        calls = []
        monkeypatch.setattr(job_mod, "make_plan", lambda *a, calls=calls, **k: calls.append(1) or real(*a, **k))
        res = gptq_jax.quantize(hand_params(layers=layers), _batches(n=1), forward=forward, quant_config=QC,
                                method="rtn")
        assert [r["path"] for r in res.report.blocks] == [f"layers[{i}]" for i in range(layers)]
        counts.append(len(calls))
    assert counts[0] == counts[1] <= 4


@pytest.mark.parametrize("blocks", ["layers", "layers.*", "layers[*]"])
def test_blocks_names_the_scanned_stack(blocks):
    res = gptq_jax.quantize(hand_params(), _batches(n=1), forward=hand_scanned, quant_config=QC, blocks=blocks,
                            method="rtn")
    assert res.report.mode == "blocks" and len(res.weights) == LAYERS * len(PROJ)


@pytest.mark.parametrize("blocks", ["layers", "layers.*"])
def test_nnx_blocks_pattern_names_the_stacked_module(blocks):
    res = gptq_jax.quantize(NNXNet(), _batches(n=1), forward=lambda m, b: m(b["tokens"], b["positions"]),
                            quant_config=QC, blocks=blocks, method="rtn")
    assert [r["path"] for r in res.report.blocks] == [f"layers[{i}]" for i in range(LAYERS)]


def test_rules_on_the_stacked_path_cover_every_slice_and_one_slice_can_be_named():
    rules = [Rule(r"layers\.down", None), Rule(r"layers\.up\[0\]", None), Rule(".*", QC)]
    res = gptq_jax.quantize(hand_params(), _batches(n=1), forward=hand_scanned, quant_config=rules)
    assert not any(n.startswith("layers.down") for n in res.weights)
    assert "layers.up[0]" not in res.weights and "layers.up[1]" in res.weights
    float_kept = {r["path"] for r in res.report.unquantized if r["reason"] == "kept in float by quant_config"}
    assert {"layers.down[0]", "layers.down[2]", "layers.up[0]"} <= float_kept
    with pytest.raises(ValueError, match=r"layers\.up: stacked on 3 layers but slices \[0\] were not quantized"):
        gptq_jax.pack(res.model, res, forward=hand_scanned)


def test_a_reversed_scan_runs_its_blocks_last_layer_first():
    def backwards(p, b):
        h = p["embed"][b["tokens"]]
        h, _ = lax.scan(lambda h, lp: (hand_layer(lp, h, b["positions"]), None), h, p["layers"], reverse=True)
        return h @ p["head"]


    params, batches = hand_params(), _batches(n=2)
    res = gptq_jax.quantize(params, batches, forward=backwards, quant_config=QC)
    assert [r["path"] for r in res.report.blocks] == ["layers[2]", "layers[1]", "layers[0]"]
    last = LAYERS - 1
    unrolled = dict(params, layers={str(last - i): _slice(params["layers"], i) for i in range(LAYERS)})
    res_u = gptq_jax.quantize(unrolled, batches, forward=hand_unrolled, quant_config=QC)
    _same_codes(res, lambda p, i: f"layers.{p}[{i}]", res_u, lambda p, i: f"layers.{last - i}.{p}")


def test_one_shot_quantizes_every_slice_too():
    res = gptq_jax.quantize(hand_params(), _batches(n=1), forward=hand_scanned, quant_config=QC, blocks=False)
    assert res.report.mode == "one-shot"
    assert sorted(res.weights) == sorted([f"layers.{p}[{i}]" for i in range(LAYERS) for p in PROJ] + ["head"])


def _reason(res, path):
    return next(r["reason"] for r in res.report.unquantized if r["path"] == path)


def test_scans_that_are_not_stacks_of_layers_are_reported_by_path_and_reason():
    k = jax.random.split(jax.random.key(3), 3)
    params = {"w": jax.random.normal(k[0], (D, D)) * 0.2, "u": jax.random.normal(k[1], (D, D)) * 0.2,
              "head": jax.random.normal(k[2], (D, V))}

    def recurrent(p, x):  # (B, T, D): a scan over time steps, weights as its body's constants
        h, _ = lax.scan(lambda h, xt: (jnp.tanh(h @ p["w"] + xt), None), jnp.zeros_like(x[:, 0]), x.swapaxes(0, 1))
        u, _ = lax.scan(lambda u, xt: (u * 0.9, None), p["u"], x.swapaxes(0, 1))  # a parameter as carried state
        return (h @ u) @ p["head"]

    x = np.random.default_rng(0).normal(size=(1, 2, T, D)).astype(np.float32)
    res = gptq_jax.quantize(params, list(x), forward=recurrent, quant_config=QC)
    assert "constant of its body" in _reason(res, "w")
    assert "carried state" in _reason(res, "u")
    assert list(res.weights) == ["head"]


def test_a_stacked_parameter_also_read_outside_its_scan_is_named():
    def leaky(p, b):  # reads the whole stack outside the scan too
        return hand_scanned(p, b) + jnp.sum(p["layers"]["q"])

    with pytest.raises(ValueError, match=r"layers\.q: stacked on a leading layer axis and scanned over, but also "
                                         r"read by 'reduce_sum' outside the scan"):
        gptq_jax.quantize(hand_params(), _batches(n=1), forward=leaky, quant_config=QC, blocks="layers")
    res = gptq_jax.quantize(hand_params(), _batches(n=1), forward=leaky, quant_config=QC)  # found alone: reported
    assert "scanned over on a leading axis of 3 layers" in _reason(res, "layers.up")


def test_a_scanned_run_resumes_from_its_work_dir(tmp_path):
    params, batches = hand_params(), _batches(n=1)
    first = gptq_jax.quantize(params, batches, forward=hand_scanned, quant_config=QC, work_dir=str(tmp_path))
    again = gptq_jax.quantize(params, batches, forward=hand_scanned, quant_config=QC, work_dir=str(tmp_path))
    assert again.report.resumed_layers == LAYERS
    _same_codes(first, lambda p, i: f"layers.{p}[{i}]", again, lambda p, i: f"layers.{p}[{i}]")
    np.testing.assert_array_equal(np.asarray(first.model["layers"]["down"]), np.asarray(again.model["layers"]["down"]))


def _reversed_with_outputs(p, b):
    h = p["embed"][b["tokens"]]
    body = lambda h, xs: (hand_layer(xs[0], h, b["positions"]) * (1.0 + 0.01 * xs[1]), jnp.mean(h) * xs[1])  # noqa: E731
    h, ys = lax.scan(body, h, (p["layers"], jnp.arange(len(p["layers"]["q"]), dtype=jnp.float32)), reverse=True)
    return h @ p["head"] + jnp.dot(ys, jnp.arange(1.0, len(ys) + 1))  # the order of ys matters


@pytest.mark.parametrize("forward", [hand_scanned, _with_layer_ids, _with_per_layer_outputs, _reversed_with_outputs])
def test_the_unrolled_model_computes_what_the_scanned_one_does(forward):
    from gptq_jax.engine.scanned import find_scans, unroll
    from gptq_jax.engine.subject import Params
    from gptq_jax.engine.trace import trace

    params, b = Params.of(hand_params()), _batches(n=1)[0]
    view = unroll(params, forward, find_scans(trace(forward, params.leaves, params.tree, b), params.paths))
    assert view.params.paths.count("layers.q[2]") == 1
    leaves = [view.take(k) for k in range(len(view.params.leaves))]
    np.testing.assert_allclose(np.asarray(view.forward(leaves, b)),
                               np.asarray(forward(params.unflatten(), b)), rtol=1e-5, atol=1e-5)
    for k, x in enumerate(leaves):  # written back: the first write into a stack copies it, the later ones do not
        if view.stacked(k):
            view.put(k, x)
    restacked = view.restack(leaves)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(restacked, params.leaves, strict=True))
    assert not any(x.is_deleted() for x in params.leaves)  # the caller's stacks are its own


def test_streaming_a_scanned_stack_is_refused_with_the_reason(tmp_path):
    """``load=`` loads a block's own parameters when it opens; a scanned stack is one parameter for all its layers,
    so it cannot be streamed: one line says so before any calibration pass."""
    params = hand_params()
    abstract = jax.eval_shape(lambda: params)

    def load(paths):
        raise AssertionError("nothing is loaded for a model that cannot stream")

    with pytest.raises(ValueError, match="load= needs a model with repeated blocks of their own parameters "
                                         r"\(found a scanned stack"):
        gptq_jax.quantize(abstract, _batches(n=1), forward=hand_scanned, quant_config=QC, load=load,
                          work_dir=str(tmp_path / "w"))
