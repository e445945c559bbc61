"""Faults a careful user hits (issue 15), each through the command line: the exit status, the one-line message, and
that nothing the user owns was changed.

Interrupts are real signals (SIGINT and SIGTERM sent to this process while `main` runs, SIGKILL to a subprocess). A
full disk is a patched writer raising what safetensors raises on ENOSPC: a tmpfs needs root and a mount, which CI
machines do not promise.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_models import write_hf_checkpoint
from safetensors.numpy import load_file, save_file

from gptq_jax import cli
from gptq_jax.cli_common import CommandError
from gptq_jax.quantize_cmd import work_dir_for
from gptq_jax.resume import ResumeStore, atomic_write

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
# 11. The work directory stores codes packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_packing_round_trips(bits):
    from gptq_jax.resume import pack_bits, unpack_bits

    codes = np.random.default_rng(bits).integers(0, 2**bits, (7, 13)).astype(np.int32)  # odd sizes: a partial byte
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.shape), codes)


def test_work_directory_is_about_the_checkpoint_size(tmp_path):
    from gptq_jax.config import QuantConfig
    from gptq_jax.quantizer import rtn_quantize

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
