"""The prepared GPU run: one command, at most ~8 minutes on one H100/H200. Run it first whenever a GPU is lent.

    PYTHONPATH=. python benchmarks/gpu_check.py            # on the GPU machine (make gpu-check)
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke --out-dir /tmp/smoke   # every code path, tiny, on CPU

Parts, each in its own process (a crash or a timeout in one leaves the others' results), in this order:

- ``kernels`` (a): the Pallas kernels against the XLA reference on the same GPU, every bit width (2/4/8) on a grid
  of shapes and M, group sizes, act-order and dtypes cycling across it; also the plan each call got.
- ``matmul`` (b): ``bench_matmul.py``: Pallas vs the XLA reference vs a bf16 ``jnp.dot``, with the copy bandwidth
  measured in the same run and the roofline (``roofline.py``) beside every figure.
- ``gptq`` (c): ``bench_gptq.py``: ``quantize_weight`` against the paper's algorithm in PyTorch eager on the same
  GPU (same weight, Hessian and settings; codes checked to agree before timing).
- ``pipeline`` (d): ``bench_pipeline.py``: whole-model GPTQ on a Llama-2-7B-shaped checkpoint of random weights
  with 2 of its 32 layers, and the 32-layer time extrapolated from the second (compiled) layer.
- ``decode`` (e): greedy decode tokens/s of SmolLM2-135M packed 4-bit g128 against bf16 (the real weights if
  ``.cache/smollm2`` holds them, else random weights of its shape: the speed does not depend on the values).

Every JSON goes to ``--out-dir`` (default ``$OUT`` when set, else benchmarks/results/gpu_check/run/), and, on a
GPU, also to benchmarks/results/gpu_check/. The summary is ``gpu_check_<device>.json``. ``--cpu-smoke`` runs each
part with tiny shapes on CPU (kernels in Pallas interpret mode) so that every path of this script has run before a GPU
sees it; its numbers mean nothing and it never writes to benchmarks/results/gpu_check/.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402  (benchmarks/provenance.py)

RESULTS = provenance.RESULTS / "gpu_check"
PARTS = ("kernels", "matmul", "gptq", "pipeline", "decode")
# Caps (seconds) on each part on the GPU; a part past its cap is killed and reported, the rest go on. Sum 460 s:
# with process start-up, the whole run stays near the 8-minute budget even if every part hits its cap.
BUDGET = {"kernels": 90, "matmul": 100, "gptq": 70, "pipeline": 140, "decode": 60}
SMOKE_BUDGET = {"kernels": 300, "matmul": 120, "gptq": 120, "pipeline": 300, "decode": 300}
DTYPES_GPU = ("bfloat16", "float16", "float32")
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # max |y - ref| / max |ref|, as tests/test_gptq_matmul

SMOLLM2_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


def slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def save_partial(out_dir: Path, part: str, res: dict) -> None:
    """What a part has so far, so a part killed at its time cap still reports what it finished."""
    (out_dir / f"part_{part}.json").write_text(json.dumps({**res, "ok": False, "partial": True}, indent=1,
                                                          default=str) + "\n")


def _bench(name: str):
    sys.path.insert(0, str(HERE))
    return __import__(name)


# ---------------------------------------------------------------------------------------------------------------------
# Parts: each returns a JSON-able dict with "ok"


def part_kernels(smoke: bool, out_dir: Path) -> dict:
    """(a) every bit width on a grid of shapes and M; group size, act-order and dtype cycle across the grid."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import gptq_matmul, gptq_matmul_reference
    from pallas_kernels import matmul as matmul_mod

    make_layer = _bench("bench_matmul").make_layer
    dev = jax.devices()[0]
    if smoke:
        shapes, ms, dtypes = [(256, 128), (384, 64)], (1, 3, 17), ("bfloat16", "float32")
        layouts = itertools.cycle(itertools.product((128, -1, 32), (False, True)))
    else:  # 45 cases: each compiles its own kernel (about a second) and the layer is built once per shape and bits
        shapes, ms, dtypes = [(576, 1536), (4096, 4096), (11008, 4096)], (1, 3, 16, 17, 256), DTYPES_GPU
        layouts = itertools.cycle(itertools.product((128, -1, 32, 64), (False, True)))
    dtype_cycle = itertools.cycle(dtypes)
    rows, failures = [], 0
    for (k, n), bits in itertools.product(shapes, (2, 4, 8)):
        group, act = next(layouts)
        w = make_layer(k, n, bits, group, act, seed=k + n + bits)
        for m in ms:
            dtype = next(dtype_cycle)
            x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)
            row = dict(K=k, N=n, M=m, bits=bits, group_size=group, act_order=act, dtype=dtype)
            try:
                row["plan"] = repr(matmul_mod.select_plan(m, w, device_kind=dev.device_kind, x_dtype=dtype))
                y = gptq_matmul(x, w, impl="pallas", interpret=smoke)
                ref = gptq_matmul_reference(x, w)
                y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
                err = float(np.abs(y64 - r64).max() / max(np.abs(r64).max(), 1e-30))
                row.update(rel_err=err, ok=bool(err <= TOL[dtype]) and y.shape == ref.shape and y.dtype == ref.dtype)
            except Exception as e:  # noqa: BLE001  (a finding: recorded, the grid goes on)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            failures += not row["ok"]
            print(f"  kernels K={k} N={n} M={m} bits={bits} g={group} act={act} {dtype}: "
                  f"{'ok' if row['ok'] else 'FAIL'} {row.get('rel_err', row.get('error'))}", flush=True)
            rows.append(row)
        save_partial(out_dir, "kernels", dict(failures=failures, cases=len(rows), interpret=smoke, results=rows))
    return dict(ok=failures == 0, failures=failures, cases=len(rows), interpret=smoke, results=rows)


def part_matmul(smoke: bool, out_dir: Path) -> dict:
    """(b) bench_matmul's sweep, the copy bandwidth measured in the same run; one call (and JSON) per shape."""
    if smoke:
        shapes = ["256x256"]
        argv = ["--m", "1,16", "--repeats", "1", "--warmup", "0", "--stream-mb", "1", "--check-interpret"]
    else:
        shapes = ["4096x4096", "11008x4096", "4096x11008", "8192x8192"]
        argv = ["--m", "1,2,4,16,64,256,2048", "--repeats", "5", "--warmup", "2", "--stream-mb", "256"]
    runs = []
    for shape in shapes:
        out = out_dir / f"bench_matmul_{shape}.json"
        rc = _bench("bench_matmul").main([*argv, "--shapes", shape, "--out", str(out)])
        runs.append(dict(shape=shape, exit_code=rc, json=str(out)))
        save_partial(out_dir, "matmul", dict(runs=runs, argv=argv))
    return dict(ok=all(r["exit_code"] == 0 for r in runs), runs=runs, argv=argv)


def part_gptq(smoke: bool, out_dir: Path) -> dict:
    """(c) quantize_weight against the paper's algorithm in PyTorch eager, same device."""
    out = out_dir / "bench_gptq.json"
    argv = (["--shapes", "128x256", "--tokens", "8192", "--repeats", "1"] if smoke
            else ["--shapes", "4096x4096,11008x4096", "--tokens", "65536", "--repeats", "2"])
    rc = _bench("bench_gptq").main([*argv, "--out", str(out)])
    return dict(ok=rc == 0, exit_code=rc, json=str(out), argv=argv)


def part_pipeline(smoke: bool, out_dir: Path) -> dict:
    """(d) whole-model GPTQ on 2 layers of a random Llama-2-7B-shaped model; 32 layers extrapolated."""
    out = out_dir / "bench_pipeline.json"
    argv = (["--model", "tiny", "--layers", "2", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2"] if smoke
            else ["--model", "llama2-7b", "--layers", "2", "--nsamples", "128", "--seqlen", "2048"])
    rc = _bench("bench_pipeline").main([*argv, "--out", str(out)])
    res = dict(ok=rc == 0, exit_code=rc, json=str(out), argv=argv)
    if rc == 0:
        rep = json.loads(out.read_text())
        layers = rep["layer_seconds"]
        per_layer = layers[-1]  # the first layer also pays for compilation
        overhead = rep["quantize_seconds"] - sum(layers)  # embedding pass, setup: paid once
        res.update(layer_seconds=layers, per_layer_seconds=per_layer,
                   extrapolated_32_layers_seconds=overhead + layers[0] + (32 - 1) * per_layer,
                   extrapolation="total - sum(layers) + first layer + 31 x last layer")
    return res


def part_decode(smoke: bool, out_dir: Path) -> dict:
    """(e) greedy decode tokens/s, SmolLM2-135M packed 4-bit g128 against the same model in bf16."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gptq_jax import QuantConfig, quantize
    from gptq_jax.models import LlamaForCausalLM, ModelConfig, load_pretrained
    from gptq_jax.models.qlinear import pack_model
    from gptq_jax.tasks.generate import generate_tokens

    dtype = jnp.float32 if smoke else jnp.bfloat16
    cached = sorted((REPO / ".cache" / "smollm2").glob("*-hf-v1"))
    if smoke:
        cfg = dict(SMOLLM2_SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=256)
        weights = "random (tiny SmolLM2-like)"
    else:
        cfg = SMOLLM2_SHAPE
        weights = f"{cached[-1].name}" if cached else "random (SmolLM2-135M shape: no network for the real weights)"

    def build():
        if cached and not smoke:
            return load_pretrained(cached[-1], dtype=dtype)[0]
        return LlamaForCausalLM(ModelConfig.from_hf_dict(cfg), dtype=dtype, rngs=nnx.Rngs(0))

    new = 8 if smoke else 128
    prompt = np.arange(1, 33, dtype=np.int32) % int(cfg["vocab_size"])

    def speed(model) -> dict:
        generate_tokens(model, prompt, max_new_tokens=new)  # compiles
        runs = [generate_tokens(model, prompt, max_new_tokens=new) for _ in range(3)]
        dec = sorted((len(r.tokens) - 1) / r.decode_seconds for r in runs)
        return dict(decode_tokens_per_second=dec[1], runs=dec, prefill_seconds=[r.prefill_seconds for r in runs])

    res = dict(model=weights, dtype=jnp.dtype(dtype).name, new_tokens=new, prompt_tokens=len(prompt),
               device=jax.devices()[0].device_kind)
    model = build()
    res["float"] = speed(model)
    one_window = np.zeros((1, 8), np.int32)  # round-to-nearest: the engine only needs to see the matmuls
    qw = quantize(model, one_window, quant_config=QuantConfig(bits=4, group_size=128), method="rtn").weights
    pack_model(model, qw)
    res["packed_4bit_g128"] = speed(model)
    res["packed_over_float"] = (res["packed_4bit_g128"]["decode_tokens_per_second"]
                                / res["float"]["decode_tokens_per_second"])
    res["ok"] = True
    print(f"  decode: float {res['float']['decode_tokens_per_second']:.1f} tok/s, packed "
          f"{res['packed_4bit_g128']['decode_tokens_per_second']:.1f} tok/s", flush=True)
    provenance.write_result(out_dir / "decode.json", res)
    return res


PART_FNS = {"kernels": part_kernels, "matmul": part_matmul, "gptq": part_gptq, "pipeline": part_pipeline,
            "decode": part_decode}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def run_part(name: str, smoke: bool, out_dir: Path, timeout: float) -> dict:
    """One part in a fresh process: its own JAX runtime, its own failure."""
    result_file = out_dir / f"part_{name}.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, __file__, "--part", name, "--out-dir", str(out_dir)] + (["--cpu-smoke"] if smoke else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, timeout=timeout, capture_output=True, text=True)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        log = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        log += f"\n... timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    (out_dir / f"part_{name}.log").write_text(log)
    try:
        res = json.loads(result_file.read_text())  # the part's result, or what it saved before it was stopped
    except (OSError, ValueError):
        res = dict(ok=False, error=f"no result (exit code {rc}); log tail:\n{log[-3000:]}")
    res.update(seconds=round(seconds, 1), exit_code=rc, timed_out=rc is None)
    print(f"[{name}] {'ok' if res.get('ok') else 'FAILED'} in {seconds:.0f} s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, kernels in interpret mode")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--out-dir", type=Path, default=None, help="default: $OUT, else benchmarks/results/gpu_check/run")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    args = p.parse_args(argv)
    out_dir = args.out_dir or Path(os.environ.get("OUT") or RESULTS / "run")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.part:  # the child process
        res = PART_FNS[args.part](args.cpu_smoke, out_dir)
        (out_dir / f"part_{args.part}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        return 0 if res.get("ok") else 1

    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu" and not args.cpu_smoke:
        print(f"no GPU here ({dev.platform}): run with --cpu-smoke for a tiny CPU run of every path", file=sys.stderr)
        return 2
    parts = [s for s in args.parts.split(",") if s]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    budget = SMOKE_BUDGET if args.cpu_smoke else BUDGET
    started = provenance.start()
    t0 = time.perf_counter()
    summary = dict(check="gpu_check", device_kind=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
                   cpu_smoke=args.cpu_smoke, date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   parts={})
    for name in parts:
        summary["parts"][name] = run_part(name, args.cpu_smoke, out_dir, budget[name])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["ok"] = all(r.get("ok") for r in summary["parts"].values())
    if hasattr(os, "getloadavg"):
        summary["load_average_at_end"] = os.getloadavg()
    name = f"gpu_check_{'cpu_smoke' if args.cpu_smoke else slug(dev.device_kind)}.json"
    written = [provenance.write_result(out_dir / name, summary, started=started)]
    if not args.cpu_smoke and out_dir.resolve() != RESULTS.resolve():  # keep the GPU's figures with the others
        for f in [*sorted(out_dir.glob("bench_*.json")), out_dir / "decode.json", out_dir / name]:
            if f.exists():
                stem = f.stem if f.name == name else f"{f.stem}_{slug(dev.device_kind)}"
                written.append(provenance.copy_result(f, RESULTS / f"{stem}{f.suffix}"))
    print(f"{'all parts ok' if summary['ok'] else 'SOME PARTS FAILED'} in {summary['seconds']:.0f} s; wrote "
          + ", ".join(map(str, written)))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
