"""Is there a low-bit gap between gptq-jax's pipeline and the GPTQ paper's whole sequential pipeline?

``benchmarks/lowbit_solver_swap.py`` showed that our per-layer solver equals the paper's blocked loop inside OUR
pipeline. This script re-implements the rest of the paper's pipeline, in PyTorch on transformers'
``LlamaForCausalLM`` (float32, loaded from our converted SmolLM2 checkpoint), written here from the published
algorithm (GPTQ, Frantar et al. 2022, Sec. 4-5):

- the inputs of decoder layer 0 (embeddings of every calibration window, plus the mask / rotary embeddings the layers
  take) are captured once;
- each decoder layer in turn is quantized "true sequential", stage by stage: [k, v, q], [o], [up, gate], [down]. For
  a stage, forward hooks on its linears fold their inputs into one Hessian per linear while the layer runs on every
  window (one window at a time), with the earlier stages already quantized:
  ``H *= n / (n + t); n += t; x = sqrt(2 / n) x; H += x^T x`` (``t`` rows = the tokens of a window); then each linear
  is solved with the paper's blocked loop (``paper_solver`` of lowbit_solver_swap.py: block 128, damp 0.01) and its
  dequantized weight, float32, written into the layer. ``--no-true-sequential``: the seven Hessians in one pass with
  the layer's float weights;
- the quantized layer is run again on every window: its outputs are the next layer's inputs;
- the final norm and the (tied) output head stay float.

The calibration windows are ours (``random_windows``, all-ones masks), and the torch-quantized weights are written
into our JAX model and scored with OUR ``tasks.eval.perplexity`` on the held-out text, so the numbers compare with
``gptq_jax.quantize`` run on the same windows (``--pipelines ours paper`` runs both). The torch model's float
perplexity on the same windows is checked against our float model's.

Per linear it records the objective ``tr((W - Q) H (W - Q)^T)`` on the pipeline's own (W, H) and, when ours ran first,
the relative Frobenius difference of the paper pipeline's Hessian from ours (equal inputs at layer 0, then each
pipeline's own quantized history); per layer the relative output error against the float layer on the same inputs.

    python benchmarks/investigations/paper_pipeline.py \\
        --bits 3 --group-size 128 --asym --nsamples 32 --seqlen 512 --seed 0

Writes benchmarks/results/paper_pipeline/
paper_pipeline_smollm2_<bits>bit_g<group>_<sym|asym>[_actorder][_seedN]_cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import lowbit_solver_swap  # noqa: E402  (paper_solver)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import provenance  # noqa: E402  (benchmarks/provenance.py)

from gptq_jax import QuantConfig, quantize  # noqa: E402
from gptq_jax.core.calibration import random_windows  # noqa: E402
from gptq_jax.core.gptq import quantize_weights  # noqa: E402
from gptq_jax.engine.solve import Solver, dequantized  # noqa: E402
from gptq_jax.io.default_model import fetch_smollm2  # noqa: E402
from gptq_jax.io.text import default_calibration_text, default_eval_text, tokenize  # noqa: E402
from gptq_jax.models import load_pretrained, load_tokenizer  # noqa: E402
from gptq_jax.tasks.eval import perplexity  # noqa: E402

STAGES = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
          ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]  # fmt: skip
RUN_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]  # the order transformers' LlamaDecoderLayer calls them
# One linear per distinct Hessian (the others of its stage read the same input).
STAGE_KEY = {n: s[0] for s in STAGES for n in s}


def objective(w, qw, h) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64 (lowbit_solver_swap.objective's value, through BLAS)."""
    d = np.asarray(w, np.float64) - np.asarray(qw.dequantize(), np.float64)
    return float(np.sum((d @ np.asarray(h, np.float64)) * d))


# ----------------------------------------------------------------------------------------------------------------------
# The paper's pipeline, in torch


class Hessian:
    """The paper's running Hessian ``2/n sum x x^T``, folded one batch of rows at a time."""

    def __init__(self, k: int):
        import torch

        self.H = torch.zeros((k, k), dtype=torch.float32)
        self.n = 0

    def add(self, x) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (t, K)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H += x.T @ x


class _Stop(Exception):
    pass


def capture_layer0_inputs(model, windows: np.ndarray) -> tuple[list, list]:
    """(hidden states [1, T, D] per window, the keyword arguments layer 0 got for it)."""
    import torch

    layer0 = model.model.layers[0]
    hidden, kwargs = [], []

    def grab(mod, args, kw):
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        for k in ("past_key_value", "past_key_values", "use_cache"):
            kw.pop(k, None)
        hidden.append(h.detach().clone())
        kwargs.append(kw)
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(input_ids=torch.from_numpy(w[None].astype(np.int64)),
                          attention_mask=torch.ones((1, w.size), dtype=torch.int64), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs


def run_layer(layer, hidden: list, kwargs: list, batch: int = 8) -> list:
    """The layer on every window, ``batch`` windows per call (the windows share their mask / positions); returns the
    output per window. Hooks see ``[batch, T, K]`` and fold it window by window."""
    import torch

    outs = []
    with torch.no_grad():
        for b in range(0, len(hidden), batch):
            try:
                o = layer(torch.cat(hidden[b : b + batch]), **kwargs[b])
            except _Stop:  # a stage's last hook: the rest of the layer is not needed
                continue
            o = o[0] if isinstance(o, tuple) else o
            outs.extend(o.split(1))
    return outs


def _same(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a is b or a == b


def paper_pipeline(model, windows: np.ndarray, qc: QuantConfig, *, true_sequential: bool = True,
                   scale_dtype: str = "float32", ours_hessians: dict | None = None, fixed: dict | None = None,
                   log=print) -> dict:
    """Quantizes ``model`` (transformers Llama) in place by the paper's pipeline; returns per-linear and per-layer
    records. ``fixed``: name -> dequantized ``[N, K]`` weight written instead of solving (the mechanics check: with
    our pipeline's weights, the Hessians must then equal ours up to float rounding)."""
    import torch

    hidden, kwargs = capture_layer0_inputs(model, windows)
    # Batching windows needs them to share the mask and positions (all-ones masks: they do).
    assert all(_same(kw, kwargs[0]) for kw in kwargs), "calibration windows with different masks / positions"
    linears, layers = {}, []
    stages = STAGES if true_sequential else [[n for s in STAGES for n in s]]
    for i, layer in enumerate(model.model.layers):
        t0 = time.perf_counter()
        mods = dict(layer.named_modules())
        float_out = run_layer(layer, hidden, kwargs)
        for names in stages:
            hs = {n: Hessian(mods[n].in_features) for n in names}
            last = max(names, key=RUN_ORDER.index)

            def fold(m, inp, out, n, hs=hs, last=last):
                for x in inp[0].detach():  # window by window, as the paper's loop over samples
                    hs[n].add(x)
                if n == last:
                    raise _Stop

            handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: fold(m, i, o, n)) for n in names]
            run_layer(layer, hidden, kwargs)  # the earlier stages of this layer already quantized
            for hd in handles:
                hd.remove()
            for n in names:
                W = mods[n].weight.data.float().clone()
                H = hs[n].H
                name = f"layers.{i}.{n}.kernel"
                rec = {}
                if ours_hessians is not None and f"layers.{i}.{STAGE_KEY[n]}.kernel" in ours_hessians:
                    ho = ours_hessians[f"layers.{i}.{STAGE_KEY[n]}.kernel"]
                    rec["hessian_rel_diff_vs_ours"] = float(np.linalg.norm(H.numpy() - ho) / np.linalg.norm(ho))
                linears[name] = rec
                if fixed is not None:
                    mods[n].weight.data = torch.from_numpy(np.array(fixed[name], np.float32))
                    continue
                qw = lowbit_solver_swap.paper_solver(W.numpy(), H.numpy(), qc, block=128)
                if scale_dtype != "float32":  # as our engine writes them back
                    qw = dataclasses.replace(qw, scales=qw.scales.astype(scale_dtype).astype("float32"))
                Q = np.array(qw.dequantize(), np.float32)
                rec["objective"] = objective(W.numpy(), qw, H.numpy())
                mods[n].weight.data = torch.from_numpy(Q).to(mods[n].weight.dtype)
        hidden = run_layer(layer, hidden, kwargs)
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(hidden, float_out, strict=True))
        den = sum(float((b**2).sum()) for b in float_out)
        layers.append({"layer": i, "relative_output_error": num / den, "seconds": time.perf_counter() - t0})
        log(f"paper layer {i}: rel. output error {num / den:.4g} ({time.perf_counter() - t0:.1f} s)")
    return {"linears": linears, "layers": layers}


def torch_perplexity(model, eval_ids: np.ndarray, seqlen: int, max_windows: int, batch_size: int = 4) -> float:
    """Same protocol as ``gptq_jax.tasks.eval.perplexity``: non-overlapping windows, mean next-token NLL."""
    import torch

    windows = min(len(eval_ids) // seqlen, max_windows)
    data = torch.from_numpy(eval_ids[: windows * seqlen].reshape(windows, seqlen).astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for b in range(0, windows, batch_size):
            x = data[b : b + batch_size]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(total / (windows * (seqlen - 1)))


def write_into_jax(jmodel, tmodel) -> None:
    """The torch model's decoder linears into our JAX model (kernel = weight^T)."""
    import jax.numpy as jnp

    for i, layer in enumerate(tmodel.model.layers):
        mods = dict(layer.named_modules())
        for n in (x for s in STAGES for x in s):
            part, lin = n.split(".")
            target = getattr(getattr(jmodel.layers[i], part), lin).kernel
            w = mods[n].weight.data.float().numpy().T
            assert tuple(target.value.shape) == w.shape, (n, target.value.shape, w.shape)
            target.value = jnp.asarray(w, target.value.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Our pipeline, with the same records


def ours_pipeline(jmodel, calib, qc: QuantConfig, *, true_sequential: bool = True,
                  scale_dtype: str = "float16") -> tuple[dict, dict, dict, dict]:
    """(per-linear records, per-layer records, Hessians of one linear per stage, the dequantized ``[N, K]`` weights
    as our engine writes them back, scales rounded to ``scale_dtype``) of ``gptq_jax.quantize``."""
    import jax.numpy as jnp

    write = functools.partial(dequantized, scale_dtype=getattr(jnp, scale_dtype))
    linears, hessians = {}, {}
    order = []

    def traced(ws, h, config):  # the weights of a stage that share its Hessian, solved together
        qws = quantize_weights(ws, h, config)
        order.extend((np.asarray(w, np.float32), qw, np.asarray(h, np.float32)) for w, qw in zip(ws, qws, strict=True))
        return qws

    res = quantize(jmodel, calib, quant_config=qc, true_sequential=true_sequential,
                   solver=Solver(solve=traced, write=write))
    for r, (w, qw, h) in zip(res.report.linears, order, strict=True):
        linears[r["name"]] = {"objective": objective(w, qw, h)}
        short = r["name"].removesuffix(".kernel").split(".", 2)[2]
        if STAGE_KEY.get(short) == short:
            hessians[r["name"]] = h
    layers = [{"layer": rec["layer"], "relative_output_error": rec["relative_output_error"],
               "seconds": rec["seconds"]} for rec in res.report.layers]
    written = {n: np.array(write(qw), np.float32) for n, qw in res.weights.items()}
    return linears, layers, hessians, written


def main(argv=None) -> int:
    started = provenance.start()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lowbit_solver_swap.add_run_args(ap)
    ap.add_argument("--layers", type=int, default=None, help="quantize only the first N layers (quick checks)")
    ap.add_argument("--no-true-sequential", action="store_true", help="all of a layer's Hessians in one float pass")
    ap.add_argument("--scale-dtype", default="float32", choices=["float32", "float16"],
                    help="paper pipeline: scales of the weights written back (ours writes float16-rounded ones)")
    ap.add_argument("--ours-scale-dtype", default="float16", choices=["float32", "float16"],
                    help="our pipeline: scales of the weights written back (the engine's default rounds to float16)")
    ap.add_argument("--pipelines", nargs="+", default=["ours", "paper", "mechanics"],
                    choices=["ours", "paper", "mechanics"],
                    help="mechanics: the paper pipeline writing our pipeline's weights instead of solving (needs ours)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM as TorchLlama

    torch.set_num_threads(2)
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, act_order=args.act_order)
    tag = lowbit_solver_swap.run_tag(args)
    tag += "" if args.seed == 0 else f"_seed{args.seed}"
    tag += "_nts" if args.no_true_sequential else ""
    tag += "" if args.ours_scale_dtype == "float16" else f"_ours-{args.ours_scale_dtype}"
    tag += "" if args.scale_dtype == "float32" else f"_paper-{args.scale_dtype}"
    tag += "" if args.layers is None else f"_{args.layers}layers"
    if args.layers is not None and "ours" in args.pipelines:
        ap.error("--layers is for the paper pipeline alone")
    out = args.out or os.path.join(
        os.path.dirname(__file__), "..", "results", "paper_pipeline", f"paper_pipeline_smollm2_{tag}_cpu.json")
    ts = not args.no_true_sequential

    model_dir = fetch_smollm2()
    tok = load_tokenizer(model_dir)
    eval_ids = tokenize(tok, default_eval_text())
    calib = random_windows(
        tokenize(tok, default_calibration_text()), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed
    )
    assert calib.mask.all(), "random_windows masks every token in"

    def jax_ppl(m) -> float:
        return perplexity(m, eval_ids, seqlen=args.seqlen, batch_size=4, max_windows=args.eval_windows).perplexity

    def torch_model():
        m = TorchLlama.from_pretrained(model_dir, torch_dtype=torch.float32)
        m.eval()
        if args.layers is not None:
            m.model.layers = m.model.layers[: args.layers]
        return m

    payload = {
        "benchmark": "paper_pipeline",
        "config": tag,
        "quant": {"bits": args.bits, "group_size": args.group_size, "sym": not args.asym,
                  "act_order": args.act_order, "damp": qc.damp_percent, "block": 128, "true_sequential": ts,
                  "paper_scale_dtype": args.scale_dtype},
        "calibration": {"text": "Python docs (default)", "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "windows": "gptq_jax.core.calibration.random_windows, all-ones masks"},
        "evaluation": {"text": "held-out tail of Python docs", "seqlen": args.seqlen, "windows": args.eval_windows,
                       "by": "gptq_jax.tasks.eval.perplexity on our JAX model"},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "runs": {},
    }  # fmt: skip
    jfloat, _ = load_pretrained(model_dir)
    tfloat = torch_model() if args.layers is None else None
    payload["float"] = {"perplexity_ours": jax_ppl(jfloat)}
    if tfloat is not None:
        payload["float"]["perplexity_torch"] = torch_perplexity(tfloat, eval_ids, args.seqlen, args.eval_windows)
    del tfloat
    print("float:", payload["float"], flush=True)

    ours_h = ours_w = None
    if "ours" in args.pipelines:
        jmodel, _ = load_pretrained(model_dir)
        t0 = time.perf_counter()
        lin, lay, ours_h, ours_w = ours_pipeline(jmodel, calib, qc, true_sequential=ts,
                                                 scale_dtype=args.ours_scale_dtype)
        secs = time.perf_counter() - t0
        run = {"seconds": secs, "linears": lin, "layers": lay, "perplexity": jax_ppl(jmodel)}
        payload["runs"]["ours"] = run
        print(f"ours: perplexity {run.get('perplexity')} ({secs:.0f} s)", flush=True)
        del jmodel
    if "paper" in args.pipelines:
        tmodel = torch_model()
        t0 = time.perf_counter()
        rec = paper_pipeline(tmodel, calib.tokens, qc, true_sequential=ts, scale_dtype=args.scale_dtype,
                             ours_hessians=ours_h, log=lambda s: print(s, flush=True))
        secs = time.perf_counter() - t0
        run = {"seconds": secs, **rec}
        if args.layers is None:
            run["perplexity_torch_eval"] = torch_perplexity(tmodel, eval_ids, args.seqlen, args.eval_windows)
            jmodel, _ = load_pretrained(model_dir)
            write_into_jax(jmodel, tmodel)
            run["perplexity"] = jax_ppl(jmodel)
        payload["runs"]["paper"] = run
        print(f"paper: perplexity {run.get('perplexity')} (torch eval {run.get('perplexity_torch_eval')}, "
              f"{secs:.0f} s)", flush=True)
    if "mechanics" in args.pipelines and ours_w is not None:
        tmodel = torch_model()
        t0 = time.perf_counter()
        rec = paper_pipeline(tmodel, calib.tokens, qc, true_sequential=ts, ours_hessians=ours_h, fixed=ours_w,
                             log=lambda s: print("mechanics:", s, flush=True))
        d = [r["hessian_rel_diff_vs_ours"] for r in rec["linears"].values() if "hessian_rel_diff_vs_ours" in r]
        run = {"seconds": time.perf_counter() - t0, "max_hessian_rel_diff_vs_ours": max(d), **rec}
        if args.layers is None:
            run["perplexity_torch_eval"] = torch_perplexity(tmodel, eval_ids, args.seqlen, args.eval_windows)
        payload["mechanics"] = run
        print(f"mechanics: max Hessian rel. diff {max(d):.3g}, torch perplexity {run.get('perplexity_torch_eval')}",
              flush=True)
    if "ours" in payload["runs"] and "paper" in payload["runs"]:
        o, p = payload["runs"]["ours"], payload["runs"]["paper"]
        r = np.array([o["linears"][n]["objective"] / p["linears"][n]["objective"] for n in p["linears"]])
        payload["objective_ratio_ours_over_paper"] = {"geomean": float(np.exp(np.mean(np.log(r)))),
                                                      "min": float(r.min()), "max": float(r.max())}
        sums = {k: sum(v["objective"] for v in run["linears"].values()) for k, run in payload["runs"].items()}
        payload["objective_sums"] = sums
        if "perplexity" in o and "perplexity" in p:
            payload["perplexity_ratio_ours_over_paper"] = o["perplexity"] / p["perplexity"]
        print({k: payload.get(k) for k in ("objective_ratio_ours_over_paper", "objective_sums",
                                           "perplexity_ratio_ours_over_paper")}, flush=True)
    payload["load"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    provenance.write_result(out, payload, started=started)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
