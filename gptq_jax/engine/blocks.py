"""What the driver quantizes: a parameter pytree, a function of it, and its repeated blocks, from any Flax model.

``open_subject`` turns the model the user passes into a ``Subject``: the function for the one-shot mode, the
blocks in the order they run, and a way to catch the first block's inputs once per calibration batch. Each block,
once ``open``ed, is a small program ``call((params, extra), *inputs)`` of its own parameters, which the driver
cuts into stages (``engine.plan``), plus the way its outputs become the next block's inputs.

Two ways to find and run the blocks, one loop in the driver:

- **NNX** (``NNXSubject``): the blocks are submodules (an ``nnx.List`` of layers, or ``blocks="layers.*"``); the
  first block's inputs are caught by standing a catcher in for it while the model runs, and a block runs as its
  own module. Supports streaming (``load=``) and a mesh.
- **A parameter pytree and a function** (``engine.regions``): a Linen ``apply`` or any ``f(params, batch)``. The
  blocks are subtrees of the parameters (``layers_0 .. layers_N``, ``layers/N``, or a pattern); the whole forward
  is traced once to a flat program and cut where each block first reads its parameters, so block i is the
  program between its cut and the next one, run from the values live at its cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.engine import placement, streaming, subject
from gptq_jax.engine.scanned import ScanError
from gptq_jax.engine.subject import Params


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
    except (subject.BlockNotReached, ScanError):
        raise
    except Exception as e:  # a user's forward can raise anything; name where it happened
        hint = FORWARD_HINT if default_forward_used else ""
        raise ValueError(f"the model's forward failed on {what}: {type(e).__name__}: {e}{hint}") from e


def matrix_paths(params: Params) -> list[str]:
    return [params.paths[i] for i in subject.candidates(params)[0]]


def outside_blocks(params: Params, block_paths: Sequence[str]) -> list[tuple[str, str]]:
    """Matrix parameters outside the blocks (embeddings, output head) stay float, as GPTQ checkpoints keep them."""
    cands, not_cands = subject.candidates(params)
    return [(params.paths[i], not_cands.get(i, "outside the repeated blocks")) for i in [*cands, *not_cands]
            if not any(params.paths[i].startswith(b + ".") for b in block_paths)]


# ----------------------------------------------------------------------------------------------------------------------
# NNX


@dataclasses.dataclass
class _NNXOpen:
    found: subject.Found
    params: Params
    extra: list[Any]
    key: Any
    rest_tree: Any
    in_tree: Any
    hidden_out: int = 0

    def call(self, state_and_rest: Any, args: Any, kwargs: Any) -> Any:
        state, extra = state_and_rest
        m = nnx.merge(self.key, state, jax.tree.unflatten(self.rest_tree, extra))
        return m(*args, **kwargs)

    def inputs(self, values: list[Any]) -> tuple:
        return jax.tree.unflatten(self.in_tree, values)

    def watch(self, out_avals: Sequence[Any], values: list[Any]) -> list[int]:
        hidden = values[0]
        for i, a in enumerate(out_avals):
            if tuple(a.shape) == tuple(jnp.shape(hidden)) and a.dtype == jnp.result_type(hidden):
                self.hidden_out = i
                return [i]
        raise ValueError(
            f"block {self.found.path} returns no array shaped like its input hidden states "
            f"{tuple(jnp.shape(hidden))} {jnp.result_type(hidden)}: the engine needs the block's output hidden "
            "states to feed the next block"
        )

    def next_inputs(self, outputs: list[Any] | None, values: list[Any]) -> list[Any]:
        if outputs is None:  # nothing ran (round-to-nearest): the next block's inputs only need their shapes
            return values
        return [outputs[self.hidden_out], *values[1:]]  # the hidden states are the first leaf of (args, kwargs)

    def close(self, drop: Sequence[str]) -> None:
        nnx.update(self.found.module, streaming.drop(self.params, drop).unflatten())


def nnx_subject(model: nnx.Module, forward: Callable | None, blocks: str | bool | None, load: Callable | None,
                 mesh: Any) -> Subject:
    fwd = forward or default_forward
    pattern = blocks if isinstance(blocks, str) else getattr(model, "gptq_blocks", None)
    found = [] if blocks is False else subject.find_blocks(model, pattern)
    if load is not None:
        if not found:
            raise ValueError("load= needs a model with repeated blocks (found none; name them with blocks=)")
        streaming.load_params(model, "", load, mesh, skip=[f.path for f in found])
    if mesh is not None:
        nnx.update(model, placement.replicated(nnx.state(model), mesh))
        for f in found:
            nnx.update(f.module, placement.spread(nnx.state(f.module), mesh))
    all_params = Params.of(nnx.state(model, nnx.Param))
    in_tree: list[Any] = []

    def catch_inputs(batches: list[Any]) -> list[list[Any]]:
        out = []
        for b, batch in enumerate(batches):
            args, kwargs = call_checked(
                lambda batch=batch: subject.catch_block_inputs(found[0], lambda: fwd(model, batch)),
                f"calibration batch {b}", forward is None)
            if not args or not isinstance(args[0], (jax.Array, np.ndarray)):
                raise ValueError(f"the first block ({found[0].path}) must take the hidden states as its first "
                                 "positional argument")
            leaves, tree = jax.tree.flatten((args, kwargs))
            in_tree[:] = [tree]
            out.append(leaves)
        return out

    def opener(f: subject.Found) -> Callable[[], _NNXOpen]:
        def open_block() -> _NNXOpen:
            if load is not None:
                streaming.load_params(f.module, f.path, load, mesh)
            graphdef, params, rest = subject.NNXBlock(f.path, f.module).split()
            rest_leaves, rest_tree = jax.tree.flatten(rest)
            return _NNXOpen(f, params, rest_leaves, graphdef, rest_tree, in_tree[0])

        return open_block

    def one_shot() -> tuple[Callable, Params]:
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        return (lambda st, batch: fwd(nnx.merge(graphdef, st, rest), batch)), Params.of(state)

    return Subject(
        name=type(model).__name__,
        shapes=params_shapes(nnx.state(model, nnx.Param)),
        blocks=[Block(f.path, opener(f)) for f in found],
        outside=outside_blocks(all_params, [f.path for f in found]) if found else [],
        one_shot=one_shot, write=lambda params: nnx.update(model, params.unflatten()),
        catch_inputs=catch_inputs, result=lambda: model, arrays=lambda: jax.tree.leaves(nnx.state(model)),
        matrices=matrix_paths(all_params), streamed=load is not None, default_forward=forward is None,
    )


def params_shapes(tree: Any) -> str:
    return repr(jax.tree.map(lambda a: (jnp.shape(a), str(jnp.result_type(a))), tree))

