"""Perplexity of gptq-jax and GPTQModel over calibration seeds, from the runs of ``vs_gptqmodel.py``.

One seed's result moves by more than the gap between the tools (SmolLM2 4-bit plain: 13.1-14.0 over seeds), so the
comparison is over seeds: per row, each tool's mean, and the mean of the paired difference (ours - GPTQModel, same
calibration windows) with its standard error.

Sources, per seed: ``vs_gptqmodel_smollm2[_seedS]_cpu.json`` gives GPTQModel's perplexity and ours (each scored by
gptq-jax's perplexity) and each tool's quantize time. A run that records no clean commit, or runs made at commits
whose library code (``gptq_jax/``, this benchmark and the GPTQModel worker) differs, are refused: a mean over seeds
is a statement about one version of the code.

    python benchmarks/vs_gptqmodel_seeds.py
    python benchmarks/vs_gptqmodel_seeds.py --method gptaq     # the runs of vs_gptqmodel.py --method gptaq
    python benchmarks/vs_gptqmodel_seeds.py --runs DIR --seeds 0,1,2,3  # runs written with --out DIR/..._seedS_cpu.json

Writes benchmarks/results/vs_gptqmodel/vs_gptqmodel_seeds_summary_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import provenance
from vs_gptqmodel import result_name

RESULTS = provenance.RESULTS / "vs_gptqmodel"


def run_file(seed: int, method: str = "gptq") -> Path:
    return RESULTS / result_name(seed, method)


def library_commit(run: dict, name: str) -> str:
    prov = run.get("provenance") or {}
    if not prov.get("commit") or prov.get("dirty") is not False:
        raise SystemExit(f"{name} records no clean commit (provenance {prov.get('commit')}, dirty {prov.get('dirty')}):"
                         " rerun it with benchmarks/vs_gptqmodel.py")
    return prov["commit"]


CODE = ("gptq_jax", "benchmarks/vs_gptqmodel.py", "tests/interop")


def same_code(commits: dict[int, str]) -> None:
    """Refuses runs whose commits differ in the code that made their numbers (results-only commits are fine)."""
    first, *rest = sorted(set(commits.values()))
    for other in rest:
        diff = subprocess.run(["git", "-C", str(provenance.REPO), "diff", "--quiet", first, other, "--", *CODE])
        if diff.returncode != 0:
            raise SystemExit(f"the runs were made at commits whose code differs ({commits}): rerun them at one")


def collect(paths: dict[int, Path]) -> tuple[dict[str, list[dict]], dict[int, str]]:
    """Per setting, one record per seed (``paths``: seed -> its run); and the commit each seed's run was made at."""
    out: dict[str, list[dict]] = {}
    commits = {}
    for seed, path in paths.items():
        run = json.loads(path.read_text())
        if run["calibration"]["seed"] != seed:
            raise ValueError(f"{path.name} holds seed {run['calibration']['seed']}, not {seed}")
        commits[seed] = library_commit(run, path.name)
        for row in run["rows"]:
            out.setdefault(row["setting"], []).append({
                "seed": seed, "gptq_jax": row["gptq_jax"]["perplexity_by_gptq_jax"],
                "gptqmodel": row["gptqmodel"]["perplexity_by_gptq_jax"],
                "seconds_gptq_jax": row["gptq_jax"]["seconds"], "seconds_gptqmodel": row["gptqmodel"]["seconds"]})
    return out, commits


def summarize(values: list[dict]) -> dict:
    n = len(values)
    diffs = [v["gptq_jax"] - v["gptqmodel"] for v in values]
    mean_d = sum(diffs) / n
    se = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    ours = sum(v["gptq_jax"] for v in values) / n
    theirs = sum(v["gptqmodel"] for v in values) / n
    secs = {k: sum(v[f"seconds_{k}"] for v in values) / n for k in ("gptq_jax", "gptqmodel")}
    return {
        "seeds": [v["seed"] for v in values],
        "mean_gptq_jax": ours,
        "mean_gptqmodel": theirs,
        "mean_difference": mean_d,
        "difference_standard_error": se,
        "relative_difference": ours / theirs - 1.0,
        "seeds_gptq_jax_lower": sum(d < 0 for d in diffs),
        "mean_seconds_gptq_jax": secs["gptq_jax"],
        "mean_seconds_gptqmodel": secs["gptqmodel"],
        "per_seed": values,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2",
                    help="comma-separated calibration seeds with a vs_gptqmodel run")  # fmt: skip
    ap.add_argument("--method", choices=("gptq", "gptaq"), default="gptq", help="whose runs (vs_gptqmodel.py --method)")
    ap.add_argument("--runs", help="a folder of runs made with vs_gptqmodel.py --out DIR/<name>_seed<S>_cpu.json "
                    "(default: the default result names)")  # fmt: skip
    ap.add_argument("--out", help="default: vs_gptqmodel_seeds[_gptaq]_summary_cpu.json, or summary_cpu.json in --runs")
    args = ap.parse_args(argv)
    tag = "" if args.method == "gptq" else f"_{args.method}"
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.runs:
        found = {s: sorted(Path(args.runs).glob(f"*_seed{s}_cpu.json")) for s in seeds}
        paths = {s: files[0] for s, files in found.items() if files}
        args.out = args.out or str(Path(args.runs) / "summary_cpu.json")
    else:
        paths = {s: run_file(s, args.method) for s in seeds}
        args.out = args.out or str(RESULTS / f"vs_gptqmodel_seeds{tag}_summary_cpu.json")
    missing = [str(s) for s in seeds if s not in paths or not paths[s].is_file()]
    if missing:
        raise SystemExit(f"no vs_gptqmodel run for seed(s) {', '.join(missing)} (run benchmarks/vs_gptqmodel.py "
                         f"--seed S{'' if args.method == 'gptq' else ' --method ' + args.method})")
    per_setting, commits = collect(paths)
    same_code(commits)
    rows = {label: summarize(v) for label, v in per_setting.items()}
    for label, s in rows.items():
        print(f"{label}: gptq-jax {s['mean_gptq_jax']:.3f}, GPTQModel {s['mean_gptqmodel']:.3f} "
              f"({100 * s['relative_difference']:+.2f}%); difference {s['mean_difference']:+.3f} "
              f"+- {s['difference_standard_error']:.3f} (standard error), ours lower on "
              f"{s['seeds_gptq_jax_lower']} of {len(s['seeds'])} seeds")  # fmt: skip
    payload = {"benchmark": "vs_gptqmodel_seeds", "method": args.method,
               "metric": "perplexity by gptq-jax, held-out Python docs, 16 x 512",
               "run_commits": commits, "rows": rows}  # fmt: skip
    provenance.write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
