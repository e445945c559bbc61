"""``LazyCheckpoint``: headers first, one block at a time, the same weights as ``load_pretrained``."""

from __future__ import annotations

import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_models import tiny_config

from gptq_jax.models import LlamaForCausalLM, ModelConfig, load_pretrained, save_pretrained
from gptq_jax.models.lazy_checkpoint import LazyCheckpoint

LAYERS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = ModelConfig.from_hf_dict(tiny_config("llama_bias", num_hidden_layers=LAYERS))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp("lazy") / "ckpt"
    save_pretrained(model, config, out, max_shard_bytes=100_000)  # several shards, split mid-layer
    return out


def test_blocks_match_load_pretrained(ckpt):
    lazy = LazyCheckpoint(ckpt)
    model, _ = load_pretrained(ckpt)
    assert lazy.num_layers == LAYERS
    for i, block in lazy.iter_blocks():
        assert set(block) == set(lazy.block_names(i)) and all(n.startswith(f"model.layers.{i}.") for n in block)
        q = block[f"model.layers.{i}.self_attn.q_proj.weight"]  # torch orientation [out, in]
        np.testing.assert_array_equal(q, np.asarray(model.layers[i].self_attn.q_proj.kernel[...]).T)
        layer = lazy.load_layer(i)
        for path, var in nnx.to_flat_state(nnx.state(layer)):
            want = nnx.state(model.layers[i])
            for p in path:
                want = want[p]
            np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[...]), err_msg=str(path))
    emb = lazy.read("model.embed_tokens.weight", jnp.bfloat16)
    assert emb.dtype == jnp.bfloat16 and emb.shape == lazy.shape("model.embed_tokens.weight")


def test_reading_block_by_block_holds_one_block(ckpt):
    lazy = LazyCheckpoint(ckpt)
    block_bytes = sum(a.nbytes for a in lazy.read_block(0).values())
    total = sum(np.prod(lazy.shape(n)) * 4 for n in lazy.names)
    assert total > LAYERS * block_bytes  # reading everything would show in the peak below
    tracemalloc.start()
    try:
        for _, block in lazy.iter_blocks():
            del block
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The loop variable keeps one block alive while the next is read: at most two blocks.
    assert peak < 2.5 * block_bytes, (peak, block_bytes)


def test_errors(ckpt, tmp_path):
    lazy = LazyCheckpoint(ckpt)
    with pytest.raises(IndexError, match=f"layer {LAYERS} is out of range: the model has {LAYERS} layers"):
        lazy.read_block(LAYERS)
    with pytest.raises(KeyError, match="model.layers.0.mlp.nope.weight"):
        lazy.read("model.layers.0.mlp.nope.weight")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LazyCheckpoint(tmp_path / "missing")
