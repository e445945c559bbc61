"""``quantize_weight`` against the paper's blocked loop (torch float32) on real SmolLM2 linears, one config.

Uses the Hessians and weights cached by ``group_fit_smollm2.py --cache PATH`` (float model, every listed layer) and
``paper_solver`` of ``lowbit_solver_swap.py``; records ``tr((W-Q) H (W-Q)^T)`` (float64, undamped H) of both.

    python benchmarks/investigations/solver_vs_paper_smollm2.py --cache /tmp/h.npz --bits 3 --group-size 128 --asym

Writes benchmarks/results/solver_vs_paper_smollm2/solver_vs_paper_smollm2_<bits>bit_g<group>_<sym|asym>_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from group_fit_smollm2 import LINEARS  # noqa: E402
from lowbit_solver_swap import objective, paper_solver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import provenance  # noqa: E402  (benchmarks/provenance.py)

from gptq_jax import QuantConfig, quantize_weight  # noqa: E402


def main(argv=None) -> int:
    started = provenance.start()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="npz written by group_fit_smollm2.py --cache")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    args = ap.parse_args(argv)
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym)
    tag = f"{args.bits}bit_g{args.group_size}_{'asym' if args.asym else 'sym'}"
    data = np.load(args.cache)
    layers = sorted({int(k.split(".")[0]) for k in data.files})
    rows = []
    for li in layers:
        for sub, group in LINEARS:
            w, h = data[f"{li}.{sub}.W"], data[f"{li}.{group}.H"]
            ours = objective(w, quantize_weight(jnp.asarray(w), jnp.asarray(h), qc), h)
            paper = objective(w, paper_solver(w, h, qc), h)
            rows.append({"layer": li, "linear": sub, "ours": ours, "paper_f32": paper})
            print(li, sub, f"ours / paper = {ours / paper:.4f}", flush=True)
    r = np.array([row["ours"] / row["paper_f32"] for row in rows])
    payload = {
        "benchmark": "solver_vs_paper_smollm2",
        "config": tag,
        "hessians": "float model, 32 x 512 windows of the default calibration text (group_fit_smollm2.py --cache)",
        "layers": layers,
        "ratio_ours_over_paper": {"geomean": float(np.exp(np.mean(np.log(r)))), "min": float(r.min()),
                                  "max": float(r.max())},
        "rows": rows,
    }  # fmt: skip
    folder = os.path.join(os.path.dirname(__file__), "..", "results", "solver_vs_paper_smollm2")
    out = os.path.join(folder, f"solver_vs_paper_smollm2_{tag}_cpu.json")
    provenance.write_result(out, payload, started=started)
    print(payload["ratio_ours_over_paper"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
