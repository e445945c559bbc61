"""The "Big models" table of docs/scaling.md: memory and time per decoder layer for Llama-2 7B / 13B / 70B shapes.

    python benchmarks/big_models_table.py benchmarks/results/bench_memory/bench_memory_llama2-7b_gptq_cpu.json

Sizes come from the shapes. The 7B peak RSS and time per layer are the ones ``bench_memory.py`` measured; the
13B/70B rows scale them: the solve's working set (peak RSS minus the block, the embedding and the process's
start) in proportion to the largest solve's ``H`` plus weight bytes, the time in proportion to the solves' flops
(``2 N K^2 + K^3 / 3`` per linear: the error feedback and the Cholesky factorization).
"""

from __future__ import annotations

import json
import sys

import numpy as np

MB = 2**20
GB = 2**30
SHAPES = {  # hidden, intermediate, heads, kv heads, head dim, layers, vocab
    "7B": (4096, 11008, 32, 32, 128, 32, 32000),
    "13B": (5120, 13824, 40, 40, 128, 40, 32000),
    "70B": (8192, 28672, 64, 8, 128, 80, 32000),
}


def linears(d: int, i: int, h: int, kv: int, hd: int) -> dict[str, tuple[int, int]]:
    """name -> (N out, K in)."""
    return {"q": (h * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, h * hd), "gate": (i, d), "up": (i, d),
            "down": (d, i)}


def stats(name: str) -> dict:
    d, i, h, kv, hd, layers, vocab = SHAPES[name]
    lin = linears(d, i, h, kv, hd)
    params = sum(n * k for n, k in lin.values()) + 2 * d
    biggest = max(lin.values(), key=lambda nk: nk[1] ** 2 + nk[0] * nk[1])
    return {
        "layers": layers,
        "block_params": params,
        "block_bf16": 2 * params,
        "block_f32": 4 * params,
        "solve_bytes": 4 * (biggest[1] ** 2 + biggest[0] * biggest[1]),  # H and W of the largest linear, f32
        "largest_h": 4 * biggest[1] ** 2,
        "embedding_bf16": 2 * vocab * d,
        "flops": sum(2 * n * k * k + k**3 / 3 for n, k in lin.values()),
        "model_bf16": 2 * (params * layers + 2 * vocab * d),
    }


def main(path: str) -> None:
    res = json.load(open(path))
    run = max(res["runs"], key=lambda r: r["layers"])
    steady = [b["total_s"] for b in run["blocks"][1:]] or [run["blocks"][0]["total_s"]]  # the first one compiles
    t7 = float(np.mean(steady))
    ref = stats("7B")
    overhead7 = run["peak_rss_mb"] * MB - run["rss_start_mb"] * MB - ref["block_f32"] - ref["embedding_bf16"]
    per_solve_byte = overhead7 / ref["solve_bytes"]
    print(f"measured on {res['device']}: {res['method']}, {res['calibration_tokens']} tokens per Hessian; "
          f"{run['layers']} layers; load {run['uptime_after'].split('load average:')[-1].strip()}\n")
    print("| shape | layers | model bf16 | block bf16 / f32 | largest H (f32) | peak host RSS | "
          "time per layer (this CPU) | whole model |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        s = stats(name)
        peak = run["rss_start_mb"] * MB + s["block_f32"] + s["embedding_bf16"] + per_solve_byte * s["solve_bytes"]
        t = t7 * s["flops"] / ref["flops"]
        tag = "measured" if name == "7B" else "scaled"
        print(f"| {name} | {s['layers']} | {s['model_bf16'] / GB:.1f} GB | {s['block_bf16'] / GB:.2f} / "
              f"{s['block_f32'] / GB:.2f} GB | {s['largest_h'] / GB:.2f} GB | {peak / GB:.1f} GB ({tag}) | "
              f"{t:.0f} s ({tag}) | {t * s['layers'] / 3600:.1f} h |")


if __name__ == "__main__":
    main(sys.argv[1])
