"""One process of a multi-process run on this machine (``test_multihost.py`` starts them).

``python tests/multihost_worker.py MODE PROCESS_ID NUM_PROCESSES PORT OUT`` with 2 CPU devices per process:

- ``quantize``: each process feeds its share of the calibration windows of ``data()``; the Hessian is folded on a
  global ``data=NUM_PROCESSES,model=2`` mesh and the weight solved with rows over ``model``. Process 0 writes the
  gathered Hessian, codes, scales and loss to OUT (npz).
- ``die``: process 1 exits right after joining; process 0 then waits in a collective and must be stopped.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

N, K, WINDOWS, T = 64, 96, 8, 16
CONFIG_KW = dict(bits=4, group_size=32, act_order=True)


def data() -> tuple[np.ndarray, np.ndarray]:
    """The calibration windows ``[WINDOWS, T, K]`` and the weight ``[N, K]`` every process (and the test) uses."""
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((K, K)).astype(np.float32) / np.sqrt(K) + np.eye(K, dtype=np.float32)
    x = (rng.standard_normal((WINDOWS, T, K)).astype(np.float32) * rng.uniform(0.2, 2.0, K).astype(np.float32)) @ mix
    w = rng.standard_normal((N, K)).astype(np.float32)
    return x, w


def main(mode: str, process_id: int, num_processes: int, port: int, out: str) -> None:
    from gptq_jax.engine import multihost

    # A short heartbeat timeout where a process dies on purpose; a long one otherwise, so that a loaded machine
    # starving a healthy process for a few seconds does not stop the run.
    heartbeat = 5 if mode == "die" else 60
    multihost.initialize(f"localhost:{port}", num_processes, process_id, timeout_s=60, heartbeat_timeout_s=heartbeat)
    import jax

    from gptq_jax import QuantConfig
    from gptq_jax.engine import sharding as S

    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
    mesh = S.make_mesh(f"data={num_processes},model=2")
    x, w = data()
    share = WINDOWS // num_processes
    local = x[process_id * share : (process_id + 1) * share]  # this process's windows only
    if mode == "die" and process_id == 1:
        os._exit(3)
    h, n = S.accumulate_hessian_sharded(*S.init_hessian_sharded(K, mesh), S.global_batch(local, mesh), mesh=mesh)
    q = S.quantize_weight_sharded(w, h, QuantConfig(**CONFIG_KW), mesh=mesh)
    arrays = {
        "h": multihost.to_host(h),
        "n": multihost.to_host(n),
        "codes": multihost.to_host(q.codes),
        "scales": multihost.to_host(q.scales),
        "loss": multihost.to_host(q.loss),
    }
    if process_id == 0:
        np.savez(out, **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
