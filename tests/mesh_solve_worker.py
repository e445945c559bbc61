"""Run by test_sharding.py::test_sharded_solve_with_many_groups_finishes in a child with 8 host devices: the sharded
solve at 4x2 of weights with several groups, the shape of load that hung the CLI on SmolLM2 (every device running
XLA:CPU's batched LAPACK kernels at once, each waiting for pool threads the others held). ``argv``: repetitions,
and the method (gptq, gptaq or qronos: their factorizations of H and the cross term D are shared the same way).
Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gptq_jax import QuantConfig  # noqa: E402
from gptq_jax.core.methods import Method, quantize_weights_method  # noqa: E402
from gptq_jax.engine import sharding  # noqa: E402


def main() -> int:
    mesh = sharding.make_mesh("data=4,model=2")
    rng = np.random.default_rng(0)
    k, reps = 576, int(sys.argv[1]) if len(sys.argv) > 1 else 4  # SmolLM2's hidden size
    method = Method(name=sys.argv[2] if len(sys.argv) > 2 else "gptq")
    x = rng.standard_normal((2048, k)).astype(np.float32)
    x_fp = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)  # the float model's inputs
    h = jax.numpy.asarray(2 * x.T @ x / 2048)
    d = jax.numpy.asarray(2 * (x_fp - x).T @ x / 2048) if method.needs_cross else None
    config = QuantConfig(bits=4, group_size=128)  # 5 groups: batched triangular solves
    ws = [jax.numpy.asarray(rng.standard_normal((n, k)).astype(np.float32)) for n in (576, 192, 192)]
    t0 = time.perf_counter()
    for _ in range(reps):
        out = sharding.quantize_weights_sharded(ws, h, config, mesh=mesh, method=method, d=d)
        jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    one = quantize_weights_method(ws, h, config, method, d)
    equal = [float(np.mean(np.asarray(a.codes) == np.asarray(b.codes))) for a, b in zip(out, one, strict=True)]
    print(json.dumps({"devices": len(jax.devices()), "seconds": seconds, "equal_codes": equal}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
