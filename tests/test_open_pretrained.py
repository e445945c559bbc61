"""``open_pretrained``: headers first, an abstract model, and a reader of just the tensors asked for, with the same
values ``load_pretrained`` gives."""

from __future__ import annotations

import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from helpers_models import tiny_config

from gptq_jax.models import LlamaForCausalLM, ModelConfig, load_pretrained, open_pretrained, save_pretrained

LAYERS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = ModelConfig.from_hf_dict(tiny_config("llama_bias", num_hidden_layers=LAYERS))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp("lazy") / "ckpt"
    save_pretrained(model, config, out, max_shard_bytes=100_000)  # several shards, split mid-layer
    return out


def _flat(model) -> dict[str, object]:
    return {".".join(str(k) for k in key): v.get_value() for key, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_blocks_match_load_pretrained(ckpt):
    abstract, config, load = open_pretrained(ckpt)
    assert config.num_hidden_layers == LAYERS
    shapes = _flat(abstract)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in shapes.values())
    want = {k: np.asarray(v) for k, v in _flat(load_pretrained(ckpt)[0]).items()}
    for i in range(LAYERS):
        paths = [p for p in shapes if p.startswith(f"layers.{i}.")]
        got = load(paths)
        assert sorted(got) == sorted(paths)
        for p in paths:
            assert got[p].shape == shapes[p].shape
            np.testing.assert_array_equal(got[p], want[p], err_msg=p)


def test_loading_block_by_block_holds_one_block(ckpt):
    abstract, _, load = open_pretrained(ckpt)
    shapes = _flat(abstract)
    blocks = [[p for p in shapes if p.startswith(f"layers.{i}.")] for i in range(LAYERS)]
    block_bytes = sum(a.nbytes for a in load(blocks[0]).values())
    total = sum(int(np.prod(s.shape)) * 4 for s in shapes.values())
    assert total > LAYERS * block_bytes  # reading everything would show in the peak below
    tracemalloc.start()
    try:
        for paths in blocks:
            got = load(paths)
            del got
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * block_bytes, (peak, block_bytes)


def test_errors(ckpt, tmp_path):
    _, _, load = open_pretrained(ckpt)
    with pytest.raises(KeyError, match="layers.0.mlp.nope.kernel"):
        load(["layers.0.mlp.nope.kernel"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_pretrained(tmp_path / "missing")
