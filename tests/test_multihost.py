"""Several processes on this machine (``gptq_jax.engine.multihost``): two processes with 2 CPU devices each, gloo
collectives over localhost, each feeding half of the calibration windows, against one process with all of them.
The processes are ``multihost_worker.py`` subprocesses (``jax.distributed`` must start before any JAX work)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptq_jax.engine import multihost

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, num_processes: int = 2) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_worker.py"), mode, str(i), str(num_processes), str(port), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(num_processes)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            pytest.fail(f"process {p.args[3]} still running after {timeout} s:\n{err[-3000:]}")
        out.append((p.returncode, err))
    return out


def test_two_processes_give_the_one_process_result(tmp_path):
    sys.path.insert(0, str(HERE))
    from multihost_worker import CONFIG_KW, K, data

    from gptq_jax import QuantConfig, accumulate_hessian, init_hessian, quantize_weight

    out = tmp_path / "two.npz"
    results = _finish(_launch("quantize", out), timeout=300)
    for i, (rc, err) in enumerate(results):
        assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
    got = np.load(out)
    x, w = data()
    h, n = accumulate_hessian(*init_hessian(K), x)  # one process, one device, all windows
    q = quantize_weight(w, h, QuantConfig(**CONFIG_KW))
    assert int(got["n"]) == int(n) == x.shape[0] * x.shape[1]
    np.testing.assert_allclose(got["h"], np.asarray(h), rtol=1e-5, atol=1e-5 * float(np.abs(h).max()))
    equal = float(np.mean(got["codes"] == np.asarray(q.codes)))
    assert equal >= 0.99, equal
    assert abs(float(got["loss"]) / float(q.loss) - 1) <= 1e-3
    np.testing.assert_allclose(got["scales"], np.asarray(q.scales), rtol=1e-2)


def test_a_dead_process_stops_the_other(tmp_path):
    t0 = time.monotonic()
    (rc0, err0), (rc1, _) = _finish(_launch("die", tmp_path / "die.npz"), timeout=120)
    assert rc1 == 3  # process 1 left on purpose
    assert rc0 != 0, "process 0 must not finish as if nothing happened"
    assert "unhealthy" in err0 or "another task died" in err0, err0[-3000:]
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "die.npz").exists()


def test_unreachable_coordinator_times_out_with_a_message():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    msg = rf"process 1: could not reach the coordinator at localhost:{port} within 1 s"
    with pytest.raises(TimeoutError, match=msg):
        multihost.initialize(f"localhost:{port}", 2, 1, timeout_s=1)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator_address="localhost:1", num_processes=2), "need process_id"),
        (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"process_id=2 must be in \[0, "),
        (dict(coordinator_address="nohostport", num_processes=2, process_id=1), "must be host:port"),
    ],
)
def test_initialize_validates_arguments(kwargs, match, monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=match):
        multihost.initialize(**kwargs)


def test_cli_flags(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    parser = argparse.ArgumentParser()
    multihost.add_distributed_args(parser)
    args = parser.parse_args(["--mesh", "data=2,model=4", "--coordinator-address", "10.0.0.1:8476",
                              "--num-processes", "4", "--process-id", "3"])
    assert (args.mesh, args.coordinator_address, args.num_processes, args.process_id) == (
        "data=2,model=4", "10.0.0.1:8476", 4, 3)
    assert multihost.initialize_from_args(parser.parse_args([])) is False  # one process: nothing to set up
    assert multihost.initialize_from_args(parser.parse_args(["--num-processes", "1"])) is False
