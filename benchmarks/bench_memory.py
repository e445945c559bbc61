"""Benchmark: peak host memory of ``gptq-jax quantize``'s streamed run, at 2 and 4 layers.

    python benchmarks/bench_memory.py                          # Llama-2-7B shapes, 2 and 4 layers, GPTQ
    python benchmarks/bench_memory.py --layers 2 4 8 --method rtn

Writes a synthetic Llama-2-7B-shaped checkpoint (random bf16 weights, the first ``max(--layers)`` of its 32
layers, one safetensors shard per layer; ``--dir``, reused when present), then for each layer count runs a fresh
child process that does what ``gptq-jax quantize`` does: ``open_pretrained`` (headers only), ``quantize(...,
load=..., work_dir=...)`` (each block read from disk in f32 when it is reached, its quantized weights dropped once
saved in the work directory), then ``save_quantized(..., weights=...)`` (one shard packed at a time). Calibration:
``--tokens`` random token ids in windows of 128.

It reports per block its time and the RSS when it starts, the peak RSS of the quantization and of the whole run
with the save (``VmHWM``; the save holds one shard, ``--max-shard-mb``), and the device's ``memory_stats()``
where the platform has them (None on CPU). Peak RSS must not grow with the number of
layers: the script checks that and exits 1 otherwise. Writes JSON to
``benchmarks/results/bench_memory/bench_memory_llama2-7b_<device>.json`` with ``uptime`` before and after each
child, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_pipeline  # the Llama-2-7B config, shared (benchmarks/ is on sys.path when run as a script)
import numpy as np
import provenance

REPO = Path(__file__).resolve().parent.parent
# The shapes of bench_pipeline.py's Llama-2-7B, stored in bf16 on disk.
LLAMA2_7B = {**bench_pipeline.LLAMA2_7B, "torch_dtype": "bfloat16"}
RSS_GROWTH_TOLERANCE = 0.10  # 4 layers may use at most 10% more peak RSS than 2


def layer_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name (without the layer prefix) -> shape, torch orientation [out, in]."""
    d, i = c["hidden_size"], c["intermediate_size"]
    hd = c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (i, d),
        "mlp.up_proj.weight": (i, d),
        "mlp.down_proj.weight": (d, i),
    }


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    if len(shape) == 1:
        return np.ones(shape, dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(shape[1]))).astype(dtype)


def write_checkpoint(out: Path, layers: int, config: dict) -> None:
    """One shard per layer plus one for embedding/norm/head, written one shard at a time."""
    import ml_dtypes
    from safetensors.numpy import save_file

    marker = out / f".complete-{layers}"
    if marker.exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    weight_map = {}
    files = [f"model-{i:05d}.safetensors" for i in range(layers)] + ["model-rest.safetensors"]
    for i in range(layers):
        tensors = {f"model.layers.{i}.{k}": _random(rng, s, bf16) for k, s in layer_shapes(config).items()}
        save_file(tensors, str(out / files[i]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, files[i]))
        del tensors
    v, d = config["vocab_size"], config["hidden_size"]
    rest = {
        "model.embed_tokens.weight": _random(rng, (v, d), bf16),
        "model.norm.weight": np.ones((d,), bf16),
        "lm_head.weight": _random(rng, (v, d), bf16),
    }
    save_file(rest, str(out / files[-1]), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, files[-1]))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    marker.touch()


def view_with_layers(full: Path, out: Path, layers: int) -> None:
    """A checkpoint directory of the first ``layers`` layers of ``full``: its own config and index, symlinked
    shards (no copy)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {
        n: f for n, f in index["weight_map"].items()
        if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers
    }
    for f in set(keep.values()):
        (out / f).symlink_to(full / f)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    config = json.loads((full / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, method: str, tokens: int, out_dir: str, max_shard_mb: int, whole: bool = False) -> dict:
    """Quantize one checkpoint as ``gptq-jax quantize`` does (weights streamed with ``open_pretrained`` and
    ``quantize(load=...)``, finished blocks in a work directory, then the streamed save); returns the measurements.
    Runs in its own process."""
    import jax

    from gptq_jax import QuantConfig, quantize
    from gptq_jax.io.checkpoint import save_quantized
    from gptq_jax.models import open_pretrained

    rss_start = _status_mb("VmRSS")
    config = QuantConfig(bits=4, group_size=128)
    if whole:  # the comparison: the whole model in memory, then packed and saved as one
        from gptq_jax.models import load_pretrained
        from gptq_jax.models.qlinear import pack_model

        model, c = load_pretrained(path)
        load = None
    else:
        model, c, load = open_pretrained(path)  # f32: each block is cast to f32 as it is loaded
    seqlen = 128
    calib = np.random.default_rng(1).integers(0, c.vocab_size, (max(1, tokens // seqlen), seqlen)).astype(np.int32)
    marks: list[dict] = []
    t0 = time.perf_counter()

    def progress(name: str) -> None:  # a line per weight: record RSS when a new layer starts
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        if not marks or marks[-1]["layer"] != layer:
            marks.append({"layer": layer, "start_s": time.perf_counter() - t0, "rss_at_start_mb": _status_mb("VmRSS"),
                          "peak_rss_so_far_mb": _status_mb("VmHWM")})

    work = os.path.join(out_dir, "work")
    result = quantize(model, calib, quant_config=config, method=method, work_dir=work, load=load, progress=progress)
    quantize_s = time.perf_counter() - t0
    peak_quantize = _status_mb("VmHWM")
    ts = time.perf_counter()
    if whole:
        pack_model(result.model, result.weights)
    save_quantized(result.model, os.path.join(out_dir, "ckpt"), quant_config=config,
                   weights=None if whole else result.weights, overwrite=True, max_shard_bytes=max_shard_mb * 2**20)
    save_s = time.perf_counter() - ts
    blocks = [{"layer": r["layer"], "total_s": r["seconds"], **(marks[k] if k < len(marks) else {})}
              for k, r in enumerate(result.report.layers)]
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return {
        "layers": c.num_hidden_layers,
        "calibration": {"windows": int(calib.shape[0]), "seqlen": seqlen},
        "rss_start_mb": rss_start,
        "peak_rss_quantize_mb": peak_quantize,
        "peak_rss_mb": _status_mb("VmHWM"),  # not ru_maxrss: a child inherits its parent's peak there
        "quantize_s": quantize_s,
        "save_s": save_s,
        "device_memory_stats": stats,
        "blocks": blocks,
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _run_child(path: Path, out_dir: Path, args: argparse.Namespace, whole: bool = False) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    before = _uptime()
    cmd = [sys.executable, __file__, "--child", str(path), "--child-out", str(out_dir), "--method", args.method,
           "--tokens", str(args.tokens), "--max-shard-mb", str(args.max_shard_mb), *(["--whole"] if whole else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        sys.exit(f"the child failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(uptime_before=before, uptime_after=_uptime())
    return res


def _checkpoint_runs(args: argparse.Namespace) -> int:
    """One real checkpoint, streamed and whole (each in a fresh process): peak RSS of each."""
    import jax

    runs = {}
    for mode in ("streamed", "whole"):
        runs[mode] = _run_child(args.checkpoint, args.dir / f"ckpt-{mode}", args, whole=mode == "whole")
        print(f"{mode}: peak RSS {runs[mode]['peak_rss_mb']:.0f} MB ({runs[mode]['peak_rss_quantize_mb']:.0f} MB "
              f"quantizing), {runs[mode]['quantize_s']:.0f} s; {runs[mode]['uptime_after']}", flush=True)
    name = args.checkpoint.resolve().name
    payload = {"benchmark": "bench_memory", "model": name, "method": args.method, "platform": jax.devices()[0].platform,
               "jax_version": jax.__version__, "quant_config": {"bits": 4, "group_size": 128, "sym": True},
               "calibration_tokens": args.tokens, "runs": runs}
    out = args.out or provenance.result_path("bench_memory", f"bench_memory_{name}_{args.method}_cpu.json")
    provenance.write_result(out, payload, started=args.started)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per Hessian")
    ap.add_argument("--max-shard-mb", type=int, default=256, help="checkpoint shard size of the save")
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "bench_memory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="measure this HF checkpoint instead (e.g. SmolLM2), streamed and whole, one run each")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.started = provenance.start()

    if args.child:  # the measured process
        res = child(args.child, args.method, args.tokens, args.child_out, args.max_shard_mb, args.whole)
        print(json.dumps(res))
        return 0
    if args.checkpoint is not None:
        return _checkpoint_runs(args)

    import jax

    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    t0 = time.perf_counter()
    full = args.dir / "llama2-7b-full"
    write_checkpoint(full, max(args.layers), LLAMA2_7B)
    write_s = time.perf_counter() - t0
    runs = []
    for n in args.layers:
        view = args.dir / f"llama2-7b-{n}"
        view_with_layers(full, view, n)
        res = _run_child(view, args.dir / f"codes-{n}", args)
        runs.append(res)
        print(f"{n} layers: peak RSS {res['peak_rss_mb']:.0f} MB ({res['peak_rss_quantize_mb']:.0f} MB quantizing), "
              f"{np.mean([b['total_s'] for b in res['blocks'][1:]] or [res['blocks'][0]['total_s']]):.1f} s per "
              f"layer after the first; {res['uptime_after']}", flush=True)
    peaks = [r["peak_rss_mb"] for r in runs]
    ok = max(peaks) <= min(peaks) * (1 + RSS_GROWTH_TOLERANCE)
    c = LLAMA2_7B
    block_params = sum(int(np.prod(s)) for s in layer_shapes(c).values())
    payload = {
        "benchmark": "bench_memory",
        "device": device,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "model": "llama2-7b shapes, random bf16 weights",
        "method": args.method,
        "quant_config": {"bits": 4, "group_size": 128, "sym": True},
        "calibration_tokens": args.tokens,
        "checkpoint_write_s": write_s,
        "block_params": block_params,
        "block_f32_mb": block_params * 4 / 2**20,
        "block_bf16_on_disk_mb": block_params * 2 / 2**20,
        "embedding_bf16_mb": c["vocab_size"] * c["hidden_size"] * 2 / 2**20,
        "largest_hessian_f32_mb": c["intermediate_size"] ** 2 * 4 / 2**20,
        "runs": runs,
        "peak_rss_mb_by_layers": dict(zip(map(str, args.layers), peaks, strict=True)),
        "rss_does_not_grow": ok,
        "rss_growth_tolerance": RSS_GROWTH_TOLERANCE,
    }
    name = f"bench_memory_llama2-7b_{args.method}_{dev.platform}.json"
    out = args.out or provenance.result_path("bench_memory", name)
    provenance.write_result(out, payload, started=args.started)
    print(f"peak RSS by layers {payload['peak_rss_mb_by_layers']}; does not grow: {ok}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
