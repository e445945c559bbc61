"""Benchmark: whole-model GPTQ time, layer by layer, on the default model or a Llama-2-7B-shaped random model.

    python benchmarks/bench_pipeline.py --model smollm2 --nsamples 128 --seqlen 2048   # the target setting
    python benchmarks/bench_pipeline.py --model smollm2 --nsamples 16 --seqlen 512     # a quick CPU run
    python benchmarks/bench_pipeline.py --model llama2-7b --nsamples 128 --seqlen 2048 # random weights, for a GPU

Reports total time, time per decoder layer and the split between solving (quantize_weight) and the calibration
passes; writes JSON to
benchmarks/results/bench_pipeline/bench_pipeline_<model>_<nsamples>x<seqlen>_<platform>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import provenance
from flax import nnx

from gptq_jax import QuantConfig, quantize
from gptq_jax.core.calibration import random_windows

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "llama2-7b", "tiny"), default="smollm2",
                    help="tiny: a 128-wide random Llama, to run this script's paths in seconds (gpu_check --cpu-smoke)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward call (the engine default)")
    ap.add_argument("--layers", type=int, help="quantize only the first N decoder layers (llama2-7b, tiny)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = provenance.start()

    dev = jax.devices()[0]
    device = dev.device_kind if dev.platform != "cpu" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    t_load = time.perf_counter()
    if args.model == "smollm2":
        from gptq_jax.io.default_model import fetch_smollm2
        from gptq_jax.io.text import default_calibration_text, tokenize
        from gptq_jax.models import load_pretrained, load_tokenizer

        path = fetch_smollm2()
        dtype = jnp.dtype(args.dtype or "float32")
        model, config = load_pretrained(path, dtype=dtype)
        ids = tokenize(load_tokenizer(path), default_calibration_text())
        calib = random_windows(ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    else:
        from gptq_jax.models import LlamaForCausalLM, ModelConfig

        cfg = dict(LLAMA2_7B)
        if args.model == "tiny":
            cfg.update(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=32, num_hidden_layers=2)
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        config = ModelConfig.from_hf_dict(cfg)
        dtype = jnp.dtype(args.dtype or "bfloat16")
        model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))  # random weights: no download needed
        rng = np.random.default_rng(0)
        calib = rng.integers(0, config.vocab_size, (args.nsamples, args.seqlen)).astype(np.int32)
    load_s = time.perf_counter() - t_load

    qc = QuantConfig(bits=4, group_size=128)
    t0 = time.perf_counter()
    res = quantize(model, calib, quant_config=qc, batch_size=args.batch_size, progress=True)
    total = time.perf_counter() - t0
    solve = sum(r["seconds"] for r in res.report.linears)
    layers = [r["seconds"] for r in res.report.layers]
    print(
        f"{args.model}: {len(layers)} layers, {args.nsamples} x {args.seqlen} tokens, {dtype.name} on {device}: "
        f"{total:.1f} s total ({total / len(layers):.2f} s/layer; solves {solve:.1f} s, passes {total - solve:.1f} s)"
    )
    payload = {
        "benchmark": "bench_pipeline",
        "device": device,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "model": args.model,
        "dtype": dtype.name,
        "quant_config": {"bits": 4, "group_size": 128, "sym": True},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size},
        "load_seconds": load_s,
        "quantize_seconds": total,
        "solve_seconds": solve,
        "layer_seconds": layers,
        "relative_output_error": [r["relative_output_error"] for r in res.report.layers],
    }
    name = f"bench_pipeline_{args.model}_{args.nsamples}x{args.seqlen}_{dev.platform}.json"
    out = args.out or provenance.result_path("bench_pipeline", name)
    provenance.write_result(out, payload, started=started)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
