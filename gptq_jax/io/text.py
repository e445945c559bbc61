"""Text for evaluation and calibration.

The default corpus is Python's own documentation (`pydoc_data.topics`), which ships with every
CPython install: real English prose with code, available offline, the same on every machine.
(The GPTQ paper uses WikiText-2 and C4; we cannot download those here.)

    text = load_text()                        # or load_text("my.txt")
    calib, held_out = split_text(text, 0.1)   # deterministic: the last 10% is held out
    tokens = tokenize(tokenizer, held_out)    # int32 [N], one long stream

By convention the default text's last `HELD_OUT_FRACTION` is for evaluation (`default_eval_text()`, what
`gptq-jax eval` uses without `--text`) and the rest for calibration, so the two never overlap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def default_text() -> str:
    """Python's bundled documentation topics, joined in sorted-key order (about 0.8 MB of text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


# The share of the default text kept out of calibration and used for evaluation (about 11k SmolLM2 tokens).
HELD_OUT_FRACTION = 0.1


def default_eval_text() -> str:
    """The held-out tail of `default_text()`: `split_text(default_text(), HELD_OUT_FRACTION)[1]`."""
    return split_text(default_text(), HELD_OUT_FRACTION)[1]


def default_calibration_text() -> str:
    """The rest of `default_text()`, disjoint from `default_eval_text()`."""
    return split_text(default_text(), HELD_OUT_FRACTION)[0]


def load_text(path: str | os.PathLike | None = None) -> str:
    """The UTF-8 text of the file at `path`, or `default_text()` when `path` is None."""
    if path is None:
        return default_text()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"text file {path} is a directory; expected a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8: {e}") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def split_text(text: str, held_out_fraction: float) -> tuple[str, str]:
    """Split `text` into (head, tail) with the tail holding about `held_out_fraction` of the characters.

    The cut is moved back to the nearest preceding paragraph break (or line break) so that no
    document is cut mid-sentence when one is near; deterministic, no randomness.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction} must be in (0, 1)")
    cut = int(len(text) * (1.0 - held_out_fraction))
    # Look back at most 10% of the tail's length for a natural boundary.
    window_start = max(0, cut - max(1, (len(text) - cut) // 10))
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, window_start, cut)
        if at > 0:
            cut = at + len(sep)
            break
    return text[:cut], text[cut:]


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """`text` as one long int32 token stream `[N]`, without special tokens.

    `tokenizer` is a Hugging Face tokenizer. The whole text is encoded at once, as in the GPTQ
    paper's evaluation (so window boundaries later fall anywhere, not at document starts).
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def check_token_ids(ids: np.ndarray, vocab_size: int | None, *, source: str = "the tokenizer") -> np.ndarray:
    """Raise ``ValueError`` if any id of ``ids`` is outside ``[0, vocab_size)``: an embedding lookup past the table
    gives NaN or garbage silently (NaN perplexity, empty text, a NaN Hessian blamed on the weights)."""
    ids = np.asarray(ids)
    if vocab_size is None or ids.size == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"{source} produced token id {bad}, outside the model's vocabulary of {vocab_size} (config.json "
            "vocab_size): the tokenizer does not belong to this model"
        )
    return ids
