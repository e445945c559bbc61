"""Is the end-to-end low-bit gap against the paper's code in the per-layer solver or in the pipeline around it?

Quantizes SmolLM2 with ``gptq_jax.quantize`` once per solver on the same calibration windows, swapping the solver the
pipeline calls: ours (``quantize_weight``); ``paper_f32``, the paper's blocked loop (Algorithm 1 with lazy batches of
128 columns, ``H^-1`` through Cholesky, inverse and Cholesky again) in torch float32, written here from the paper; and
optionally ``reference_f64``, the float64 column-by-column loop of ``tests/gptq_reference.py``. Everything else
(Hessians, stage order, what the next layer sees, evaluation) is unchanged. In every run all the ``--compare`` solvers
are applied to the very (W, H) the pipeline hands over, and their objectives ``tr((W - Q) H (W - Q)^T)`` recorded;
the run continues with its own solver's result. Reports the held-out perplexity of each run.

    python benchmarks/investigations/lowbit_solver_swap.py --bits 3 --group-size 128 --asym --nsamples 32 --seqlen 512

Writes benchmarks/results/lowbit_solver_swap/lowbit_solver_swap_<bits>bit_g<group>_<sym|asym>_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
import gptq_reference  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import provenance  # noqa: E402  (benchmarks/provenance.py)

from gptq_jax import QuantConfig, quantize  # noqa: E402
from gptq_jax.core.calibration import random_windows  # noqa: E402
from gptq_jax.core.gptq import quantize_weight  # noqa: E402
from gptq_jax.core.quantizer import CODE_DTYPE, QuantizedWeight  # noqa: E402
from gptq_jax.io.default_model import fetch_smollm2  # noqa: E402
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize  # noqa: E402
from gptq_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from gptq_jax.tasks.eval import perplexity  # noqa: E402


def reference_solver(w, h, config: QuantConfig) -> QuantizedWeight:
    """``quantize_weight``'s signature on top of the float64 reference."""
    codes, scales, zeros, g_idx, _ = gptq_reference.gptq(
        np.asarray(w), np.asarray(h), bits=config.bits, group_size=config.group_size, sym=config.sym,
        act_order=config.act_order, static_groups=config.static_groups, damp_percent=config.damp_percent,
    )  # fmt: skip
    k = w.shape[1]
    return QuantizedWeight(
        codes=jnp.asarray(codes, CODE_DTYPE),
        scales=jnp.asarray(scales, jnp.float32),
        zeros=jnp.asarray(zeros, jnp.int32),
        g_idx=jnp.asarray(g_idx, jnp.int32),
        perm=None,
        loss=jnp.zeros((), jnp.float32),
        damp=jnp.asarray(config.damp_percent, jnp.float32),
        fallback=jnp.zeros((), jnp.bool_),
        bits=config.bits,
        group_size=config.effective_group_size(k),
        sym=config.sym,
    )


def paper_solver(w, h, config: QuantConfig, block: int = 128) -> QuantizedWeight:
    """The paper's blocked GPTQ loop in torch float32 (GPTQ, Alg. 1 with lazy batch updates): group grids are fitted
    on ``W`` at the group's first column, where in-block columns have not yet received their block's feedback."""
    import torch

    W = torch.tensor(np.asarray(w), dtype=torch.float32)  # (N, K)
    H = torch.tensor(np.asarray(h), dtype=torch.float32)  # (K, K)
    n, k = W.shape
    maxq = 2**config.bits - 1
    g = config.effective_group_size(k)

    def grid(x):
        s, z = gptq_reference.grid(x.numpy(), config.bits, config.sym)
        return torch.tensor(s, dtype=torch.float32), torch.tensor(z, dtype=torch.float32)

    if config.group_size == -1:
        scale, zero = grid(W)  # on the weight as given
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if config.act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += config.damp_percent * torch.mean(torch.diag(H)) * torch.eye(k)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros((n, k), dtype=torch.int64)
    groups = -(-k // g)
    scales, zeros = torch.zeros((n, groups)), torch.zeros((n, groups))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if config.group_size != -1 and c % g == 0:
                scale, zero = grid(W[:, c : c + g])
                scales[:, c // g], zeros[:, c // g] = scale, zero
            q = torch.clamp(torch.round(W1[:, i] / scale) + zero, 0, maxq)
            codes[:, c] = q.long()
            err = (W1[:, i] - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if config.group_size == -1:
        scales[:, 0], zeros[:, 0] = scale, zero
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // g)[inv]
    return QuantizedWeight(
        codes=jnp.asarray(codes[:, inv].numpy(), CODE_DTYPE),
        scales=jnp.asarray(scales.numpy()),
        zeros=jnp.asarray(zeros.numpy(), jnp.int32),
        g_idx=jnp.asarray(g_idx.numpy(), jnp.int32),
        perm=None,
        loss=jnp.zeros((), jnp.float32),
        damp=jnp.asarray(config.damp_percent, jnp.float32),
        fallback=jnp.zeros((), jnp.bool_),
        bits=config.bits,
        group_size=g,
        sym=config.sym,
    )


def objective(w, qw: QuantizedWeight, h) -> float:
    d = np.asarray(w, np.float64) - np.asarray(qw.dequantize(), np.float64)
    return float(np.einsum("nk,kl,nl->", d, np.asarray(h, np.float64), d))


def add_run_args(ap: argparse.ArgumentParser, seeds: bool = False) -> None:
    """The quantization and calibration flags this script shares with paper_pipeline.py and
    scale_rounding_seeds.py (``seeds=True``: ``--seeds``, several calibration draws, instead of ``--seed``)."""
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    if seeds:
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    else:
        ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=16)


def run_tag(args: argparse.Namespace) -> str:
    """``<bits>bit_g<group>_<sym|asym>[_actorder]``, the part of a result file's name these flags decide."""
    return f"{args.bits}bit_g{args.group_size}_{'asym' if args.asym else 'sym'}{'_actorder' if args.act_order else ''}"


def main(argv=None) -> int:
    started = provenance.start()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--solvers", nargs="+", default=["ours", "paper_f32"], help="one run per solver")
    ap.add_argument("--compare", nargs="+", default=["ours", "paper_f32"], help="solvers scored on every (W, H)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order)
    tag = run_tag(args)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "..", "results", "lowbit_solver_swap", f"lowbit_solver_swap_{tag}_cpu.json")

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib = random_windows(
        tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed
    )
    import torch

    torch.set_num_threads(2)
    solvers = {"ours": quantize_weight, "paper_f32": paper_solver, "reference_f64": reference_solver}
    runs = {}
    for label in args.solvers:
        objectives = []

        def traced(w, h, config, label=label, objectives=objectives):
            # Both solvers on the very (W, H) this run hands over; the run continues with its own solver's result.
            outs = {name: solvers[name](w, h, config) for name in {*args.compare, label}}
            objectives.append({name: objective(w, qw, h) for name, qw in outs.items()})
            return outs[label]

        # The engine's solver hook; it hands over the weights sharing a Hessian together.
        model, _ = load_pretrained(model_dir)
        t0 = time.perf_counter()
        res = quantize(model, calib, quant_config=qc,
                       solver=lambda ws, h, config, traced=traced: [traced(w, h, config) for w in ws])
        secs = time.perf_counter() - t0
        ppl = perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4, max_windows=args.eval_windows).perplexity
        names = [r["name"] for r in res.report.linears]
        runs[label] = {"perplexity": ppl, "seconds": secs, "objectives": dict(zip(names, objectives, strict=True))}
        print(f"{label}: perplexity {ppl:.3f} ({secs:.0f} s)", flush=True)
    payload = {
        "benchmark": "lowbit_solver_swap",
        "config": tag,
        "calibration": {"text": "Python docs (default)", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed},
        "evaluation": {"text": "held-out tail of Python docs", "seqlen": args.seqlen, "windows": args.eval_windows},
        "load": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "runs": runs,
    }  # fmt: skip
    base = "reference_f64" if "reference_f64" in args.compare else "paper_f32"
    for label, run in runs.items():
        r = np.array([o["ours"] / o[base] for o in run["objectives"].values()])
        run[f"objective_ratio_ours_over_{base}"] = {
            "geomean": float(np.exp(np.mean(np.log(r)))),
            "min": float(r.min()),
            "max": float(r.max()),
            "worst": max(
                run["objectives"], key=lambda n: run["objectives"][n]["ours"] / run["objectives"][n][base]
            ),
        }
        print(label, run[f"objective_ratio_ours_over_{base}"])
    provenance.write_result(out, payload, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
