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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------------------------------
# `gptq-jax quantize` over two processes, end to end


QUANT_ARGS = ["--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "32", "--act-order"]


def _cli(args: list[str], devices: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(extra_env or {})}
    return subprocess.Popen([sys.executable, str(HERE / "multihost_cli_worker.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(model_dir: Path, out: Path, calib: Path, exit_after: int | None = None,
                   timeout: float = 300) -> list[tuple[int, str]]:
    port = _free_port()
    procs = [
        _cli(["quantize", str(model_dir), str(out), *QUANT_ARGS, "--calib", str(calib), "--mesh", "data=2,model=2",
              "--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
              "--heartbeat-timeout", "5"],
             devices=2, extra_env={"EXIT_AFTER_BLOCK": str(exit_after)} if exit_after is not None and i == 1 else None)
        for i in range(2)
    ]
    return _finish(procs, timeout)


def _tensors(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def cli_job(tmp_path_factory):
    """A tiny HF Llama checkpoint, calibration text, and its checkpoint from one process on one device."""
    sys.path.insert(0, str(HERE))
    from helpers_models import write_hf_checkpoint

    root = tmp_path_factory.mktemp("mhcli")
    model_dir = write_hf_checkpoint(root, "llama", 0, name="tiny", with_tokenizer=True)
    rng = np.random.default_rng(0)
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, 120, 12)) for _ in range(60)))
    one = root / "one"
    [(rc, err)] = _finish([_cli(["quantize", str(model_dir), str(one), *QUANT_ARGS, "--calib", str(calib)], 1)], 300)
    assert rc == 0, err[-3000:]
    return root, model_dir, calib, _tensors(one)


def _assert_same_checkpoint(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(("qweight", "qzeros", "g_idx")):
            equal = float(np.mean(got[name] == want[name]))
            assert equal >= 0.99, (name, equal)  # Hessians differ only in summation order
        else:
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), rtol=2e-3,
                                       atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_two_process_cli_writes_the_one_process_checkpoint(cli_job):
    root, model_dir, calib, want = cli_job
    out = root / "two"
    results = _two_processes(model_dir, out, calib)
    for i, (rc, err) in enumerate(results):
        assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
    _assert_same_checkpoint(_tensors(out), want)
    assert not list(root.glob("two*.work*"))  # both processes removed their finished blocks after the save


@pytest.mark.slow
def test_a_process_dying_mid_run_stops_the_other_and_a_rerun_resumes(cli_job):
    from gptq_jax.cli.quantize_cmd import work_dir_for

    root, model_dir, calib, want = cli_job
    out = root / "resumed"
    (rc0, err0), (rc1, _) = _two_processes(model_dir, out, calib, exit_after=0)
    assert rc1 == 3  # process 1 left after saving layer 0
    assert rc0 != 0, "process 0 must not finish as if nothing happened"
    assert not out.exists()
    work = work_dir_for(out)
    assert (work / "layer-00000.json").is_file() and (work / "process-1" / "layer-00000.json").is_file()
    results = _two_processes(model_dir, out, calib)
    for i, (rc, err) in enumerate(results):
        assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
    import json

    assert json.loads((out / "quant_report.json").read_text())["resumed_layers"] == 1
    _assert_same_checkpoint(_tensors(out), want)
