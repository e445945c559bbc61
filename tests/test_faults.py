"""Faults a careful user hits (issue 15), each through the command line: the exit status, the one-line message, and
that nothing the user owns was changed.

Interrupts are real signals (SIGINT and SIGTERM sent to this process while `main` runs, SIGKILL to a subprocess). A
full disk is a patched writer raising what safetensors raises on ENOSPC: a tmpfs needs root and a mount, which CI
machines do not promise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_models import write_hf_checkpoint
from safetensors.numpy import load_file, save_file

from gptq_jax import cli
from gptq_jax.cli.common import CommandError
from gptq_jax.cli.quantize_cmd import work_dir_for
from gptq_jax.engine.resume import ResumeStore, atomic_write
from gptq_jax.io import checkpoint

REPO = Path(__file__).resolve().parent.parent
Q_ARGS = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error line of a failed command (log lines start with a level name, progress bars with a description)."""
    lines = [line for line in err.splitlines() if line.startswith("gptq-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) -> SHA-256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def edit_tensor(file: Path, name: str, edit) -> None:
    tensors = load_file(str(file))
    tensors[name] = edit(tensors[name].copy())
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, model_dir, quantize argv tail, reference output dir of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("faults")
    model_dir = write_hf_checkpoint(root, "llama", 0, name="model", with_tokenizer=True)
    rng = np.random.default_rng(0)
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, 120, 12)) for _ in range(60)))
    args = [*Q_ARGS, "--calib", str(calib)]
    ref = root / "reference"
    assert cli.main(["quantize", str(model_dir), str(ref), *args]) == 0
    return root, model_dir, args, ref


def copy_model(tiny, dest: Path) -> Path:
    shutil.copytree(tiny[1], dest)
    return dest


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def crash_on_save(monkeypatch, *, after_layer: int | None, signum: int | None = None) -> None:
    """Make the run stop in ``ResumeStore.save``: before anything is saved (``after_layer=None``) or once layer
    ``after_layer`` is saved; by a real signal ``signum`` sent to this process, else by KeyboardInterrupt."""
    real = ResumeStore.save

    def save(self, index, *a, **k):
        if after_layer is not None:
            real(self, index, *a, **k)
        if after_layer is None or index == after_layer:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            time.sleep(10)  # the signal's handler raises here

    monkeypatch.setattr(ResumeStore, "save", save)


# ---------------------------------------------------------------------------------------------------------------------
# 1. OUT_DIR that is, contains or lies inside an input is refused; --overwrite replaces only our own output


@pytest.mark.parametrize(
    "layout,message",
    [
        ("proj/model proj", "contains MODEL_DIR"),
        ("proj/model .", "contains MODEL_DIR"),
        ("proj/model proj/model/q", "lies inside MODEL_DIR"),
        ("proj/model link", "contains MODEL_DIR"),  # link -> proj: symlinks are followed
        ("model proj --calib proj/calib.txt", "contains --calib"),
    ],
)
def test_out_dir_overlapping_an_input_is_refused(tiny, tmp_path, capsys, monkeypatch, layout, message):
    proj = tmp_path / "proj"
    proj.mkdir()
    copy_model(tiny, proj / "model")
    copy_model(tiny, tmp_path / "model")
    shutil.copy(tiny[0] / "calib.txt", proj / "calib.txt")
    (tmp_path / "link").symlink_to(proj)
    model, out, *rest = layout.split()
    if out == ".":  # run from inside proj
        monkeypatch.chdir(proj)
        model = "model"
    else:
        monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "proj")
    code, _, err = run(capsys, "quantize", model, out, *Q_ARGS, *rest, "--overwrite")
    assert code == 1 and message in one_line(err)
    assert snapshot(tmp_path / "proj") == before


def test_overwrite_replaces_only_our_own_output(tiny, tmp_path, capsys):
    root, model_dir, args, ref = tiny
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", model_dir, theirs, "--method", "rtn", "--group-size", "32", "--overwrite")
    assert code == 1 and "not an earlier gptq-jax output" in one_line(err)
    assert (theirs / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    shutil.copytree(ref, ours)
    code, _, err = run(capsys, "quantize", model_dir, ours, "--method", "rtn", "--group-size", "32", "--overwrite")
    assert code == 0, err
    assert json.loads((ours / "quant_report.json").read_text())["method"] == "rtn"


def test_only_our_files_leave_the_work_directory(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    work = work_dir_for(out)
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    assert code == 0, err
    assert [p.name for p in work.iterdir()] == ["mine.txt"] and (work / "mine.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Resume does not trust work made from other weights


def test_replaced_weights_are_not_resumed(tiny, tmp_path, capsys, monkeypatch):
    model = copy_model(tiny, tmp_path / "model")
    out = tmp_path / "q"
    crash_on_save(monkeypatch, after_layer=0)
    assert run(capsys, "quantize", model, out, *tiny[2])[0] == 130
    monkeypatch.undo()
    weights = model / "model.safetensors"
    stat = weights.stat()
    edit_tensor(weights, "model.layers.0.self_attn.q_proj.weight", lambda w: 2 * w)  # same path, same size
    if weights.stat().st_mtime_ns == stat.st_mtime_ns:  # a coarse clock: make the replacement visible
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, out_text, err = run(capsys, "quantize", model, out, *tiny[2])
    assert code == 1 and "different arguments (model files" in one_line(err)
    assert "resumed" not in out_text and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# 3. NaN in a checkpoint is named at load; --json is strict JSON


@pytest.fixture()
def nan_checkpoint(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny[3], bad)

    def nan(a):
        a[0, 1] = np.nan
        return a

    edit_tensor(bad / "model.safetensors", "model.layers.1.mlp.up_proj.scales", nan)
    return bad


@pytest.mark.parametrize("command", [["eval", "--seqlen", "32", "--json"], ["generate", "--prompt", "w1", "--json"]])
def test_nan_in_a_checkpoint_is_named(nan_checkpoint, tiny, capsys, command):
    extra = ["--text", str(tiny[0] / "calib.txt")] if command[0] == "eval" else []
    code, out, err = run(capsys, command[0], nan_checkpoint, *command[1:], *extra)
    assert code == 1 and out == ""
    line = one_line(err)
    assert "model.layers.1.mlp.up_proj.scales" in line and "1 NaN/Inf" in line


def test_json_output_is_strict(tiny, capsys):
    def no_constants(token):
        raise AssertionError(f"non-standard JSON token {token}")

    # One new token: no decode step, so the decode rate is undefined (was printed as a bare NaN).
    code, out, err = run(capsys, "generate", tiny[3], "--prompt", "w1 w2", "--max-new-tokens", "1", "--json")
    assert code == 0, err
    report = json.loads(out, parse_constant=no_constants)
    assert report["new_tokens"] == 1 and report["decode_tokens_per_second"] is None


# ---------------------------------------------------------------------------------------------------------------------
# 4. A full disk: which file, how much, and that the run resumes


def test_disk_full_during_the_final_save(tiny, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "q"

    def full_disk(tensors, file, metadata=None):
        Path(file).write_bytes(b"\0" * 100)  # what made it to disk before the device filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.numpy.save_file", full_disk)  # what every checkpoint writer calls
    code, _, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    line = one_line(err)
    assert code == 1 and "No space left on device" in line and str(out / "model.safetensors") in line
    assert re.search(r"model.safetensors \([\d,.]+ (MiB|bytes)\)", line)
    assert "2 finished layer(s) are kept" in line and "resume" in line
    assert not out.exists() and not list(tmp_path.glob(".q.partial-*"))
    monkeypatch.undo()
    code, printed, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    assert code == 0, err
    assert "resumed after 2 layers" in printed
    assert_same_checkpoint(tiny[3], out)


def test_too_little_space_is_found_before_writing(tiny, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, _, err = run(capsys, "quantize", tiny[1], tmp_path / "q", "--method", "rtn", "--group-size", "32")
    line = one_line(err)
    assert code == 1 and "not enough space" in line and "1,000 bytes are free" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# 4. A failed write in the work directory names the file


def test_work_file_write_error_names_the_file(tmp_path):
    def write(tmp):
        Path(tmp).write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "layer-00000.npz"
    with pytest.raises(OSError, match="cannot write .*layer-00000.npz: No space left on device") as e:
        atomic_write(str(target), write)
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# 5. A damaged work file is reported and its layer quantized again


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "drop the checksum file"])
def test_damaged_work_file_is_redone(tiny, tmp_path, capsys, monkeypatch, damage):
    out = tmp_path / "q"
    crash_on_save(monkeypatch, after_layer=1)
    assert run(capsys, "quantize", tiny[1], out, *tiny[2])[0] == 130
    monkeypatch.undo()
    npz = work_dir_for(out) / "layer-00000.npz"
    data = npz.read_bytes()
    if damage == "truncate":
        npz.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        npz.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        npz.with_suffix(".json").write_text('{"format": 2, "fingerprint"')
    code, printed, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    assert code == 0, err
    assert "layer 0 in the work directory is damaged" in err and "quantizing it again" in err
    assert "resumed" not in printed  # layer 1 was computed from layer 0, so it is redone too
    assert_same_checkpoint(tiny[3], out)


# ---------------------------------------------------------------------------------------------------------------------
# 6. --max-new-tokens beyond the context is capped


def test_max_new_tokens_is_capped_at_the_context(tiny, capsys):
    code, out, err = run(capsys, "generate", tiny[1], "--prompt", "w1 w2 w3", "--max-new-tokens", "100000000", "--json")
    assert code == 0, err
    assert "exceed the model's context of 256 tokens; generating at most 253 tokens" in err
    report = json.loads(out)
    assert report["new_tokens"] <= 253 and report["stop_reason"] in ("eos", "context")


# ---------------------------------------------------------------------------------------------------------------------
# 7. Tokenizer problems name the file


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("remove tokenizer", "has no tokenizer: expected tokenizer.json"),
        ("config.json", "config.json is not valid JSON: "),
        ("tokenizer.json", "tokenizer.json is not valid JSON: "),
    ],
)
def test_tokenizer_problems_name_the_file(tiny, tmp_path, capsys, breakage, message):
    model = copy_model(tiny, tmp_path / "model")
    if breakage == "remove tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (model / f).unlink(missing_ok=True)
    else:
        text = (model / breakage).read_text()
        (model / breakage).write_text(text[: len(text) // 2])
    code, _, err = run(capsys, "generate", model, "--prompt", "w1")
    line = one_line(err)
    assert code == 1 and message in line
    if breakage != "remove tokenizer":
        assert "line " in line and "column " in line


# ---------------------------------------------------------------------------------------------------------------------
# 8. --calib a directory; an unwritable OUT_DIR is found before any slow work


def test_calib_directory_is_named(tiny, capsys):
    code, _, err = run(capsys, "quantize", tiny[1], tiny[0] / "never", *Q_ARGS, "--calib", tiny[0])
    assert code == 1 and "is a directory; expected a UTF-8 text file" in one_line(err)
    code, _, err = run(capsys, "eval", tiny[1], "--text", tiny[0])
    assert code == 1 and "is a directory; expected a UTF-8 text file" in one_line(err)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_unwritable_out_dir_is_found_first(tiny, tmp_path, capsys, monkeypatch, method):
    import gptq_jax.models

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the probe see what a user would

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr("tempfile.TemporaryFile", denied)

    def never(*a, **k):
        raise AssertionError("the model was loaded before OUT_DIR was checked")

    monkeypatch.setattr(gptq_jax.models, "load_pretrained", never)
    try:
        code, _, err = run(capsys, "quantize", tiny[1], locked / "q", "--method", method, "--group-size", "32")
    finally:
        locked.chmod(0o755)
    line = one_line(err)
    assert code == 1 and f"{locked} is not writable (Permission denied)" in line
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# 9. NaN/Inf in the model's weights: all checked up front, the tensor named


def test_nan_in_model_weights_is_named_up_front(tiny, tmp_path, capsys, monkeypatch):
    import gptq_jax.engine.driver

    model = copy_model(tiny, tmp_path / "model")

    def inf(w):
        w[3, 4] = np.inf
        return w

    edit_tensor(model / "model.safetensors", "model.layers.1.mlp.down_proj.weight", inf)
    before = snapshot(model)

    def never(*a, **k):
        raise AssertionError("quantization started on a model with an Inf")

    monkeypatch.setattr(gptq_jax.engine.driver, "quantize", never)
    code, _, err = run(capsys, "quantize", model, tmp_path / "q", *tiny[2])
    line = one_line(err)
    assert code == 1 and "tensor model.layers.1.mlp.down_proj.weight" in line and "[3, 4]" in line
    assert snapshot(model) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------------------------------------------
# 10. Interrupts, leftovers, the progress bar


def test_failed_run_without_finished_layers_does_not_block_the_next(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    crash_on_save(monkeypatch, after_layer=None)
    code, _, err = run(capsys, "quantize", tiny[1], out, *tiny[2], "--seed", "1")
    assert code == 130 and "no layer had finished" in one_line(err)
    assert not work_dir_for(out).exists()  # it held no layer: nothing is left behind
    monkeypatch.undo()
    code, _, err = run(capsys, "quantize", tiny[1], out, *tiny[2])  # corrected: the default seed
    assert code == 0, err
    assert_same_checkpoint(tiny[3], out)


@pytest.mark.parametrize("signum,code,said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_interrupt_says_the_run_resumes(tiny, tmp_path, capsys, monkeypatch, signum, code, said):
    out = tmp_path / "q"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # test runners may install their own
    try:
        crash_on_save(monkeypatch, after_layer=0, signum=signum)
        got, _, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    finally:
        signal.signal(signal.SIGINT, previous)
    line = one_line(err)
    assert got == code and said in line
    assert f"1 finished layer(s) are kept in {work_dir_for(out)}; run the same command again to resume" in line
    monkeypatch.undo()
    code, printed, err = run(capsys, "quantize", tiny[1], out, *tiny[2])
    assert code == 0 and "resumed after 1 layers" in printed
    assert "2/2" in err  # the bar counts the resumed layer and reaches the total
    assert_same_checkpoint(tiny[3], out)


KILL_DURING_SAVE = """
import os, signal, sys
from gptq_jax import cli
from gptq_jax.io import checkpoint
real = checkpoint._write_shards
def write_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_shards = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_during_save_leaves_nothing_behind(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    argv = ["quantize", str(tiny[1]), str(out), "--method", "rtn", "--group-size", "32"]  # rtn: a quick start
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, *argv], env=env, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())  # the half-written output, and the lock the run held
    assert len(left) == 2 and left[1].startswith(f".q.partial-{proc.pid}-") and left[0] == ".q.gptq-lock", left
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert f"removed {tmp_path / left[1]}, left by a run that was killed while saving" in err
    assert f"left by process {proc.pid}, which is gone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_output_of_a_run_killed_while_overwriting_is_put_back(tiny, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    out = tmp_path / "q"
    shutil.copytree(tiny[3], tmp_path / f"q.old-{dead.pid}")  # the previous output, renamed aside, then SIGKILL
    before = snapshot(tmp_path / f"q.old-{dead.pid}")
    code, _, err = run(capsys, "quantize", tiny[1], out, "--method", "rtn", "--group-size", "32")
    assert code == 1 and f"OUT_DIR {out} is not empty" in one_line(err) and f"restored {out}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert snapshot(out) == {k.replace(f"q.old-{dead.pid}", "q"): v for k, v in before.items()}


# ---------------------------------------------------------------------------------------------------------------------
# 11. The work directory stores codes packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_round_trips(bits):
    from gptq_jax.engine.resume import pack_bits, unpack_bits

    codes = np.random.default_rng(bits).integers(0, 2**bits, (7, 13)).astype(np.int32)  # odd sizes: a partial byte
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.shape), codes)


def test_work_directory_is_about_the_checkpoint_size(tmp_path):
    from gptq_jax.core.config import QuantConfig
    from gptq_jax.core.quantizer import rtn_quantize

    w = np.random.default_rng(0).standard_normal((384, 1024)).astype(np.float32)
    qw = rtn_quantize(w, QuantConfig(bits=4, group_size=128))
    store = ResumeStore(str(tmp_path), "fp")
    store.save(0, {"model.layers.0.mlp.up_proj": qw}, {"linears": [], "layer": {}})
    size = (tmp_path / "layer-00000.npz").stat().st_size
    # 4 bits a code and a zero, f32 scales, int32 g_idx, and a few hundred bytes of zip and npy headers; int32 codes
    # alone were 8x the packed ones.
    want = (qw.codes.size + qw.zeros.size) * 4 // 8 + qw.scales.nbytes + qw.g_idx.nbytes
    assert want < size < want + 4096
    back, _ = store.load(0)
    for f in ("codes", "scales", "zeros", "g_idx"):
        got = np.asarray(getattr(back["model.layers.0.mlp.up_proj"], f))
        np.testing.assert_array_equal(got, np.asarray(getattr(qw, f)))


# ---------------------------------------------------------------------------------------------------------------------
# 10. -v is accepted after the subcommand as well as before it


def test_verbose_after_the_subcommand(capsys, tmp_path):
    missing = tmp_path / "missing"
    code, _, err = run(capsys, "eval", missing)
    assert code == 1 and "does not exist" in one_line(err)
    for argv in (["-v", "eval", str(missing)], ["eval", str(missing), "-v"]):
        with pytest.raises(CommandError, match="does not exist"):  # -v shows the traceback: the error propagates
            cli.main(argv)
