"""Several processes (hosts) as one mesh: ``jax.distributed`` set up with a reachable coordinator and clear errors.

After ``initialize`` every process sees all processes' devices in ``jax.devices()``, so ``sharding.make_mesh``
builds one global mesh and the sharded Hessian fold and solve run unchanged: each process feeds its share of the
calibration windows (``sharding.global_batch``) and the ``data`` all-reduce crosses processes. On CPU the
cross-process collectives are gloo over TCP (``jax_cpu_collectives_implementation``); on GPU/TPU they are the
platform's own.

Failure modes, and what the user sees:

- The coordinator (process 0) cannot be reached: JAX's client aborts the whole process on a failed connect, with
  no Python exception. So processes other than 0 first probe the coordinator's TCP port until ``timeout_s`` and
  raise ``TimeoutError`` naming the address, the process and the timeout.
- A process dies mid-run: JAX's coordination service notices the missed heartbeats within
  ``heartbeat_timeout_s`` and terminates every other process with an error ("another task died"); a pending
  collective may fail sooner. Nothing hangs. Work already written to the resume store stays (it is written block
  by block), so a rerun resumes.

The CLI flags (``add_distributed_args``) fall back to the environment: ``JAX_COORDINATOR_ADDRESS`` (which JAX
itself reads), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time

import jax
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be host:port, e.g. 'localhost:1234' or '10.0.0.1:8476'")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, *, process_id: int | None = None) -> None:
    """Block until a TCP connection to ``address`` (host:port) succeeds, or raise ``TimeoutError`` after
    ``timeout_s`` seconds with a message saying what to check."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            who = "" if process_id is None else f"process {process_id}: "
            raise TimeoutError(
                f"{who}could not reach the coordinator at {address} within {timeout_s:g} s ({last}). "
                "Is process 0 running with the same --coordinator-address, and is the port open from here?"
            )
        time.sleep(0.2)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    cpu_collectives: str = "gloo",
    local_device_ids: list[int] | None = None,
) -> None:
    """``jax.distributed.initialize`` with the checks JAX does not do. Call before any other JAX work.

    Args:
      coordinator_address: ``host:port`` of process 0 (it binds that port); None reads ``JAX_COORDINATOR_ADDRESS``.
      num_processes: processes in all; None reads ``JAX_NUM_PROCESSES``.
      process_id: this process, in ``[0, num_processes)``; None reads ``JAX_PROCESS_ID``.
      timeout_s: how long to wait for the coordinator and for all processes to register.
      heartbeat_timeout_s: a process silent this long counts as dead and the others are stopped.
      cpu_collectives: cross-process collectives on CPU (``"gloo"`` or ``"mpi"``).
      local_device_ids: the accelerators this process uses (GPU: one process per GPU); None: all local ones.

    Raises:
      ValueError: missing or inconsistent arguments (named).
      TimeoutError: the coordinator did not answer within ``timeout_s``.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(
            f"several processes need {', '.join(missing)} (flags --coordinator-address, --num-processes, "
            "--process-id, or the env vars JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    _split_address(coordinator_address)
    if timeout_s <= 0 or heartbeat_timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} and heartbeat_timeout_s={heartbeat_timeout_s} must be positive")
    start = time.monotonic()
    if process_id != 0:
        wait_for_coordinator(coordinator_address, timeout_s, process_id=process_id)
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    remaining = max(1, int(timeout_s - (time.monotonic() - start)))
    log.info(
        "process %d of %d: joining %s (waiting up to %d s for all processes; if one never comes, JAX stops this "
        "process with DEADLINE_EXCEEDED)", process_id, num_processes, coordinator_address, remaining,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=remaining,
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The CLI flags for meshes and several hosts: ``--mesh``, ``--coordinator-address``, ``--num-processes``,
    ``--process-id``, ``--distributed-timeout``. Read them back with ``initialize_from_args``."""
    g = parser.add_argument_group("devices and hosts")
    g.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="device mesh, e.g. 'data=2,model=4' (calibration split over data, GPTQ rows over model); "
        "default: all devices on data",
    )
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address, for several hosts (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in all (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0-based (env JAX_PROCESS_ID)")
    g.add_argument("--distributed-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the coordinator and the other processes (default {DEFAULT_TIMEOUT_S})")
    g.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="seconds of silence after which a process counts as dead and the others stop "
                   f"(default {DEFAULT_HEARTBEAT_TIMEOUT_S})")


def initialize_from_args(args: argparse.Namespace) -> bool:
    """Call ``initialize`` when the flags or env vars ask for several processes; returns whether it did.

    One process (no coordinator given anywhere, or ``--num-processes 1``) needs no initialization."""
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    if address is None and num in (None, 1):
        return False
    if num == 1:
        return False
    initialize(address, num, args.process_id, timeout_s=args.distributed_timeout,
               heartbeat_timeout_s=getattr(args, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S))
    return True


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process (an all-gather when it spans processes)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
