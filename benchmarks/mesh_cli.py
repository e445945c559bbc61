"""The CLI on a mesh against one device: `gptq-jax quantize` of SmolLM2-135M-Instruct on one CPU device and at
`--mesh data=4,model=2` on 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), then `gptq-jax eval`
of both outputs on the same held-out text.

Done when the 4x2 run finishes (it once hung in layer 0's first solve) and its perplexity is within 1% of the
one-device run's: the mesh changes the order of float sums (Hessians, feedback matmuls), not the method.

    python benchmarks/mesh_cli.py [--nsamples 16] [--seqlen 512] [--eval-windows 16]

Writes benchmarks/results/mesh_cli/mesh_cli_cpu.json (each run's seconds, perplexity and the relative gap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance

CLI = [sys.executable, "-m", "gptq_jax.cli"]
TOLERANCE = 0.01  # relative perplexity gap allowed between the 4x2 and the one-device run


def _run(cmd: list[str], env: dict, timeout: float, what: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        raise SystemExit(f"{what}: no result in {timeout:.0f} s; last output:\n{tail!r}") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each command")
    ap.add_argument("--out", type=Path, default=provenance.result_path("mesh_cli", "mesh_cli_cpu.json"))
    args = ap.parse_args(argv)
    started = provenance.start()
    from gptq_jax.io.default_model import fetch_smollm2

    model_dir = str(fetch_smollm2())
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(provenance.REPO)}
    base.pop("XLA_FLAGS", None)
    quant = ["--bits", "4", "--group-size", "128", "--sym", "--nsamples", str(args.nsamples),
             "--seqlen", str(args.seqlen)]
    runs = {
        "1 device": (base, []),
        "mesh 4x2": ({**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, ["--mesh", "data=4,model=2"]),
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="mesh_cli_") as tmp:
        for name, (env, extra) in runs.items():
            out = str(Path(tmp) / name.replace(" ", "_"))
            print(f"{name}: quantize ...", flush=True)
            _, q_s = _run([*CLI, "quantize", model_dir, out, *quant, *extra], env, args.timeout, f"{name} quantize")
            print(f"{name}: eval ...", flush=True)
            text, e_s = _run([*CLI, "eval", out, "--seqlen", str(args.seqlen), "--max-windows",
                              str(args.eval_windows), "--json"], base, args.timeout, f"{name} eval")
            ev = json.loads(text)
            results[name] = {"quantize_seconds": q_s, "eval_seconds": e_s, "perplexity": ev["perplexity"],
                             "eval_tokens": ev["tokens"], "quant_report": json.loads(
                                 (Path(out) / "quant_report.json").read_text())["seconds"]}
            print(f"{name}: perplexity {ev['perplexity']:.4f}, quantize {q_s:.0f} s", flush=True)
    one, mesh = results["1 device"]["perplexity"], results["mesh 4x2"]["perplexity"]
    gap = mesh / one - 1
    payload = {
        "benchmark": "mesh_cli",
        "model": "SmolLM2-135M-Instruct",
        "config": {"bits": 4, "group_size": 128, "sym": True, "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "eval_windows": args.eval_windows},
        "runs": results,
        "relative_perplexity_gap": gap,
        "tolerance": TOLERANCE,
        "ok": abs(gap) <= TOLERANCE,
    }
    path = provenance.write_result(args.out, payload, started=started)
    print(f"perplexity: 1 device {one:.4f}, mesh 4x2 {mesh:.4f} ({gap:+.3%}); wrote {path}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
