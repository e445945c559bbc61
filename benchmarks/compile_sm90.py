"""Compile every kernel plan the dispatcher can choose to sm_90a (H100/H200), without a GPU, and check it.

For each combination of bits (2/4/8), group size (32/64/128/-1), act-order, M (1, 2..16, 17..64, 256, 2048), dtype
and Llama shape, the dispatcher's plan (``pallas_kernels.matmul.select_plan``, tile table for an H100) is resolved.
Plans repeat across shapes (the compiled code depends on the tiles, bits and dtype, not on K or N beyond loop
bounds), so each distinct plan is compiled once, on its first shape:

1. ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``: the ``__gpu$xla.gpu.triton`` custom call's
   ``mhlo.backend_config`` holds the kernel's Triton IR, ``num_warps`` and ``num_stages``;
2. ``jax._src.lib.triton.compile("cuda", ir, "9.0", ...)``: XLA's own Triton pass pipeline, giving PTX for sm_90a
   and the shared memory the kernel needs;
3. ``ptxas -v -arch=sm_90a`` (from the nvidia-cuda-nvcc wheel): registers and spill bytes.

A plan fails on a compile error, any spill (stack frame or spill bytes), shared memory over 227 KiB, or shared
memory over the dispatcher's own bound (``_Plan.smem_bound``, which is what keeps unlaunchable plans from being
picked). The PTX is also searched for what matters to speed: ``mma``/``wgmma``, ``cp.async`` and TMA
(``cp.async.bulk``), and the vector width of global loads.

Needs JAX with the CUDA plugin (``jax-cuda12-plugin`` registers the Triton compile handler) and ptxas: ``make
cuda-venv`` builds ``.venv-cuda`` for this. Run from the repository root:

    JAX_PLATFORMS=cpu PYTHONPATH=. .venv-cuda/bin/python benchmarks/compile_sm90.py [--quick] [--out FILE]

Writes benchmarks/results/compile_sm90/kernels_sm90_compile.json;
 exits 1 if any plan fails. These are XLA's Triton pipeline's
numbers as compiled here; the runtime compile inside XLA on a GPU may differ slightly (the GPU run confirms).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import provenance

from pallas_kernels import PackedWeight
from pallas_kernels import matmul as matmul_mod

RESULTS = provenance.RESULTS / "compile_sm90"
ARCH = "9.0"  # sm_90a: Triton picks the "a" features (wgmma, TMA) for 9.0
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may have on sm_90
DEVICE_KIND = "NVIDIA H100 80GB HBM3"  # the tile-table key the plans are resolved for

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (576, 1536))  # (K, N)
BITS = (2, 4, 8)
GROUPS = (32, 64, 128, -1)
ACT_ORDER = (False, True)
M_VALUES = (1, 2, 8, 16, 17, 33, 64, 256, 2048)  # 1; 2..16; 17..64 (each block_m); 256; 2048
DTYPES = ("bfloat16", "float16", "float32")
QUICK = dict(shapes=((4096, 4096), (576, 1536)), bits=(4,), groups=(128,), act_order=(False,), m=(1, 16, 256),
             dtypes=("bfloat16",))


def abstract_weight(k: int, n: int, bits: int, group_size: int, act_order: bool) -> PackedWeight:
    """A packed layer of abstract arrays (nothing allocated): all the dispatcher and the lowering look at."""
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    sds = jax.ShapeDtypeStruct
    return PackedWeight(qweight=sds((k * bits // 32, n), jnp.int32), qzeros=sds((groups, n * bits // 32), jnp.int32),
                        scales=sds((groups, n), jnp.float16), g_idx=None,
                        perm=sds((k,), jnp.int32) if act_order and group_size != -1 else None,
                        bits=bits, group_size=group_size, in_features=k, out_features=n)


def plan_key(plan, bits: int, dtype: str) -> tuple:
    """What shapes the compiled kernel: every plan field but the split-K grid, plus bits and dtype."""
    fields = dataclasses.asdict(plan)
    fields.pop("split_k")
    fields.pop("steps_per_split")
    return tuple(sorted(fields.items())) + (("bits", bits), ("dtype", dtype))


def triton_calls(lowered) -> list[dict]:
    """Triton IR, num_warps and num_stages of every ``__gpu$xla.gpu.triton`` custom call in a CUDA lowering."""
    from jax._src.lib.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.attributes
                    if child.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in attrs:
                        target = ir.StringAttr(attrs["call_target_name"]).value
                        if "triton" in target:
                            cfg = attrs["mhlo.backend_config"]
                            found.append(dict(target=target, ir=ir.StringAttr(cfg["ir"]).value_bytes,
                                              num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                                              num_stages=ir.IntegerAttr(cfg["num_stages"]).value))
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def ptxas_path() -> Path:
    try:
        import nvidia.cuda_nvcc as nvcc  # the nvidia-cuda-nvcc-cu12 wheel
    except ImportError as e:
        raise SystemExit(f"no ptxas: install nvidia-cuda-nvcc-cu12 (make cuda-venv): {e}") from None
    path = Path(list(nvcc.__path__)[0]) / "bin" / "ptxas"
    if not path.is_file():
        raise SystemExit(f"no ptxas at {path}")
    return path


def ptx_stats(ptx: str) -> dict:
    """Instruction counts that matter to a weight-streaming kernel, read off the PTX."""
    loads = collections.Counter()
    for m in re.finditer(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*?\.(?:v(\d)\.)?([bfsu])(\d+)\b", ptx):
        loads[int(m.group(1) or 1) * int(m.group(3))] += 1  # bits per load
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    cp_async = collections.Counter(int(size, 0) for size in copies)  # bytes per copy; PTX writes them in hex
    return dict(
        mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        cp_async=sum(cp_async.values()),
        cp_async_bytes=dict(sorted(cp_async.items())),  # bytes per cp.async -> count
        tma=len(re.findall(r"\bcp\.async\.bulk\b", ptx)),
        ld_global_bits=dict(sorted(loads.items())),  # bits per ld.global -> count
        max_global_load_bits=max([*loads, *(8 * b for b in cp_async)], default=0),
    )


def ptxas_stats(ptxas: Path, ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True)
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        return dict(ptxas_error=log.strip()[-2000:])

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(registers=num(r"Used (\d+) registers"), stack_frame=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"))


def compile_plan(plan, w: PackedWeight, m: int, dtype: str, ptxas: Path) -> dict:
    from jax._src.lib import triton

    launch = functools.partial(matmul_mod._pallas_matmul, bits=w.bits, group=w.group_len, plan=plan, interpret=False)
    x = jax.ShapeDtypeStruct((m, w.in_features), jnp.dtype(dtype))
    t0 = time.perf_counter()
    try:
        lowered = jax.jit(launch).trace(x, w.qweight, w.scales, w.qzeros).lower(lowering_platforms=("cuda",))
        calls = triton_calls(lowered)
        if len(calls) != 1:
            raise RuntimeError(f"expected one Triton custom call, found {len(calls)}")
        call = calls[0]
        out = triton.compile("cuda", call["ir"], ARCH, num_warps=call["num_warps"], num_ctas=1,
                             num_stages=call["num_stages"])
    except Exception as e:  # a compile error is a finding, reported per plan
        return dict(error=f"{type(e).__name__}: {str(e)[-2000:]}", seconds=time.perf_counter() - t0)
    row = dict(num_warps=call["num_warps"], num_stages=call["num_stages"], smem=int(out.smem_bytes))
    row.update(ptxas_stats(ptxas, out.asm))
    row.update(ptx_stats(out.asm))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def problems(row: dict, smem_bound: int) -> list[str]:
    if "error" in row:
        return [f"compile error: {row['error'][:300]}"]
    if "ptxas_error" in row:
        return [f"ptxas error: {row['ptxas_error'][:300]}"]
    out = []
    if row["spill_stores"] or row["spill_loads"] or row["stack_frame"]:
        out.append(f"spills: {row['spill_stores']} B stored / {row['spill_loads']} B loaded, "
                   f"{row['stack_frame']} B stack frame ({row['registers']} registers)")
    if row["smem"] > SMEM_LIMIT:
        out.append(f"shared memory {row['smem']} B > {SMEM_LIMIT} B: cannot launch on sm_90")
    if row["smem"] > smem_bound:
        out.append(f"shared memory {row['smem']} B > the dispatcher's bound {smem_bound} B (_Plan.smem_bound)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a few combinations only: {QUICK}")
    p.add_argument("--out", type=Path, default=RESULTS / "kernels_sm90_compile.json")
    args = p.parse_args(argv)
    jax.devices()  # loads the CUDA plugin, which registers the Triton compile handler
    from jax._src.lib import triton

    if not triton.has_compilation_handler("cuda"):
        raise SystemExit("no CUDA Triton compile handler: install jax-cuda12-plugin and jax-cuda12-pjrt (make "
                         "cuda-venv) and run with JAX_PLATFORMS=cpu")
    ptxas = ptxas_path()
    grid = QUICK if args.quick else dict(shapes=SHAPES, bits=BITS, groups=GROUPS, act_order=ACT_ORDER, m=M_VALUES,
                                         dtypes=DTYPES)
    t_start = time.perf_counter()
    plans: dict[tuple, dict] = {}
    refused = []
    for (k, n), bits, group, act, m, dtype in itertools.product(*grid.values()):
        w = abstract_weight(k, n, bits, group, act)
        case = dict(K=k, N=n, bits=bits, group_size=group, act_order=act, M=m, dtype=dtype)
        try:
            plan = matmul_mod.select_plan(m, w, device_kind=DEVICE_KIND, x_dtype=dtype)
        except NotImplementedError as e:
            refused.append({**case, "reason": str(e)})
            continue
        key = plan_key(plan, bits, dtype)
        if key not in plans:
            plans[key] = dict(plan=dataclasses.asdict(plan), bits=bits, dtype=dtype, compiled_on=case, cases=0,
                              smem_bound=plan.smem_bound(bits, jnp.dtype(dtype).itemsize), _w=w, _m=m)
        plans[key]["cases"] += 1
    print(f"{len(plans)} distinct plans for {sum(p['cases'] for p in plans.values())} cases "
          f"({len(refused)} refused by the dispatcher)", flush=True)

    failures = 0
    print(f"{'kernel':>8} {'bm':>3} {'xr':>3} {'bn':>4} {'bk':>4} {'w':>2} {'st':>2} {'bits':>4} {'dtype':>9} "
          f"{'regs':>4} {'spill':>5} {'smem':>7} {'bound':>7} {'mma':>4} {'wgmma':>5} {'cp.async':>8} {'ld bits':>7}")
    for entry in plans.values():
        w, m = entry.pop("_w"), entry.pop("_m")
        plan = matmul_mod._Plan(**entry["plan"])
        row = compile_plan(plan, w, m, entry["dtype"], ptxas)
        entry.update(row)
        entry["problems"] = problems(row, entry["smem_bound"])
        failures += bool(entry["problems"])
        pl = entry["plan"]
        head = (f"{pl['kernel']:>8} {pl['block_m']:>3} {pl['x_rows']:>3} {pl['block_n']:>4} {pl['block_k']:>4} "
                f"{pl['num_warps']:>2} {pl['num_stages']:>2} {entry['bits']:>4} {entry['dtype']:>9}")
        if "registers" in row:
            print(f"{head} {row['registers']:>4} {row['spill_stores'] + row['spill_loads']:>5} {row['smem']:>7} "
                  f"{entry['smem_bound']:>7} {row['mma_sync']:>4} {row['wgmma']:>5} {row['cp_async']:>8} "
                  f"{row['max_global_load_bits']:>7}  {'; '.join(entry['problems']) or 'ok'}", flush=True)
        else:
            print(f"{head}  {'; '.join(entry['problems'])}", flush=True)
    seconds = time.perf_counter() - t_start
    report = dict(
        check="kernels_sm90_compile",
        arch="sm_90a",
        device_kind_for_tile_table=DEVICE_KIND,
        smem_limit_bytes=SMEM_LIMIT,
        jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        quick=args.quick,
        grid={k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in grid.items()},
        seconds=round(seconds, 1),
        load_average=os.getloadavg(),
        note="XLA's Triton pipeline compiled on a CPU machine; the runtime compile on a GPU may differ slightly.",
        plans=list(plans.values()),
        failures=failures,
        refused_by_dispatcher=refused,
    )
    provenance.write_result(args.out, report)
    print(f"{len(plans)} plans compiled in {seconds:.0f} s, {failures} failing; wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
