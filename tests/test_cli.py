"""The `gptq-jax` command line on a tiny random checkpoint with a word-level tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from helpers_models import build_torch_model, tiny_config, write_hf_checkpoint

from gptq_jax import cli
from gptq_jax.models import load_pretrained
from gptq_jax.tasks.eval import perplexity

TEXT = " ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 100, size=300))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("cli"), "llama", seed=5, with_tokenizer=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json(capsys, tiny_dir, text_file):
    code, out, err = run(capsys, "eval", tiny_dir, "--text", text_file, "--seqlen", "32", "--batch-size", "3", "--json")
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    assert out.count("\n") == 1
    assert report["seqlen"] == 32 and report["windows"] == 300 // 32 and report["tokens"] == 9 * 32
    model, _ = load_pretrained(tiny_dir)
    tokens = np.arange(4, 4 + 100)[np.asarray([int(w[1:]) for w in TEXT.split()])]  # the tokenizer's ids
    want = perplexity(model, tokens, seqlen=32, progress=False)
    assert report["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)


def test_eval_plain_and_dtype(capsys, tiny_dir, text_file):
    code, out, err = run(capsys, "eval", tiny_dir, "--text", text_file, "--seqlen", "64", "--dtype", "bf16")
    assert code == 0, err
    assert out.startswith("perplexity ") and "4 windows of 64 tokens" in out


def test_eval_seqlen_capped_by_context(capsys, tiny_dir, text_file):
    # The tiny config's max_position_embeddings is 256; 300 tokens make one window.
    code, out, err = run(capsys, "eval", tiny_dir, "--text", text_file, "--json")
    assert code == 0, err
    assert json.loads(out)["seqlen"] == 256


def test_generate(capsys, tiny_dir):
    argv = ["generate", tiny_dir, "--prompt", "w1 w2 w3", "--max-new-tokens", "5"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["new_tokens"] == len(report["tokens"]) <= 5
    assert report["prompt_tokens"] == 3
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out == report["text"] + "\n"  # greedy: the same text again
    assert "tokens/s" in err

    code, out, err = run(capsys, *argv, "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) <= 5


def test_convert_gguf(capsys, tmp_path):
    from test_gguf import write_tiny_gguf

    config = tiny_config("llama")
    tensors = {k: v.numpy() for k, v in build_torch_model(config).state_dict().items()}
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, config, tensors, gguf.GGMLQuantizationType.Q8_0)
    out_dir = tmp_path / "hf"
    code, out, err = run(capsys, "convert-gguf", path, out_dir)
    assert code == 0, err
    assert "wrote" in out and "Q8_0" in out
    assert (out_dir / "config.json").is_file()
    code, out, err = run(capsys, "convert-gguf", path, out_dir)
    assert code == 1 and "not empty" in err and "--overwrite" in err
    code, out, err = run(capsys, "convert-gguf", path, out_dir, "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["eval", "{missing}"], 1, "does not exist"),
        (["eval", "{empty}"], 1, "no config.json"),
        (["eval", "{model}", "--seqlen", "0"], 2, "--seqlen: expected a positive integer, got 0"),
        (["eval", "{model}", "--seqlen", "1"], 1, "--seqlen 1 must be at least 2"),
        (["eval", "{model}", "--batch-size", "x"], 2, "--batch-size: expected a positive integer, got 'x'"),
        (["eval", "{model}", "--dtype", "f64"], 2, "invalid choice: 'f64'"),
        (["eval", "{model}", "--text", "{missing}"], 1, "text file not found"),
        (["eval", "{model}", "--text", "{text}", "--seqlen", "2000"], 1, "fewer than one window"),
        (["generate", "{model}"], 2, "--prompt"),
        (["generate", "{model}", "--prompt", "w1", "--top-p", "0"], 2, "--top-p: expected a number in (0, 1]"),
        (["generate", "{model}", "--prompt", "w1", "--temperature", "-1"], 2, "--temperature"),
        (["generate", "{model}", "--prompt", "w1", "--chat"], 1, "no chat template"),
        (["convert-gguf", "{text}", "{out}"], 1, "not a GGUF file"),
        (["convert-gguf", "{missing}", "{out}"], 1, "does not exist"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, tiny_dir, text_file, argv, code, message):
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    names = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "model": tiny_dir,
        "text": short,
        "out": tmp_path / "out",
    }
    got, out, err = run(capsys, *[a.format(**names) for a in argv])
    assert got == code
    assert out == ""
    assert message in err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]  # log lines
    assert len(lines) == 1 and lines[0].startswith("gptq-jax") and "Traceback" not in err


def test_help_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    assert "convert-gguf" in capsys.readouterr().out


def test_a_new_command_is_one_entry(capsys, monkeypatch):
    def add(p):
        p.add_argument("--bits", type=cli.positive_int, default=4)

    def run_it(args):
        print(f"bits={args.bits}")
        return 0

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, cli.Command("example", "an example command", add, run_it)])
    assert cli.main(["example", "--bits", "3"]) == 0
    assert capsys.readouterr().out == "bits=3\n"


def test_console_entry_stdout_is_pure_json(tiny_dir, text_file):
    """As a separate process: nothing but the JSON object reaches stdout (JAX and tqdm write to stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    argv = ["eval", str(tiny_dir), "--text", str(text_file), "--seqlen", "64", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "gptq_jax.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["windows"] == 4
