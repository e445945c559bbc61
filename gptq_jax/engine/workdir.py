"""The work-directory protocol of a block-by-block run: where each process keeps its finished blocks, and, block
by block, whether a finished block may be reused (``resume.ResumeStore`` holds the files).

A finished block is reused while the run replays an unbroken prefix of finished blocks: each must have been made
from the very float weights the model holds now (a SHA-256 of them is stored with it), and, with several
processes, every process must hold a usable copy (the passes are one program over all of them). The first block
that fails either test is redone, and so is every block after it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import jax
import numpy as np

from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.engine import multihost
from gptq_jax.engine.resume import ResumeStore

log = logging.getLogger(__name__)


def process_work_dir(work_dir: str) -> str:
    """Where this process keeps its finished blocks: ``work_dir`` itself for process 0 (the only one on one host),
    ``work_dir/process-<i>`` for the others, so that processes sharing a disk never write the same files."""
    i = jax.process_index()
    return work_dir if i == 0 else os.path.join(work_dir, f"process-{i}")


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (itself alone on one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def weights_digest(paths: list[str], leaves: list[Any]) -> str:
    """SHA-256 of a block's float parameters: a resumed block must have been made from these very weights."""
    h = hashlib.sha256()
    for path, x in zip(paths, leaves, strict=True):
        a = multihost.to_host(x) if isinstance(x, jax.Array) else np.asarray(x)  # gathered when split over hosts
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class WorkDir:
    """The finished blocks of one job (``fp``, its fingerprint) in ``work_dir``, and the resume decisions."""

    def __init__(self, work_dir: str, fp: str):
        self.store = ResumeStore(process_work_dir(work_dir), fp)
        self.resuming = True

    def reusable(self, index: int, path: str, digest: str) -> tuple[dict[str, QuantizedWeight], dict] | None:
        """Block ``index``'s stored ``(weights, records)`` if the run may reuse them (see module docstring)."""
        saved = self.store.load(index) if self.resuming else None
        if saved is not None and saved[1].get("weights_digest") not in (None, digest):
            log.warning("block %s: its weights differ from those of the run that saved it; redoing it and the "
                        "blocks after it", path)
            saved, self.resuming = None, False
        if self.resuming and not all_processes(saved is not None):
            if saved is not None:
                log.warning("block %s: another process has no usable copy of it; redoing it and the blocks after it",
                            path)
            saved, self.resuming = None, False
        return saved

    def save(self, index: int, weights: dict[str, QuantizedWeight], records: dict[str, Any]) -> None:
        self.store.save(index, weights, records)
