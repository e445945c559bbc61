"""Hostile and unlucky files (issue 25): each case ends in a one-line error naming the file and the problem (or, for a
valid input, a correct result), nothing the user owns is lost, and nothing outside a checkpoint is read.

The table's cases are fixtures here; ``test_fuzz_*`` feed each parser we own (config.json, quantize_config.json, the
safetensors index and header, tokenizer files, GGUF) random inputs with hypothesis, bounded in examples and time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers_models import tiny_config, write_hf_checkpoint
from safetensors.numpy import load_file, save_file

from gptq_jax import cli
from gptq_jax.engine.resume import ResumeStore

Q_ARGS = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("gptq-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, float model dir with tokenizer, quantize argv tail, a GPTQ checkpoint of it)."""
    root = tmp_path_factory.mktemp("hostile")
    model_dir = write_hf_checkpoint(root, "llama", 0, name="model", with_tokenizer=True)
    rng = np.random.default_rng(0)
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, 120, 12)) for _ in range(60)))
    args = [*Q_ARGS, "--calib", str(calib)]
    gptq = root / "gptq"
    assert cli.main(["quantize", str(model_dir), str(gptq), "--method", "rtn", *Q_ARGS[:4]]) == 0
    return root, model_dir, args, gptq


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def shard_into_index(ckpt: Path, outside: str) -> None:
    """Replace ``ckpt``'s model.safetensors by an index that puts one tensor in the file ``outside`` names."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    first = sorted(tensors)[0]
    save_file({first: tensors.pop(first)}, str(ckpt / "a.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(ckpt / "b.safetensors"), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(tensors, "b.safetensors"), first: outside}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    os.remove(ckpt / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Case 3: every path from an index stays inside its checkpoint; model.safetensors wins over an index, for both loaders


@pytest.mark.parametrize("kind", ["float", "gptq"])
@pytest.mark.parametrize("outside", ["abs", "../a.safetensors", "sub/../../a.safetensors"])
def test_index_cannot_point_outside(tiny, tmp_path, capsys, kind, outside):
    root, model_dir, _, gptq = tiny
    ckpt = copy(model_dir if kind == "float" else gptq, tmp_path / "ckpt")
    shard_into_index(ckpt, "a.safetensors")
    shutil.move(ckpt / "a.safetensors", tmp_path / "a.safetensors")  # the tensor now lies outside the checkpoint
    name = str(tmp_path / "a.safetensors") if outside == "abs" else outside
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (name if v == "a.safetensors" else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run(capsys, "eval", ckpt, "--seqlen", "16", "--max-windows", "1")
    assert code == 1
    assert "model.safetensors.index.json names shard" in one_line(err) and "outside the checkpoint" in err


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_model_safetensors_wins_over_an_index(tiny, tmp_path, kind):
    """Both loaders read model.safetensors when both it and an index are there (transformers' order)."""
    from gptq_jax.io.checkpoint import load_quantized
    from gptq_jax.models import load_pretrained

    root, model_dir, _, gptq = tiny
    ckpt = copy(model_dir if kind == "float" else gptq, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    (load_pretrained if kind == "float" else load_quantized)(ckpt)  # the index (naming a missing file) is not read


# ---------------------------------------------------------------------------------------------------------------------
# Cases 4 and 5: a model file rewritten or truncated while `quantize` runs


def first_byte_of_layer_1(file: Path) -> int:
    """Where the data of the first ``model.layers.1.*`` tensor starts: cut there, every layer-1 read is past the end."""
    from gptq_jax.models.safetensors_file import SafetensorsFile

    with SafetensorsFile(file) as f:
        return min(f.info(n).start for n in f.keys() if n.startswith("model.layers.1."))


def rewrite_after_layer_0(monkeypatch, file: Path, how: str, marker: Path | None = None) -> None:
    """Once layer 0 is saved (layer 1 not yet read): change layer 1's bytes in place, or truncate the file before
    layer 1's data. ``marker`` gets the file's size afterwards, so a test can tell that the rewrite happened."""
    real = ResumeStore.save

    def save(self, index, *a, **k):
        real(self, index, *a, **k)
        if index == 0:
            st = os.stat(file)
            if how == "same size":  # change layer 1's bytes in place, keep size, inode and mtime (like `cp -p`)
                tensors = load_file(str(file))
                name = "model.layers.1.mlp.down_proj.weight"
                raw = file.read_bytes()
                at = raw.find(tensors[name].tobytes())
                with open(file, "r+b") as f:
                    f.seek(at)
                    f.write((tensors[name] * 2).tobytes())
                os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                os.truncate(file, first_byte_of_layer_1(file))
            if marker is not None:
                marker.write_text(str(os.path.getsize(file)))

    monkeypatch.setattr(ResumeStore, "save", save)


def test_rewrite_during_quantize_stops_it(tiny, tmp_path, capsys, monkeypatch):
    """Case 4: the fingerprint was taken only at the start, so a same-size rewrite gave a mixed checkpoint, exit 0."""
    root, model_dir, args, _ = tiny
    model = copy(model_dir, tmp_path / "model")
    rewrite_after_layer_0(monkeypatch, model / "model.safetensors", "same size")
    code, err = run(capsys, "quantize", model, tmp_path / "q", *args)
    assert code == 1
    assert "model.safetensors: tensor model.layers.1" in one_line(err) and "changed since it was first read" in err
    assert not (tmp_path / "q").exists()


TRUNCATE = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import pytest
from test_hostile_files import rewrite_after_layer_0
from gptq_jax import cli
mp = pytest.MonkeyPatch()
rewrite_after_layer_0(mp, Path({file!r}), "truncate", Path({marker!r}))
sys.exit(cli.main({argv!r}))
"""

SIGBUS = (-7, 128 + 7)  # killed by the signal (Python's subprocess), or a shell's report of it


def run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python, its temporary files under ``tmp_path/tmp`` (so a test can see what it left)."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode not in SIGBUS, f"killed by SIGBUS (exit {proc.returncode}): a memory map of the file"
    return proc


def test_truncation_during_quantize_is_a_message_not_sigbus(tiny, tmp_path):
    """Case 5: the weights were memory-mapped, so a truncating rewrite killed the run with SIGBUS (exit 135). Here the
    file is cut before layer 1's data once layer 0 is done, so reading layer 1 from a map would touch pages past the
    end; the run must stop with one line naming the file, and write nothing to OUT_DIR."""
    root, model_dir, args, _ = tiny
    model = copy(model_dir, tmp_path / "model")
    file, marker, out = model / "model.safetensors", tmp_path / "truncated", tmp_path / "q"
    cut = first_byte_of_layer_1(file)
    assert file.stat().st_size - cut > 2 * 4096  # whole pages past the cut: a map would fault on them
    argv = ["quantize", str(model), str(out), *args]
    script = TRUNCATE.format(tests=str(Path(__file__).parent), file=str(file), marker=str(marker), argv=argv)
    proc = run_script(script, tmp_path)
    assert marker.read_text() == str(cut), "the file was not truncated during the run"
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert f"{file} changed while it was being read (size" in line and "nothing was written" in line, line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


# ---------------------------------------------------------------------------------------------------------------------
# Case 15: one run per OUT_DIR


def test_second_run_into_one_out_dir_stops_at_once(tiny, tmp_path, capsys):
    """Two runs into one OUT_DIR both did their work, then one or both failed about a missing block."""
    from gptq_jax.cli.quantize_cmd import work_dir_for
    from gptq_jax.models.checkpoint_dir import lock_path

    _, model_dir, args, _ = tiny
    out = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(lock_path(out)).write_text(f"{holder.pid}\n")
        code, err = run(capsys, "quantize", model_dir, out, *args)
        assert code == 1
        assert f"another gptq-jax run (pid {holder.pid}) is writing" in one_line(err)
        assert not out.exists() and not work_dir_for(out).exists()
        assert Path(lock_path(out)).read_text() == f"{holder.pid}\n"  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is taken over with a message, the run succeeds and removes the lock.
    code, err = run(capsys, "quantize", model_dir, out, *args, "--method", "rtn")
    assert code == 0, err
    assert f"taking over {lock_path(out)}, left by process {holder.pid}, which is gone" in err
    assert not os.path.exists(lock_path(out))


def test_failure_before_any_layer_leaves_no_work_directory(tiny, tmp_path, capsys, monkeypatch):

    _, model_dir, args, _ = tiny
    out = tmp_path / "q"

    def fail(self, *a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(ResumeStore, "save", fail)
    code, err = run(capsys, "quantize", model_dir, out, *args)
    assert code == 1 and "boom" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Cases 7, 11, 13: config.json checked field by field, with bounds, before anything is built or read by transformers

CONFIG_CASES = {
    "rms_norm_eps -1": ({"rms_norm_eps": -1}, "field 'rms_norm_eps' must be > 0"),  # case 7: NaN perplexity
    "layers 10^6": ({"num_hidden_layers": 10**6}, "field 'num_hidden_layers' must be >= 1 and <= 4096"),  # case 11
    "hidden_size str": ({"hidden_size": "64"}, "field 'hidden_size' must be an integer, got '64'"),
    "heads float": ({"num_attention_heads": 4.0}, "field 'num_attention_heads' must be an integer"),
    "tie str": ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
    "eps str": ({"rms_norm_eps": "1e-6"}, "field 'rms_norm_eps' must be a number"),
    "rope_scaling str": ({"rope_scaling": "linear"}, "field 'rope_scaling' must be a JSON object"),
    "rope_theta neg": ({"rope_theta": -1}, "field 'rope_theta' must be > 0"),
    "eos str": ({"eos_token_id": "2"}, "field 'eos_token_id' must be a token id or a list of them"),
    "head_dim str": ({"head_dim": "16"}, "field 'head_dim' must be an integer"),
    "hidden_act list": ({"hidden_act": ["silu"]}, "field 'hidden_act' must be a string"),
    "quantization_config str": ({"quantization_config": "gptq"}, "field 'quantization_config' must be a JSON object"),
    "max_position_embeddings 0": ({"max_position_embeddings": 0}, "field 'max_position_embeddings' must be >= 1"),
    "max_position_embeddings -100": ({"max_position_embeddings": -100}, "field 'max_position_embeddings' must be"),
    "num_key_value_heads 0": ({"num_key_value_heads": 0}, "field 'num_key_value_heads' must be >= 1"),
    "bos 10^30": ({"bos_token_id": 10**30}, "field 'bos_token_id' must be >= 0"),
}


def write_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edit(cfg)) if callable(edit) else edit)


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_field_is_named(tiny, tmp_path, capsys, case):
    edit, message = CONFIG_CASES[case]
    ckpt = copy(tiny[1], tmp_path / "ckpt")
    write_config(ckpt, lambda c: {**c, **edit})
    code, err = run(capsys, "eval", ckpt, "--seqlen", "16", "--max-windows", "1")
    assert code == 1
    line = one_line(err)
    assert f"{ckpt / 'config.json'}: {message}" in line, line


@pytest.mark.parametrize("text,message", [
    ("[" * 200_000 + "]" * 200_000, "is not valid JSON: nested too deeply"),
    ("[1, 2]", "must hold a JSON object, got list"),
])
@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_malformed_config_json_is_named(tiny, tmp_path, capsys, text, message, command):
    ckpt = copy(tiny[1], tmp_path / "ckpt")
    write_config(ckpt, text)
    extra = ["--max-windows", "1"] if command == "eval" else [tmp_path / "q", *tiny[2]]
    code, err = run(capsys, command, ckpt, *extra)
    assert code == 1 and message in one_line(err) and "config.json" in one_line(err)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda q: {**q, "bits": None}, "field 'bits' must be an integer, got null"),
    (lambda q: {**q, "bits": "4"}, "field 'bits' must be an integer"),
    (lambda q: {**q, "group_size": 0}, "group_size 0 is not a group size"),
    (lambda q: {**q, "desc_act": "no"}, "field 'desc_act' must be true or false"),
])
def test_bad_quantize_config_json_is_named(tiny, tmp_path, capsys, edit, message):
    """The AutoGPTQ-era quantize_config.json (config.json without quantization_config)."""
    ckpt = copy(tiny[3], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "quantize_config.json").write_text(json.dumps(edit(qc)))
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1")
    assert code == 1 and f"{ckpt / 'quantize_config.json'}: {message}" in one_line(err)


def test_quantize_config_parse_error_names_the_file(tiny, tmp_path, capsys):
    ckpt = copy(tiny[3], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "quantize_config.json").write_text("{bits: 4")
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1")
    assert code == 1 and f"{ckpt / 'quantize_config.json'} is not valid JSON" in one_line(err)


@pytest.mark.parametrize("index,message", [
    ({"metadata": {}}, 'needs a non-empty "weight_map" object'),
    ({"weight_map": {"x": 3}}, "the file of tensor 'x' must be a string"),
    ([1], 'needs a non-empty "weight_map" object'),
])
def test_bad_index_names_the_file(tiny, tmp_path, capsys, index, message):
    ckpt = copy(tiny[1], tmp_path / "ckpt")
    shard_into_index(ckpt, "a.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1")
    assert code == 1 and f"{ckpt / 'model.safetensors.index.json'}" in one_line(err) and message in err


@pytest.mark.parametrize("breakage,message", [
    (lambda p: p.write_text('{"model": 1}'), 'its "model" must be a JSON object'),
    (lambda p: os.truncate(p, 200 * 2**20), "more than any tokenizer.json file should be"),  # sparse: no disk used
])
def test_bad_tokenizer_json_is_named(tiny, tmp_path, capsys, breakage, message):
    ckpt = copy(tiny[1], tmp_path / "ckpt")
    breakage(ckpt / "tokenizer.json")
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1")
    assert code == 1 and f"{ckpt / 'tokenizer.json'}" in one_line(err) and message in err


def test_out_dir_symlink_loop_is_named(tiny, tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    code, err = run(capsys, "quantize", tiny[1], loop, *tiny[2])
    assert code == 1 and "is a symlink loop" in one_line(err)


# ---------------------------------------------------------------------------------------------------------------------
# Case 12: every package the code imports (or makes transformers import) is declared


# What our calls make other packages import lazily: the call in our source -> the distribution it needs.
INDIRECT = {"apply_chat_template": "jinja2"}  # transformers renders chat templates with jinja2 and does not need it


def test_every_imported_package_is_declared():
    import ast
    import importlib.metadata as md
    import tomllib

    repo = Path(__file__).resolve().parent.parent
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    dists = md.packages_distributions()
    needed: dict[str, str] = {}
    for file in [*(repo / "gptq_jax").rglob("*.py"), *(repo / "pallas_kernels").rglob("*.py")]:
        source = file.read_text()
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("gptq_jax", "pallas_kernels"):
                    continue
                for dist in dists.get(top, [top]):
                    needed.setdefault(dist.lower().replace("_", "-"), str(file.relative_to(repo)))
        for call, dist in INDIRECT.items():
            if call in source:
                needed.setdefault(dist, str(file.relative_to(repo)))
    # jaxlib comes with jax; the GPU toolchains are optional and imported only where present.
    optional = {"jax-cuda12-plugin", "jax-cuda13-plugin", "triton", "nvidia-cuda-nvcc-cu12"}
    missing = {d: f for d, f in needed.items() if d not in declared and d not in optional}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# ---------------------------------------------------------------------------------------------------------------------
# Case 6: token ids checked against the vocabulary


@pytest.fixture()
def big_tokenizer_model(tiny, tmp_path):
    """The tiny model (vocab_size 128) with a tokenizer of 200 words: `w150` encodes to an id past the embedding."""
    from helpers_models import write_tiny_tokenizer

    ckpt = copy(tiny[1], tmp_path / "ckpt")
    write_tiny_tokenizer(ckpt, vocab_size=200)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in range(0, 200, 3)) * 20)
    return ckpt, text


@pytest.mark.parametrize("command", ["eval", "generate", "quantize"])
def test_token_id_past_the_vocabulary_is_named(big_tokenizer_model, tiny, tmp_path, capsys, command):
    ckpt, text = big_tokenizer_model
    argv = {
        "eval": ["eval", ckpt, "--text", text, "--seqlen", "16"],
        "generate": ["generate", ckpt, "--prompt", "w1 w150", "--max-new-tokens", "2"],
        "quantize": ["quantize", ckpt, tmp_path / "q", *Q_ARGS, "--calib", text],
    }[command]
    code, err = run(capsys, *argv)
    assert code == 1
    line = one_line(err)
    assert "outside the model's vocabulary of 128" in line and "does not belong to this model" in line, line
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Cases 8 and 9: a quantized checkpoint is checked for consistency


def relabel(tiny, tmp_path, edit) -> Path:
    ckpt = copy(tiny[3], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_quantized_linear_missing_a_bias_the_architecture_needs(tiny, tmp_path, capsys):
    """Case 8: a Llama GPTQ checkpoint relabelled Qwen2 loaded without Qwen2's q/k/v biases."""
    ckpt = relabel(tiny, tmp_path, lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1", "--seqlen", "16")
    assert code == 1
    assert re.search(r"model.layers.0.self_attn.[qkv]_proj has no bias, but a Qwen2ForCausalLM model has one",
                     one_line(err))


def test_group_size_against_g_idx(tiny, tmp_path, capsys):
    """Case 9: group_size 48 on a file made at 32 (the group counts of K=64 still match: 2 and 2)."""
    ckpt = relabel(tiny, tmp_path, lambda c: c["quantization_config"].update(group_size=48))
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1", "--seqlen", "16")
    assert code == 1 and "g_idx does not give groups of group_size=48" in one_line(err)


def test_v1_file_labelled_v2(tiny, tmp_path, capsys):
    """Case 9: a symmetric v1 file (stored zero - 1) labelled gptq_v2 ran with every zero off by one."""
    ckpt = relabel(tiny, tmp_path, lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    code, err = run(capsys, "eval", ckpt, "--max-windows", "1", "--seqlen", "16")
    assert code == 1 and "qzeros all hold 7, the symmetric zero as gptq stores it" in one_line(err)


def test_consistent_checkpoint_still_loads(tiny):
    from gptq_jax.io.checkpoint import load_quantized

    load_quantized(tiny[3])


# ---------------------------------------------------------------------------------------------------------------------
# Cases 10, 13 and 14: GGUF counts against the file size, metadata against the tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama GGUF file (F32) with an int32 array field `test.array`, as llama.cpp would write it."""
    import gguf
    from helpers_models import build_torch_model, tiny_config
    from test_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("gguf")
    config = tiny_config("llama")
    tensors = {k: v.numpy() for k, v in build_torch_model(config, seed=0).state_dict().items()}
    path = root / "tiny.gguf"
    real = gguf.GGUFWriter.write_header_to_file

    def with_array(self, *a, **k):
        self.add_array("test.array", [1, 2, 3])
        return real(self, *a, **k)

    gguf.GGUFWriter.write_header_to_file = with_array
    try:
        write_tiny_gguf(path, config, tensors)
    finally:
        gguf.GGUFWriter.write_header_to_file = real
    return path


def patch_field(path: Path, key: str, after_type: int, fmt: str, value: int) -> None:
    """Overwrite the value of metadata field ``key`` (``after_type`` bytes past its type: 4 for a scalar, 8 for an
    array's count) with ``value`` packed as ``fmt``."""
    import struct

    raw = bytearray(path.read_bytes())
    name = struct.pack("<Q", len(key)) + key.encode()
    at = raw.index(name) + len(name) + after_type
    raw[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))


GGUF_CASES = {
    # Case 10: memory grew without bound. The message names the entry and the bytes its count needs against those left.
    "array count 2^40": ("test.array", 8, "<Q", 2**40, "is corrupt: metadata entry"),
    "head_count 0": ("llama.attention.head_count", 4, "<I", 0, "field 'llama.attention.head_count' must be >= 1"),
    "embedding_length 0": ("llama.embedding_length", 4, "<I", 0, "field 'llama.embedding_length' must be >= 1"),
    "block_count 10^9": ("llama.block_count", 4, "<I", 10**9, "field 'llama.block_count' must be >= 1 and <= 4096"),
    "block_count 3": ("llama.block_count", 4, "<I", 3, "llama.block_count is 3, the tensors hold 2 block(s)"),
    "context_length 0": ("llama.context_length", 4, "<I", 0, "field 'llama.context_length' must be >= 1"),
    "feed_forward_length 8": ("llama.feed_forward_length", 4, "<I", 8, "the metadata implies"),
    "head_count_kv 3": ("llama.attention.head_count_kv", 4, "<I", 3, "must be a multiple of num_key_value_heads=3"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_metadata_is_checked_before_anything_is_allocated(tiny_gguf, tmp_path, capsys, case):
    key, after, fmt, value, message = GGUF_CASES[case]
    path = tmp_path / "x.gguf"
    shutil.copy(tiny_gguf, path)
    patch_field(path, key, after, fmt, value)
    code, err = run(capsys, "convert-gguf", path, tmp_path / "out")
    assert code == 1
    line = one_line(err)
    assert str(path) in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_convert_gguf_onto_a_full_disk(tiny_gguf, tmp_path, capsys, monkeypatch):
    """Case 13: safetensors' own error type for ENOSPC came out as a traceback naming the staging directory."""
    from safetensors import SafetensorError

    def full_disk(tensors, file, metadata=None):
        Path(file).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.numpy.save_file", full_disk)
    out = tmp_path / "out"
    code, err = run(capsys, "convert-gguf", tiny_gguf, out)
    line = one_line(err)
    assert code == 1 and "No space left on device" in line and f"cannot write {out / 'model.safetensors'}" in line
    assert ".partial-" not in line and sorted(p.name for p in tmp_path.iterdir()) == []


CHANGE_GGUF = """
import os, sys
from pathlib import Path
import gptq_jax.io.gguf as mod
from gptq_jax import cli
real = mod.checked_metadata

def checked_then_changed(f, header):
    meta = real(f, header)  # the header is walked and every check passed; no tensor data has been read yet
    first = min(t.start for t in f.tensors)
    if {how!r} == "truncate":
        os.truncate(f.path, first)  # every tensor's data is now past the end of the file
    else:
        with open(f.path, "r+b") as out:  # same size, other bytes (a new mtime)
            out.seek(first)
            out.write(os.urandom(1024))
    Path({marker!r}).write_text(str(os.path.getsize(f.path)))
    return meta

mod.checked_metadata = checked_then_changed
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_gguf_changed_during_convert_is_a_message_not_sigbus(tiny_gguf, tmp_path, how):
    """The tensors were read through the `gguf` package's memory map of the file: a GGUF truncated after the header
    was checked killed convert-gguf with SIGBUS. Now tensors are read with plain reads, each checked against the file
    as it was opened: one line naming the file, nothing written, no temporary file left."""
    from gptq_jax.io.gguf_file import GGUFFile

    path, marker, out = tmp_path / "x.gguf", tmp_path / "changed", tmp_path / "out"
    shutil.copy(tiny_gguf, path)
    with GGUFFile(path) as f:
        first = min(t.start for t in f.tensors)
    assert path.stat().st_size - first > 2 * 4096  # whole pages past the cut: a map would fault on them
    proc = run_script(CHANGE_GGUF.format(how=how, marker=str(marker), argv=["convert-gguf", str(path), str(out)]),
                      tmp_path)
    assert marker.read_text() == str(first if how == "truncate" else tiny_gguf.stat().st_size)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert f"{path} changed while it was being read" in line and "nothing was written" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.gguf", "changed", "tmp"])
    assert list((tmp_path / "tmp").iterdir()) == []  # the metadata's private copy is gone too


# ---------------------------------------------------------------------------------------------------------------------
# Fuzzing: every parser we own, on random inputs. Each must return or raise one of the errors the CLI reports on one
# line (ValueError, OSError), with a one-line message naming the file, within a time bound (hypothesis' deadline)
# and a memory bound (tracemalloc's peak), never reading outside the directory. Bounded so the whole runs in CI
# in well under a minute.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
MEMORY_BOUND = 64 * 2**20

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def expect_clean(fn, file: str | Path):
    """``fn()``'s value, or None if it raised a clean error: ValueError or OSError, one line, naming ``file``."""
    import tracemalloc

    tracemalloc.start()
    try:
        return fn()
    except (ValueError, OSError) as e:
        text = str(e)
        assert "\n" not in " ".join(text.split()) and text, text
        assert str(file) in text or os.path.basename(str(file)) in text, f"{text!r} does not name {file}"
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"{peak / 2**20:.0f} MiB allocated"


CONFIG_KEYS = sorted({*tiny_config("llama"), "head_dim", "rope_scaling", "rope_parameters",
                      "sliding_window", "use_sliding_window", "layer_types", "quantization_config", "attention_bias"})


@pytest.fixture(scope="module")
def valid_config() -> dict:
    from helpers_models import tiny_config

    return tiny_config("llama")


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, min_size=1, max_size=3))
def test_fuzz_config_json(valid_config, edits):
    import tempfile

    from gptq_jax.models import ModelConfig

    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "config.json"
        file.write_text(json.dumps({**valid_config, **edits}))
        expect_clean(lambda: ModelConfig.from_json(d), file)


@FUZZ
@given(doc=json_values, text=st.text(max_size=40))
def test_fuzz_config_json_documents(doc, text):
    import tempfile

    from gptq_jax.models import ModelConfig

    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "config.json"
        for content in (json.dumps(doc), text):
            file.write_text(content)
            expect_clean(lambda: ModelConfig.from_json(d), file)


@FUZZ
@given(qc=st.dictionaries(st.sampled_from(["bits", "group_size", "sym", "desc_act", "checkpoint_format",
                                           "quant_method", "damp_percent", "static_groups"]), json_values),
       side=st.booleans())
def test_fuzz_quantization_config(valid_config, qc, side):
    import tempfile

    from gptq_jax.io.checkpoint import read_quantization_config

    with tempfile.TemporaryDirectory() as d:
        if side:
            (Path(d) / "config.json").write_text(json.dumps(valid_config))
            (Path(d) / "quantize_config.json").write_text(json.dumps(qc))
            file = Path(d) / "quantize_config.json"
        else:
            (Path(d) / "config.json").write_text(json.dumps({**valid_config, "quantization_config": qc}))
            file = Path(d) / "config.json"
        got = expect_clean(lambda: read_quantization_config(d), file)
        if got is not None:
            assert got["bits"] in (2, 3, 4, 8) and got["checkpoint_format"] in ("gptq", "gptq_v2")


shard_names = st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "sub/a.safetensors", "..", ".",
                               "", "a\\..\\b", "b.safetensors"]) | st.text(max_size=12)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=6), shard_names
                                                                                | json_values, max_size=4)}))
def test_fuzz_safetensors_index(index):
    import tempfile

    from gptq_jax.models.checkpoint_dir import weight_files

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.safetensors").write_bytes(b"")
        file = Path(d) / "model.safetensors.index.json"
        file.write_text(json.dumps(index))
        files = expect_clean(lambda: weight_files(d), file)
        for f in files or []:  # never a file outside the checkpoint
            assert Path(f).resolve().parent == Path(d).resolve(), f


@pytest.fixture(scope="module")
def valid_safetensors(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int32)}, str(path))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_file(valid_safetensors, data):
    """Random byte edits, truncations and header rewrites of a valid file."""
    import tempfile

    from gptq_jax.models.safetensors_file import SafetensorsFile

    raw = bytearray(valid_safetensors)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "header"]))
        if kind == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            header = json.dumps(data.draw(json_values)).encode()
            raw = bytearray(len(header).to_bytes(8, "little") + header + bytes(raw[8:]))
    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "x.safetensors"
        file.write_bytes(bytes(raw))

        def read_all():
            with SafetensorsFile(file) as f:
                return {k: f.read(k) for k in f.keys()}

        expect_clean(read_all, file)


@pytest.fixture(scope="module")
def transformers_loaded():
    """Import transformers' tokenizer classes once, outside the memory bound of any example."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


@settings(max_examples=12, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(tokenizer=json_values, tokenizer_config=json_values)
def test_fuzz_tokenizer_files(transformers_loaded, valid_config, tokenizer, tokenizer_config):
    import tempfile

    from gptq_jax.models import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(valid_config))
        (Path(d) / "tokenizer.json").write_text(json.dumps(tokenizer))
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        expect_clean(lambda: load_tokenizer(d), d)


@settings(max_examples=40, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_fuzz_gguf(tiny_gguf, data):
    """Random byte edits and truncations of a tiny GGUF file, through everything convert-gguf does before writing:
    the header walk, the reader (on the metadata's copy), the metadata and shape checks."""
    import tempfile

    from gptq_jax.io.gguf import checked_metadata
    from gptq_jax.io.gguf_file import GGUFFile

    raw = bytearray(tiny_gguf.read_bytes())
    header_end = min(len(raw), 4096)  # the edits that matter fall in the header and metadata
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
            header_end = min(header_end, len(raw)) or 1
            if not raw:
                break

    with tempfile.TemporaryDirectory() as d:
        file = Path(d) / "x.gguf"
        file.write_bytes(bytes(raw))

        def convert_checks():
            with GGUFFile(file) as f, f.metadata_copy() as header:
                checked_metadata(f, header)

        expect_clean(convert_checks, file)


def test_model_dir_symlink_loop_is_named(tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    code, err = run(capsys, "eval", loop)
    assert code == 1 and "is a symlink that leads nowhere" in one_line(err)
