"""Streaming (issue: models larger than memory): ``quantize(..., load=...)`` on an abstract model loads each block
only when it is reached and drops its quantized weights once they are saved in the work directory; the streamed
save packs one shard at a time. Checked against the whole-model run on the same model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from helpers_models import write_hf_checkpoint
from test_engine import QC, TinyModel, _tokens

import gptq_jax
from gptq_jax import QuantConfig
from gptq_jax.engine.resume import ResumeStore, StoredWeights
from gptq_jax.io.checkpoint import load_quantized, save_quantized
from gptq_jax.models import load_pretrained, open_pretrained
from gptq_jax.models.qlinear import pack_model


def _dict_loader(model: nnx.Module):
    """A ``load(paths)`` over a concrete model's parameters, recording what was asked."""
    flat = {".".join(str(k) for k in key): np.asarray(v[...]) for key, v in nnx.to_flat_state(nnx.state(model,
                                                                                                        nnx.Param))}
    asked: list[list[str]] = []

    def load(paths):
        asked.append(list(paths))
        return {p: flat[p] for p in paths}

    return load, asked


def _abstract_tiny():
    return nnx.eval_shape(lambda: TinyModel(nnx.Rngs(0)))


def test_streamed_run_equals_the_whole_model_run_and_holds_one_block(tmp_path):
    calib = _tokens()
    whole = gptq_jax.quantize(TinyModel(nnx.Rngs(0)), calib, quant_config=QC)
    load, asked = _dict_loader(TinyModel(nnx.Rngs(0)))
    model = _abstract_tiny()
    res = gptq_jax.quantize(model, calib, quant_config=QC, load=load, work_dir=str(tmp_path / "w"))
    # Outside the blocks first, then block by block, each asked for once.
    assert [sorted({p.split(".")[1] for p in a if p.startswith("blocks.")}) for a in asked] == [[], ["0"], ["1"]]
    assert isinstance(res.weights, StoredWeights) and sorted(res.weights) == sorted(whole.weights)
    for name, qw in whole.weights.items():
        np.testing.assert_array_equal(np.asarray(res.weights[name].codes), np.asarray(qw.codes), err_msg=name)
        np.testing.assert_array_equal(np.asarray(res.weights[name].scales), np.asarray(qw.scales), err_msg=name)
    assert [r["relative_output_error"] for r in res.report.layers] == pytest.approx(
        [r["relative_output_error"] for r in whole.report.layers], rel=1e-6)
    # Quantized weights (a stack of experts too) are dropped again; what was not quantized (the integer tensor)
    # stays loaded.
    assert isinstance(model.blocks[1].q.w.get_value(), jax.ShapeDtypeStruct)
    assert isinstance(model.blocks[1].down.kernel.get_value(), jax.ShapeDtypeStruct)
    assert isinstance(model.blocks[1].experts.get_value(), jax.ShapeDtypeStruct)
    assert not isinstance(model.blocks[1].table.get_value(), jax.ShapeDtypeStruct)
    assert not isinstance(model.embed.embedding.get_value(), jax.ShapeDtypeStruct)


def test_streamed_run_resumes_after_a_crash(tmp_path, monkeypatch):
    calib = _tokens()
    work = str(tmp_path / "w")
    real = ResumeStore.save

    def crash_after_first(self, index, *a, **k):
        real(self, index, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResumeStore, "save", crash_after_first)
    load, _ = _dict_loader(TinyModel(nnx.Rngs(0)))
    with pytest.raises(KeyboardInterrupt):
        gptq_jax.quantize(_abstract_tiny(), calib, quant_config=QC, load=load, work_dir=work)
    monkeypatch.setattr(ResumeStore, "save", real)
    load, asked = _dict_loader(TinyModel(nnx.Rngs(0)))
    res = gptq_jax.quantize(_abstract_tiny(), calib, quant_config=QC, load=load, work_dir=work)
    assert res.report.resumed_layers == 1
    whole = gptq_jax.quantize(TinyModel(nnx.Rngs(0)), calib, quant_config=QC)
    for name, qw in whole.weights.items():
        np.testing.assert_array_equal(np.asarray(res.weights[name].codes), np.asarray(qw.codes), err_msg=name)


def test_streaming_bad_input(tmp_path):
    calib = _tokens()
    load, _ = _dict_loader(TinyModel(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pass work_dir="):
        gptq_jax.quantize(_abstract_tiny(), calib, quant_config=QC, load=load)

    def forgetful(paths):
        return {p: v for p, v in load(paths).items() if not p.endswith("up")}

    with pytest.raises(ValueError, match=r"load\(\) returned no array for 1 parameter\(s\): blocks.0.up"):
        gptq_jax.quantize(_abstract_tiny(), calib, quant_config=QC, load=forgetful, work_dir=str(tmp_path / "a"))

    def wrong_shape(paths):
        got = load(paths)
        return {p: (v.T if p == "blocks.0.up" else v) for p, v in got.items()}

    msg = r"load\(\) returned shape \(64, 32\) for blocks.0.up, the model has \(32, 64\)"
    with pytest.raises(ValueError, match=msg):
        gptq_jax.quantize(_abstract_tiny(), calib, quant_config=QC, load=wrong_shape, work_dir=str(tmp_path / "b"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return write_hf_checkpoint(root, "llama", 0, name="tiny", with_tokenizer=True)


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 10_000])
def test_streamed_llama_checkpoint_equals_the_packed_model_checkpoint(tiny_llama, tmp_path, max_shard_bytes):
    qc = QuantConfig(bits=4, group_size=32, act_order=True)
    calib = np.random.default_rng(1).integers(0, 100, (4, 32)).astype(np.int32)
    model, _ = load_pretrained(tiny_llama)
    whole = gptq_jax.quantize(model, calib, quant_config=qc)
    pack_model(model, whole.weights)
    save_quantized(model, tmp_path / "whole", quant_config=qc)

    abstract, _, load = open_pretrained(tiny_llama)
    res = gptq_jax.quantize(abstract, calib, quant_config=qc, load=load, work_dir=str(tmp_path / "w"))
    save_quantized(res.model, tmp_path / "streamed", quant_config=qc, weights=res.weights,
                   max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    if max_shard_bytes > 2**20:
        assert files == ["model.safetensors"]
    else:  # one or more blocks per shard, the float tensors last
        assert len(files) >= 3 and (tmp_path / "streamed" / "model.safetensors.index.json").is_file()

    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "np") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, _ = load_quantized(tmp_path / "streamed")
    out = m(calib[:1])
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape[:2] == (1, 32) and np.isfinite(np.asarray(logits)).all()
