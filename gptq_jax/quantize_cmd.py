"""``gptq-jax quantize MODEL_DIR OUT_DIR``: GPTQ a Hugging Face checkpoint into a GPTQ checkpoint.

    gptq-jax quantize MODEL_DIR OUT_DIR [--bits 4] [--group-size 128] [--sym|--asym] [--act-order]
        [--static-groups] [--damp 0.01] [--mse] [--nsamples 128] [--seqlen 2048] [--calib FILE]
        [--format gptq|gptq_v2] [--seed 0] [--method gptq|rtn] [--batch-size 8] [--dtype f32]
        [--save-dtype f16] [--overwrite]

Progress: a bar per decoder layer on stderr. Writes OUT_DIR (weights, config with ``quantization_config``,
tokenizer, ``quant_report.json``) in one rename at the end. The unquantized tensors (embeddings, norms, an untied
``lm_head``) are written in ``--save-dtype``, float16 by default, as the PyTorch GPTQ tools publish them and as vLLM's
GPTQ kernels expect (``torch_dtype`` in ``config.json`` says which). Each finished decoder layer is kept in a work
directory beside OUT_DIR (``.OUT_DIR.gptq-work``), so an interrupted run (Ctrl-C, a crash) resumes from the last
finished layer when run again with the same arguments; other arguments are refused. The work directory is removed
once OUT_DIR is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from gptq_jax.cli_common import DTYPES, CommandError, add_model_arguments, check_model_dir, positive_int, probability

logger = logging.getLogger("gptq_jax.cli")


def _group_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a positive integer, got {text!r}") from None
    if v == 0 or v < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (per channel) or a positive integer, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="GPTQ checkpoint directory to write")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="default 4")
    p.add_argument("--group-size", type=_group_size, default=128, help="-1 for per channel (default 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (written as gptq_v2)")
    p.add_argument("--act-order", action="store_true", help="visit columns by descending Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="fix group grids before the solve")
    p.add_argument("--damp", type=probability, default=0.01, help="dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--mse", action="store_true", help="search each grid's range for the lowest error")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: Python's docs, minus the eval tail)")
    p.add_argument("--format", choices=("gptq", "gptq_v2"), help="checkpoint format (default: gptq if --sym)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="rtn: round-to-nearest baseline")
    p.add_argument("--batch-size", type=positive_int, default=8, help="calibration windows per pass (default 8)")
    p.add_argument(
        "--save-dtype",
        choices=sorted(DTYPES),
        default="f16",
        help="dtype of the unquantized tensors in OUT_DIR (embeddings, norms); default f16, as PyTorch tools expect",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")


def _check_options(args: argparse.Namespace) -> None:
    """Options that contradict each other or the output directory, before anything slow starts."""
    if args.static_groups and args.group_size == -1:
        raise CommandError("--static-groups needs a group size: it fixes each group's grid, and -1 has one group")
    if args.format == "gptq" and not args.sym:
        raise CommandError(
            "--format gptq with --asym would lose zero points (v1 stores zero - 1, so 0 overflows); use gptq_v2"
        )
    if args.method == "rtn" and (args.act_order or args.static_groups):
        raise CommandError("--act-order and --static-groups need GPTQ's Hessians; they mean nothing with --method rtn")
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise CommandError(f"OUT_DIR {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CommandError(f"OUT_DIR {out} is not empty (pass --overwrite to replace it)")
    if out.resolve() == args.model_dir.resolve():
        raise CommandError("OUT_DIR must differ from MODEL_DIR")
    if args.calib is not None and not args.calib.is_file():
        raise CommandError(f"calibration text {args.calib} does not exist")


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.gptq-work"


def run(args: argparse.Namespace) -> int:
    check_model_dir(args.model_dir)
    _check_options(args)

    import jax.numpy as jnp

    from gptq_jax import data
    from gptq_jax.calibration import random_windows
    from gptq_jax.checkpoint import save_quantized
    from gptq_jax.config import QuantConfig
    from gptq_jax.models import load_pretrained, load_tokenizer
    from gptq_jax.pipeline import quantize
    from gptq_jax.qlinear import pack_model

    qc = QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        mse=args.mse,
    )
    tok = load_tokenizer(args.model_dir)
    model, config = load_pretrained(args.model_dir, dtype=jnp.dtype(DTYPES[args.dtype]))
    if args.method == "gptq" and args.seqlen > config.max_position_embeddings:
        raise CommandError(f"--seqlen {args.seqlen} exceeds the model's context of {config.max_position_embeddings}")

    calib = None
    work = None
    if args.method == "gptq":
        text = data.load_text(args.calib) if args.calib is not None else data.default_calibration_text()
        ids = data.tokenize(tok, text)
        calib = random_windows(ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        logger.info("calibration: %d windows of %d tokens from %d tokens of text", args.nsamples, args.seqlen, ids.size)
        work = work_dir_for(args.out_dir)
    t0 = time.perf_counter()
    result = quantize(
        model,
        calib,
        quant_config=qc,
        method=args.method,
        batch_size=args.batch_size,
        work_dir=None if work is None else str(work),
        fingerprint_extra=f"{args.model_dir.resolve()}|{args.dtype}",
        progress=True,
    )
    seconds = time.perf_counter() - t0
    pack_model(result.model, result.weights)
    report = result.report.to_json()
    report.update(model=str(args.model_dir), seconds_total=seconds)
    out = save_quantized(
        result.model,
        args.out_dir,
        quant_config=qc,
        checkpoint_format=args.format,
        float_dtype=jnp.dtype(DTYPES[args.save_dtype]),
        tokenizer_dir=args.model_dir,
        overwrite=args.overwrite,
        extra_files={"quant_report.json": json.dumps(report, indent=1)},
    )
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    _summary(result.report, out, seconds)
    return 0


def _summary(report, out: str, seconds: float) -> None:
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.suffix == ".safetensors")
    lines = [f"{'layer':>5}  {'rel. output error':>17}  {'seconds':>8}"]
    lines += [f"{r['layer']:>5}  {r['relative_output_error']:>17.3e}  {r['seconds']:>8.1f}" for r in report.layers]
    fb = report.fallbacks
    lines.append(
        f"quantized {len(report.linears)} linears ({report.method}, {report.quant_config['bits']}-bit, group "
        f"{report.quant_config['group_size']}) in {seconds:.1f} s"
        + (f", resumed after {report.resumed_layers} layers" if report.resumed_layers else "")
        + (f"; {len(fb)} fell back to round-to-nearest: {', '.join(fb)}" if fb else "")
    )
    lines.append(f"wrote {out} ({size / 2**20:.1f} MiB of weights)")
    print("\n".join(lines))
