"""The CLI on a mesh against one device: `gptq-jax quantize` of SmolLM2-135M-Instruct on one CPU device and at
`--mesh data=4,model=2` on 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), then `gptq-jax eval`
of both outputs on the same held-out text.

Done when the 4x2 run finishes (it once hung in layer 0's first solve) and its perplexity is within 1% of the
one-device run's: the mesh changes the order of float sums (Hessians, feedback matmuls), not the method.

    python benchmarks/mesh_cli.py [--nsamples 16] [--seqlen 512] [--eval-windows 16] [--seeds 0 1 2] [--noise]

A change in the order of float sums flips a few rounding decisions, and GPTQ carries each flip into the columns and
layers after it, so one pair of runs differs by run-to-run noise as well as by anything the mesh does wrong. With
several ``--seeds`` (calibration draws) the gap is also given for the mean perplexity over seeds; ``--noise`` adds,
per seed, a one-device run whose only change is the order of the Hessian sums (``--batch-size 4``: four windows per
pass instead of one), the size of that noise on one device.

Writes benchmarks/results/mesh_cli/mesh_cli_cpu.json (each run's seconds, perplexity and the relative gaps).
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (one pair of runs each)")
    ap.add_argument("--noise", action="store_true", help="also a one-device run with 4 windows per pass, per seed")
    ap.add_argument("--out", type=Path, default=provenance.result_path("mesh_cli", "mesh_cli_cpu.json"))
    ap.add_argument("--reuse", type=Path, help="a result of this script at the same settings: its runs are kept and "
                    "not run again (e.g. to add the --noise runs to measured seeds)")
    args = ap.parse_args(argv)
    started = provenance.start()
    from gptq_jax.io.default_model import fetch_smollm2

    model_dir = str(fetch_smollm2())
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(provenance.REPO)}
    base.pop("XLA_FLAGS", None)
    runs = {
        "1 device": (base, []),
        "mesh 4x2": ({**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, ["--mesh", "data=4,model=2"]),
    }
    if args.noise:
        runs["1 device, 4 windows per pass"] = (base, ["--batch-size", "4"])
    payload = {
        "benchmark": "mesh_cli",
        "model": "SmolLM2-135M-Instruct",
        "config": {"bits": 4, "group_size": 128, "sym": True, "nsamples": args.nsamples, "seqlen": args.seqlen,
                   "eval_windows": args.eval_windows, "seeds": args.seeds},
        "runs": {},
        "tolerance": TOLERANCE,
    }  # fmt: skip
    if args.reuse is not None:
        payload["runs"], payload["reused"] = _reused(args.reuse, payload["config"])
    for seed in args.seeds:
        quant = ["--bits", "4", "--group-size", "128", "--sym", "--nsamples", str(args.nsamples),
                 "--seqlen", str(args.seqlen), "--seed", str(seed)]  # fmt: skip
        results = payload["runs"].setdefault(str(seed), {})
        for name, (env, extra) in runs.items():
            if name in results:
                continue
            results[name] = _quantize_and_eval(model_dir, name, env, base, [*quant, *extra], args)
            payload |= _gaps(payload["runs"])
            provenance.write_result(args.out, payload, started=started)
    path = provenance.write_result(args.out, payload, started=started)
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=1))
    print(f"wrote {path}")
    return 0 if payload["ok"] else 1


def _reused(path: Path, config: dict) -> tuple[dict, dict]:
    """The runs of an earlier result at the same settings, and where they came from (its provenance)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--reuse {path}: cannot read it as a result of this script ({e})") from None
    if not isinstance(old, dict) or "runs" not in old:
        raise SystemExit(f"--reuse {path}: not a result of this script (no 'runs')")
    mine = {k: v for k, v in config.items() if k != "seeds"}
    theirs = {k: v for k, v in old.get("config", {}).items() if k != "seeds"}
    if mine != theirs:
        raise SystemExit(f"--reuse {path}: its settings {theirs} are not these {mine}")
    return old["runs"], {"file": path.name, "provenance": old.get("provenance")}


def _quantize_and_eval(model_dir: str, name: str, env: dict, base: dict, quant: list[str], args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mesh_cli_") as tmp:
        out = str(Path(tmp) / "out")
        print(f"{name} {quant[-1]}: quantize ...", flush=True)
        _, q_s = _run([*CLI, "quantize", model_dir, out, *quant], env, args.timeout, f"{name} quantize")
        text, e_s = _run([*CLI, "eval", out, "--seqlen", str(args.seqlen), "--max-windows", str(args.eval_windows),
                          "--json"], base, args.timeout, f"{name} eval")  # fmt: skip
        ev = json.loads(text)
        report = json.loads((Path(out) / "quant_report.json").read_text())
    print(f"{name}: perplexity {ev['perplexity']:.4f}, quantize {q_s:.0f} s", flush=True)
    return {"quantize_seconds": q_s, "eval_seconds": e_s, "perplexity": ev["perplexity"], "eval_tokens": ev["tokens"],
            "quant_report_seconds": report["seconds"], "load_after": list(os.getloadavg())}  # fmt: skip


def _gaps(runs: dict) -> dict:
    """Relative perplexity gaps against the one-device run: per seed, and of the means over the seeds that have both."""
    per_seed = {}
    for seed, r in runs.items():
        one = r.get("1 device", {}).get("perplexity")
        per_seed[seed] = {name: x["perplexity"] / one - 1 for name, x in r.items() if one and name != "1 device"}
    out = {"relative_perplexity_gap_per_seed": per_seed}
    done = [r for r in runs.values() if "1 device" in r and "mesh 4x2" in r]
    if done:
        names = [n for n in done[0] if all(n in r for r in done)]  # the noise run too, once every seed has it
        mean = {name: sum(r[name]["perplexity"] for r in done) / len(done) for name in names}
        out["mean_perplexity"] = mean
        out["relative_perplexity_gap_of_means"] = gap = mean["mesh 4x2"] / mean["1 device"] - 1
        out["relative_gaps_of_means"] = {n: mean[n] / mean["1 device"] - 1 for n in names if n != "1 device"}
        out["ok"] = abs(gap) <= TOLERANCE
    else:
        out["ok"] = False
    return out


if __name__ == "__main__":
    sys.exit(main())
