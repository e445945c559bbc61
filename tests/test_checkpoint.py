"""Quantized inference and GPTQ checkpoints: ours round-trip bit-exactly, foreign (AutoGPTQ-era) ones load."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers_models import tiny_config
from safetensors.numpy import load_file, save_file

from gptq_jax import QuantConfig, quantize
from gptq_jax.engine.packed import load_packed, pack, save_packed
from gptq_jax.io.checkpoint import load_quantized, read_quantization_config, save_quantized
from gptq_jax.models import LlamaForCausalLM, ModelConfig
from gptq_jax.models.llama import make_forward
from gptq_jax.models.params import save_pretrained
from gptq_jax.models.qlinear import QuantLinear, pack_model, quantized_linears
from pallas_kernels.packing import checkpoint_arrays

# ---------------------------------------------------------------------------------------------------------------------
# Quantized models and checkpoints


def _quantized_model(arch="llama_bias", qc=QuantConfig(bits=4, group_size=32), seed=0, method="rtn"):  # noqa: B008
    """A tiny model, quantized and packed. RTN where only the packing matters (compiles in a fraction of GPTQ's
    time); GPTQ where act-order must produce a non-monotone g_idx."""
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(tiny_config(arch)), rngs=nnx.Rngs(seed))
    tok = np.random.default_rng(seed).integers(0, 128, (6, 24))
    res = quantize(model, tok, quant_config=qc, method=method)
    fake = np.asarray(make_forward(model)(tok)[0])
    pack_model(model, res.weights)
    return model, tok, fake


CASES = [
    ("llama_bias", QuantConfig(bits=4, group_size=32), "rtn"),
    ("llama_tied", QuantConfig(bits=4, group_size=-1, act_order=True), "gptq"),
    ("qwen2", QuantConfig(bits=3, group_size=32, sym=False, act_order=True), "gptq"),
    ("llama", QuantConfig(bits=8, group_size=32, sym=False), "rtn"),
    ("llama", QuantConfig(bits=2, group_size=32, sym=True), "rtn"),
    # Group-aware order; group 24: K = 64 has a partial last group, K = 96 none.
    ("llama", QuantConfig(bits=4, group_size=24, act_group_aware=True), "gptq"),
]


@pytest.mark.parametrize("arch,qc,method", CASES)
def test_save_load_gives_identical_logits(tmp_path, arch, qc, method):
    model, tok, fake = _quantized_model(arch, qc, method=method)
    if qc.act_order and qc.group_size != -1:  # per-channel act-order has one group: g_idx stays monotone
        assert any(lin.packed.perm is not None for lin in quantized_linears(model).values())
    if qc.act_group_aware:  # whole groups move: no permutation to carry, g_idx k // g
        for lin in quantized_linears(model).values():
            assert lin.packed.perm is None
            g_idx = checkpoint_arrays(lin.packed)[3]
            np.testing.assert_array_equal(g_idx, np.arange(g_idx.size) // qc.group_size)
    assert len(quantized_linears(model)) == 14
    packed = np.asarray(make_forward(model)(tok)[0])
    # Packed inference computes what calibration saw (dequantized weights with float16 scales).
    np.testing.assert_allclose(packed, fake, rtol=1e-5, atol=1e-5)
    out = save_quantized(model, tmp_path / "q", quant_config=qc)
    qconf = read_quantization_config(out)
    assert qconf["checkpoint_format"] == ("gptq" if qc.sym else "gptq_v2")
    assert qconf["desc_act"] == qc.act_order and qconf["bits"] == qc.bits
    assert qconf["act_group_aware"] == qc.act_group_aware
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == np.int32
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == np.float16
    loaded, _ = load_quantized(out)
    np.testing.assert_array_equal(np.asarray(make_forward(loaded)(tok)[0]), packed)
    # Our packer's tensors are read back bit-exactly.
    for name, lin in quantized_linears(loaded).items():
        mine = quantized_linears(model)[name]
        for a, b in zip(checkpoint_arrays(lin.packed), checkpoint_arrays(mine.packed), strict=True):
            np.testing.assert_array_equal(a, b)


def _torch_unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The packing of docs/checkpoints.md read as a little-endian bit stream along ``dim``: code i starts at bit
    ``bits * i`` of the concatenated 32-bit words (for 3 bits it straddles words at codes 10 and 21). Written here
    with torch from the format's facts alone, as a PyTorch-side reader would, sharing no code with
    ``pallas_kernels``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        return _torch_unpack(w.T, bits, 0).T
    n = w.shape[0] * 32 // bits
    pos = torch.arange(n) * bits
    word, off = pos // 32, (pos % 32)[:, None]
    nxt = torch.clamp(word + 1, max=w.shape[0] - 1)
    val = (w[word] >> off) | torch.where(off + bits > 32, w[nxt] << (32 - off), torch.zeros_like(w[word]))
    return val & ((1 << bits) - 1)


@pytest.mark.parametrize("arch,qc,method", CASES)
def test_transformers_computes_our_checkpoint(tmp_path, arch, qc, method):
    """The PyTorch side reads what we write: a torch reader built from docs/checkpoints.md dequantizes our safetensors
    into transformers' own model class, which then gives our quantized model's logits."""
    from helpers_models import build_torch_model

    model, tok, _ = _quantized_model(arch, qc, method=method)
    out = save_quantized(model, tmp_path / "q", quant_config=qc)
    conf = json.loads(open(os.path.join(out, "config.json")).read())
    qconf = conf.pop("quantization_config")
    v1 = qconf.get("checkpoint_format", "gptq") == "gptq"
    tensors = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    state = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            q = _torch_unpack(t, qconf["bits"], 0)  # (K, N)
            z = _torch_unpack(tensors[name + ".qzeros"], qconf["bits"], 1) + (1 if v1 else 0)  # (G, N)
            g_idx = tensors[name + ".g_idx"].long()
            w = tensors[name + ".scales"].float()[g_idx] * (q - z[g_idx]).float()  # (K, N)
            state[name + ".weight"] = w.T.contiguous()  # torch Linear: (N, K)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = t.float()
    ref = build_torch_model(conf)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and conf.get("tie_word_embeddings", False) == bool(missing)
    with torch.no_grad():
        theirs = ref(torch.tensor(tok)).logits.numpy()
    loaded, _ = load_quantized(out)
    ours = np.asarray(make_forward(loaded)(tok)[0])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max()))


def test_symmetric_v1_zeros_are_seven(tmp_path):
    model, _, _ = _quantized_model("llama", QuantConfig(bits=4, group_size=32))
    out = save_quantized(model, tmp_path / "q", quant_config=QuantConfig(bits=4, group_size=32))
    qz = load_file(os.path.join(out, "model.safetensors"))["model.layers.1.mlp.up_proj.qzeros"]
    assert np.all(qz.view(np.uint32) == 0x77777777)  # docs/checkpoints.md: stored nibble is always 7


def test_orbax_round_trip(tmp_path):
    """A model with QuantLinear layers (biases included) saved with Orbax comes back onto a float model of the same
    shape, as QuantLinear layers (modules=True) or as a PackedModel: both give the logits it gave."""
    model, tok, _ = _quantized_model()
    want = np.asarray(make_forward(model)(tok)[0])
    save_packed(model, tmp_path / "orbax")
    float_like = lambda: LlamaForCausalLM(ModelConfig.from_hf_dict(tiny_config("llama_bias")), rngs=nnx.Rngs(1))  # noqa: E731
    restored = load_packed(float_like(), tmp_path / "orbax", modules=True)
    assert len(quantized_linears(restored)) == len(quantized_linears(model))
    np.testing.assert_array_equal(np.asarray(make_forward(restored)(tok)[0]), want)
    program = load_packed(float_like(), tmp_path / "orbax")
    logits = np.asarray(program(jnp.asarray(tok))[0])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_pack_and_pack_model_are_one_conversion(tmp_path):
    """``pack`` (any model) and ``pack_model`` (our Llama family) hold the same PackedWeight for every weight, and
    a PackedModel saved with Orbax loads back as QuantLinear layers."""
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(tiny_config("llama_bias")), rngs=nnx.Rngs(0))
    tok = np.random.default_rng(0).integers(0, 128, (6, 24))
    res = quantize(model, tok, quant_config=QuantConfig(bits=4, group_size=32), method="rtn")
    program = pack(model, res)
    save_packed(program, tmp_path / "program")
    pack_model(model, res.weights)
    for name, lin in quantized_linears(model).items():
        a, b = lin.packed, program.packed[name.removeprefix("model.") + ".kernel"]
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=name)
    like = LlamaForCausalLM(ModelConfig.from_hf_dict(tiny_config("llama_bias")), rngs=nnx.Rngs(2))
    restored = load_packed(like, tmp_path / "program", modules=True)
    np.testing.assert_array_equal(np.asarray(make_forward(restored)(tok)[0]), np.asarray(make_forward(model)(tok)[0]))


def test_load_packed_refuses_a_directory_it_did_not_write(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a packed model"):
        load_packed(LlamaForCausalLM(ModelConfig.from_hf_dict(tiny_config("llama")), rngs=nnx.Rngs(0)), tmp_path)


def test_save_refuses_bad_requests(tmp_path):
    model, _, _ = _quantized_model()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        save_quantized(model, tmp_path / "full", quant_config=QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="not an earlier gptq-jax output"):  # overwrite replaces only our output
        save_quantized(model, tmp_path / "full", quant_config=QuantConfig(bits=4, group_size=32), overwrite=True)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ValueError, match="asymmetric"):
        save_quantized(
            model, tmp_path / "a", quant_config=QuantConfig(sym=False, group_size=32), checkpoint_format="gptq"
        )
    assert not (tmp_path / "a").exists()


def _write_foreign_checkpoint(path, *, desc_act: bool, seed: int = 0):
    """An AutoGPTQ-era checkpoint built from the facts of docs/checkpoints.md with torch:
    gptq_model-4bit-32g.safetensors, a quantize_config.json and no checkpoint_format (so v1), a zero bias on every
    layer, non-monotone g_idx for desc_act. Returns the float model dir and the dequantized weights it should
    compute with."""
    cfg = tiny_config("llama")
    float_dir = path / "float"
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(cfg), rngs=nnx.Rngs(seed))
    save_pretrained(model, None, float_dir)
    tensors = {k: v for k, v in load_file(os.path.join(float_dir, "model.safetensors")).items() if "_proj" not in k}
    g = 32
    gen = torch.Generator().manual_seed(seed)
    dequant = {}
    for name, (k, n) in {
        f"model.layers.{i}.{s}": shape
        for i in range(cfg["num_hidden_layers"])
        for s, shape in {
            "self_attn.q_proj": (64, 64),
            "self_attn.k_proj": (64, 32),
            "self_attn.v_proj": (64, 32),
            "self_attn.o_proj": (64, 64),
            "mlp.gate_proj": (64, 96),
            "mlp.up_proj": (64, 96),
            "mlp.down_proj": (96, 64),
        }.items()
    }.items():
        q = torch.randint(0, 16, (k, n), generator=gen)
        groups = k // g
        g_idx = torch.arange(k) // g
        if desc_act:
            g_idx = g_idx[torch.randperm(k, generator=gen)]
        scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).half()
        zeros = torch.full((groups, n), 8)  # symmetric
        qweight = torch.zeros(k // 8, n, dtype=torch.int64)
        for r in range(k):
            qweight[r // 8] |= q[r].long() << (4 * (r % 8))
        zcols = (zeros - 1).long()  # v1 stores zero - 1
        qzeros = torch.zeros(groups, n // 8, dtype=torch.int64)
        for c in range(n):
            qzeros[:, c // 8] |= zcols[:, c] << (4 * (c % 8))
        to_i32 = lambda t: t.to(torch.int64).numpy().astype(np.uint32).view(np.int32)  # noqa: E731
        tensors[f"{name}.qweight"] = to_i32(qweight)
        tensors[f"{name}.qzeros"] = to_i32(qzeros)
        tensors[f"{name}.scales"] = scales.numpy()
        tensors[f"{name}.g_idx"] = g_idx.int().numpy()
        tensors[f"{name}.bias"] = np.zeros(n, np.float16)
        dequant[name] = (scales.float()[g_idx] * (q - zeros[g_idx]).float()).numpy()  # (K, N)
    ck = path / "foreign"
    ck.mkdir()
    save_file(tensors, str(ck / "gptq_model-4bit-32g.safetensors"), metadata={"format": "pt", "gptq_bits": "4"})
    conf = json.loads((float_dir / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(conf))
    (ck / "quantize_config.json").write_text(
        json.dumps({"bits": 4, "group_size": g, "desc_act": desc_act, "sym": True, "damp_percent": 0.01})
    )
    return float_dir, dequant


@pytest.mark.parametrize("desc_act", [False, True])
def test_loads_autogptq_era_checkpoints(tmp_path, desc_act):
    float_dir, dequant = _write_foreign_checkpoint(tmp_path, desc_act=desc_act)
    model, _ = load_quantized(tmp_path / "foreign")
    for name, lin in quantized_linears(model).items():
        assert isinstance(lin, QuantLinear)
        np.testing.assert_allclose(np.asarray(lin.packed.dequantize()), dequant[name], rtol=1e-6)
    # The model computes with exactly those weights: compare against the float model holding them.
    from gptq_jax.models import load_pretrained

    ref, _ = load_pretrained(float_dir)
    for name, w in dequant.items():
        layer = ref.layers[int(name.split(".")[2])]
        parent, attr = name.split(".", 3)[3].rsplit(".", 1)
        getattr(getattr(layer, parent), attr).kernel.set_value(jnp.asarray(w))
    tok = np.random.default_rng(0).integers(0, 128, (2, 16))
    np.testing.assert_allclose(
        np.asarray(make_forward(model)(tok)[0]), np.asarray(make_forward(ref)(tok)[0]), rtol=1e-4, atol=1e-4
    )


def test_load_errors_name_the_problem(tmp_path):
    model, _, _ = _quantized_model("llama")
    out = save_quantized(model, tmp_path / "q", quant_config=QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        conf = json.loads((tmp_path / "q" / "config.json").read_text())
        del conf["quantization_config"]
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "config.json").write_text(json.dumps(conf))
        load_quantized(tmp_path / "plain")
    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"][:1]
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj: scales has shape \(1, 96\)"):
        load_quantized(out)
    with open(os.path.join(out, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_quantized(out)
