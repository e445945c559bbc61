"""The resume store: each finished block of a quantization run, saved in a work directory.

A run that is interrupted (Ctrl-C, a crash, a killed job) restarts after the last finished block when it is
given the same work directory and the same job. What "the same job" means is the fingerprint the caller
computes (``fingerprint``): a store opened with another fingerprint refuses to resume.

Files, all written to a temporary name and renamed:

- ``manifest.json``: ``{"fingerprint": ...}``
- ``layer-{i:05d}.npz``: every ``QuantizedWeight`` of block ``i``, under ``{name}/{field}``
- ``layer-{i:05d}.json``: block ``i``'s report records
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptq_jax.quantizer import QuantizedWeight

_QW_FIELDS = ("codes", "scales", "zeros", "g_idx", "loss", "damp", "fallback")


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


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


class ResumeStore:
    """Finished blocks of one job in ``work_dir``; ``open`` refuses a directory made for another fingerprint."""

    def __init__(self, work_dir: str, fp: str):
        self.work_dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        manifest = os.path.join(work_dir, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                old = json.load(f).get("fingerprint")
            if old != fp:
                raise ValueError(
                    f"{work_dir} holds a partial quantization made with different arguments (model, options or "
                    "calibration data); rerun with the same arguments to resume, or remove that directory to start over"
                )
        else:
            write_json(manifest, {"fingerprint": fp})

    def _paths(self, index: int) -> tuple[str, str]:
        return tuple(os.path.join(self.work_dir, f"layer-{index:05d}.{ext}") for ext in ("npz", "json"))

    def save(self, index: int, weights: dict[str, QuantizedWeight], records: dict[str, Any]) -> None:
        arrays = {}
        for name, qw in weights.items():
            for f in _QW_FIELDS:
                arrays[f"{name}/{f}"] = np.asarray(getattr(qw, f))
            if qw.perm is not None:
                arrays[f"{name}/perm"] = np.asarray(qw.perm)
            arrays[f"{name}/meta"] = np.asarray([qw.bits, qw.group_size, int(qw.sym)])
        npz, js = self._paths(index)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(npz, write)
        write_json(js, records)

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], dict[str, Any]] | None:
        """Block ``index``'s weights and records, or None if that block has not finished."""
        npz, js = self._paths(index)
        if not (os.path.exists(npz) and os.path.exists(js)):
            return None
        with np.load(npz) as data:
            names = sorted({k.rsplit("/", 1)[0] for k in data.files})
            weights = {}
            for name in names:
                bits, group_size, sym = (int(v) for v in data[f"{name}/meta"])
                fields = {f: jnp.asarray(data[f"{name}/{f}"]) for f in _QW_FIELDS}
                perm = jnp.asarray(data[f"{name}/perm"]) if f"{name}/perm" in data.files else None
                weights[name] = QuantizedWeight(**fields, perm=perm, bits=bits, group_size=group_size, sym=bool(sym))
        with open(js) as f:
            records = json.load(f)
        return weights, records
