"""SmolLM2-135M on this machine: our JAX model, float and packed 4-bit, against transformers' PyTorch model.

Three kinds of runs, side by side in one invocation: ours in float32; ours packed (every decoder linear quantized
round-to-nearest, 4-bit, group 128, and swapped for a ``QuantLinear``: the packed layout and compute path any GPTQ
checkpoint gets, without spending a minute on GPTQ itself); transformers in float32.

Measures, float32, batch 1:
  - perplexity-evaluation throughput (tokens/s): summed next-token NLL of `--windows` windows of `seqlen` held-out
    tokens, for each seqlen in `--seqlens`, as each side computes it (ours: `gptq_jax.tasks.eval`, whose head runs in
    tiles with a running log-sum-exp; transformers: the model's full logits, then logsumexp and the target logit);
  - the plain forward to full `(1, T, V)` logits (tokens/s) on both sides, the same work for each;
  - prefill and decode throughput (tokens/s): greedy decoding with a KV cache, `--new-tokens` tokens after a
    `--prompt`-token prompt.

transformers runs at torch's default thread count and at 1 thread: on a 2-core machine shared with other work,
OpenMP's barriers wait for descheduled threads and 1 thread is up to 10x faster; the comparison is with the faster.
Each framework runs in its own process (XLA's and OpenMP's thread pools in one process slow each other down: we saw
transformers' prefill 2.4x slower after a JAX computation in the same process). Rounds alternate ours / theirs so
that background load hits both alike. In each process the first pass is the warm-up (compilation for JAX) and also
yields the values that must agree: perplexity to 1e-4 relative, identical greedy tokens; the run stops without
reporting timings if they do not. Timings are medians over all timed repeats of all rounds.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_model.py [--seqlens 512 2048] [--rounds 2] [--repeats 2]

Writes benchmarks/results/bench_model/bench_model_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import provenance  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = provenance.result_path("bench_model", "bench_model_cpu.json")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------------------
# One framework, in its own process: warm-up (with the agreement values), then timed repeats.


def _windows(tokens: np.ndarray, seqlen: int, windows: int) -> np.ndarray:
    if len(tokens) < windows * seqlen:
        sys.exit(f"the held-out text has {len(tokens)} tokens, fewer than {windows} windows of {seqlen}")
    return tokens[: windows * seqlen].reshape(windows, seqlen).astype(np.int32)  # (W, T)


def run_ours(args: argparse.Namespace, tokens: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    from gptq_jax.models import load_pretrained
    from gptq_jax.models.llama import make_forward
    from gptq_jax.tasks.eval import make_nll_fn
    from gptq_jax.tasks.generate import generate_tokens

    model, _ = load_pretrained(args.model_dir, dtype=jnp.float32)
    if args.packed:
        from gptq_jax import QuantConfig, quantize
        from gptq_jax.models.qlinear import pack_model

        qc = QuantConfig(bits=args.packed_bits, group_size=args.packed_group_size)
        one_window = np.zeros((1, 8), np.int32)  # round-to-nearest: the engine only needs to see the matmuls
        pack_model(model, quantize(model, one_window, quant_config=qc, method="rtn").weights)
    nll_fn = make_nll_fn(model)  # what gptq_jax.tasks.eval.perplexity runs per batch
    forward = make_forward(model)
    out = {"eval": [], "versions": {"jax": jax.__version__}, "backend": jax.default_backend()}
    for seqlen in args.seqlens:
        batches = [jnp.asarray(w[None]) for w in _windows(tokens, seqlen, args.windows)]  # (1, T) each
        t0 = time.perf_counter()
        nll = sum(float(nll_fn(b)[0]) for b in batches)  # warm-up: compiles
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for b in batches:
                jax.block_until_ready(nll_fn(b))
            times.append(time.perf_counter() - t0)
        fwd_times = []  # the plain forward to full (1, T, V) logits, for comparison with transformers' forward
        jax.block_until_ready(forward(batches[0])[0])  # compiles
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for b in batches:
                jax.block_until_ready(forward(b)[0])
            fwd_times.append(time.perf_counter() - t0)
        out["eval"].append(
            {"seqlen": seqlen, "nll_sum": nll, "warmup_seconds": warm, "seconds": times, "forward_seconds": fwd_times}
        )
    prompt = tokens[: args.prompt].astype(np.int32)
    first = generate_tokens(model, prompt, max_new_tokens=args.new_tokens)
    pre, dec = [], []
    for _ in range(args.repeats):
        r = generate_tokens(model, prompt, max_new_tokens=args.new_tokens)
        pre.append(r.prefill_seconds)
        dec.append(r.decode_seconds)
    out["decode"] = {
        "tokens": first.tokens.tolist(),
        "compile_seconds": first.compile_seconds,
        "prefill_seconds": pre,
        "decode_seconds": dec,
    }
    return out


def torch_window_nll(model, x):
    """Summed next-token NLL per window `(B,)`, the same formula as `gptq_jax.tasks.eval.window_nll`.

    (logsumexp minus the target logit: torch's float32 `cross_entropy` / `log_softmax` are ~1e-5 relative away from
    a float64 computation on these 49152-way logits; this formula is not.)"""
    import torch

    logits = model(x).logits[:, :-1].float()  # (B, T-1, V)
    target = x[:, 1:, None]  # (B, T-1, 1)
    return (torch.logsumexp(logits, -1) - logits.gather(-1, target)[..., 0]).sum(-1)  # (B,)


def torch_greedy(model, prompt: np.ndarray, new: int) -> tuple[list[int], float, float]:
    """Greedy decoding with transformers' KV cache: (tokens, prefill seconds, decode seconds)."""
    import torch

    x = torch.tensor(prompt[None], dtype=torch.long)
    t0 = time.perf_counter()
    out = model(x, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - t0
    past, tokens = out.past_key_values, [int(nxt)]
    t0 = time.perf_counter()
    for _ in range(new - 1):
        out = model(nxt[:, None], past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt))
    return tokens, prefill, time.perf_counter() - t0


def run_torch(args: argparse.Namespace, tokens: np.ndarray) -> dict:
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32).eval()
    out = {
        "eval": [],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "attention": model.config._attn_implementation,
    }
    with torch.inference_mode():
        for seqlen in args.seqlens:
            batches = [torch.tensor(w[None], dtype=torch.long) for w in _windows(tokens, seqlen, args.windows)]
            t0 = time.perf_counter()
            nll = sum(float(torch_window_nll(model, b)[0]) for b in batches)
            warm = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for b in batches:
                    torch_window_nll(model, b)
                times.append(time.perf_counter() - t0)
            fwd_times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for b in batches:
                    model(b).logits  # noqa: B018
                fwd_times.append(time.perf_counter() - t0)
            row = {"seqlen": seqlen, "nll_sum": nll, "warmup_seconds": warm, "seconds": times}
            out["eval"].append({**row, "forward_seconds": fwd_times})
        prompt = tokens[: args.prompt].astype(np.int32)
        first, _, _ = torch_greedy(model, prompt, args.new_tokens)
        pre, dec = [], []
        for _ in range(args.repeats):
            _, p, d = torch_greedy(model, prompt, args.new_tokens)
            pre.append(p)
            dec.append(d)
    out["decode"] = {"tokens": first, "prefill_seconds": pre, "decode_seconds": dec}
    return out


def worker(args: argparse.Namespace) -> None:
    from gptq_jax.io.text import default_eval_text, tokenize
    from gptq_jax.models import load_tokenizer

    tokens = tokenize(load_tokenizer(args.model_dir), default_eval_text())
    result = (run_ours if args.worker == "ours" else run_torch)(args, tokens)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration


def spawn(args: argparse.Namespace, which: str, threads: int = 0, packed: bool = False) -> dict:
    argv = [sys.executable, __file__, "--worker", which, "--model-dir", str(args.model_dir), "--threads", str(threads)]
    if packed:
        argv += ["--packed", "--packed-bits", str(args.packed_bits), "--packed-group-size", str(args.packed_group_size)]
    argv += ["--seqlens", *map(str, args.seqlens), "--windows", str(args.windows), "--prompt", str(args.prompt)]
    argv += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    label = which + (" packed" if packed else "") + (f" ({threads} threads)" if threads else "")
    print(f"running {label} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        sys.exit(f"the {which} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_agreement(ours: dict, theirs: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for a, b in zip(ours["eval"], theirs["eval"], strict=True):
        n = args.windows * (a["seqlen"] - 1)
        ppl_a, ppl_b = float(np.exp(a["nll_sum"] / n)), float(np.exp(b["nll_sum"] / n))
        rel = abs(ppl_a - ppl_b) / ppl_b
        if rel > 1e-4:
            sys.exit(f"perplexities disagree at seqlen {a['seqlen']}: ours {ppl_a} vs transformers {ppl_b}")
        rows.append({"seqlen": a["seqlen"], "ours": ppl_a, "transformers": ppl_b, "rel_diff": rel})
    if ours["decode"]["tokens"] != theirs["decode"]["tokens"]:
        sys.exit(f"greedy tokens disagree: ours {ours['decode']['tokens']} vs {theirs['decode']['tokens']}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, help="default: SmolLM2-135M-Instruct, converted into .cache/smollm2")
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--windows", type=int, default=2, help="windows per timed evaluation (default 2)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="alternating ours/transformers rounds (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per round, after the warm-up (default 2)")
    p.add_argument(
        "--torch-threads",
        type=int,
        nargs="*",
        default=[0, 1],
        help="transformers is run once per value with torch.set_num_threads(value); 0 is torch's default (one per "
        "core). The comparison uses the fastest. Default: 0 1 (on a loaded machine OpenMP's barriers make 1 faster). "
        "No value: skip transformers (ours float vs packed only)",
    )
    p.add_argument("--packed-bits", type=int, default=4, help="bits of the packed run (default 4)")
    p.add_argument("--packed-group-size", type=int, default=128, help="group size of the packed run (default 128)")
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)  # the worker quantizes and packs
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # the torch worker's thread count
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from gptq_jax.io.default_model import fetch_smollm2

    args.model_dir = args.model_dir or fetch_smollm2()
    started = provenance.start()
    load_before = started["load_average"]
    torch_variants = [f"transformers-{t or 'default'}-threads" for t in args.torch_threads]
    packed = f"ours-packed-{args.packed_bits}bit-g{args.packed_group_size}"
    variants = ["ours", packed, *torch_variants]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    ppl = None
    for _ in range(args.rounds):  # alternating, so that background load hits every variant alike
        runs["ours"].append(spawn(args, "ours"))
        runs[packed].append(spawn(args, "ours", packed=True))
        for t, v in zip(args.torch_threads, torch_variants, strict=True):
            runs[v].append(spawn(args, "torch", t))
            if ppl is None:  # the first transformers run: check agreement before going on
                ppl = check_agreement(runs["ours"][0], runs[v][0], args)
        for v in torch_variants[1:]:
            check_agreement(runs["ours"][0], runs[v][-1], args)
    n_eval = [args.windows * (s - 1) for s in args.seqlens]
    packed_ppl = [
        {"seqlen": a["seqlen"], "float": float(np.exp(a["nll_sum"] / n)), "packed": float(np.exp(b["nll_sum"] / n))}
        for a, b, n in zip(runs["ours"][0]["eval"], runs[packed][0]["eval"], n_eval, strict=True)
    ]
    for row in packed_ppl:  # a broken packed path would decode fast and wrong (RTN 4-bit g128: about 1.5x float here)
        if not row["packed"] < 3 * row["float"]:
            sys.exit(f"packed perplexity {row['packed']:.3f} is far from float {row['float']:.3f}: packed path broken?")

    def median(v: str, get) -> float:
        return statistics.median(x for run in runs[v] for x in get(run))

    summary = {}
    for v in variants:
        row = {}
        for i, seqlen in enumerate(args.seqlens):
            row[f"eval_tokens_per_second_seqlen_{seqlen}"] = (
                args.windows * seqlen / median(v, lambda r, i=i: r["eval"][i]["seconds"])
            )
        for i, seqlen in enumerate(args.seqlens):
            row[f"forward_tokens_per_second_seqlen_{seqlen}"] = (
                args.windows * seqlen / median(v, lambda r, i=i: r["eval"][i]["forward_seconds"])
            )
        row["prefill_tokens_per_second"] = args.prompt / median(v, lambda r: r["decode"]["prefill_seconds"])
        row["decode_tokens_per_second"] = (args.new_tokens - 1) / median(v, lambda r: r["decode"]["decode_seconds"])
        if v in torch_variants:
            row["torch_threads"] = runs[v][0]["threads"]
            row["attention"] = runs[v][0]["attention"]
        summary[v] = row
    # Fastest transformers per metric (absent without transformers runs)
    best = {k: max(summary[v][k] for v in torch_variants) for k in summary["ours"]} if torch_variants else {}

    result = {
        "benchmark": "bench_model",
        "model": args.model_dir.name,
        "dtype": "float32",
        "batch_size": 1,
        "device": {
            "name": f"{cpu_name()} ({os.cpu_count()} cores)",
            "jax_backend": runs["ours"][0]["backend"],
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "versions": {**runs["ours"][0]["versions"], **(runs[torch_variants[0]][0]["versions"] if torch_variants
                                                        else {})},
        "settings": {
            "seqlens": args.seqlens,
            "windows": args.windows,
            "prompt_tokens": args.prompt,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "repeats_per_round": args.repeats,
        },
        "perplexity": ppl,
        "perplexity_float_vs_packed": packed_ppl,
        "packed": {"bits": args.packed_bits, "group_size": args.packed_group_size, "method": "rtn",
                   "layers": "every decoder linear (QuantLinear -> pallas_kernels.gptq_matmul, the jnp path on CPU)"},
        "compile_seconds_ours": {
            "eval_warmup": [[e["warmup_seconds"] for e in r["eval"]] for r in runs["ours"]],
            "decode": [r["decode"]["compile_seconds"] for r in runs["ours"]],
        },
        "tokens_per_second": summary,
        "ratio_ours_to_best_transformers": {k: summary["ours"][k] / best[k] for k in best},
        "ratio_packed_to_float": {k: summary[packed][k] / summary["ours"][k] for k in summary["ours"]},
        "raw": runs,
    }

    print(f"\n{args.model_dir.name}, float32, batch 1, {cpu_name()} ({os.cpu_count()} cores), "
          f"load average {load_before[0]:.1f}, median of {args.rounds * args.repeats}; tokens/s")  # fmt: skip
    names = {v: v.replace("transformers-", "torch ").replace("-threads", " thr") for v in variants}
    names[packed] = f"packed {args.packed_bits}b g{args.packed_group_size}"
    print(f"{'':26s}" + "".join(f"{names[v]:>18s}" for v in variants) + f"{'packed/ours':>12s}"
          + (f"{'ours/best':>11s}" if best else ""))
    for k in summary["ours"]:
        label = k.replace("_tokens_per_second", "").replace("_seqlen_", ", seqlen ").replace("forward", "logits fwd")
        if k.startswith("prefill"):
            label = f"prefill, {args.prompt} tokens"
        elif k.startswith("decode"):
            label = f"decode, {args.new_tokens} tokens"
        cells = "".join(f"{summary[v][k]:18.1f}" for v in variants)
        ratio = f"{summary['ours'][k] / best[k]:11.2f}" if best else ""
        print(f"{label:26s}{cells}{summary[packed][k] / summary['ours'][k]:12.2f}{ratio}")

    provenance.write_result(args.out, result, started=started)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
