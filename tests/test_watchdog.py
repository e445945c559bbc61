"""The watchdog (``cli.watchdog``): a step without progress for its deadline ends the run with a message naming
it; progress keeps it alive; through the CLI, a hung solve ends with exit 3 and the finished layers resume."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_models import write_hf_checkpoint

from gptq_jax.cli.watchdog import EXIT_STALLED, Watchdog

REPO = Path(__file__).resolve().parent.parent


def test_no_progress_ends_the_run_naming_the_step(caplog):
    codes = []
    with caplog.at_level(logging.ERROR, logger="gptq_jax.cli.watchdog"):
        with Watchdog(0.3, lambda: "2 finished layer(s) are kept", exit=codes.append) as dog:
            dog.progress("layers.2.mlp.down_proj")
            deadline = time.monotonic() + 10
            while not codes and time.monotonic() < deadline:
                time.sleep(0.05)
    assert codes == [EXIT_STALLED] and dog.expired
    assert "no progress for 0 s in step layers.2.mlp.down_proj" in caplog.text
    assert "2 finished layer(s) are kept" in caplog.text


def test_progress_keeps_it_alive_and_zero_turns_it_off():
    codes = []
    with Watchdog(0.5, exit=codes.append) as dog:
        for i in range(12):  # 1.2 s in all, never 0.5 s without progress
            dog.progress(f"step {i}")
            time.sleep(0.1)
    assert codes == [] and not dog.expired
    with Watchdog(0, exit=codes.append) as dog:
        time.sleep(0.2)
    assert codes == [] and dog._thread is None
    with pytest.raises(ValueError, match="must be >= 0"):
        Watchdog(-1)


# The child hangs in the solve of layer 1's first stage (the 5th solve: 4 stages a Llama layer), as the 4x2 mesh
# once did, so that layer 0 is finished and kept.
_HANG = """
import sys, time
import dataclasses
from gptq_jax.engine import solve as engine_solve
calls = [0]
gptq = engine_solve.GPTQ
def hang(*a, **k):
    calls[0] += 1
    if calls[0] == 5:
        time.sleep(10**6)
    return gptq.solve(*a, **k)
# The default solver the CLI's quantize picks (engine.solve.as_solver), made to hang in its 5th solve.
engine_solve.GPTQ = dataclasses.replace(gptq, solve=hang, sharded=None)  # the CLI may pass a 1x1 mesh
from gptq_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_cli_stalled_solve_exits_3_and_the_rerun_resumes(tmp_path):
    model_dir = write_hf_checkpoint(tmp_path, "llama", 0, name="tiny", with_tokenizer=True)
    out = tmp_path / "out"
    args = [str(model_dir), str(out), "--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _HANG, "quantize", *args, "--stall-timeout", "30"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_STALLED, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 500
    assert "no progress for 30 s in step layers.1.self_attn" in proc.stderr, proc.stderr[-3000:]
    assert "1 finished layer(s) are kept in" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "gptq_jax.cli", "quantize", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed after 1 layers" in proc.stdout


def test_cli_refuses_a_negative_stall_timeout(tmp_path, capsys):
    from gptq_jax.cli import main

    assert main(["quantize", str(tmp_path), str(tmp_path / "out"), "--stall-timeout", "-5"]) == 2  # before any file
    assert "expected a number of seconds >= 0 (0: no watchdog), got -5" in capsys.readouterr().err
