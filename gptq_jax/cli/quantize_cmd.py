"""``gptq-jax quantize MODEL_DIR OUT_DIR``: GPTQ a Hugging Face checkpoint into a GPTQ checkpoint.

    gptq-jax quantize MODEL_DIR OUT_DIR [--bits 4] [--group-size 128] [--sym|--asym] [--act-order]
        [--act-group-aware] [--static-groups] [--damp 0.01] [--mse] [--nsamples 128] [--seqlen 2048] [--calib FILE]
        [--format gptq|gptq_v2] [--seed 0] [--method gptq|gptaq|qronos|rtn] [--gptaq-alpha 0.25] [--batch-size 1]
        [--dtype f32] [--save-dtype f16] [--overwrite] [--stall-timeout 3600]

Progress: a bar per decoder layer on stderr. Writes OUT_DIR (weights, config with ``quantization_config``, tokenizer,
``quant_report.json``) in one rename at the end. ``--overwrite`` replaces only an earlier output of gptq-jax (a
directory holding ``checkpoint_dir.OWNER_MARK``), and OUT_DIR may neither contain nor lie inside MODEL_DIR or the
calibration file; one run at a time holds OUT_DIR's lock. The unquantized tensors (embeddings, norms, an untied
``lm_head``) are written in ``--save-dtype``, float16 by default, as the PyTorch GPTQ tools publish them and as vLLM's
GPTQ kernels expect (``torch_dtype`` in ``config.json`` says which). Each finished decoder layer is kept in a work
directory beside OUT_DIR (``.OUT_DIR.gptq-work``), so an interrupted run (Ctrl-C, a crash) resumes from the last
finished layer when run again with the same arguments and model files (their sizes and modification times are
part of the job's fingerprint); other arguments are refused. The work directory is removed once OUT_DIR is written,
and what a killed run left beside OUT_DIR (a half-written ``.OUT_DIR.partial-*``) is removed by the next run. A step
that makes no progress for ``--stall-timeout`` seconds ends the run with exit status 3 and a line naming the step
(``cli.watchdog``); the finished layers stay in the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from gptq_jax.cli.common import (
    DTYPES,
    CommandError,
    Interrupted,
    add_model_arguments,
    check_model_config,
    check_model_dir,
    positive_int,
    probability,
)
from gptq_jax.cli.watchdog import EXIT_STALLED, Watchdog
from gptq_jax.engine.multihost import add_distributed_args

logger = logging.getLogger("gptq_jax.cli")
# Seconds a step may go without progress before the run ends (--stall-timeout). A step is one stage's solve plus
# the next stage's calibration pass; on a GPU that is seconds to minutes even for 70B-parameter layers, and a
# SmolLM2 layer takes about 15 s on a 2-core CPU. An hour leaves room for large models on slow machines.
DEFAULT_STALL_TIMEOUT = 3600.0


def _group_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a positive integer, got {text!r}") from None
    if v == 0 or v < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (per channel) or a positive integer, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0: no watchdog), got {text}")
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
    p.add_argument(
        "--act-group-aware",
        action="store_true",
        help="visit whole groups by their largest Hessian diagonal (GPTQModel's default); keeps g_idx trivial",
    )
    p.add_argument("--static-groups", action="store_true", help="fix group grids before the solve")
    p.add_argument("--damp", type=probability, default=0.01, help="dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--mse", action="store_true", help="search each grid's range for the lowest error")
    p.add_argument("--fp32-scales", action="store_true",
                   help="fit float32 scales that only the file rounds to float16 (the paper's code); by default each "
                        "scale is rounded to float16 when fitted")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: Python's docs, minus the eval tail)")
    p.add_argument("--format", choices=("gptq", "gptq_v2"), help="checkpoint format (default: gptq if --sym)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--method", choices=("gptq", "gptaq", "qronos", "rtn"), default="gptq",
                   help="gptaq/qronos: fit each layer to the float model's outputs (docs/methods.md); "
                        "rtn: round-to-nearest baseline")
    p.add_argument("--gptaq-alpha", type=probability, default=0.25,
                   help="GPTAQ's scale of the float/quantized cross term, in (0, 1] (default 0.25)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="calibration windows per pass (default: the mesh's data axis; 1 on one device)")
    p.add_argument(
        "--save-dtype",
        choices=sorted(DTYPES),
        default="f16",
        help="dtype of the unquantized tensors in OUT_DIR (embeddings, norms); default f16, as PyTorch tools expect",
    )
    add_distributed_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--stall-timeout", type=_seconds, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help=f"end the run (exit {EXIT_STALLED}, finished layers kept) when a step makes no progress for "
                        f"this long (default {DEFAULT_STALL_TIMEOUT:.0f}; 0: wait forever)")


def _check_options(args: argparse.Namespace) -> None:
    """Options that contradict each other or the output directory, before anything slow starts."""
    if args.static_groups and args.group_size == -1:
        raise CommandError("--static-groups needs a group size: it fixes each group's grid, and -1 has one group")
    if args.act_group_aware and args.act_order:
        raise CommandError("--act-group-aware and --act-order exclude each other: choose one column order")
    if args.act_group_aware and args.group_size == -1:
        raise CommandError("--act-group-aware reorders whole groups; it needs a group size, and -1 has one group")
    if args.format == "gptq" and not args.sym:
        raise CommandError(
            "--format gptq with --asym would lose zero points (v1 stores zero - 1, so 0 overflows); use gptq_v2"
        )
    if args.method == "rtn" and (args.act_order or args.static_groups or args.act_group_aware):
        raise CommandError(
            "--act-order, --act-group-aware and --static-groups need GPTQ's Hessians; they mean nothing with "
            "--method rtn"
        )
    if args.calib is not None:
        if args.calib.is_dir():
            raise CommandError(f"--calib {args.calib} is a directory; expected a UTF-8 text file")
        if not args.calib.is_file():
            raise CommandError(f"calibration text {args.calib} does not exist")
    from gptq_jax.models.checkpoint_dir import CheckpointDirError, check_out_dir

    inputs = {"MODEL_DIR": args.model_dir, **({"--calib": args.calib} if args.calib is not None else {})}
    try:
        check_out_dir(args.out_dir, inputs=inputs, overwrite=args.overwrite)
    except CheckpointDirError as e:
        raise CommandError(str(e)) from None
    _check_writable(args.out_dir)


def _check_writable(out: Path) -> None:
    """OUT_DIR, its work directory and its temporary copy are made in OUT_DIR's parent (created if missing): try
    a file there now, before any slow work."""
    from gptq_jax.models.checkpoint_dir import CheckpointDirError, resolve_path

    try:
        parent = resolve_path(out, "OUT_DIR").parent
    except CheckpointDirError as e:
        raise CommandError(str(e)) from None
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"cannot create OUT_DIR {out}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CommandError(f"cannot write OUT_DIR {out}: {existing} is not writable ({e.strerror or e})") from None


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.gptq-work"


def _weights_signature(model_dir: Path) -> str:
    """What the resume fingerprint knows of the model files: each weight file's name, size and modification time,
    and config.json's. Replacing a file (or editing it in place) changes its mtime, so old work is not reused."""
    from gptq_jax.models.checkpoint_dir import weight_files

    files = [*weight_files(model_dir), str(model_dir / "config.json")]
    return ";".join(f"{os.path.basename(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)


def _clean_leftovers(out: Path) -> None:
    """Remove what a killed run of ours left beside OUT_DIR: a half-written ``.OUT.partial-{pid}-*`` and, had the
    kill come between the two renames of an overwrite, put the previous output ``OUT.old-{pid}`` back."""
    from gptq_jax.engine.resume import pid_alive, remove_leftovers
    from gptq_jax.models.checkpoint_dir import OLD_SUFFIX, partial_prefix

    parent = out.resolve().parent
    if not parent.is_dir():
        return
    for path in remove_leftovers(str(parent), re.escape(partial_prefix(out)) + r"(?P<pid>\d+)-.*"):
        logger.info("removed %s, left by a run that was killed while saving", path)
    pattern = re.escape(out.name + OLD_SUFFIX) + r"(?P<pid>\d+)"
    for old in sorted(parent.iterdir()):
        m = re.fullmatch(pattern, old.name)
        if m is None or pid_alive(int(m.group("pid"))):
            continue
        if not out.exists():
            old.rename(out)
            logger.warning("restored %s from %s, left by a run that was killed while replacing it", out, old)
        else:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed %s, left by a run that was killed while replacing OUT_DIR", old)


def _finished_layers(work: Path | None) -> int:
    return len(list(work.glob("layer-*.json"))) if work is not None and work.is_dir() else 0


def _lock(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """OUT_DIR's lock, held by process 0 only: the other processes of a multi-host run are the same job (they find
    process 0's lock on a shared disk, and a pid of another host means nothing here)."""
    from gptq_jax.models.checkpoint_dir import hold_lock

    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID") or 0
    return hold_lock(args.out_dir) if int(pid) == 0 else contextlib.nullcontext()


def run(args: argparse.Namespace) -> int:
    check_model_dir(args.model_dir)
    _check_writable(args.out_dir)  # the lock file goes beside OUT_DIR
    with _lock(args):  # before anything is cleaned or written: a second run into OUT_DIR stops here
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    _clean_leftovers(args.out_dir)  # first: it may put back a previous OUT_DIR, which the checks must then see
    _check_options(args)
    work = work_dir_for(args.out_dir) if args.method != "rtn" else None
    try:
        return _run(args, work)
    except KeyboardInterrupt:
        n = _finished_layers(work)
        if n:
            raise Interrupted(
                f"{n} finished layer(s) are kept in {work}; run the same command again to resume after them"
            ) from None
        if work is None:
            raise Interrupted("nothing was kept (--method rtn keeps no work directory)") from None
        raise Interrupted("no layer had finished; nothing was kept") from None
    except OSError as e:  # a full disk, in the work directory or in the final save: OUT_DIR is untouched either way
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        n = _finished_layers(work)
        then = (
            f"the {n} finished layer(s) are kept in {work}: free some space and run the same command again to resume"
            if n
            else "free some space and run the command again"
        )
        where = f" ({e.filename})" if e.filename else ""
        raise CommandError(f"{e.strerror or e}{where}; OUT_DIR was not written; {then}") from None
    finally:
        if work is not None and work.is_dir() and not _finished_layers(work):  # keep nothing that holds nothing
            from gptq_jax.engine.resume import remove_store

            remove_store(str(work))


def _mesh_and_batch(args: argparse.Namespace) -> tuple[object, int]:
    """Start the other processes' collectives if asked (several hosts), then the mesh: ``--mesh``, or all devices
    on the data axis when there is more than one; the batch defaults to the data axis."""
    import jax

    from gptq_jax.engine.multihost import initialize_from_args
    from gptq_jax.engine.sharding import make_mesh, mesh_shape

    initialize_from_args(args)
    if args.mesh is None and len(jax.devices()) == 1:
        return None, args.batch_size or 1
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise CommandError(f"--mesh: {e}") from None
    data = mesh_shape(mesh).get("data", 1)
    batch = args.batch_size or data
    if batch % data:
        raise CommandError(f"--batch-size {batch} does not split over the mesh's data axis of {data} devices; "
                           f"use a multiple of {data}")
    if args.method != "rtn" and args.nsamples % batch:
        logger.info("the last calibration batch has %d windows", args.nsamples % batch)
        if (args.nsamples % batch) % data:
            raise CommandError(f"--nsamples {args.nsamples} leaves a last batch of {args.nsamples % batch} windows, "
                               f"which does not split over the data axis of {data}; use a multiple of {batch}")
    return mesh, batch


def _run(args: argparse.Namespace, work: Path | None) -> int:
    import jax

    qc = _quant_config(args)
    mesh, batch_size = _mesh_and_batch(args)
    model, config, load, tok = _open_model(args, work)
    calib = _calibration(args, tok, config, batch_size)
    t0 = time.perf_counter()
    result = _quantize_with_progress(args, model, calib, qc, mesh=mesh, batch_size=batch_size, work=work, load=load)
    seconds = time.perf_counter() - t0
    if jax.process_index() != 0:  # process 0 writes OUT_DIR; the others keep their work until it is written
        _after_save_of_process_0(work)
        return 0
    out = _save(args, result, qc, streamed=load is not None, seconds=seconds)
    _after_save_of_process_0(work)
    _summary(result.report, out, seconds)
    return 0


def _quant_config(args: argparse.Namespace):
    from gptq_jax.core.config import QuantConfig

    return QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        act_group_aware=args.act_group_aware,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        mse=args.mse,
        fp16_scales=not args.fp32_scales,
    )


def _open_model(args: argparse.Namespace, work: Path | None):
    """(model, config, load, tokenizer). GPTQ (with a work directory) streams: the model comes abstract, and
    ``load`` reads one decoder layer at a time, finished ones going to the work directory; otherwise the model is
    loaded whole and ``load`` is None."""
    import jax.numpy as jnp

    from gptq_jax.models import load_pretrained, load_tokenizer, open_pretrained

    check_model_config(args.model_dir)  # before transformers reads config.json for the tokenizer
    tok = load_tokenizer(args.model_dir)
    dtype = jnp.dtype(DTYPES[args.dtype])
    load = None
    if work is not None:
        model, config, load = open_pretrained(args.model_dir, dtype=dtype, check_values=True)
    else:
        model, config = load_pretrained(args.model_dir, dtype=dtype)
    if args.method != "rtn" and args.seqlen > config.max_position_embeddings:
        raise CommandError(f"--seqlen {args.seqlen} exceeds the model's context of {config.max_position_embeddings}")
    return model, config, load, tok


def _calibration(args: argparse.Namespace, tok, config, batch_size: int):
    """The calibration windows, int32 ``[nsamples, seqlen]``, from ``--calib`` or the default text."""
    import numpy as np

    from gptq_jax.core.calibration import random_windows
    from gptq_jax.io import text as data

    if args.method == "rtn":  # round-to-nearest reads no data: short windows only show the engine the model's matmuls
        return np.zeros((batch_size, 8), np.int32)
    text = data.load_text(args.calib) if args.calib is not None else data.default_calibration_text()
    ids = data.check_token_ids(data.tokenize(tok, text), config.vocab_size, source="the calibration text's tokens")
    calib = random_windows(ids, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    logger.info("calibration: %d windows of %d tokens from %d tokens of text", args.nsamples, args.seqlen, ids.size)
    return calib


def _quantize_with_progress(args: argparse.Namespace, model, calib, qc, *, mesh, batch_size: int,
                            work: Path | None, load):
    """``quantize`` under a progress bar over layers and the stall watchdog (``--stall-timeout``)."""
    from gptq_jax.engine.driver import quantize

    def advice() -> str:
        n = _finished_layers(work)
        return (f"{n} finished layer(s) are kept in {work}; run the same command again to resume after them" if n
                else "no layer had finished; nothing was kept")

    with _LayerBar(len(model.layers), f"{args.method} {args.bits}-bit") as bar, \
            Watchdog(args.stall_timeout, advice) as dog:

        def progress(name: str) -> None:
            dog.progress(name)
            bar.linear(name)

        result = quantize(
            model,
            calib,
            quant_config=qc,
            method=args.method, gptaq_alpha=args.gptaq_alpha,
            batch_size=batch_size,
            mesh=mesh,
            work_dir=None if work is None else str(work),
            fingerprint_extra=f"{args.model_dir.resolve()}|{args.dtype}|{_weights_signature(args.model_dir)}",
            progress=progress,
            load=load,
        )
        bar.done()
    return result


def _save(args: argparse.Namespace, result, qc, *, streamed: bool, seconds: float) -> Path:
    """OUT_DIR, with the run's report as ``quant_report.json``. A streamed run's model holds float weights and
    ``result.weights`` the quantized ones; otherwise the model's linears are packed in place first."""
    import jax.numpy as jnp

    from gptq_jax.io.checkpoint import save_quantized
    from gptq_jax.models.qlinear import pack_model

    if not streamed:
        pack_model(result.model, result.weights)
    report = result.report.to_json()
    report.update(model=str(args.model_dir), seconds_total=seconds)
    return save_quantized(
        result.model,
        args.out_dir,
        quant_config=qc,
        checkpoint_format=args.format,
        float_dtype=jnp.dtype(DTYPES[args.save_dtype]),
        tokenizer_dir=args.model_dir,
        overwrite=args.overwrite,
        extra_files={"quant_report.json": json.dumps(report, indent=1)},
        weights=result.weights if streamed else None,
    )


def _after_save_of_process_0(work: Path | None) -> None:
    """Once OUT_DIR is written (every process waits for process 0 to get there), drop this process's finished
    blocks. If process 0 fails to save, the others never pass the barrier and keep theirs for a rerun."""
    import jax

    from gptq_jax.engine.resume import remove_store
    from gptq_jax.engine.workdir import process_work_dir

    if jax.process_count() == 1:
        if work is not None:
            remove_store(str(work))
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("gptq-jax: OUT_DIR written")
    if work is not None and jax.process_index() != 0:
        remove_store(process_work_dir(str(work)))  # inside process 0's directory when they share a disk
    multihost_utils.sync_global_devices("gptq-jax: work removed")
    if work is not None and jax.process_index() == 0:
        remove_store(str(work))


class _LayerBar:
    """A progress bar over decoder layers, fed by ``quantize``'s per-linear status lines: a line for layer ``i``
    means layers ``0..i-1`` are finished. So a resumed run's bar starts at the layers it skipped and ends at the
    total, instead of counting only the layers it computed."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="layer")

    def linear(self, name: str) -> None:
        m = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
        if m is not None and int(m.group(1)) > self.bar.n:
            self.bar.update(int(m.group(1)) - self.bar.n)
        self.bar.set_postfix_str(name, refresh=True)

    def done(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)

    def __enter__(self) -> _LayerBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _summary(report, out: str, seconds: float) -> None:
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.suffix == ".safetensors")
    lines = [f"{'layer':>5}  {'rel. output error':>17}  {'seconds':>8}"]
    err = lambda e: "-" if e is None else f"{e:.3e}"  # noqa: E731 - no error is measured for RTN
    lines += [f"{r['layer']:>5}  {err(r['relative_output_error']):>17}  {r['seconds']:>8.1f}" for r in report.layers]
    fb = report.fallbacks
    lines.append(
        f"quantized {len(report.linears)} linears ({report.method}, {report.quant_config['bits']}-bit, group "
        f"{report.quant_config['group_size']}) in {seconds:.1f} s"
        + (f", resumed after {report.resumed_layers} layers" if report.resumed_layers else "")
        + (f"; {len(fb)} fell back to round-to-nearest: {', '.join(fb)}" if fb else "")
    )
    lines.append(f"wrote {out} ({size / 2**20:.1f} MiB of weights)")
    print("\n".join(lines))
