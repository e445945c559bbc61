"""Benchmark: GPTQ on one layer, gptq_jax against the same algorithm written plainly in PyTorch eager.

The PyTorch side is the paper's algorithm as its reference implementation runs it: Cholesky, the
inverse, the upper Cholesky factor of the inverse, then a Python loop over columns inside 128-column
blocks with the lazy block update. Both sides get the same weight, Hessian and settings (4-bit, group
128, symmetric), run in the same process on the same device, and are checked to agree before timing.
Also reports Hessian accumulation throughput (tokens/s).

    python benchmarks/bench_gptq.py                 # all shapes
    python benchmarks/bench_gptq.py --shapes 576x576,4096x4096 --repeats 3

Writes JSON to benchmarks/results/bench_gptq/bench_gptq_<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import provenance

from gptq_jax import QuantConfig, accumulate_hessian, init_hessian
from gptq_jax.core.gptq import jitted_solver

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]  # (out N, in K)


def torch_gptq_eager(w, h, *, bits=4, group_size=128, blocksize=128, percdamp=0.01, fp16_scales=True):
    """GPTQ as the paper's reference runs it, eagerly in PyTorch (symmetric grid of docs/checkpoints.md).

    ``fp16_scales`` rounds each scale to float16 when it is fitted, as ``QuantConfig``'s default does (the paper's
    code rounds only when it packs); without it about 3% of the codes of a 576x576 layer differ from ours.
    """
    import torch

    w = w.clone().float()
    h = h.clone()
    n, k = w.shape
    maxq = 2**bits - 1

    def params(x):
        xmax = torch.maximum(-x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0))
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = 2 * xmax / maxq
        if fp16_scales:
            f16 = torch.finfo(torch.float16)
            scale = scale.clamp(f16.smallest_normal * 2.0**-10, f16.max).half().float()
        return scale, torch.full_like(scale, (maxq + 1) / 2)

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(k)
    h[idx, idx] += damp
    hinv = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    q_all = torch.zeros_like(w)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if (i1 + i) % group_size == 0:
                scale, zero = params(w[:, i1 + i : i1 + i + group_size])
            q = torch.clamp(torch.round(col / scale) + zero, 0, maxq)
            dq = scale * (q - zero)
            q1[:, i] = q
            e = (col - dq) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return q_all


def time_fn(fn, repeats):
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK list (out x in)")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens for the Hessian")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager side")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bench_gptq/"
                    "bench_gptq_<platform>.json)")
    args = ap.parse_args(argv)
    started = provenance.start()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    dev = jax.devices()[0]
    device_name = (
        dev.device_kind
        if dev.platform != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    torch_device = "cuda" if dev.platform == "gpu" else "cpu"
    if not args.no_torch:
        import torch

        if torch_device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
    config = QuantConfig(bits=4, group_size=128, sym=True)
    rng = np.random.default_rng(0)
    results = []
    for n, k in shapes:
        # Correlated inputs, like real activations; Hessian from args.tokens tokens, in chunks.
        mix = jnp.asarray(rng.standard_normal((k, k)).astype(np.float32) / math.sqrt(k))
        h, cnt = init_hessian(k)
        chunk = 8192
        key = jax.random.PRNGKey(k)
        xs = jax.random.normal(key, (chunk, k), jnp.float32) @ mix
        jax.block_until_ready(accumulate_hessian(h, cnt, xs))
        t0 = time.perf_counter()
        for i in range(max(1, args.tokens // chunk)):
            h, cnt = accumulate_hessian(h, cnt, xs * (1.0 + 0.01 * i))
        jax.block_until_ready(h)
        hess_s = time.perf_counter() - t0
        hess_tps = int(cnt) / hess_s
        w = jax.random.normal(jax.random.PRNGKey(1), (n, k), jnp.float32) * 0.02

        t0 = time.perf_counter()
        compiled = jitted_solver().lower(w, h, config).compile()
        compile_s = time.perf_counter() - t0
        run = functools.partial(lambda c, a, b: jax.block_until_ready(c(a, b)), compiled, w, h)
        jax_s, jax_all = time_fn(run, args.repeats)
        row = {
            "shape": [n, k],
            "hessian_tokens": int(cnt),
            "hessian_tokens_per_s": hess_tps,
            "jax_s": jax_s,
            "jax_runs_s": jax_all,
            "jax_compile_s": compile_s,
        }
        line = (
            f"{n:>6}x{k:<6} hessian {hess_tps / 1e3:8.1f} ktok/s | jax {jax_s * 1e3:9.1f} ms"
            f" (compile {compile_s:.1f} s)"
        )
        if not args.no_torch:
            import torch

            wt = torch.tensor(np.asarray(w), device=torch_device)
            ht = torch.tensor(np.asarray(h), device=torch_device)
            q_torch = torch_gptq_eager(wt, ht, fp16_scales=config.fp16_scales)
            q_jax = np.asarray(compiled(w, h)[0].codes)  # (QuantizedWeight, loss per row)
            agree = float(np.mean(q_torch.cpu().numpy().astype(np.int32) == q_jax))
            if agree < 0.98:
                print(f"codes of JAX and PyTorch agree on only {agree:.4f} of entries", file=sys.stderr)
                return 1

            def run_torch(wt=wt, ht=ht):
                torch_gptq_eager(wt, ht, fp16_scales=config.fp16_scales)
                if torch_device == "cuda":
                    torch.cuda.synchronize()

            torch_s, torch_all = time_fn(run_torch, args.repeats)
            row.update(torch_eager_s=torch_s, torch_runs_s=torch_all, speedup=torch_s / jax_s, codes_agree=agree)
            line += (
                f" | torch eager {torch_s * 1e3:9.1f} ms | speedup {torch_s / jax_s:5.2f}x (codes agree {agree:.4f})"
            )
        print(line, flush=True)
        results.append(row)

    out = args.out or provenance.result_path("bench_gptq", f"bench_gptq_{dev.platform}.json")
    payload = {
        "benchmark": "bench_gptq",
        "device": device_name,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "config": {"bits": 4, "group_size": 128, "sym": True, "block_size": 128, "damp_percent": 0.01},
        "results": results,
    }
    # This machine may be shared: the provenance's load average says how much the timings can be trusted.
    provenance.write_result(out, payload, started=started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
