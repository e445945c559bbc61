"""The `gptq-jax` command line.

    gptq-jax eval MODEL_DIR [--text FILE] [--seqlen N] [--batch-size N] [--max-windows N] [--dtype D] [--json]
    gptq-jax generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
                               [--chat] [--dtype D] [--json]
    gptq-jax convert-gguf FILE OUT_DIR [--overwrite]
    gptq-jax quantize MODEL_DIR OUT_DIR [--bits 4] [--group-size 128] [--sym|--asym] [--act-order] ...
                               (see gptq_jax/cli/quantize_cmd.py)

`eval` and `generate` take float checkpoints and GPTQ checkpoints alike.

D is f32 (default), bf16 or f16. Results go to stdout (with `--json`, exactly one JSON object); logs and progress
bars go to stderr. Bad input ends with a one-line `gptq-jax <command>: error: ...` on stderr and exit status 2 (bad
options) or 1 (bad files, failed work); Ctrl-C ends with 130 and SIGTERM with 143, after one line saying what was
kept. `-v` (before or after the command) shows debug logs and the traceback. docs/failures.md lists
what happens on each fault.

To add a subcommand, write `add_arguments(parser)` and `run(args) -> int` and append a `Command` to `COMMANDS`;
reuse `add_model_arguments` / `load_model` for a MODEL_DIR and `--dtype`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from gptq_jax.cli.common import (  # noqa: F401  (re-exported: commands and tests use them as cli.*)
    DTYPES,
    CommandError,
    add_model_arguments,
    check_model_config,
    check_model_dir,
    is_quantized,
    non_negative_float,
    positive_int,
    probability,
)

logger = logging.getLogger("gptq_jax.cli")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers (argument types and MODEL_DIR checks live in cli_common)


def load_model(args: argparse.Namespace, *, tokenizer: bool = True) -> tuple[Any, Any, Any]:
    """`(model, config, tokenizer or None)` for `args.model_dir` in `args.dtype`."""
    import jax.numpy as jnp

    from gptq_jax.models import load_pretrained, load_tokenizer

    path = check_model_dir(args.model_dir)
    check_model_config(path)
    tok = load_tokenizer(path) if tokenizer else None
    logger.info("loading %s (%s)", path, args.dtype)
    if is_quantized(path):  # a GPTQ checkpoint: ours from `quantize`, or one written by the PyTorch tools
        from gptq_jax.io.checkpoint import load_quantized

        model, config = load_quantized(path, dtype=jnp.dtype(DTYPES[args.dtype]))
    else:
        model, config = load_pretrained(path, dtype=jnp.dtype(DTYPES[args.dtype]))
    return model, config, tok


def _strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: JSON has no NaN (``json.dumps`` writes a bare
    ``NaN`` token that strict parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def print_json(obj: dict[str, Any]) -> None:
    """One strict JSON object on stdout (non-finite numbers as null)."""
    sys.stdout.write(json.dumps(_strict(obj), sort_keys=True, allow_nan=False) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------------
# eval


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--text", type=Path, help="UTF-8 text file to evaluate on (default: the held-out tail of Python's docs)"
    )
    p.add_argument("--seqlen", type=positive_int, default=2048, help="window length (default 2048, the paper's)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=positive_int, help="evaluate only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _eval_run(args: argparse.Namespace) -> int:
    from gptq_jax.io import text as data
    from gptq_jax.tasks.eval import perplexity

    check_model_dir(args.model_dir)
    if args.seqlen < 2:
        raise CommandError(f"--seqlen {args.seqlen} must be at least 2")
    text = data.load_text(args.text) if args.text is not None else data.default_eval_text()
    model, _, tok = load_model(args)
    tokens = data.tokenize(tok, text)
    logger.info("%d tokens of text", len(tokens))
    result = perplexity(
        model, tokens, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, progress=None
    )
    report = {
        "model": str(args.model_dir),
        "text": str(args.text) if args.text is not None else "default (held-out Python docs)",
        "dtype": args.dtype,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": result.windows,
        "seqlen": result.seqlen,
        "batch_size": args.batch_size,
        "seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
    }
    if args.json:
        print_json(report)
    else:
        print(
            f"perplexity {result.perplexity:.4f} (nll {result.nll:.4f}) over {result.windows} windows of "
            f"{result.seqlen} tokens ({result.tokens} tokens, {result.seconds:.1f} s, "
            f"{result.tokens_per_second:.0f} tokens/s)"
        )
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# generate


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="default 128")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the text")


def _generate_run(args: argparse.Namespace) -> int:
    from gptq_jax.tasks.generate import generate

    check_model_dir(args.model_dir)
    if not args.prompt:
        raise CommandError("--prompt is empty")
    model, _, tok = load_model(args)
    result = generate(
        model,
        tok,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    stats = {
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.tokens),
        "stop_reason": result.stop_reason,
        "prefill_tokens_per_second": result.prefill_tokens_per_second,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "compile_seconds": result.compile_seconds,
    }
    if args.json:
        print_json({"text": result.text, "tokens": result.tokens.tolist(), **stats})
    else:
        print(result.text)
        print(
            f"[{result.prompt_tokens} prompt tokens, {len(result.tokens)} new ({result.stop_reason}); "
            f"prefill {result.prefill_tokens_per_second:.1f} tokens/s, "
            f"decode {result.decode_tokens_per_second:.1f} tokens/s; compile {result.compile_seconds:.1f} s]",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# convert-gguf


def _convert_gguf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", type=Path, help="a Llama-architecture .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="HF checkpoint directory to write (float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")


def _convert_gguf_run(args: argparse.Namespace) -> int:
    from gptq_jax.io.gguf import check_out_dir, convert_gguf

    if not args.file.is_file():
        raise CommandError(f"GGUF file {args.file} does not exist")
    check_out_dir(args.out_dir, gguf_path=args.file, overwrite=args.overwrite, option="--overwrite")  # before the work
    report = convert_gguf(args.file, args.out_dir, overwrite=args.overwrite, overwrite_option="--overwrite")
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.quant_types.items()))
    print(
        f"wrote {report.out_dir}: {report.num_tensors} tensors, {report.num_parameters:,} parameters "
        f"(from {types}), tokenizer {'yes' if report.tokenizer else 'no'}"
    )
    return 0


def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    from gptq_jax.cli import quantize_cmd  # its own module: it is the largest command

    quantize_cmd.add_arguments(p)


def _quantize_run(args: argparse.Namespace) -> int:
    from gptq_jax.cli import quantize_cmd

    return quantize_cmd.run(args)


COMMANDS: list[Command] = [
    Command("quantize", "GPTQ-quantize a checkpoint into a GPTQ checkpoint", _quantize_arguments, _quantize_run),
    Command("eval", "perplexity of a model on a text (GPTQ protocol)", _eval_arguments, _eval_run),
    Command("generate", "generate text from a prompt", _generate_arguments, _generate_run),
    Command("convert-gguf", "convert a Llama GGUF file to a float32 HF checkpoint", _convert_gguf_arguments,
            _convert_gguf_run),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# main


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptq-jax", description="GPTQ post-training quantization for JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        # -v also after the subcommand; SUPPRESS keeps a -v given before it from being reset to False here.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("gptq_jax")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default `sys.argv[1:]`); returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local directories: never reach for the Hub
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line usage error already printed
        return int(e.code or 0)
    _setup_logging(args.verbose)
    prog = f"{parser.prog} {args.command}"
    terminated = []

    def on_sigterm(signum, frame):  # a killed job (SIGTERM) stops as cleanly as Ctrl-C: temporary files go
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = _install_sigterm(on_sigterm)
    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{prog}: {what}" + (f"; {_one_line(e)}" if str(e) else ""), file=sys.stderr)
        return 143 if terminated else 130
    except (CommandError, ValueError, OSError) as e:  # bad input: files, options, checkpoints
        if args.verbose:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        _install_sigterm(previous)


def _install_sigterm(handler: Any) -> Any:
    """Set the SIGTERM handler (only the main thread may); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)

