"""What the dequant-matmul should take on an H100/H200: a memory roofline from the bytes each call must move.

Decode-sized products (small M) are bound by memory: every call reads the packed weights once, plus its
activations and output. The model here is that bound, ``bytes / peak bandwidth``, with the vendors' peak HBM
bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) and, where a run measured it, the device's copy bandwidth. It is a
floor, not a forecast: a kernel at 80% of it is doing well. For large M the tensor cores bound instead
(``flops / peak``); both are given and the larger is the roofline.

Also from the sm_90a compile statistics (benchmarks/results/compile_sm90/kernels_sm90_compile.json): how many
blocks of a plan fit on one SM (registers, shared memory) and so how many waves its grid takes on 132 SMs.

    python benchmarks/roofline.py [--shapes 4096x4096,...] [--m 1,16,256] [--bits 4] [--group-size 128]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "compile_sm90"

# Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core throughput (flop/s), SXM parts, vendor figures.
DEVICES = {
    "H100": dict(bandwidth=3.35e12, bf16_flops=989e12, sms=132),
    "H200": dict(bandwidth=4.8e12, bf16_flops=989e12, sms=132),
}
SM90 = dict(registers=65536, smem=228 * 1024, max_blocks=32, max_threads=2048)


def device_of(device_kind: str) -> str | None:
    """"H100"/"H200" for a jax device_kind such as "NVIDIA H100 80GB HBM3", else None."""
    for name in DEVICES:
        if name.lower() in device_kind.lower():
            return name
    return None


def packed_bytes(k: int, n: int, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Bytes of one packed layer: qweight ``K * bits / 8 * N``, qzeros and scales per group."""
    groups = -(-k // (k if group_size == -1 else group_size))
    return k * n * bits // 8 + groups * n * bits // 8 + groups * n * scale_bytes


def matmul_bytes(k: int, n: int, m: int, *, bits: int | None, group_size: int = 128, x_bytes: int = 2,
                 split_k: int = 1, split_rows: int = 0) -> dict:
    """Bytes one ``(M, K) @ (K, N)`` call must move. ``bits=None``: a dense weight of ``x_bytes`` per element.

    ``split_k``/``split_rows``: a split-K decode plan also writes and re-reads f32 partial sums ``(split, rows, N)``.
    """
    weight = k * n * x_bytes if bits is None else packed_bytes(k, n, bits, group_size)
    act = m * k * x_bytes + m * n * x_bytes
    partial = 2 * split_k * split_rows * n * 4 if split_k > 1 else 0
    return dict(weight=weight, activations=act, partial_sums=partial, total=weight + act + partial)


def roofline_us(k: int, n: int, m: int, device: str, *, bits: int | None, group_size: int = 128, x_bytes: int = 2,
                split_k: int = 1, split_rows: int = 0, bandwidth: float | None = None) -> float:
    """Microseconds at the roofline: max(bytes / bandwidth, flops / peak). ``bandwidth`` overrides the peak."""
    spec = DEVICES[device]
    nbytes = matmul_bytes(k, n, m, bits=bits, group_size=group_size, x_bytes=x_bytes, split_k=split_k,
                          split_rows=split_rows)["total"]
    t_mem = nbytes / (bandwidth or spec["bandwidth"])
    t_flop = 2 * m * k * n / spec["bf16_flops"]
    return 1e6 * max(t_mem, t_flop)


def blocks_per_sm(registers: int, smem: int, num_warps: int) -> int:
    """Blocks of a kernel resident on one sm_90 SM, from its registers per thread and shared memory per block."""
    threads = 32 * num_warps
    regs = SM90["registers"] // max(1, -(-registers // 8) * 8 * threads)  # registers allocated in groups of 8
    shared = SM90["smem"] // smem if smem else SM90["max_blocks"]
    return max(0, min(regs, shared, SM90["max_blocks"], SM90["max_threads"] // threads))


def waves(programs: int, per_sm: int, sms: int = 132) -> float:
    """Grid size over what the GPU holds at once (1.0 = exactly one full wave)."""
    return programs / max(1, per_sm * sms)


def compile_stats(path: Path = RESULTS / "kernels_sm90_compile.json") -> list[dict]:
    """The compile check's per-plan rows, or [] when it has not been run."""
    try:
        return json.loads(path.read_text())["plans"]
    except (OSError, ValueError, KeyError):
        return []


def stats_for(plan: dict, bits: int, dtype: str, stats: list[dict]) -> dict | None:
    """The compile row of this plan (every field but the split-K grid), if the compile check has one."""
    skip = ("split_k", "steps_per_split")
    for row in stats:
        same = all(row["plan"].get(f) == plan.get(f) for f in plan if f not in skip)
        if same and row["bits"] == bits and row["dtype"] == dtype:
            return row
    return None


def main(argv: list[str] | None = None) -> int:
    from pallas_kernels import PackedWeight  # noqa: F401  (the plan needs the package; imported lazily)
    from pallas_kernels import matmul as matmul_mod

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x8192,8192x28672,576x1536")
    p.add_argument("--m", default="1,16,64,256,2048")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    stats = compile_stats()
    print(f"{'K x N':>13} {'M':>5} {'plan':>22} {'packed MB':>9} {'H100 us':>8} {'H200 us':>8} {'bf16 H100':>9} "
          f"{'x bf16':>6} {'regs':>4} {'blk/SM':>6} {'waves':>6}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        g = k if args.group_size == -1 else args.group_size
        sds = jax.ShapeDtypeStruct
        w = PackedWeight(qweight=sds((k * args.bits // 32, n), jnp.int32),
                         qzeros=sds((-(-k // g), n * args.bits // 32), jnp.int32),
                         scales=sds((-(-k // g), n), jnp.float16), g_idx=None, perm=None, bits=args.bits,
                         group_size=args.group_size, in_features=k, out_features=n)
        for m in (int(v) for v in args.m.split(",")):
            plan = matmul_mod.select_plan(m, w, device_kind="NVIDIA H100")
            rows = plan.x_rows if plan.kernel == "decode" else 0
            kw = dict(bits=args.bits, group_size=args.group_size, split_k=plan.split_k, split_rows=rows)
            h100, h200 = roofline_us(k, n, m, "H100", **kw), roofline_us(k, n, m, "H200", **kw)
            dense = roofline_us(k, n, m, "H100", bits=None)
            row = stats_for(vars(plan), args.bits, "bfloat16", stats)
            programs = (n // plan.block_n) * (plan.split_k if plan.kernel == "decode" else -(-m // plan.block_m))
            occ = blocks_per_sm(row["registers"], row["smem"], plan.num_warps) if row else 0
            print(f"{k:>6} x {n:<5} {m:>5} {plan.kernel[:3]} {plan.block_m}x{plan.block_n}x{plan.block_k} "
                  f"s{plan.split_k:<3} {matmul_bytes(k, n, m, **kw)['total'] / 1e6:9.2f} {h100:8.1f} {h200:8.1f} "
                  f"{dense:9.1f} {dense / h100:6.2f} {row['registers'] if row else '-':>4} {occ or '-':>6} "
                  f"{waves(programs, occ) if occ else math.nan:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
