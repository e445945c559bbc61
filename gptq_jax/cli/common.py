"""What every `gptq-jax` subcommand shares: argument types, the MODEL_DIR arguments, and ``CommandError``.

Its own module so that command modules (``quantize_cmd``) and ``cli`` both import it, and neither imports the other
at module level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class CommandError(Exception):
    """Bad input found by a command; the message is shown on one line, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a command; its message says what was kept and how to go on."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL_DIR and --dtype, as every command that loads a model takes them."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="f32", help="dtype of the weights and activations (default f32)"
    )


def check_model_dir(path: Path) -> Path:
    """Fail fast, before JAX starts, on a path that cannot be a checkpoint directory."""
    if not path.exists():
        if path.is_symlink():
            raise CommandError(f"model directory {path} is a symlink that leads nowhere (a loop or a missing target)")
        raise CommandError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CommandError(f"{path} is not a directory (expected a Hugging Face checkpoint directory)")
    if not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a model directory: it has no config.json")
    return path


def check_model_config(path: Path) -> None:
    """config.json (and a GPTQ checkpoint's quantization config) checked field by field before anything reads it:
    transformers reads config.json too when it loads the tokenizer, and fails on a bad field with a traceback."""
    from gptq_jax.models import ModelConfig

    ModelConfig.from_json(path)
    if is_quantized(path):
        from gptq_jax.io.checkpoint import read_quantization_config

        read_quantization_config(path)


def is_quantized(path: Path) -> bool:
    """Whether a checkpoint directory holds a GPTQ model (``quantization_config`` or ``quantize_config.json``)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # the loader reports what is wrong with it
    return isinstance(config, dict) and "quantization_config" in config or (path / "quantize_config.json").is_file()
