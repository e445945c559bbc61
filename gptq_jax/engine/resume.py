"""The resume store: each finished block of a quantization run, saved in a work directory.

A run that is interrupted (Ctrl-C, a crash, a killed job) restarts after the last finished block when it is
given the same work directory and the same job. What "the same job" means is the fingerprint the caller
computes (``fingerprint``): a store opened with another fingerprint refuses to resume, unless it holds no finished
block yet (then it is simply reused for the new job).

Files, each written to a temporary name, flushed to disk (fsync) and renamed, so a crash leaves the old file or the
whole new one:

- ``manifest.json``: ``{"fingerprint": ..., "format": 2}``
- ``layer-{i:05d}.npz``: every ``QuantizedWeight`` of block ``i``, under ``{name}/{field}``. Codes and zeros are
  stored bit-packed (``{name}/codes_packed`` uint8, ``bits`` bits per value, row-major; the shape in
  ``{name}/codes_shape``): a SmolLM2 layer at 4 bits takes 1.9 MB instead of 14.4 MB with int32 codes, about
  the size of its part of the final checkpoint.
- ``layer-{i:05d}.json``: block ``i``'s report records, the job's fingerprint, and the size and SHA-256 of the npz.
  It is written after the npz, so a block counts as finished only once both are complete, and a damaged npz (a
  truncated copy, a full disk, bit rot) is recognised on load: the block is reported and quantized again.

Leftovers of a killed run (``*.tmp-{pid}``) are removed when the next run opens the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptq_jax.core.quantizer import CODE_DTYPE, QuantizedWeight

log = logging.getLogger(__name__)

FORMAT = 2
_QW_FIELDS = ("codes", "scales", "zeros", "g_idx", "loss", "damp", "fallback")
_PACKED = ("codes", "zeros")  # integer fields in [0, 2**bits - 1]
_LAYER_FILE = re.compile(r"layer-(\d{5})\.(npz|json)")


def fingerprint(parts: Iterable[str], arrays: Iterable[np.ndarray] = ()) -> str:
    """A digest of everything a run's result depends on: ``parts`` (reprs of configs and options) and ``arrays``
    (calibration tokens and masks, ...)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)``, fsync, then rename ``tmp`` to ``path``: readers (and a run after a power loss) see the old file
    or the whole new one. An ``OSError`` (a full disk, no permission) is raised again naming ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours, or another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(directory: str, pattern: str) -> list[str]:
    """Remove the entries of ``directory`` whose name fully matches ``pattern`` (a regex with a group named ``pid``)
    and whose process is gone: what a killed run of ours left behind. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(pattern, name)
        if m is None or pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(path)
    return removed


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in ``[0, 2**bits)`` of any shape -> uint8 ``[ceil(size * bits / 8)]``: each value's ``bits`` low bits,
    least significant first, values in row-major order."""
    v = np.asarray(values).reshape(-1).astype(np.uint32)
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # (size, bits)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """``pack_bits`` undone: int32 array of ``shape``."""
    size = int(np.prod(shape))
    planes = np.unpackbits(packed, count=size * bits, bitorder="little").reshape(size, bits)
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int32)
    return (planes.astype(np.int32) @ weights).reshape(shape)


def _encode(weights: dict[str, QuantizedWeight]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, qw in weights.items():
        for f in _QW_FIELDS:
            a = np.asarray(getattr(qw, f))
            if f in _PACKED:
                arrays[f"{name}/{f}_packed"] = pack_bits(a, qw.bits)
                arrays[f"{name}/{f}_shape"] = np.asarray(a.shape, np.int64)
            else:
                arrays[f"{name}/{f}"] = a
        if qw.perm is not None:
            arrays[f"{name}/perm"] = np.asarray(qw.perm)
        arrays[f"{name}/meta"] = np.asarray([qw.bits, qw.group_size, int(qw.sym)])
    return arrays


def _decode(data: Any) -> dict[str, QuantizedWeight]:
    names = sorted({k.rsplit("/", 1)[0] for k in data.files})
    weights = {}
    for name in names:
        bits, group_size, sym = (int(v) for v in data[f"{name}/meta"])
        fields = {}
        for f in _QW_FIELDS:
            if f"{name}/{f}_packed" in data.files:
                shape = tuple(int(s) for s in data[f"{name}/{f}_shape"])
                fields[f] = jnp.asarray(unpack_bits(data[f"{name}/{f}_packed"], bits, shape))
            else:  # format 1 stored int32
                fields[f] = jnp.asarray(data[f"{name}/{f}"])
        fields["codes"] = fields["codes"].astype(CODE_DTYPE)
        perm = jnp.asarray(data[f"{name}/perm"]) if f"{name}/perm" in data.files else None
        weights[name] = QuantizedWeight(**fields, perm=perm, bits=bits, group_size=group_size, sym=bool(sym))
    return weights


def remove_store(work_dir: str) -> None:
    """Delete a finished job's work directory: the files a store writes, then the directory if nothing else is in
    it (a file someone else put there is left alone)."""
    if not os.path.isdir(work_dir):
        return
    for name in os.listdir(work_dir):
        if name == "manifest.json" or _LAYER_FILE.fullmatch(name) or re.fullmatch(r".+\.tmp-\d+", name):
            os.remove(os.path.join(work_dir, name))
    try:
        os.rmdir(work_dir)
    except OSError:
        log.warning("kept %s: it holds files gptq-jax did not write", work_dir)


class ResumeStore:
    """Finished blocks of one job in ``work_dir``; opening refuses a directory that holds finished blocks of a job
    with another fingerprint."""

    def __init__(self, work_dir: str, fp: str):
        self.work_dir = work_dir
        self.fingerprint = fp
        try:
            os.makedirs(work_dir, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the work directory {work_dir}: {e.strerror or e}") from e
        for path in remove_leftovers(work_dir, r".+\.tmp-(?P<pid>\d+)"):
            log.info("removed %s, left by a run that was killed", path)
        manifest = os.path.join(work_dir, "manifest.json")
        old, problem = None, None
        if os.path.exists(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    old = json.load(f).get("fingerprint")
            except (OSError, ValueError, AttributeError) as e:
                problem = f"{manifest} is damaged ({e})"
        if old == fp:
            return
        if old is not None and self.finished_files():
            raise ValueError(
                f"{work_dir} holds a partial quantization made with different arguments (model files, options or "
                "calibration data); rerun with the same arguments to resume, or remove that directory to start over"
            )
        if problem is not None:
            log.warning("%s; starting it afresh (each finished layer is still checked against this job)", problem)
        elif old is not None:
            log.info("%s held no finished layer of another job; reusing it", work_dir)
        write_json(manifest, {"fingerprint": fp, "format": FORMAT})

    def finished_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.work_dir) if _LAYER_FILE.fullmatch(n))

    def _paths(self, index: int) -> tuple[str, str]:
        return tuple(os.path.join(self.work_dir, f"layer-{index:05d}.{ext}") for ext in ("npz", "json"))

    def save(self, index: int, weights: dict[str, QuantizedWeight], records: dict[str, Any]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **_encode(weights))
        blob = buf.getvalue()
        npz, js = self._paths(index)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(blob)

        atomic_write(npz, write)
        # After the data: the json is what marks the block finished, and it carries the npz's size and checksum.
        meta = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        write_json(js, {"format": FORMAT, "fingerprint": self.fingerprint, "npz": meta, "records": records})

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], dict[str, Any]] | None:
        """Block ``index``'s weights and records, or None if that block has not finished. A damaged block is logged,
        its files (and those of later blocks, which were computed from it) are removed, and None is returned so that
        the caller quantizes it again."""
        npz, js = self._paths(index)
        if not (os.path.exists(npz) and os.path.exists(js)):
            return None
        try:
            with open(js, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format") == FORMAT:
                if meta.get("fingerprint") != self.fingerprint:
                    raise ValueError("it belongs to another job")
                with open(npz, "rb") as f:
                    blob = f.read()
                want = meta["npz"]
                if len(blob) != want["size"]:
                    raise ValueError(f"{npz} has {len(blob)} bytes, {want['size']} were written")
                if hashlib.sha256(blob).hexdigest() != want["sha256"]:
                    raise ValueError(f"{npz} does not match the checksum written with it")
                records = meta["records"]
            else:  # format 1: records only, no checksum
                with open(npz, "rb") as f:
                    blob = f.read()
                records = meta
            with np.load(io.BytesIO(blob)) as data:
                weights = _decode(data)
        except Exception as e:  # json, zip and numpy raise many types for a damaged file; all mean "redo it"
            log.warning("layer %d in the work directory is damaged (%s); quantizing it again", index, e)
            self._discard_from(index)
            return None
        return weights, records

    def _discard_from(self, index: int) -> None:
        for name in self.finished_files():
            if int(_LAYER_FILE.fullmatch(name).group(1)) >= index:
                os.remove(os.path.join(self.work_dir, name))


class StoredWeights(Mapping):
    """Parameter path -> ``QuantizedWeight``, read back from a store one block at a time: what a streamed run
    (``quantize(..., load=...)``) returns as its weights, since it keeps no finished block in memory. Iteration is
    in block order; the last block read is cached, so reading block by block reads each file once."""

    def __init__(self, store: ResumeStore, blocks: Mapping[str, int]):
        self._store, self._blocks = store, dict(blocks)  # name -> block index
        self._cached: tuple[int, dict[str, QuantizedWeight]] | None = None

    def block_of(self, name: str) -> int:
        return self._blocks[name]

    def __getitem__(self, name: str) -> QuantizedWeight:
        i = self._blocks[name]
        if self._cached is None or self._cached[0] != i:
            got = self._store.load(i)
            if got is None:
                raise ValueError(f"block {i} is no longer in the work directory {self._store.work_dir} "
                                 f"(removed or damaged since it was written); rerun the quantization")
            self._cached = (i, got[0])
        return self._cached[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)
