"""Perplexity, by the GPTQ paper's protocol (Frantar et al. 2022, Sec. 5; their `datautils` / `llama_eval`).

The whole text is tokenized once into one stream; the stream is cut into non-overlapping windows of `seqlen` tokens
(the trailing partial window is dropped); each window is run on its own, with no context carried over, and every
position but the first predicts its next token. Perplexity is `exp` of the mean negative log-likelihood over all
those predictions. (All windows have the same length, so this equals the paper's mean of per-window means.)

    result = perplexity(model, tokens, seqlen=2048, batch_size=1)
    result.perplexity, result.nll, result.tokens, result.windows, result.seqlen, result.seconds
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.io.text import check_token_ids

logger = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048  # the GPTQ paper's evaluation length


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood, nats
    tokens: int  # tokens evaluated: windows * seqlen (each window makes seqlen - 1 predictions)
    windows: int
    seqlen: int  # the window length actually used (after capping at the model's context)
    seconds: float  # wall time of the evaluation, compilation included

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def window_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL of each window: `logits (B, T, V)`, `tokens (B, T)` -> `(B,)` float32."""
    logits = logits[:, :-1].astype(jnp.float32)  # (B, T-1, V): position t predicts token t+1
    targets = tokens[:, 1:]  # (B, T-1)
    logz = jax.nn.logsumexp(logits, axis=-1)  # (B, T-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T-1)
    return jnp.sum(logz - picked, axis=-1)  # (B,)


def _module_nll(graphdef: Any, state: Any, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    if hasattr(model, "hidden_states") and hasattr(model, "token_nll"):
        # The head in tiles (LlamaForCausalLM.token_nll): same sums, without the (B, T, V) logits.
        h, _ = model.hidden_states(tokens)  # (B, T, D)
        B, T, D = h.shape
        nll = model.token_nll(h[:, :-1].reshape(B * (T - 1), D), tokens[:, 1:].reshape(B * (T - 1)))
        return jnp.sum(nll.reshape(B, T - 1), axis=-1)  # (B,)
    logits, _ = model(tokens)  # (B, T, V)
    return window_nll(logits, tokens)


# graphdef is static and hashable: repeated evaluations of models of the same structure reuse the compilation.
_module_nll_jit = jax.jit(_module_nll, static_argnums=0)


def make_nll_fn(model: Any) -> Callable[[jax.Array], jax.Array]:
    """A jitted `tokens (B, T) int32 -> (B,)` summed NLL per window for `model`.

    `model` is called as `model(tokens) -> (logits, cache)` (the `LlamaForCausalLM` signature). An NNX module is split
    into graph and state so its weights are arguments of the compiled function rather than baked-in constants; any
    other callable is traced as it is.
    """
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return lambda tokens: _module_nll_jit(graphdef, state, tokens)

    @jax.jit
    def nll_plain(tokens):
        logits, _ = model(tokens)
        return window_nll(logits, tokens)

    return nll_plain


def model_context(model: Any) -> int | None:
    """The model's `config.max_position_embeddings`, if it has one."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def perplexity(
    model: Any,
    tokens: np.ndarray,
    *,
    seqlen: int = DEFAULT_SEQLEN,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the token stream `tokens` (int `[N]`), GPTQ protocol (see module docstring).

    Args:
      model: `model(tokens (B, T) int32) -> (logits (B, T, V), cache)`, e.g. a `LlamaForCausalLM` (quantized or not).
      tokens: the whole text as one token stream.
      seqlen: window length; capped at the model's `config.max_position_embeddings`.
      batch_size: windows per forward pass. The last batch is padded with dummy windows (not counted) so every
        pass has the same shape and compiles once.
      max_windows: evaluate only the first this many windows (for quick checks); None for all.
      progress: tqdm progress bar on stderr; None shows it only on a terminal.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    check_token_ids(tokens, getattr(getattr(model, "config", None), "vocab_size", None), source="the text's tokens")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r} must be an integer >= 2")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows!r} must be positive or None")
    context = model_context(model)
    if context is not None and seqlen > context:
        logger.warning("seqlen=%d exceeds the model's max_position_embeddings=%d; using %d", seqlen, context, context)
        seqlen = context
    windows = len(tokens) // seqlen
    if windows == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    data = tokens[: windows * seqlen].reshape(windows, seqlen).astype(np.int32)  # (W, T)
    batch_size = min(batch_size, windows)
    n_batches = -(-windows // batch_size)
    pad = n_batches * batch_size - windows
    if pad:  # repeat the first window; its results are discarded below
        data = np.concatenate([data, np.repeat(data[:1], pad, axis=0)])

    from tqdm.auto import tqdm

    nll_fn = make_nll_fn(model)
    start = time.perf_counter()
    sums = []
    bar = tqdm(
        total=windows, desc=f"perplexity (seqlen {seqlen})", unit="win", file=sys.stderr, disable=_disable(progress)
    )
    with bar:
        for b in range(n_batches):
            batch = data[b * batch_size : (b + 1) * batch_size]  # (batch_size, T)
            sums.append(np.asarray(nll_fn(jnp.asarray(batch)), dtype=np.float64))
            bar.update(min(batch_size, windows - b * batch_size))
    seconds = time.perf_counter() - start
    total = np.concatenate(sums)[:windows].sum()
    nll = float(total / (windows * (seqlen - 1)))
    return PerplexityResult(
        perplexity=float(np.exp(nll)),
        nll=nll,
        tokens=windows * seqlen,
        windows=windows,
        seqlen=seqlen,
        seconds=seconds,
    )


def _disable(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress
