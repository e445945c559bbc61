"""Benchmark: peak host memory of quantizing a model block by block from disk, at 2 and 4 layers.

    python benchmarks/bench_memory.py                          # Llama-2-7B shapes, 2 and 4 layers, GPTQ
    python benchmarks/bench_memory.py --layers 2 4 8 --method rtn

Writes a synthetic Llama-2-7B-shaped checkpoint (random bf16 weights, the first ``max(--layers)`` of its 32
layers, one safetensors shard per layer; ``--dir``, reused when present), then for each layer count runs a fresh
child process that streams it with ``gptq_jax.models.lazy_checkpoint.LazyCheckpoint`` and quantizes it block by block:
per linear group one Hessian from random activations (``accumulate_hessian``), then ``quantize_weight`` per
linear; each finished block's codes are written to disk and dropped, as the engine's resume store does. The child
keeps the embedding and the calibration activations for the whole run, as a real run would.

It reports per block the read and solve times and the RSS, and over the run peak RSS (``ru_maxrss``) and the
device's ``memory_stats()`` where the platform has them (None on CPU). Peak RSS must not grow with the number of
layers: the script checks that and exits 1 otherwise. Writes JSON to
``benchmarks/results/bench_memory_llama2-7b_<device>.json`` with ``uptime`` before and after each child, since
the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_pipeline  # the Llama-2-7B config, shared (benchmarks/ is on sys.path when run as a script)
import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The shapes of bench_pipeline.py's Llama-2-7B, stored in bf16 on disk.
LLAMA2_7B = {**bench_pipeline.LLAMA2_7B, "torch_dtype": "bfloat16"}
# Linear groups of a decoder layer (one Hessian each) and their members.
GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
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


def child(path: str, method: str, tokens: int, out_dir: str) -> dict:
    """Stream and quantize one checkpoint; returns the measurements. Runs in its own process."""
    import jax
    import jax.numpy as jnp

    from gptq_jax import QuantConfig, accumulate_hessian, init_hessian, quantize_weight, rtn_quantize
    from gptq_jax.models.lazy_checkpoint import LazyCheckpoint

    rss_start = _status_mb("VmRSS")
    config = QuantConfig(bits=4, group_size=128)
    lazy = LazyCheckpoint(path)
    c = lazy.config
    embedding = lazy.read("model.embed_tokens.weight", None)  # kept, bf16 (the calibration pass needs it)
    rng = np.random.default_rng(1)
    # Calibration activations for the whole run: the hidden states [T, D] (f32), as the engine keeps them.
    hidden = jnp.asarray(rng.standard_normal((tokens, c.hidden_size), dtype=np.float32))
    blocks = []
    for i in range(lazy.num_layers):
        t0 = time.perf_counter()
        block = lazy.read_block(i, np.float32)  # one decoder layer in f32: the only weights in memory
        t_read = time.perf_counter() - t0
        solve_s = {}
        hess_s = 0.0
        result = {}
        for members in GROUPS.values():
            k = block[f"model.layers.{i}.{members[0]}.weight"].shape[1]
            th = time.perf_counter()
            # Random activations of the group's input width (a real run would take the layer's own inputs).
            x = hidden if k == c.hidden_size else jnp.asarray(rng.standard_normal((tokens, k), dtype=np.float32))
            h, _ = accumulate_hessian(*init_hessian(k), x)
            h.block_until_ready()
            hess_s += time.perf_counter() - th
            for m in members:
                name = f"model.layers.{i}.{m}.weight"
                ts = time.perf_counter()
                w = jnp.asarray(block.pop(name))  # (N, K) f32
                q = quantize_weight(w, h, config) if method == "gptq" else rtn_quantize(w, config)
                result[m] = np.asarray(q.codes, np.uint8)
                result[m + ".scales"] = np.asarray(q.scales, np.float16)
                solve_s[m] = time.perf_counter() - ts
                del w, q
            del h, x
        np.savez(os.path.join(out_dir, f"block-{i}.npz"), **result)  # finished blocks go to disk
        del block, result
        blocks.append({
            "layer": i,
            "read_s": t_read,
            "hessian_s": hess_s,
            "solve_s": solve_s,
            "total_s": time.perf_counter() - t0,
            "rss_after_mb": _status_mb("VmRSS"),
            "peak_rss_so_far_mb": _status_mb("VmHWM"),
        })
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    del embedding
    return {
        "layers": lazy.num_layers,
        "rss_start_mb": rss_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_memory_stats": stats,
        "blocks": blocks,
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per Hessian")
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "bench_memory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # the measured process
        res = child(args.child, args.method, args.tokens, args.child_out)
        print(json.dumps(res))
        return 0

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
        codes_dir = args.dir / f"codes-{n}"
        shutil.rmtree(codes_dir, ignore_errors=True)
        codes_dir.mkdir()
        before = _uptime()
        cmd = [sys.executable, __file__, "--child", str(view), "--child-out", str(codes_dir),
               "--method", args.method, "--tokens", str(args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(uptime_before=before, uptime_after=_uptime())
        runs.append(res)
        print(f"{n} layers: peak RSS {res['peak_rss_mb']:.0f} MB, "
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
    out = args.out or str(REPO / "benchmarks" / "results" / f"bench_memory_llama2-7b_{args.method}_{dev.platform}.json")
    with open(out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"peak RSS by layers {payload['peak_rss_mb_by_layers']}; does not grow: {ok}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
