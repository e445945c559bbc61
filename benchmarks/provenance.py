"""Where a benchmark result came from, written with the result.

Every benchmark writes its JSON through :func:`write_result`, which adds a ``provenance`` record (the git commit,
whether the work tree had uncommitted changes, the JAX version, the device, the load average when the run started
and when it ended, the command line and the time) and writes the file to a temporary name in the same directory
before renaming it into place, so an interrupted run never leaves half a file where a complete one was.

    import provenance
    started = provenance.start()          # the load average before the work
    ...
    provenance.write_result(provenance.result_path("bench_gptq", "bench_gptq_cpu.json"), payload, started=started)

Results live in ``benchmarks/results/<benchmark>/``, one folder per benchmark script. Scripts run as
``python benchmarks/<name>.py``, so this module is importable by its bare name; scripts in
``benchmarks/investigations/`` add ``benchmarks/`` to ``sys.path`` first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"


def result_path(benchmark: str, name: str) -> Path:
    """``benchmarks/results/<benchmark>/<name>``: each benchmark's results in a folder of its own."""
    return RESULTS / benchmark / name


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _device() -> str:
    """The first JAX device in words ("cpu, 2 cores" or "gpu, NVIDIA H100 80GB HBM3 x1"); "unknown" without JAX."""
    try:
        import jax

        devices = jax.devices()
    except Exception as e:  # no JAX in this interpreter, or no backend: the result still gets the rest
        return f"unknown ({type(e).__name__})"
    dev = devices[0]
    if dev.platform == "cpu":
        return f"cpu, {os.cpu_count()} cores"
    return f"{dev.platform}, {dev.device_kind} x{len(devices)}"


def _jax_version() -> str | None:
    try:
        import jax
    except ImportError:
        return None
    return jax.__version__


def _tree(own: Path | None = None) -> tuple[str | None, bool | None]:
    """The checked-out commit and whether tracked files differ from it (None where git cannot say). Results are not
    code: ``own`` (the result being written, which a run rewrites as it goes) and the other files under
    ``benchmarks/results/`` (an earlier run of a series not committed yet) do not count."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        return _git("rev-parse", "HEAD"), None
    own = None if own is None else Path(own).resolve()
    mine = str(own.relative_to(REPO)) if own is not None and own.is_relative_to(REPO) else None
    results = str(RESULTS.relative_to(REPO)) + "/"
    # "XY path" per line; _git strips the output, so the first line may have lost a leading blank of its XY.
    paths = [line.split(None, 1)[1] for line in status.splitlines() if line.strip()]
    changed = [p for p in paths if p != mine and not p.startswith(results)]
    return _git("rev-parse", "HEAD"), bool(changed)


def start() -> dict:
    """What to record before the timed work: the load average, the wall-clock time, and the commit and dirty flag
    (a run of hours imports its code at the start, while the checkout may move on under it)."""
    commit, dirty = _tree()
    return {"load_average": list(os.getloadavg()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit,
            "dirty": dirty}


def provenance(started: dict | None = None, own: Path | None = None) -> dict:
    """The record :func:`write_result` adds: commit, dirty flag, JAX version, device, load and command. The commit
    and dirty flag are those at ``started`` where given (the code that ran); ``checkout_moved`` says the checkout
    was at another commit or state by the time of writing."""
    commit, dirty = _tree(own)
    if started is not None and "commit" in started:
        moved = (commit, dirty) != (started["commit"], started["dirty"])
        commit, dirty = started["commit"], started["dirty"]
    else:
        moved = None
    return {
        "commit": commit,
        "dirty": dirty,
        "checkout_moved": moved,
        "jax_version": _jax_version(),
        "device": _device(),
        "load_average_start": None if started is None else started["load_average"],
        "load_average_end": list(os.getloadavg()),
        "started": None if started is None else started["time"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_result(path: str | os.PathLike, payload: dict, *, started: dict | None = None) -> Path:
    """Writes ``payload`` plus its ``provenance`` as JSON to ``path``: a temporary file in the same folder, then a
    rename. Creates the folder. Returns the path."""
    if not isinstance(payload, dict):
        raise TypeError(f"a benchmark result is a JSON object (dict), got {type(payload).__name__}")
    record = {**payload, "provenance": provenance(started, Path(path))}
    return _write_atomic(Path(path), json.dumps(record, indent=1, default=str) + "\n")


def copy_result(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copies a result file (its provenance as it was written) to ``dst``, atomically."""
    return _write_atomic(Path(dst), Path(src).read_text())
