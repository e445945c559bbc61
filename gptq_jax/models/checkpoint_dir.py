"""Checkpoint directories on disk: which files hold the weights, and how a directory is written and put in place.

Every reader and writer of a checkpoint directory goes through here, so that they agree on one set of rules:

- **Finding the weights** (``weight_files``): ``model.safetensors`` if present, else the shards that
  ``model.safetensors.index.json`` lists, else a lone ``*.safetensors`` (AutoGPTQ-era names such as
  ``gptq_model-4bit-128g.safetensors``). Every name an index gives must be a plain file name in the directory: an
  absolute path, a separator or ``..`` is refused, so a checkpoint never makes us read outside itself.
- **Writing** (``staging`` + ``swap_into_place``): files are written into ``.OUT.partial-{pid}-*`` beside
  ``OUT``, which then takes ``OUT``'s place by renames (an existing ``OUT`` is first moved to ``OUT.old-{pid}``).
  An interrupted write never leaves a directory that looks complete; the pid in the names lets a later run tell a
  leftover of a killed write from a write still running (``gptq_jax.cli.quantize_cmd``).
- **Owning OUT_DIR** (``check_out_dir``): OUT_DIR may not be, contain or lie inside an input; a non-empty OUT_DIR
  is replaced only with ``overwrite`` and only when it is a directory we wrote (it holds ``OWNER_MARK``).
- **One run per OUT_DIR** (``hold_lock``): a lock file with the holder's pid; a lock left by a dead process is taken
  over with a message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gptq_jax.engine.resume import pid_alive

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Written into every directory gptq-jax writes, so that ``--overwrite`` can tell our outputs from the user's.
OWNER_MARK = ".gptq-jax-output"
LEGACY_MARKS = ("quant_report.json",)  # outputs of `quantize` written before OWNER_MARK existed
OLD_SUFFIX = ".old-"  # ``{out_dir}.old-{pid}``: the previous output, for the moment an overwrite swaps them
MAX_INDEX_BYTES = 64 * 2**20  # an index of 100k tensors is ~10 MB; anything far larger is not an index


class CheckpointDirError(ValueError):
    """A checkpoint directory (or an OUT_DIR) that cannot be used; the message names the path and the problem."""


def read_json_file(file: str | os.PathLike, *, max_bytes: int = MAX_INDEX_BYTES, what: str = "JSON") -> object:
    """``json.load`` of ``file`` with every failure (size, encoding, syntax, nesting too deep) a one-line
    ``ValueError`` naming the file."""
    file = os.fspath(file)
    size = os.path.getsize(file)
    if size > max_bytes:
        raise ValueError(f"{file} is {size:,} bytes, more than any {what} file should be ({max_bytes:,})")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{file} is not valid JSON: nested too deeply") from None


def shard_names(n: int) -> list[str]:
    """The weight file names of a checkpoint written in ``n`` shards (transformers' names)."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of ``path``'s index, checked: a JSON object whose
    ``weight_map`` maps strings to plain file names inside ``path``."""
    index = os.path.join(os.fspath(path), INDEX_FILE)
    data = read_json_file(index, what="safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} is not a safetensors index: it needs a non-empty \"weight_map\" object")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{index}: the file of tensor {tensor!r} must be a string, got {name!r}")
        if not name or os.path.basename(name) != name or name in (".", "..") or "\\" in name or "\0" in name:
            raise ValueError(f"{index} names shard {name!r} outside the checkpoint directory; only plain file "
                             "names in the directory are read")
    return weight_map


def weight_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of checkpoint directory ``path`` (see the module docstring for the rule)."""
    path = os.fspath(path)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        files = []
        for name in sorted(set(read_index(path).values())):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {file} listed in {os.path.join(path, INDEX_FILE)} does not exist")
            files.append(file)
        return files
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and os.path.isfile(os.path.join(path, f)))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    if found:
        raise FileNotFoundError(f"{path}: several .safetensors files without {INDEX_FILE}: {found}")
    present = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
    raise FileNotFoundError(
        f"no model.safetensors or {INDEX_FILE} in {path}"
        + (f" (found {present}; only safetensors checkpoints are read)" if present else "")
    )


def write_index(directory: str, weight_map: Mapping[str, str], total_size: int) -> None:
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------------
# Writing a directory


@contextlib.contextmanager
def naming(final: str) -> Iterator[None]:
    """Raise an ``OSError`` (a full disk) again naming ``final``, the path the file will have once the directory is
    complete, rather than the hidden staging directory it is written in."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot write {final}: {e.strerror or e}") from e


def save_safetensors(tensors: Mapping[str, Any], file: str, final: str) -> None:
    """``safetensors.numpy.save_file`` with metadata ``{"format": "pt"}``, its I/O errors (a full disk: safetensors
    raises its own error type for them) raised as ``OSError`` naming ``final``."""
    from safetensors.numpy import save_file

    try:
        with naming(final):
            save_file(dict(tensors), file, metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as e:  # SafetensorError: "I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        need = sum(a.nbytes for a in tensors.values())
        raise OSError(code, f"cannot write {final} ({need / 2**20:,.1f} MiB): {os.strerror(code)}") from e


def partial_prefix(out_dir: str | os.PathLike) -> str:
    """The name prefix of the temporary directory a write of ``out_dir`` builds (then ``{pid}-{random}``)."""
    return f".{os.path.basename(os.path.abspath(os.fspath(out_dir)))}.partial-"


@contextlib.contextmanager
def staging(out_dir: str | os.PathLike) -> Iterator[str]:
    """A fresh directory beside ``out_dir`` to write into; removed on the way out unless ``swap_into_place`` moved
    it (so a failure anywhere leaves ``out_dir`` as it was and nothing behind)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{partial_prefix(out_dir)}{os.getpid()}-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _public_permissions(directory: str) -> None:
    """``mkdtemp`` makes the directory private (0700), and some writers make their files 0600: give them the usual
    umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def swap_into_place(tmp: str, out_dir: str | os.PathLike) -> None:
    """Mark ``tmp`` (from ``staging``) as ours and rename it to ``out_dir``, replacing what is there."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    with open(os.path.join(tmp, OWNER_MARK), "w", encoding="utf-8") as f:
        f.write("written by gptq-jax; `--overwrite` may replace this directory\n")
    _public_permissions(tmp)
    if os.path.lexists(out_dir):
        old = f"{out_dir}{OLD_SUFFIX}{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


# ----------------------------------------------------------------------------------------------------------------------
# OUT_DIR rules


def resolve_path(path: Path, what: str) -> Path:
    """``path.resolve()``, a symlink loop reported as one (naming ``what``) instead of a RuntimeError."""
    try:
        return path.resolve(strict=False)
    except RuntimeError:  # Python < 3.13 raises RuntimeError on a symlink loop
        raise CheckpointDirError(f"{what} {path} is a symlink loop") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointDirError(f"{what} {path} is a symlink loop") from None
        raise


def check_overlap(out: Path, what: str, path: Path) -> None:
    """Refuse an OUT_DIR that is, contains or lies inside ``path`` (symlinks resolved): replacing OUT_DIR would
    delete the input, or the output would land among the inputs."""
    o, p = resolve_path(out, "OUT_DIR"), resolve_path(path, what)
    if o == p:
        raise CheckpointDirError(f"OUT_DIR {out} is {what} {path}; choose another OUT_DIR")
    if o in p.parents:
        raise CheckpointDirError(f"OUT_DIR {out} contains {what} {path}; choose an OUT_DIR outside it")
    if p in o.parents:
        raise CheckpointDirError(f"OUT_DIR {out} lies inside {what} {path}; choose an OUT_DIR outside it")


def is_ours(out: Path) -> bool:
    return any((out / mark).is_file() for mark in (OWNER_MARK, *LEGACY_MARKS))


def check_out_dir(out: str | os.PathLike, *, inputs: Mapping[str, str | os.PathLike] = (), overwrite: bool,
                  option: str = "--overwrite") -> Path:
    """OUT_DIR's rules, checked before any slow work: not overlapping any of ``inputs`` (what -> path), not a file,
    and, if not empty, replaced only with ``overwrite`` and only when gptq-jax wrote it."""
    out = Path(out)
    resolve_path(out, "OUT_DIR")
    for what, path in dict(inputs).items():
        check_overlap(out, what, Path(path))
    if os.path.islink(out) and not out.exists():
        raise CheckpointDirError(f"OUT_DIR {out} is a dangling symlink")
    if out.exists() and not out.is_dir():
        raise CheckpointDirError(f"OUT_DIR {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointDirError(f"OUT_DIR {out} is not empty (pass {option} to replace it)")
        if not is_ours(out):
            raise CheckpointDirError(
                f"OUT_DIR {out} is not empty and not an earlier gptq-jax output; {option} replaces only those: "
                "choose another OUT_DIR or empty it yourself"
            )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One run per OUT_DIR


def lock_path(out_dir: str | os.PathLike) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.gptq-lock")


def _lock_holder(lock: str) -> int | None:
    try:
        with open(lock, encoding="utf-8") as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def hold_lock(out_dir: str | os.PathLike) -> Iterator[str]:
    """Hold OUT_DIR's lock (``.OUT.gptq-lock`` beside it, holding our pid) for the block: a second run into the same
    OUT_DIR fails at once naming the holder; a lock whose process is gone is taken over with a warning."""
    lock = lock_path(out_dir)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_holder(lock)
            if pid is not None and pid_alive(pid):
                raise CheckpointDirError(
                    f"another gptq-jax run (pid {pid}) is writing {out_dir} (it holds {lock}); wait for it to "
                    "finish or choose another OUT_DIR"
                ) from None
            log.warning("taking over %s, left by process %s, which is gone", lock, pid)
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise CheckpointDirError(f"cannot take the lock {lock}: other runs keep taking it")
    try:
        yield lock
    finally:
        if _lock_holder(lock) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
