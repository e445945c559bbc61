"""`gptq-jax quantize`, end to end on a tiny checkpoint, and `eval`/`generate` on its output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers_models import write_hf_checkpoint

from gptq_jax.cli import main
from gptq_jax.cli.quantize_cmd import work_dir_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliq")
    model_dir = write_hf_checkpoint(root, "llama", 0, name="tiny", with_tokenizer=True)
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(f"w{i}" for i in rng.integers(0, 120, 12)) for _ in range(60))
    (root / "calib.txt").write_text(text)
    return root, model_dir


ARGS = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]


def test_quantize_then_eval_and_generate(tiny, capsys):
    root, model_dir = tiny
    out = root / "q"
    assert main(["quantize", str(model_dir), str(out), *ARGS, "--calib", str(root / "calib.txt")]) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 linears" in printed and "wrote" in printed
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["bits"] == 4 and conf["quantization_config"]["checkpoint_format"] == "gptq"
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["linears"]) == 14 and len(report["layers"]) == 2
    assert (out / "tokenizer.json").is_file()
    assert not work_dir_for(out).exists()  # removed after a successful save
    # Unquantized tensors are float16 by default, as the PyTorch tools publish them; scales always are.
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert conf["torch_dtype"] == "float16"
    assert tensors["model.embed_tokens.weight"].dtype == np.float16
    assert tensors["model.norm.weight"].dtype == np.float16
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == np.float16

    assert main(["eval", str(out), "--text", str(root / "calib.txt"), "--seqlen", "32", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert np.isfinite(ev["perplexity"]) and ev["seqlen"] == 32
    assert main(["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "4", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["new_tokens"] >= 1


def test_act_group_aware_writes_a_plain_checkpoint(tiny, capsys):
    """The group-aware order changes the codes, not the file's layout: g_idx stays k // g, desc_act false, and the
    config records the switch as GPTQModel does."""
    root, model_dir = tiny
    calib = ["--calib", str(root / "calib.txt")]
    out = root / "gar"
    assert main(["quantize", str(model_dir), str(out), *ARGS, *calib, "--act-group-aware"]) == 0
    qconf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconf["act_group_aware"] is True and qconf["desc_act"] is False
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    np.testing.assert_array_equal(g_idx, np.arange(g_idx.size) // 32)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(root / "calib.txt"), "--seqlen", "32", "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["perplexity"])


def test_interrupted_run_resumes(tiny, capsys):
    root, model_dir = tiny
    calib = ["--calib", str(root / "calib.txt")]
    full = root / "full"
    assert main(["quantize", str(model_dir), str(full), *ARGS, *calib]) == 0
    # A crash after layer 0: the work directory holds layer 0 only, OUT_DIR does not exist.
    out = root / "resumed"
    work = work_dir_for(out)
    capsys.readouterr()

    from gptq_jax.engine.resume import ResumeStore

    real = ResumeStore.save

    def crash_after_first(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    ResumeStore.save = crash_after_first
    try:
        assert main(["quantize", str(model_dir), str(out), *ARGS, *calib]) == 130
    finally:
        ResumeStore.save = real
    assert not out.exists() and (work / "layer-00000.npz").is_file()
    assert main(["quantize", str(model_dir), str(out), *ARGS, *calib]) == 0
    assert "resumed after 1 layers" in capsys.readouterr().out
    a = json.loads((full / "quant_report.json").read_text())
    b = json.loads((out / "quant_report.json").read_text())
    assert [x["loss"] for x in a["linears"]] == [x["loss"] for x in b["linears"]]
    from safetensors.numpy import load_file

    ta, tb = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])
    # Other arguments are refused while a partial run is there.
    shutil.rmtree(out)
    ResumeStore.save = crash_after_first
    try:
        main(["quantize", str(model_dir), str(out), *ARGS, *calib])
    finally:
        ResumeStore.save = real
    assert main(["quantize", str(model_dir), str(out), *ARGS, "--bits", "3", *calib]) == 1
    assert "different arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--static-groups", "--group-size", "-1"], "--static-groups needs a group size"),
        (["--asym", "--format", "gptq"], "use gptq_v2"),
        (["--method", "rtn", "--act-order"], "need GPTQ's Hessians"),
        (["--method", "rtn", "--act-group-aware"], "need GPTQ's Hessians"),
        (["--act-group-aware", "--act-order"], "exclude each other"),
        (["--act-group-aware", "--group-size", "-1"], "--act-group-aware reorders whole groups"),
        (["--calib", "/nonexistent.txt"], "does not exist"),
        (["--seqlen", "100000"], "exceeds the model's context"),
    ],
)
def test_bad_options_are_refused(tiny, capsys, extra, message):
    root, model_dir = tiny
    out = root / "never"
    assert main(["quantize", str(model_dir), str(out), *extra]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_non_empty_out_dir_is_refused(tiny, capsys):
    root, model_dir = tiny
    out = root / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(model_dir), str(out), *ARGS]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_rtn_method_needs_no_calibration(tiny):
    root, model_dir = tiny
    out = root / "rtn"
    argv = [
        "quantize",
        str(model_dir),
        str(out),
        "--method",
        "rtn",
        "--group-size",
        "32",
        "--asym",
        "--save-dtype",
        "f32",
    ]
    assert main(argv) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert conf["torch_dtype"] == "float32"
    from safetensors.numpy import load_file

    assert load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == np.float32
