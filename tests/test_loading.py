"""Loading and saving HF checkpoints: sharding, dtypes, round trips through transformers, and every bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers_models import (
    random_tokens,
    right_padding_mask,
    torch_logits,
    torch_model,
    write_hf_checkpoint,
    write_tiny_tokenizer,
)
from safetensors.torch import load_file, save_file

from gptq_jax.models import (
    PARAM_TABLE,
    LlamaForCausalLM,
    hf_to_nnx,
    load_pretrained,
    load_tokenizer,
    nnx_to_hf,
    save_pretrained,
)

# Tolerance on logits relative to the largest |logit|, per dtype the model computes in.
RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def params(model):
    return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A single-file random Llama checkpoint; tests copy it before damaging it."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=3)


def copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def rewrite(ckpt, fn):
    """Applies ``fn`` to the tensors of ``ckpt/model.safetensors`` (a dict name -> torch tensor)."""
    file = ckpt / "model.safetensors"
    tensors = fn(load_file(file))
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------------
# The table


def test_table_runs_both_ways():
    names = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.11.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.3.self_attn.k_proj.weight",
        "model.layers.3.self_attn.o_proj.bias",
        "model.layers.7.self_attn.q_norm.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.mlp.up_proj.bias",
    ]
    for name in names:
        path, transpose = hf_to_nnx(name)
        assert nnx_to_hf(path) == (name, transpose)
    assert hf_to_nnx("model.layers.3.self_attn.k_proj.weight") == ("layers.3.self_attn.k_proj.kernel", True)
    assert hf_to_nnx("model.layers.3.self_attn.k_proj.qweight") is None
    assert len(PARAM_TABLE) == 9


# ----------------------------------------------------------------------------------------------------------------------
# Round trips


def test_sharded_and_single_file_load_identically(tmp_path):
    single = write_hf_checkpoint(tmp_path, "qwen2", seed=4)
    sharded = write_hf_checkpoint(tmp_path, "qwen2", seed=4, max_shard_size="40KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    a, b = params(load_pretrained(single)[0]), params(load_pretrained(sharded)[0])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("arch", ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"])
def test_save_pretrained_loads_in_transformers(tmp_path, arch):
    src = write_hf_checkpoint(tmp_path, arch, seed=5)
    model, config = load_pretrained(src)
    out = tmp_path / "ours"
    save_pretrained(model, config, out)
    assert sorted(os.listdir(out)) == [".gptq-jax-output", "config.json", "model.safetensors"]
    tokens = random_tokens(2, 12, seed=5)
    mask = right_padding_mask([12, 8], 12)
    ref = torch_logits(src, tokens, mask)
    theirs = torch_model(out)
    assert type(theirs).__name__ == config.architecture
    real = mask.astype(bool)
    assert rel_err(torch_logits(theirs, tokens, mask)[real], ref[real]) < 1e-6  # same weights, same code
    ours, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert rel_err(np.asarray(ours)[real], ref[real]) < RTOL["float32"]


def test_save_pretrained_sharded_and_overwrite(tmp_path, llama):
    model, config = load_pretrained(llama)
    out = tmp_path / "out"
    save_pretrained(model, config, out, max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params(model).values())
    reloaded = params(load_pretrained(out)[0])
    for k, v in params(model).items():
        np.testing.assert_array_equal(reloaded[k], v, err_msg=k)

    # Saving again into the same directory as one file replaces the shards and keeps foreign files.
    write_tiny_tokenizer(out)
    save_pretrained(model, None, out)
    assert sorted(os.listdir(out)) == [
        ".gptq-jax-output", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging or old directory left
    reloaded = params(load_pretrained(out)[0])
    np.testing.assert_array_equal(reloaded["embed_tokens.embedding"], params(model)["embed_tokens.embedding"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(tmp_path, dtype):
    """A half-precision checkpoint loads in that dtype and matches transformers running the same weights."""
    src = write_hf_checkpoint(tmp_path, "llama3", seed=6, dtype=dtype)
    model, _ = load_pretrained(src, dtype=getattr(jnp, dtype))
    assert all(v.dtype == jnp.dtype(dtype) for v in params(model).values())
    tokens = random_tokens(2, 12, seed=6)
    logits, _ = model(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    ref32 = torch_logits(torch_model(src).float(), tokens)  # same rounded weights, computed in float32
    assert rel_err(logits, ref32) < RTOL[dtype]
    assert rel_err(torch_logits(src, tokens), ref32) < RTOL[dtype]  # transformers itself is no closer
    # Saved in the dtype it holds.
    out = tmp_path / "out"
    save_pretrained(model, None, out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == getattr(torch, dtype)


def test_float32_checkpoint_loads_as_bfloat16(llama):
    model32, _ = load_pretrained(llama)
    model16, _ = load_pretrained(llama, dtype="bfloat16")
    tokens = jnp.asarray(random_tokens(1, 10, seed=7))
    assert model16.layers[0].mlp.down_proj.kernel.dtype == jnp.bfloat16
    assert rel_err(model16(tokens)[0], model32(tokens)[0]) < RTOL["bfloat16"]


def test_ignored_tensors(tmp_path):
    """Old checkpoints carry rotary inv_freq buffers; tied checkpoints may carry lm_head.weight. Both are skipped."""
    ckpt = write_hf_checkpoint(tmp_path, "llama_tied", seed=8)
    ref = params(load_pretrained(ckpt)[0])

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        return t

    rewrite(ckpt, add)
    got = params(load_pretrained(ckpt)[0])
    assert got.keys() == ref.keys()


def test_load_tokenizer(tmp_path):
    ckpt = write_hf_checkpoint(tmp_path, "llama", with_tokenizer=True)
    tok = load_tokenizer(ckpt)
    assert tok("w0 w5")["input_ids"] == [4, 9] and tok.eos_token_id == 2
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*nowhere does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_model_is_built_abstractly_then_filled(llama, monkeypatch):
    """load_pretrained never runs the random initialisers on real arrays (that would cost an extra model copy)."""
    from gptq_jax.models import llama as llama_module

    concrete = []
    real = jax.random.normal

    def normal(key, *args, **kwargs):
        concrete.append(not isinstance(key, jax.core.Tracer))
        return real(key, *args, **kwargs)

    monkeypatch.setattr(llama_module.jax.random, "normal", normal)
    model, _ = load_pretrained(llama)
    assert isinstance(model, LlamaForCausalLM)
    assert concrete and not any(concrete)  # traced by nnx.eval_shape, never executed
    LlamaForCausalLM(model.config, rngs=nnx.Rngs(0))
    assert any(concrete)  # the probe does see eager construction


_PEAK_PROBE = """
import sys
import jax.numpy as jnp
from gptq_jax.models import load_pretrained

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

jnp.zeros(8).block_until_ready()  # the runtime's own start-up is not the load's
before = status("VmRSS")
model, _ = load_pretrained(sys.argv[1])
print(status("VmHWM") - before, status("VmRSS") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_loading_peaks_near_one_copy_of_the_model(tmp_path):
    """Each layer becomes jax arrays before the next is read: the load never holds the model twice (it did, as
    numpy and as jax, until the last tensor was read)."""
    import subprocess
    import sys

    # Ten layers of 9 MB each, so that the one layer held twice while it is read stays under the bound.
    ckpt = write_hf_checkpoint(tmp_path, "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=10)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
    assert size > 60  # large enough that a second copy shows over the runtime's noise
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(ckpt)], capture_output=True, text=True, check=True)
    peak, held = (float(x) for x in out.stdout.split())
    assert held > 0.9 * size  # the model is loaded
    assert peak < held + 0.25 * size, (peak, held, size)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: each case damages a copy of a good checkpoint and checks the message.


def _config(ckpt, **change):
    d = json.loads((ckpt / "config.json").read_text())
    d.update(change)
    (ckpt / "config.json").write_text(json.dumps(d))


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _reshape(name, shape):
    return lambda t: {**t, name: torch.zeros(shape)}


def _truncate(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


BAD = {
    "no config": (lambda c: os.remove(c / "config.json"), FileNotFoundError, r"no config.json at .*config.json"),
    "config not json": (
        lambda c: (c / "config.json").write_text("{'vocab_size': 3"),
        ValueError,
        r"config.json is not valid JSON",
    ),
    "config not object": (
        lambda c: (c / "config.json").write_text("[1, 2]"),
        ValueError,
        r"config.json: must hold a JSON object, got list",
    ),
    "unsupported arch": (
        lambda c: _config(c, architectures=["PhiForCausalLM"]),
        ValueError,
        r"unsupported architecture \['PhiForCausalLM'\]; supported: LlamaForCausalLM, "
        r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ),
    "missing field": (
        lambda c: _config(c, num_attention_heads=None),
        ValueError,
        r"config.json: config for LlamaForCausalLM lacks required field 'num_attention_heads'",
    ),
    "quantized": (
        lambda c: _config(c, quantization_config={"quant_method": "gptq"}),
        ValueError,
        r"is a quantized checkpoint",
    ),
    "missing tensor": (
        lambda c: rewrite(c, _drop("model.layers.1.mlp.up_proj.weight")),
        ValueError,
        r"1 tensor\(s\) missing from the checkpoint: model.layers.1.mlp.up_proj.weight",
    ),
    "missing lm_head": (
        lambda c: rewrite(c, _drop("lm_head.weight")),
        ValueError,
        r"missing from the checkpoint: lm_head.weight",
    ),
    "wrong shape vs config": (
        lambda c: _config(c, intermediate_size=80),
        ValueError,
        r"tensor model.layers.0.mlp.(gate|up|down)_proj.weight has shape \(\d+, \d+\), "
        r"config.json implies \(\d+, \d+\)",
    ),
    "extra tensor": (
        lambda c: rewrite(c, lambda t: {**t, "model.layers.0.mlp.up_proj.qweight": torch.zeros(2)}),
        ValueError,
        r"1 tensor\(s\) have no place in a LlamaForCausalLM model with this config: "
        r"model.layers.0.mlp.up_proj.qweight \(pass strict=False to skip them\)",
    ),
    "extra layer": (
        lambda c: _config(c, num_hidden_layers=1),
        ValueError,
        r"have no place .*model.layers.1.input_layernorm.weight",
    ),
    "int tensor": (
        lambda c: rewrite(c, lambda t: {**t, "model.norm.weight": torch.ones(64, dtype=torch.int32)}),
        ValueError,
        r"tensor model.norm.weight has dtype I32; expected one of \['BF16', 'F16', 'F32'\]",
    ),
    "truncated": (
        _truncate,
        ValueError,
        r"model.safetensors is not a readable safetensors file \(corrupt or "
        r"truncated\?\)",
    ),
    "garbage": (
        lambda c: (c / "model.safetensors").write_bytes(b"\xff" * 64),
        ValueError,
        r"not a readable safetensors file",
    ),
    "no weights": (
        lambda c: os.rename(c / "model.safetensors", c / "pytorch_model.bin"),
        FileNotFoundError,
        r"no model.safetensors or model.safetensors.index.json in .*ckpt \(found \['pytorch_model.bin'\]; "
        r"only safetensors checkpoints are read\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint(tmp_path, llama, case):
    damage, error, message = BAD[case]
    ckpt = copy(llama, tmp_path)
    damage(ckpt)
    with pytest.raises(error, match=message):
        load_pretrained(ckpt)


def test_wrong_shape_names_both_shapes(tmp_path, llama):
    ckpt = copy(llama, tmp_path)
    rewrite(ckpt, _reshape("model.layers.0.self_attn.k_proj.weight", (16, 64)))
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 64\), config.json implies \(32, 64\)"):
        load_pretrained(ckpt)


def test_extra_tensors_warn_when_not_strict(tmp_path, llama):
    ckpt = copy(llama, tmp_path)
    rewrite(ckpt, lambda t: {**t, "model.extra.weight": torch.zeros(2)})
    with pytest.warns(UserWarning, match=r"model.extra.weight; skipped"):
        model, _ = load_pretrained(ckpt, strict=False)
    np.testing.assert_array_equal(params(model)["norm.scale"], params(load_pretrained(llama)[0])["norm.scale"])


def test_bad_sharded_checkpoints(tmp_path):
    ckpt = write_hf_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[-1]
    os.remove(ckpt / shard)
    with pytest.raises(FileNotFoundError, match=rf"shard .*{shard} listed in .*model.safetensors.index.json does not"):
        load_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r'index.json is not a safetensors index: it needs a non-empty "weight_map"'):
        load_pretrained(ckpt)


def test_bad_arguments(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nowhere does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; use one of \('float32', 'bfloat16'"):
        load_pretrained(llama, dtype="int8")
    model, config = load_pretrained(llama)
    with pytest.raises(ValueError, match=r"max_shard_bytes=0 must be positive"):
        save_pretrained(model, config, tmp_path / "out", max_shard_bytes=0)


def test_save_refuses_unknown_layers(tmp_path, llama):
    """A model whose projections were swapped for another layer type is not silently saved half-way."""
    model, config = load_pretrained(llama)

    class Other(nnx.Module):
        def __init__(self):
            self.qweight = nnx.Param(jnp.zeros((4,), jnp.int32))

    model.layers[0].mlp.up_proj = Other()
    with pytest.raises(ValueError, match=r"cannot save layers.0.mlp.up_proj.qweight \(Param\)"):
        save_pretrained(model, config, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
