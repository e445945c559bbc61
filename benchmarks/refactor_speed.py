"""Benchmark: is the refactored code as fast as before? `bench_gptq.py` and `bench_pipeline.py` of two work trees,
interleaved in one period so that both see the same load.

    git worktree add /work/wt-base 54bb2fb      # the code before the refactor (issue 24's base)
    python benchmarks/refactor_speed.py --base /work/wt-base --rounds 3

Each round runs both benchmarks in each tree, each as a fresh process (`nice -n 5`, `JAX_PLATFORMS=cpu`, the tree
first on `PYTHONPATH`), alternating which tree goes first (base, head; head, base; ...) so that a load that drifts
during a round falls on both. The head is the tree this script is in. Besides each benchmark's own timings it
records the CPU time (user + system) of each run's process: on a machine shared with other work, wall time grows
with the load, CPU time much less. Reports medians over rounds and the load average around every run; writes JSON
to benchmarks/results/refactor_speed/refactor_speed_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance

HEAD = provenance.REPO


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_benchmark(tree: Path, script: str, args: list[str]) -> dict:
    """``benchmarks/<script>`` of ``tree`` in a fresh process; its JSON, with the run's wall time and load."""
    with tempfile.TemporaryDirectory(prefix="refactor-speed-") as d:
        out = Path(d) / "result.json"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tree)}
        cmd = ["nice", "-n", "5", sys.executable, f"benchmarks/{script}", *args, "--out", str(out)]
        load_before, t0, cpu0 = os.getloadavg()[0], time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        if proc.returncode != 0:
            raise RuntimeError(f"{script} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    return {"result": result, "wall_s": wall, "process_cpu_s": cpu, "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def gptq_row(run: dict) -> dict:
    return {**{"x".join(map(str, r["shape"])): r["jax_s"] for r in run["result"]["results"]},
            "process_cpu_s": run["process_cpu_s"]}


def pipeline_row(run: dict) -> dict:
    r = run["result"]
    return {"quantize_s": r["quantize_seconds"], "solve_s": r["solve_seconds"],
            "passes_s": r["quantize_seconds"] - r["solve_seconds"], "process_cpu_s": run["process_cpu_s"]}


def medians(rows: list[dict]) -> dict:
    return {k: statistics.median(row[k] for row in rows) for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="work tree of the code to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gptq-shapes", default="576x576,1536x576,2048x2048")
    ap.add_argument("--gptq-repeats", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-pipeline", default=None,
                    help="also copy the head's last bench_pipeline JSON (its provenance included) here")
    args = ap.parse_args(argv)
    started = provenance.start()
    trees = {"base": args.base.resolve(), "head": HEAD}
    gptq_args = ["--shapes", args.gptq_shapes, "--repeats", str(args.gptq_repeats), "--tokens", "32768", "--no-torch"]
    pipe_args = ["--model", "smollm2", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    runs: dict[str, dict[str, list]] = {t: {"bench_gptq": [], "bench_pipeline": []} for t in trees}
    for r in range(args.rounds):
        order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
        for script, bench_args in (("bench_gptq.py", gptq_args), ("bench_pipeline.py", pipe_args)):
            for tree in order:
                run = run_benchmark(trees[tree], script, bench_args)
                runs[tree][script.removesuffix(".py")].append(run)
                print(f"round {r} {tree:4} {script:18} {run['wall_s']:7.1f} s wall, {run['process_cpu_s']:7.1f} s CPU, "
                      f"load {run['load_1min_before']:.1f} -> {run['load_1min_after']:.1f}", flush=True)

    summary = {}
    for tree in trees:
        summary[tree] = {
            "commit": _commit(trees[tree]),
            "bench_gptq_jax_s": medians([gptq_row(x) for x in runs[tree]["bench_gptq"]]),
            "bench_pipeline": medians([pipeline_row(x) for x in runs[tree]["bench_pipeline"]]),
        }
    ratio = {f"bench_gptq {k}": summary["head"]["bench_gptq_jax_s"][k] / v
             for k, v in summary["base"]["bench_gptq_jax_s"].items()}
    ratio.update({f"bench_pipeline {k}": summary["head"]["bench_pipeline"][k] / v
                  for k, v in summary["base"]["bench_pipeline"].items()})
    for k, v in ratio.items():
        print(f"{k:28} base {_get(summary['base'], k):8.3f} s  head {_get(summary['head'], k):8.3f} s  "
              f"head/base {v:.3f}")
    payload = {
        "benchmark": "refactor_speed",
        "settings": {"rounds": args.rounds, "bench_gptq": gptq_args, "bench_pipeline": pipe_args,
                     "nice": 5, "order": "alternating per round, base first in round 0"},
        "summary_medians": summary,
        "head_over_base": ratio,
        "runs": {t: {b: [{**{k: v for k, v in x.items() if k != "result"},
                          "row": (gptq_row if b == "bench_gptq" else pipeline_row)(x),
                          "result_provenance": x["result"].get("provenance")} for x in runs[t][b]]
                     for b in runs[t]} for t in runs},
    }
    out = args.out or provenance.result_path("refactor_speed", "refactor_speed_cpu.json")
    provenance.write_result(out, payload, started=started)
    print(f"wrote {out}")
    if args.keep_pipeline:
        Path(args.keep_pipeline).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as d:  # as the head's bench_pipeline wrote it, its provenance included
            (Path(d) / "r.json").write_text(json.dumps(runs["head"]["bench_pipeline"][-1]["result"], indent=1) + "\n")
            provenance.copy_result(Path(d) / "r.json", args.keep_pipeline)
    return 0


def _get(side: dict, key: str) -> float:
    bench, name = key.split(" ", 1)
    return side["bench_gptq_jax_s" if bench == "bench_gptq" else "bench_pipeline"][name]


if __name__ == "__main__":
    sys.exit(main())
