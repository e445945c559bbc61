"""What the driver quantizes: a parameter pytree, a function of it, and its repeated blocks, from any Flax model.

A ``Subject`` is the model the user passes as the engine sees it: the function for the one-shot mode, the blocks
in the order they run, and a way to compute the first block's inputs once per calibration batch. Each block, once
``open``ed, is a small program ``call((params, extra), *inputs)`` of its own parameters, which the driver cuts into
stages (``engine.plan``), plus the way its outputs become the next block's inputs. ``engine.regions`` makes the
subject of every model (an NNX model split into its parameter state, a Linen ``apply``, any ``f(params, batch)``):
the forward is traced once to a flat program and cut where each block first reads its parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from gptq_jax.engine.scanned import ScanError
from gptq_jax.engine.subject import Params, candidates


class OpenBlock(Protocol):
    """A block ready to quantize: ``params`` (its leaves are replaced in place by the quantized values), ``extra``
    leaves it reads but does not quantize, ``call((params_tree, extra), *inputs(values))`` its program, ``key``
    (blocks with equal keys and shapes share one plan and its compiled passes)."""

    params: Params
    extra: list[Any]
    key: Any

    def call(self, params_and_extra: Any, *inputs: Any) -> Any: ...

    def inputs(self, values: list[Any]) -> tuple: ...

    def watch(self, out_avals: Sequence[Any], values: list[Any]) -> list[int]:
        """The outputs whose error against the float block the report gives (its new hidden states)."""

    def next_inputs(self, outputs: list[Any] | None, values: list[Any]) -> list[Any]:
        """The next block's input leaves from this block's outputs (None: nothing ran, for round-to-nearest)."""

    def close(self, drop: Sequence[str]) -> None:
        """Write the parameters back into the model; ``drop``: paths made abstract again (a streamed run)."""


@dataclasses.dataclass
class Block:
    path: str
    open: Callable[[], OpenBlock]


@dataclasses.dataclass
class Subject:
    """``blocks`` (empty: one shot), ``outside`` (matrix parameters outside the blocks and why they stay float),
    ``one_shot()`` -> ``(call(params_tree, batch), Params)`` and ``write(params)`` its result back,
    ``catch_inputs(batches)`` -> the first block's input leaves per batch, ``result()`` -> the model with the
    quantized values, ``arrays()`` -> its arrays (to wait for)."""

    name: str
    shapes: str
    blocks: list[Block]
    outside: list[tuple[str, str]]
    one_shot: Callable[[], tuple[Callable, Params]]
    write: Callable[[Params], None]
    catch_inputs: Callable[[list[Any]], list[list[Any]]]
    result: Callable[[], Any]
    arrays: Callable[[], list[Any]]
    matrices: list[str] = dataclasses.field(default_factory=list)  # paths of the float parameters of rank >= 2
    streamed: bool = False
    default_forward: bool = False


def default_forward(model: Any, batch: Any) -> Any:
    if isinstance(batch, dict) and "tokens" in batch:
        return model(batch["tokens"], attention_mask=batch["attention_mask"])
    return model(batch)


FORWARD_HINT = ("; if the model needs more than the batch (positions, masks, deterministic=..., a method other "
                "than __call__), pass forward=lambda model, batch: ... (with apply_fn: forward=lambda params, "
                "batch: apply_fn({'params': params}, ...))")


def call_checked(fn: Callable[[], Any], what: str, default_forward_used: bool = False) -> Any:
    """``fn()``, with an exception from the user's forward named: where it happened, and what to pass."""
    try:
        return fn()
    except ScanError:
        raise
    except Exception as e:  # a user's forward can raise anything; name where it happened
        hint = FORWARD_HINT if default_forward_used else ""
        raise ValueError(f"the model's forward failed on {what}: {type(e).__name__}: {e}{hint}") from e


def matrix_paths(params: Params) -> list[str]:
    return [params.paths[i] for i in candidates(params)[0]]


def outside_blocks(params: Params, block_paths: Sequence[str]) -> list[tuple[str, str]]:
    """Matrix parameters outside the blocks (embeddings, output head) stay float, as GPTQ checkpoints keep them."""
    cands, not_cands = candidates(params)
    return [(params.paths[i], not_cands.get(i, "outside the repeated blocks")) for i in [*cands, *not_cands]
            if not any(params.paths[i].startswith(b + ".") for b in block_paths)]


def params_shapes(tree: Any) -> str:
    return repr(jax.tree.map(lambda a: (jnp.shape(a), str(jnp.result_type(a))), tree))

