"""Calibration batches: token windows with their masks.

The paper's recipe is 128 random windows of 2048 tokens from one long text (GPTQ, Sec. 5 "Calibration
data"). ``Calibration`` holds them as ``tokens`` int32 ``[S, T]`` and ``mask`` int32 ``[S, T]`` (1 for real
tokens, 0 for right padding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``tokens`` int32 ``[S, T]`` and ``mask`` int32 ``[S, T]`` (1 real, 0 padding on the right)."""

    tokens: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape != self.mask.shape:
            raise ValueError(
                f"calibration tokens {self.tokens.shape} and mask {self.mask.shape} must both be [samples, seqlen]"
            )
        if self.tokens.shape[0] == 0 or self.tokens.shape[1] == 0:
            raise ValueError(f"calibration set is empty: tokens shape {self.tokens.shape}")
        if not np.all(self.mask.sum(axis=1) > 0):
            raise ValueError("every calibration sample needs at least one real (unmasked) token")

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @classmethod
    def from_tokens(cls, tokens: Any, mask: Any | None = None) -> Calibration:
        """From an int array ``[S, T]`` (or ``[T]``, one sample) and an optional mask of the same shape."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"calibration tokens must be integers, got dtype {tokens.dtype}")
        mask = np.ones_like(tokens, np.int32) if mask is None else np.asarray(mask).reshape(tokens.shape)
        return cls(tokens.astype(np.int32), (mask != 0).astype(np.int32))


def random_windows(token_ids: Sequence[int] | np.ndarray, *, nsamples: int, seqlen: int, seed: int = 0) -> Calibration:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets of one long token stream (the paper's recipe).

    Raises ``ValueError`` when the stream is shorter than one window. When it holds fewer than ``nsamples * seqlen``
    tokens the windows overlap (the paper samples from corpora far larger than that); a warning says so.
    """
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples={nsamples} and seqlen={seqlen} must be positive")
    if ids.size < seqlen:
        raise ValueError(
            f"calibration text has {ids.size} tokens, fewer than one window of seqlen={seqlen}: "
            "pass more text (--calib FILE) or shorter windows (--seqlen)"
        )
    if ids.size < nsamples * seqlen:
        log.warning(
            "calibration text has %d tokens, fewer than %d windows x %d tokens = %d: the windows overlap",
            ids.size,
            nsamples,
            seqlen,
            nsamples * seqlen,
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seqlen + 1, size=nsamples)
    tokens = np.stack([ids[s : s + seqlen] for s in starts])  # (S, T)
    return Calibration(tokens, np.ones_like(tokens, np.int32))


def from_texts(texts: Sequence[str], tokenizer: Any, *, seqlen: int) -> Calibration:
    """One sample per string, truncated to ``seqlen`` tokens and right-padded, with its mask."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[:seqlen] for t in texts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"calibration texts {empty[:5]} tokenize to nothing")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return Calibration(tokens, mask)
