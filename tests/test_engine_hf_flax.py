"""Hugging Face's Flax Llama (transformers 4.x, a model this project did not write) quantized block by block from
its params and a forward. transformers 5 has no Flax models, so 4.x lives in its own directory (``make hf-flax``)
put first on the path of a child process; the test skips where that directory is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_flax_llama_for_causal_lm_is_quantized_block_by_block():
    overlay = os.environ.get("GPTQ_JAX_HF_FLAX", str(HERE.parent / ".venv-hf-flax"))
    if not (Path(overlay) / "transformers").is_dir():
        pytest.skip(f"transformers 4.x not installed in {overlay} (make hf-flax)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([overlay, str(HERE.parent), str(HERE),
                                                       os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(HERE / "hf_flax_worker.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "OK 21 weights" in done.stdout
