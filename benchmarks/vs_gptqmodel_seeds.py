"""Perplexity of gptq-jax and GPTQModel over calibration seeds, from the runs of ``vs_gptqmodel.py``.

One seed's result moves by more than the gap between the tools (SmolLM2 4-bit plain: 13.1-14.0 over seeds), so the
comparison is over seeds: per row, each tool's mean, and the mean of the paired difference (ours - GPTQModel, same
calibration windows) with its standard error.

Sources, per seed: ``vs_gptqmodel_smollm2[_seedS]_cpu.json`` gives GPTQModel's perplexity and ours. Seeds 0 and 1
ran (all or some rows) with gptq-jax code from before ``fp16_scales`` (their JSON's ``code_note`` says which); for
those rows ours is taken from ``scale_rounding_seeds/scale_rounding_seeds_<row>_cpu.json``
(an investigation, benchmarks/investigations/) (variant ``solver_f16``: the current
algorithm, the same windows and held-out text, scored from packed weights with float16 scales as the checkpoint
stores them). Every value is scored by gptq-jax's perplexity. Seeds 6-11 ran the 3-bit row only, so the 4-bit
rows have seeds 0-5.

    python benchmarks/vs_gptqmodel_seeds.py

Writes benchmarks/results/vs_gptqmodel/vs_gptqmodel_seeds_summary_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import provenance
from vs_gptqmodel import result_name

RESULTS = provenance.RESULTS / "vs_gptqmodel"
SCALE_ROUNDING = provenance.RESULTS / "scale_rounding_seeds"
ROWS = ("4bit_g128_sym", "4bit_g128_sym_actorder", "3bit_g128_sym")
# (seed, row) whose gptq-jax value in the vs_gptqmodel JSON came from code before fp16_scales (see its code_note).
OLD_CODE = {(0, r) for r in ROWS} | {(1, "4bit_g128_sym")}


def run_file(seed: int) -> Path:
    return RESULTS / result_name(seed)


def collect(seeds: list[int]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {r: [] for r in ROWS}
    for seed in seeds:
        run = json.loads(run_file(seed).read_text())
        if run["calibration"]["seed"] != seed:
            raise ValueError(f"{run_file(seed).name} holds seed {run['calibration']['seed']}, not {seed}")
        for row in run["rows"]:
            label = row["setting"]
            if label not in out:
                continue
            ours, source = row["gptq_jax"]["perplexity_by_gptq_jax"], run_file(seed).name
            if (seed, label) in OLD_CODE:
                f = SCALE_ROUNDING / f"scale_rounding_seeds_{label}_cpu.json"
                ours, source = json.loads(f.read_text())["summary"]["solver_f16"]["per_seed"][str(seed)], f.name
            out[label].append({"seed": seed, "gptq_jax": ours, "gptqmodel": row["gptqmodel"]["perplexity_by_gptq_jax"],
                               "gptq_jax_source": source})  # fmt: skip
    return out


def summarize(values: list[dict]) -> dict:
    n = len(values)
    diffs = [v["gptq_jax"] - v["gptqmodel"] for v in values]
    mean_d = sum(diffs) / n
    se = math.sqrt(sum((d - mean_d) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    ours = sum(v["gptq_jax"] for v in values) / n
    theirs = sum(v["gptqmodel"] for v in values) / n
    return {
        "seeds": [v["seed"] for v in values],
        "mean_gptq_jax": ours,
        "mean_gptqmodel": theirs,
        "mean_difference": mean_d,
        "difference_standard_error": se,
        "relative_difference": ours / theirs - 1.0,
        "seeds_gptq_jax_lower": sum(d < 0 for d in diffs),
        "per_seed": values,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=",".join(map(str, range(12))),
                    help="comma-separated calibration seeds with a vs_gptqmodel run")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "vs_gptqmodel_seeds_summary_cpu.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    missing = [run_file(s).name for s in seeds if not run_file(s).is_file()]
    if missing:
        raise SystemExit(f"no vs_gptqmodel run for: {', '.join(missing)} (run benchmarks/vs_gptqmodel.py --seed S)")
    rows = {label: summarize(v) for label, v in collect(seeds).items() if v}
    for label, s in rows.items():
        print(f"{label}: gptq-jax {s['mean_gptq_jax']:.3f}, GPTQModel {s['mean_gptqmodel']:.3f} "
              f"({100 * s['relative_difference']:+.2f}%); difference {s['mean_difference']:+.3f} "
              f"+- {s['difference_standard_error']:.3f} (standard error), ours lower on "
              f"{s['seeds_gptq_jax_lower']} of {len(s['seeds'])} seeds")  # fmt: skip
    payload = {"benchmark": "vs_gptqmodel_seeds", "metric": "perplexity by gptq-jax, held-out Python docs, 16 x 512",
               "rows": rows}  # fmt: skip
    provenance.write_result(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
