"""One trained model in every form a JAX user brings it, quantized by the same engine: SmolLM2-135M-Instruct as our
NNX Llama (the reference, block by block), as that model's parameter state with a forward (the parameter-pytree
path), as a Linen Llama scanning its layers (``nn.scan``), as an NNX Llama scanning its layers (``nnx.vmap`` +
``nnx.scan``), and as Hugging Face's ``FlaxLlamaForCausalLM`` (transformers 4.x, ``make hf-flax``). The scanned
models are ``examples/scanned_llama.py``.

Each kind runs in a fresh process (so its peak RSS, ``VmHWM``, is its own): the same calibration windows (``--nsamples``
x ``--seqlen`` of the default calibration text, seed ``--seed``), 4-bit g128 asym act-order, then perplexity of the
quantized model on every full ``--seqlen`` window of the held-out text, computed the same way for every kind (summed
next-token NLL of its logits). The issue's targets: every projection (210 for SmolLM2) quantized in mode "blocks",
perplexity within 1% of the NNX reference, and the parameter-pytree path's peak RSS at most 1.2x the NNX path's.

Peak RSS is the quantization's own: once the model is built (the scanned kinds stack the NNX Llama's weights, two
copies for a moment), the freed memory is trimmed and the peak reset (``/proc/self/clear_refs``), then ``VmHWM`` is
read when ``quantize`` returns. A ``-donate`` kind passes ``donate=True``: the caller gives its float parameters up,
so the run holds one copy of the model (an NNX model is changed in place anyway); without it the caller's float
tree and the returned one are both alive.

    python benchmarks/kinds_smollm2.py                               # every kind
    python benchmarks/kinds_smollm2.py --kinds nnx linen-scan --nsamples 8

Writes benchmarks/results/kinds_smollm2/kinds_smollm2_cpu.json after every kind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import provenance
from vs_gptqmodel import peak_rss_mb  # VmHWM of this process, not a parent's

REPO = Path(__file__).resolve().parent.parent
KINDS = ("nnx", "pytree", "pytree-donate", "linen-scan", "linen-scan-donate", "nnx-scan", "hf-flax")
PPL_TOLERANCE = 0.01
RSS_TOLERANCE = 1.2


def _scanned_module():
    spec = importlib.util.spec_from_file_location("scanned_llama", REPO / "examples" / "scanned_llama.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Linen's dataclass transform looks the module up by name
    spec.loader.exec_module(mod)
    return mod


def _hf_flax(llama, model_dir: str):
    """Hugging Face's FlaxLlamaForCausalLM holding our Llama's weights, as (params, forward).

    transformers' Flax Llama builds its RoPE table with base 10000 whatever ``rope_theta`` says (SmolLM2's is
    100000), so as shipped it is another model than the checkpoint: its float logits differ from PyTorch's and ours
    by up to 16 (max |logit| 43). The table is built here with the config's base, so that every kind quantizes the
    same float model; this corrects the third-party module, it does not touch gptq-jax."""
    import jax.numpy as jnp
    from transformers import FlaxLlamaForCausalLM, LlamaConfig
    from transformers.models.llama import modeling_flax_llama

    cfg = LlamaConfig.from_pretrained(model_dir)
    theta = float(cfg.rope_theta)

    def sinusoidal_positions(num_pos: int, dim: int):
        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
        freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
        emb = np.concatenate((freqs, freqs), axis=-1)
        return jnp.asarray(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))

    modeling_flax_llama.create_sinusoidal_positions = sinusoidal_positions
    model = FlaxLlamaForCausalLM(cfg, _do_init=False)
    w = lambda lin: lin.kernel[...]  # noqa: E731 - (in, out) in both
    layers = {str(i): {
        "input_layernorm": {"weight": layer.input_layernorm.scale[...]},
        "post_attention_layernorm": {"weight": layer.post_attention_layernorm.scale[...]},
        "self_attn": {p: {"kernel": w(getattr(layer.self_attn, p))} for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {p: {"kernel": w(getattr(layer.mlp, p))} for p in ("gate_proj", "up_proj", "down_proj")},
    } for i, layer in enumerate(llama.layers)}  # fmt: skip
    emb = llama.embed_tokens.embedding[...]
    norm = {"weight": llama.norm.scale[...]}
    body = {"embed_tokens": {"embedding": emb}, "layers": layers, "norm": norm}
    params = {"model": body, "lm_head": {"kernel": emb.T}}
    return params, lambda p, ids: model(ids, params=p).logits


def _build(kind: str, model_dir: str):
    """(target for quantize, its keyword arguments, forward(quantized result model, tokens) -> logits)."""
    from flax import nnx

    from gptq_jax.models import load_pretrained

    llama, _ = load_pretrained(model_dir)
    if kind == "nnx":
        return llama, {}, _nnx_forward
    if kind == "pytree":
        graphdef, params, rest = nnx.split(llama, nnx.Param, ...)

        def fwd(p, ids):
            return nnx.merge(graphdef, p, rest)(ids)[0]

        return params, {"forward": fwd}, lambda p: _bind(fwd, p)
    scanned = _scanned_module()
    if kind == "linen-scan":
        net = scanned.LinenScannedLlama(llama.config)
        params = scanned.linen_params_from_llama(llama)
        return params, {"apply_fn": net.apply}, lambda p: _bind(lambda q, ids: net.apply({"params": q}, ids), p)
    if kind == "nnx-scan":
        return scanned.nnx_from_llama(llama), {}, _nnx_forward
    if kind == "hf-flax":
        params, fwd = _hf_flax(llama, model_dir)
        return params, {"forward": fwd}, lambda p: _bind(fwd, p)
    raise ValueError(f"unknown kind {kind!r}")


def _bind(fwd, params):
    import jax

    jitted = jax.jit(fwd)
    return lambda ids: jitted(params, ids)


def _nnx_forward(model):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])
    return lambda ids: jitted(state, ids)


def _perplexity(forward, windows: np.ndarray, batch: int = 2) -> float:
    import jax
    import jax.numpy as jnp

    from gptq_jax.tasks.eval import window_nll

    nll = jax.jit(window_nll)
    total = 0.0
    for i in range(0, len(windows), batch):
        ids = jnp.asarray(windows[i : i + batch])
        total += float(jnp.sum(nll(forward(ids), ids)))
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def _reset_peak_rss() -> bool:
    """Give freed memory back and restart ``VmHWM`` from the current RSS (Linux); False where that is not possible."""
    from gptq_jax.engine.memory import release_freed_memory

    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> int:
    from gptq_jax import QuantConfig, quantize

    calib = np.load(args.calib)
    windows = np.load(args.eval)
    target, kwargs, make_forward = _build(args.kind.removesuffix("-donate"), args.model_dir)
    if args.kind.endswith("-donate"):
        kwargs["donate"] = True
    reset = _reset_peak_rss()
    qc = QuantConfig(bits=4, group_size=128, sym=False, act_order=True)
    t0 = time.perf_counter()
    res = quantize(target, calib, quant_config=qc, batch_size=args.batch_size, **kwargs)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    ppl = _perplexity(make_forward(res.model), windows)
    print(json.dumps({"kind": args.kind, "mode": res.report.mode, "weights": len(res.weights),
                      "unquantized": [list(u) if isinstance(u, tuple) else u for u in res.report.unquantized],
                      "perplexity": ppl, "quantize_seconds": seconds, "peak_rss_mb_quantize": rss,
                      "peak_rss_since": "model built" if reset else "process start",
                      "peak_rss_mb": peak_rss_mb()}))  # fmt: skip
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hf-flax", default=str(REPO / ".venv-hf-flax"), help="transformers 4.x directory (make hf-flax)")
    ap.add_argument("--work", default=str(REPO / ".cache" / "kinds_smollm2"))
    ap.add_argument("--out", default=str(provenance.result_path("kinds_smollm2", "kinds_smollm2_cpu.json")))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--eval", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    started = provenance.start()

    from gptq_jax.core.calibration import random_windows
    from gptq_jax.io.default_model import fetch_smollm2
    from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize
    from gptq_jax.models import load_tokenizer

    model_dir = str(fetch_smollm2())
    tok = load_tokenizer(model_dir)
    calib = random_windows(tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen,
                           seed=args.seed)  # fmt: skip
    ids = np.asarray(tokenize(tok, default_eval_text()))
    n = len(ids) // args.seqlen
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", np.asarray(calib.tokens, np.int32))
    np.save(work / "eval.npy", ids[: n * args.seqlen].reshape(n, args.seqlen).astype(np.int32))
    payload = {"benchmark": "kinds_smollm2", "model": "SmolLM2-135M-Instruct",
               "config": {"bits": 4, "group_size": 128, "sym": False, "act_order": True},
               "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                               "batch_size": args.batch_size},
               "evaluation": {"windows": n, "seqlen": args.seqlen, "text": "held-out tail of Python docs"},
               "rows": []}  # fmt: skip
    for kind in args.kinds:
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        path = [str(REPO), str(Path(__file__).resolve().parent)]
        if kind == "hf-flax":
            if not (Path(args.hf_flax) / "transformers").is_dir():
                print(f"hf-flax: skipped, transformers 4.x not in {args.hf_flax} (make hf-flax)", flush=True)
                continue
            path.insert(0, args.hf_flax)
        env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--child", "--kind", kind, "--calib", str(work / "calib.npy"),
                               "--eval", str(work / "eval.npy"), "--model-dir", model_dir,
                               "--batch-size", str(args.batch_size)],
                              env=env, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            row = {"kind": kind, "error": proc.stderr[-3000:]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        row |= {"load_before": list(load_before), "load_after": list(os.getloadavg())}
        payload["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "unquantized"}), flush=True)
        payload["checks"] = _checks(payload["rows"])
        provenance.write_result(args.out, payload, started=started)
    print(json.dumps(payload.get("checks"), indent=1))
    return 0


def _checks(rows: list[dict]) -> dict:
    ref = next((r for r in rows if r["kind"] == "nnx" and "perplexity" in r), None)
    out = {}
    for r in rows:
        if "perplexity" not in r:
            out[r["kind"]] = {"ok": False, "why": "failed"}
            continue
        c = {"all_210_quantized": r["weights"] == 210, "blocks_mode": r["mode"] == "blocks"}
        if ref is not None:
            c["perplexity_gap"] = r["perplexity"] / ref["perplexity"] - 1
            c["within_1pct"] = abs(c["perplexity_gap"]) <= PPL_TOLERANCE
            c["rss_ratio_vs_nnx"] = r["peak_rss_mb_quantize"] / ref["peak_rss_mb_quantize"]
            c["rss_within_1.2x"] = c["rss_ratio_vs_nnx"] <= RSS_TOLERANCE
        out[r["kind"]] = c
    return out


if __name__ == "__main__":
    sys.exit(main())
