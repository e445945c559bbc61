"""Text generation with a KV cache: one jitted prefill over the prompt, then one jitted step per new token.

    result = generate(model, tokenizer, "Write a haiku about JAX", chat=True, max_new_tokens=64)
    result.text, result.tokens, result.prefill_tokens_per_second, result.decode_tokens_per_second

Decoding is greedy when `temperature == 0`, otherwise temperature sampling restricted to the nucleus (top-p) of the
distribution. Both compiled functions are built ahead of time, so the reported throughputs exclude compilation
(`compile_seconds` reports it). One prompt at a time (batch 1).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.io.text import check_token_ids

log = logging.getLogger(__name__)

# The cache length is rounded up to a multiple of this, so prompts of similar length reuse compiled decode steps.
CACHE_BUCKET = 128


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen (hashable: a static argument of the compiled steps)."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # sample only from the smallest set of tokens whose probabilities sum to >= top_p

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    tokens: np.ndarray  # int32 [n]: the generated ids, the stopping EOS included when there is one
    prompt_tokens: int
    text: str | None  # the generated text (special tokens removed), when a tokenizer was given
    stop_reason: str  # "eos", "max_new_tokens", or "context" (the model's context is full)
    prefill_seconds: float  # the prompt's forward pass (it yields the first new token)
    decode_seconds: float  # all single-token steps after that
    compile_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first token came from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token ids `(B,)` int32 from last-position logits `(B, V)`."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # (B, V) most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # (B, V)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the tokens ranked above it sum to less than top_p: the most likely token is always kept.
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p  # (B, V)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _step(graphdef: Any, sampling: SamplingConfig, state: Any, tokens: jax.Array, cache: Any, key: jax.Array):
    """One forward pass over `tokens (B, T)` with the cache, and the next token: `(next (B,) int32, cache)`."""
    model = nnx.merge(graphdef, state)
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        # Only the last position's logits are needed: the head (a sixth of SmolLM2's prefill) runs on one row.
        h, cache = model.hidden_states(tokens, cache=cache)  # (B, T, D)
        logits = model.head(h[:, -1:])[:, 0]  # (B, V)
    else:
        logits, cache = model(tokens, cache=cache)  # (B, T, V)
        logits = logits[:, -1]  # (B, V)
    return sample_next(logits, key, sampling), cache


# The cache argument is donated: its buffers are updated in place rather than copied every step.
_step_jit = jax.jit(_step, static_argnums=(0, 1), donate_argnums=(4,))
_COMPILED: OrderedDict[Any, Any] = OrderedDict()  # recently compiled steps, so repeated calls skip compilation
_COMPILED_MAX = 16


def _compiled_step(graphdef: Any, sampling: SamplingConfig, state: Any, tokens: jax.Array, cache: Any, key: Any):
    """The compiled `_step` for these argument shapes (compiled ahead of time, so callers can time it apart)."""
    spec = jax.tree.map(lambda x: (x.shape, str(x.dtype)), (state, tokens, cache))
    leaves, treedef = jax.tree.flatten(spec, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
    signature = (graphdef, sampling, treedef, tuple(leaves))
    if signature in _COMPILED:
        _COMPILED.move_to_end(signature)
    else:
        _COMPILED[signature] = _step_jit.lower(graphdef, sampling, state, tokens, cache, key).compile()
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return _COMPILED[signature]


def eos_ids(config: Any, tokenizer: Any = None, extra: Iterable[int] = ()) -> frozenset[int]:
    """The ids that end generation: the config's `eos_token_id` (an int or several), the tokenizer's, and `extra`."""
    ids = set(extra)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(i) for i in eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def generate_tokens(
    model: Any,
    prompt: np.ndarray,
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_token_ids: Iterable[int] = (),
) -> GenerationResult:
    """Continue the token sequence `prompt` (int `[T]`) with up to `max_new_tokens` tokens.

    `model` is a `LlamaForCausalLM` (or any NNX module with its call signature and a `config` that
    `gptq_jax.models.llama.init_cache` accepts). Stops after the first token in `eos_token_ids`, and when prompt and
    new tokens fill the model's context (`config.max_position_embeddings`): a larger `max_new_tokens` is capped
    with a warning, as the KV cache is sized from it.
    """
    from gptq_jax.models.llama import init_cache

    prompt = np.asarray(prompt)
    if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt must be a non-empty 1-D integer array, got {prompt.dtype} of shape {prompt.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    config = model.config
    T = int(prompt.size)
    context = getattr(config, "max_position_embeddings", None)
    capped = False
    if context is not None:
        if T >= context:
            raise ValueError(f"the prompt has {T} tokens, which fills the model's context of {context} tokens")
        if T + max_new_tokens > context:
            log.warning(
                "max_new_tokens=%d and the prompt's %d tokens exceed the model's context of %d tokens; "
                "generating at most %d tokens",
                max_new_tokens, T, context, context - T,
            )  # fmt: skip
            max_new_tokens, capped = context - T, True
    max_len = -(-(T + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if context is not None:
        max_len = min(max_len, context)
    dtype = getattr(model, "dtype", jnp.float32)
    eos = frozenset(int(i) for i in eos_token_ids)

    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    tokens = jnp.asarray(prompt[None], jnp.int32)  # (1, T)
    one = jnp.zeros((1, 1), jnp.int32)  # (1, 1)
    cache = init_cache(config, 1, max_len, dtype)

    t0 = time.perf_counter()
    prefill = _compiled_step(graphdef, sampling, state, tokens, cache, key)
    decode = _compiled_step(graphdef, sampling, state, one, cache, key) if max_new_tokens > 1 else None
    compile_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    nxt, cache = prefill(state, tokens, cache, jax.random.fold_in(key, 0))
    out = [int(nxt[0])]  # the host needs each token to test for EOS
    prefill_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    while out[-1] not in eos and len(out) < max_new_tokens:
        nxt, cache = decode(state, nxt[:, None], cache, jax.random.fold_in(key, len(out)))
        out.append(int(nxt[0]))
    decode_seconds = time.perf_counter() - t0

    return GenerationResult(
        tokens=np.asarray(out, np.int32),
        prompt_tokens=T,
        text=None,
        stop_reason="eos" if out[-1] in eos else "context" if capped else "max_new_tokens",
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        compile_seconds=compile_seconds,
    )


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False) -> np.ndarray:
    """Prompt ids `[T]` int32: the plain text with the tokenizer's usual special tokens, or with `chat=True` a
    single user message rendered by the tokenizer's chat template (with the assistant's turn opened)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; run without chat (--chat)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already placed them
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens")
    return np.asarray(ids, np.int32)


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> GenerationResult:
    """Generate a continuation of the text `prompt` (or a chat reply with `chat=True`); see `generate_tokens`."""
    ids = check_token_ids(encode_prompt(tokenizer, prompt, chat=chat), model.config.vocab_size,
                          source="the tokenizer (on the prompt)")
    result = generate_tokens(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature, top_p=top_p),
        seed=seed,
        eos_token_ids=eos_ids(model.config, tokenizer),
    )
    text = tokenizer.decode(result.tokens.tolist(), skip_special_tokens=True)
    return GenerationResult(**{**result.__dict__, "text": text})
