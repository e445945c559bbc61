"""Benchmark: the GPTQ dequant-matmul, Pallas kernel vs the jnp reference under XLA vs a plain bf16 XLA dot.

All three run in one process on the same device, on the same activations and (dequantized) weights, and each
result is checked against the reference before it is timed. Each timed call runs the matmul on several distinct
copies of the weight, enough bytes to overflow the GPU's L2 cache: decode is weight streaming, and a layer's weights
are read once per token, not served from cache. That also amortizes Python dispatch over many kernels.

Reported per (K x N, M): microseconds per matmul (median over repeats), speedup over the bf16 dot, effective GB/s
of weight traffic (packed qweight + scales + qzeros; the bf16 dot reads K*N*2 bytes) and its fraction of the
device's copy bandwidth, measured here with a large elementwise copy. Beside every figure, the roofline
(benchmarks/roofline.py): the microseconds the call's bytes (weights, activations, split-K partial sums) take at
H100's 3.35 TB/s and H200's 4.8 TB/s, and at the copy bandwidth measured in this run; on an H100/H200 also the
measured time's fraction of that device's roofline.

On CPU the Pallas kernel can only run in interpret mode, whose timings mean nothing: it is not timed, and the JSON
says so; with --check-interpret its result is still checked for the smallest M.

    python benchmarks/bench_matmul.py                      # full sweep (GPU)
    python benchmarks/bench_matmul.py --quick              # a few M and shapes (CPU)
    python benchmarks/bench_matmul.py --m 1,16 --shapes 4096x4096 --bits 4 --group-size 128
    python benchmarks/bench_matmul.py --cpu-decode         # CPU decode: float dot vs reference vs chunked

Writes JSON to benchmarks/results/bench_matmul/bench_matmul_<device kind>.json (``--cpu-decode``:
bench_matmul_cpu_decode.json).

``--cpu-decode`` (CPU, float32 activations, SmolLM2-135M's shapes by default) times what one decode step of a
model does with each layer: a chain of distinct layers in one jitted call, each layer's input depending on the
previous layer's output, enough layers that the float weights stream from memory (64 MiB by default, twice this
CPU's L3) as a model's do. Compared per (K x N, M): the float32 ``jnp.dot`` on the dequantized weight, the
materializing reference (``gptq_matmul_reference``) and ``gptq_matmul_chunked`` at several f32 tile sizes
(``--tile-kib``); min and median over repeats, with the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import PackedWeight, gptq_matmul, gptq_matmul_chunked, gptq_matmul_reference
from pallas_kernels import matmul as matmul_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402  (benchmarks/provenance.py)
import roofline  # noqa: E402  (benchmarks/roofline.py)

M_ALL = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHAPES_ALL = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))  # (K, N)
M_QUICK = (1, 8, 64, 256)
SHAPES_QUICK = ((4096, 4096), (11008, 4096))
SHAPES_SMOLLM2 = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # q/o, k/v, gate/up, down
M_CPU_DECODE = (1, 4, 8, 16)
TILE_KIB_CPU_DECODE = (384, 768, 3072, 6144)
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # max |y - ref| / max |ref|
RESULTS = provenance.RESULTS / "bench_matmul"


def make_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, seed: int = 0) -> PackedWeight:
    rng = np.random.default_rng(seed)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    maxq = (1 << bits) - 1
    codes = rng.integers(0, maxq + 1, (k, n), dtype=np.int32)
    zeros = rng.integers(0, maxq + 1, (groups, n), dtype=np.int32)
    scales = (rng.uniform(0.5, 1.5, (groups, n)) * 0.02 / maxq).astype(np.float16)
    g_idx = None
    if act_order:
        g_idx = np.empty(k, np.int32)
        g_idx[rng.permutation(k)] = np.arange(k) // g
    return PackedWeight.from_codes(codes, scales, zeros, g_idx, bits, group_size)


def weight_bytes(w: PackedWeight) -> int:
    return sum(a.size * a.dtype.itemsize for a in (w.qweight, w.qzeros, w.scales))


def copies(tree, count: int):
    """``count`` copies in distinct device buffers: XLA cannot tell they are equal, and the cache cannot hold them."""
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count)]


def time_call(fn, args, *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` after ``warmup`` calls, each call waited for with ``block_until_ready``."""
    return time_stats(fn, args, warmup=warmup, repeats=repeats)[1]


def copy_bandwidth(nbytes: int, *, warmup: int, repeats: int) -> float:
    """Bytes/s of an elementwise f32 copy (read + write) of ``nbytes``: the device's practical memory bandwidth."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / time_call(f, (a,), warmup=warmup, repeats=repeats)


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def roofline_row(k: int, n: int, m: int, impl: str, plan, args, x_bytes: int, copy_bw: float) -> dict:
    """Roofline microseconds for this call (benchmarks/roofline.py): H100, H200, this run's copy bandwidth."""
    dense = impl == "xla_bf16_dot"
    kw = dict(bits=None if dense else args.bits, group_size=args.group_size, x_bytes=x_bytes)
    if impl == "pallas" and plan.kernel == "decode":
        kw.update(split_k=plan.split_k, split_rows=plan.x_rows)
    out = {f"{d}_us": roofline.roofline_us(k, n, m, d, **kw) for d in roofline.DEVICES}
    out["copy_bw_us"] = roofline.roofline_us(k, n, m, "H100", bandwidth=copy_bw, **kw) if copy_bw else None
    out["bytes"] = roofline.matmul_bytes(k, n, m, **{key: v for key, v in kw.items()})["total"]
    here = roofline.device_of(jax.devices()[0].device_kind)
    if here:
        out["this_device_us"] = out[f"{here}_us"]
    return out


def print_rows(rows: list[dict]) -> None:
    """Every measured figure with its roofline beside it."""
    print(f"\n{'K x N':>12} {'M':>4} {'impl':>14} {'us':>10} {'x bf16':>7} {'GB/s':>8} {'% copy':>7} "
          f"{'roof H100':>9} {'roof H200':>9} {'roof copy':>9} {'% roof':>7}  status")
    for r in rows:
        us = f"{r['us']:10.1f}" if "us" in r else f"{'-':>10}"
        sp = f"{r['speedup_vs_bf16']:7.2f}" if "speedup_vs_bf16" in r else f"{'-':>7}"
        gb = f"{r['GBps']:8.1f}" if "GBps" in r else f"{'-':>8}"
        fr = f"{100 * r['frac_copy_bw']:6.1f}%" if "frac_copy_bw" in r else f"{'-':>7}"
        rf = r["roofline"]
        cp = f"{rf['copy_bw_us']:9.1f}" if rf.get("copy_bw_us") else f"{'-':>9}"
        pr = f"{100 * r['frac_of_roofline']:6.1f}%" if "frac_of_roofline" in r else f"{'-':>7}"
        print(f"{r['K']:>5} x {r['N']:<5} {r['M']:>4} {r['impl']:>14} {us} {sp} {gb} {fr} {rf['H100_us']:9.1f} "
              f"{rf['H200_us']:9.1f} {cp} {pr}  {r['status']}")


def chained(matmul):
    """A jitted ``(x, layers) -> outputs`` running ``matmul`` layer after layer; each input depends on the last output.

    ``x + nan_to_num(y[0, 0] * 0)`` is x again, but XLA cannot start a layer before the previous one ends: the
    order of a model's decode step, where a layer's input is the previous layer's output.
    """

    def run(x, ws):
        out = []
        for w in ws:
            y = matmul(x, w)
            out.append(y[:, :1])
            x = x + jnp.nan_to_num(y[0, 0] * 0.0)
        return out

    return jax.jit(run)


def time_stats(fn, args, *, warmup: int, repeats: int) -> tuple[float, float]:
    """(min, median) seconds of ``fn(*args)``: on a shared machine the min is the steadier figure."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def cpu_decode(args, argv) -> int:
    """``--cpu-decode``: float dot vs reference vs chunked at small M on CPU (module docstring)."""
    dev = jax.devices()[0]
    ms = tuple(int(v) for v in args.m.split(",")) if args.m else M_CPU_DECODE
    shapes = SHAPES_SMOLLM2
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(","))
    tiles = tuple(int(v) for v in args.tile_kib.split(",")) if args.tile_kib else TILE_KIB_CPU_DECODE
    stream_bytes = int((args.stream_mb if args.stream_mb is not None else 64) * 2**20)
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    started = provenance.start()
    load_before = started["load_average"]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; load average {load_before}")
    rows, failures = [], 0
    for k, n in shapes:
        w = make_layer(k, n, args.bits, args.group_size, args.act_order, seed=k + n)
        w_dense = w.dequantize(jnp.float32)
        layers = max(1, min(args.max_layers, math.ceil(stream_bytes / (k * n * 4))))
        wqs, wds = copies(w, layers), copies(w_dense, layers)
        impls = {"float32_dot": (chained(lambda x, a: jnp.dot(x, a, precision="highest")), wds),
                 "reference": (chained(gptq_matmul_reference), wqs)}
        for t in tiles:
            r = matmul_mod.cpu_chunk_rows(w, t * 1024)
            impls[f"chunked_{t}KiB"] = (chained(lambda x, a, r=r: gptq_matmul_chunked(x, a, rows=r)), wqs)
        for m in ms:
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
            ref = gptq_matmul_reference(x, w)
            line = f"{k:>5} x {n:<5} M={m:<3} layers={layers:<3}"
            base = None
            for name, (fn, ws) in impls.items():
                row = dict(K=k, N=n, M=m, impl=name, layers_per_call=len(ws))
                if name.startswith("chunked"):
                    row["chunk_rows"] = matmul_mod.cpu_chunk_rows(w, int(name.split("_")[1][:-3]) * 1024)
                    row["rel_err"] = rel_err(gptq_matmul_chunked(x, w, rows=row["chunk_rows"]), ref)
                    if row["rel_err"] > TOL["float32"]:
                        failures += 1
                        row["status"] = f"MISMATCH: rel_err {row['rel_err']:.3g}"
                lo, med = time_stats(fn, (x, ws), **timing)
                row.update(us_min=lo / len(ws) * 1e6, us_median=med / len(ws) * 1e6)
                base = base or row["us_min"]
                row["min_vs_float"] = row["us_min"] / base
                line += f" | {name} {row['us_min']:7.1f} ({row['us_median']:7.1f})"
                rows.append(row)
            print(line + "   us/layer, min (median)", flush=True)
    out = args.out or RESULTS / "bench_matmul_cpu_decode.json"
    report = dict(
        benchmark="gptq_matmul CPU decode",
        device_kind=dev.device_kind,
        platform=dev.platform,
        cpu_count=os.cpu_count(),
        jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        settings=dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order, dtype="float32",
                      warmup=args.warmup, repeats=args.repeats, stream_bytes=stream_bytes,
                      dispatcher=dict(cpu_decode_max_m=matmul_mod.CPU_DECODE_MAX_M,
                                      cpu_tile_bytes=matmul_mod.CPU_TILE_BYTES)),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        results=rows,
    )
    provenance.write_result(out, report, started=started)
    print(f"load average {report['load_average_after']}\nwrote {out}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"M in {M_QUICK}, shapes {SHAPES_QUICK} (for CPU)")
    p.add_argument("--m", type=str, default=None, help="comma-separated M values")
    p.add_argument("--shapes", type=str, default=None, help="comma-separated KxN, e.g. 4096x4096,11008x4096")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="a desc_act layer (rows reordered at load time)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOL))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--stream-mb", type=float, default=None,
                   help="weight bytes touched per timed call (default 512 on GPU to overflow L2, 32 on CPU)")
    p.add_argument("--check-interpret", action="store_true",
                   help="on CPU, still check the Pallas kernel (interpret mode) at the smallest M")
    p.add_argument("--cpu-decode", action="store_true",
                   help=f"CPU decode: float32 dot vs reference vs chunked, shapes {SHAPES_SMOLLM2}, M {M_CPU_DECODE}")
    p.add_argument("--tile-kib", type=str, default=None,
                   help=f"--cpu-decode: comma-separated f32 tile sizes (KiB) of the chunked path "
                        f"(default {TILE_KIB_CPU_DECODE})")
    p.add_argument("--max-layers", type=int, default=64, help="--cpu-decode: at most this many layers per call")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cpu_decode:
        return cpu_decode(args, argv)

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    dtype = jnp.dtype(args.dtype)
    ms = M_QUICK if args.quick else M_ALL
    shapes = SHAPES_QUICK if args.quick else SHAPES_ALL
    if args.m:
        ms = tuple(int(v) for v in args.m.split(","))
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(","))
    stream_bytes = int((args.stream_mb if args.stream_mb is not None else (512 if on_gpu else 32)) * 2**20)
    timing = dict(warmup=args.warmup, repeats=args.repeats)

    bw = copy_bandwidth(max(stream_bytes, 64 * 2**20), **timing)
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s")
    pallas_note = None if on_gpu else (
        f"Pallas kernel not timed on {dev.platform}: it only runs in interpret mode there, whose timings are "
        "meaningless"
    )
    if pallas_note:
        print(pallas_note)

    rows, failures = [], 0
    for k, n in shapes:
        w = make_layer(k, n, args.bits, args.group_size, args.act_order, seed=k + n)
        wq_bytes = weight_bytes(w)
        w_dense = w.dequantize(dtype)  # (K, N): the bf16 baseline's weight, same values as the reference's
        dense_bytes = w_dense.size * w_dense.dtype.itemsize
        n_q = max(1, math.ceil(stream_bytes / wq_bytes))
        n_dense = max(1, math.ceil(stream_bytes / dense_bytes))
        wqs, wds = copies(w, n_q), copies(w_dense, n_dense)
        # Layer lists are pytrees: one jit call runs every copy back to back.
        impls = {
            "xla_reference": (jax.jit(lambda x, ws: [gptq_matmul_reference(x, w) for w in ws]), wqs, wq_bytes),
            "xla_bf16_dot": (jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws]), wds, dense_bytes),
        }
        if on_gpu:
            impls["pallas"] = (jax.jit(lambda x, ws: [gptq_matmul(x, w, impl="pallas") for w in ws]), wqs, wq_bytes)
        for m in ms:
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)
            ref = gptq_matmul_reference(x, w)
            plan = matmul_mod.select_plan(m, w, device_kind=dev.device_kind, x_dtype=dtype)
            kernel = plan.kernel
            result = {}
            for name, (fn, ws, nbytes) in impls.items():
                err = rel_err(fn(x, ws[:1])[0], ref)
                row = dict(K=k, N=n, M=m, impl=name, rel_err=err, copies_per_call=len(ws), weight_bytes=nbytes)
                row["roofline"] = roofline_row(k, n, m, name, plan, args, dtype.itemsize, bw)
                if name == "pallas":
                    row.update(kernel=kernel, plan=repr(plan))
                if err > TOL[args.dtype]:
                    row["status"] = f"MISMATCH: rel_err {err:.3g} > {TOL[args.dtype]}"
                    failures += 1
                else:
                    sec = time_call(fn, (x, ws), **timing) / len(ws)
                    row.update(status="ok", us=sec * 1e6, GBps=nbytes / sec / 1e9, frac_copy_bw=nbytes / sec / bw)
                result[name] = row
            if not on_gpu and args.check_interpret and m == min(ms):
                err = rel_err(gptq_matmul(x, w, impl="pallas", interpret=True), ref)
                ok = err <= TOL[args.dtype]
                failures += not ok
                result["pallas"] = dict(K=k, N=n, M=m, impl="pallas", kernel=kernel, rel_err=err,
                                        roofline=roofline_row(k, n, m, "pallas", plan, args, dtype.itemsize, bw),
                                        status=("checked in interpret mode; not timed" if ok else
                                                f"MISMATCH in interpret mode: rel_err {err:.3g}"))
            base = result["xla_bf16_dot"].get("us")
            for row in result.values():
                if base and row.get("us"):
                    row["speedup_vs_bf16"] = base / row["us"]
                here = row["roofline"].get("this_device_us")
                if here and row.get("us"):
                    row["frac_of_roofline"] = here / row["us"]
                rows.append(row)

    print_rows(rows)

    out = args.out or RESULTS / f"bench_matmul_{device_slug(dev.device_kind)}.json"
    report = dict(
        benchmark="gptq_matmul",
        device_kind=dev.device_kind,
        platform=dev.platform,
        jax_version=jax.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        settings=dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order, dtype=args.dtype,
                      warmup=args.warmup, repeats=args.repeats, stream_bytes=stream_bytes,
                      tile_table=str(matmul_mod.tuning.TABLE.name)),
        copy_bandwidth_GBps=bw / 1e9,
        load_average_at_end=os.getloadavg() if hasattr(os, "getloadavg") else None,  # other work on the machine
        pallas_timing_skipped=pallas_note,
        results=rows,
    )
    provenance.write_result(out, report)
    print(f"\nwrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
