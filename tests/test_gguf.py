"""GGUF import: tiny synthetic GGUF files written the way llama.cpp's converter writes them must convert back to the
original HF tensors (this checks the Q/K un-permutation and the dimension order without downloading anything)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from helpers_models import build_torch_model, random_tokens, tiny_config, torch_logits

from gptq_jax.io.gguf import GGUFError, convert_gguf, hf_tensor_name, permute_rotary, unpermute_rotary

_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, n, rest = hf.split(".", 3)  # model.layers.N.rest
    return f"blk.{n}.{_TO_GGUF[rest]}"


def write_tiny_gguf(
    path: Path, config: dict, tensors: dict[str, np.ndarray], qtype=gguf.GGMLQuantizationType.F32, arch: str = "llama"
) -> dict[str, np.ndarray]:
    """Writes `tensors` (HF names) as llama.cpp would: Q/K rows permuted, 2-D weights in `qtype`, 1-D in F32.

    Returns what a correct importer must produce: the tensors after the quantization round trip, in HF layout.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    expected = {}
    for name, t in tensors.items():
        t = np.asarray(t, np.float32)
        if name.endswith("q_proj.weight"):
            t_gguf = permute_rotary(t, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t_gguf = permute_rotary(t, config["num_key_value_heads"])
        else:
            t_gguf = t
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(t_gguf, qtype)
            w.add_tensor(_gguf_name(name), q, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).reshape(t.shape)
            # Un-permute with the reference formula written out here, not the function under test.
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                hd = t.shape[0] // heads
                back = back.reshape(heads, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(t.shape)
            expected[name] = back
        else:
            w.add_tensor(_gguf_name(name), t_gguf)
            expected[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _tiny(tmp_path: Path, arch: str = "llama", qtype=gguf.GGMLQuantizationType.F32, **overrides):
    config = tiny_config(arch, **overrides)
    model = build_torch_model(config, seed=0)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    path = tmp_path / f"tiny-{arch}-{qtype.name}.gguf"
    expected = write_tiny_gguf(path, config, tensors, qtype)
    return path, config, model, expected


def test_permutation_known_values():
    # One head of dim 4: HF rows (a0, a1 | b0, b1) are stored by llama.cpp as interleaved pairs (a0, b0, a1, b1).
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert permute_rotary(w, 1)[:, 0].tolist() == [0, 4, 2, 6]
    assert unpermute_rotary(permute_rotary(w, 1), 1).tolist() == w.tolist()


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 1), (3, 8, 5), (9, 64, 3)])
def test_unpermute_inverts_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, n_head), n_head), w)
    b = w[:, 0]  # biases are permuted the same way
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(b, n_head), n_head), b)
    if head_dim > 2:
        assert not np.array_equal(permute_rotary(w, n_head), w)


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(GGUFError, match="blk.0.ffn_gate_exps.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", gguf.GGMLQuantizationType.F32),  # GQA: K un-permuted with n_head_kv != n_head
        ("llama_tied", gguf.GGMLQuantizationType.F32),  # tied embeddings: no output.weight
        ("llama", gguf.GGMLQuantizationType.Q8_0),
        ("llama", gguf.GGMLQuantizationType.F16),
    ],
)
def test_convert_reproduces_hf_tensors(tmp_path, arch, qtype):
    from safetensors.numpy import load_file

    path, config, model, expected = _tiny(tmp_path, arch, qtype)
    report = convert_gguf(path, tmp_path / "out")
    out = tmp_path / "out"
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    written = json.loads((out / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert written[key] == config[key], key
    assert written["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"])
    assert written["rope_theta"] == config["rope_theta"]
    assert written["architectures"] == ["LlamaForCausalLM"]
    assert report.tokenizer is False  # no tokenizer metadata in the tiny file
    assert report.num_parameters == sum(t.size for t in expected.values())

    # transformers reads the directory and computes what the original model computes.
    tokens = random_tokens(2, 12)
    want_logits = torch_logits(model, tokens)
    got_logits = torch_logits(out, tokens)
    tol = 1e-5 if qtype == gguf.GGMLQuantizationType.F32 else 0.05
    np.testing.assert_allclose(got_logits, want_logits, rtol=tol, atol=tol * np.abs(want_logits).max())


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text('{"not": "gguf"}')
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(GGUFError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path):
    path, *_ = _tiny(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(GGUFError):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_tensor_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "llama")
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((128, 64), np.int32))  # written as GGML type I32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="type I32, which cannot be dequantized"):
        convert_gguf(tmp_path / "i32.gguf", tmp_path / "out")


def test_output_directory_rules(tmp_path):
    path, *_ = _tiny(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(GGUFError, match="not empty"):
        convert_gguf(path, out)
    # Issue 25 case 2: overwrite replaces only a directory gptq-jax wrote, never the user's own.
    with pytest.raises(GGUFError, match="not an earlier gptq-jax output"):
        convert_gguf(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    ours = tmp_path / "ours"
    convert_gguf(path, ours)
    convert_gguf(path, ours, overwrite=True)  # our own output is replaced
    assert sorted(p.name for p in ours.iterdir()) == [
        ".gptq-jax-output", "config.json", "generation_config.json", "model.safetensors"
    ]
    # Nothing left behind beside it: no temporary or old directories.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ours", "out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf(path, empty)  # an empty directory is fine without overwrite
    assert (empty / "config.json").is_file()

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(GGUFError, match="not a directory"):
        convert_gguf(path, afile)


@pytest.mark.parametrize("where", ["parent", "grandparent"])
def test_out_dir_holding_the_gguf_is_refused(tmp_path, capsys, where):
    """Issue 25 case 1: `convert-gguf DIR/x.gguf DIR --overwrite` deleted the input and the user's files in DIR."""
    from gptq_jax import cli

    src = tmp_path / "dir" / "sub"
    src.mkdir(parents=True)
    path, *_ = _tiny(src)
    (src / "notes.txt").write_text("mine")
    out = src if where == "parent" else src.parent
    before = sorted(p.name for p in src.iterdir())
    code = cli.main(["convert-gguf", str(path), str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1
    assert "contains the GGUF file" in err and "Traceback" not in err and "overwrite=True" not in err
    assert sorted(p.name for p in src.iterdir()) == before


def test_cli_names_the_option_not_the_argument(tmp_path, capsys):
    from gptq_jax import cli

    path, *_ = _tiny(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    assert cli.main(["convert-gguf", str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    import gptq_jax.io.gguf as mod

    path, *_ = _tiny(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
