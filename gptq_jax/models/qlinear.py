"""Packed weights in our Llama family: ``pack_model`` swaps a model's ``Linear``s for ``QuantLinear``s after
``gptq_jax.quantize``.

``QuantLinear`` (``gptq_jax.engine.packed``) computes from a ``PackedWeight`` (``pallas_kernels.packing``) with
``pallas_kernels.gptq_matmul`` (Pallas on GPU, the jnp reference on CPU), built by the engine's one conversion
``packed_weight``. A model with quantized linears is the same NNX model class, so ``eval`` and ``generate`` work
unchanged; ``gptq_jax.engine.packed.save_packed`` / ``load_packed(..., modules=True)`` keep it with Orbax.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.engine.packed import QuantLinear
from gptq_jax.models.llama import Linear, LlamaForCausalLM


def module_at(root: nnx.Module, path: str) -> Any:
    """The submodule at a dotted NNX path such as ``layers.3.self_attn.q_proj``."""
    node: Any = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def quantized_linears(model: nnx.Module) -> dict[str, QuantLinear]:
    """HF module name -> ``QuantLinear`` for every quantized linear of a Llama-family model (found by walking the
    model, so whatever the engine quantized is found)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            out["model." + ".".join(str(p) for p in path)] = node
    return out


def pack_model(model: LlamaForCausalLM, weights: dict[str, QuantizedWeight]) -> LlamaForCausalLM:
    """Replace each ``Linear`` whose kernel is in ``weights`` (parameter paths such as
    ``layers.3.self_attn.q_proj.kernel``, as ``gptq_jax.quantize`` returns them) by a ``QuantLinear`` holding its
    packed weight; biases are kept. Modifies and returns ``model``."""
    for name, qw in weights.items():
        if not name.endswith(".kernel"):
            raise ValueError(f"{name} is not the kernel of a Linear")
        parent_path, attr = name.removesuffix(".kernel").rsplit(".", 1)
        parent = module_at(model, parent_path)
        old = getattr(parent, attr)
        if not isinstance(old, Linear):
            raise ValueError(f"{name} belongs to a {type(old).__name__}, not a float Linear")
        if tuple(qw.codes.shape) != (old.out_features, old.in_features):
            raise ValueError(
                f"{name}: quantized weight {tuple(qw.codes.shape)} does not match the layer's "
                f"(out, in) = {(old.out_features, old.in_features)}"
            )
        bias = None if old.bias is None else old.bias[...]
        setattr(parent, attr, QuantLinear.from_quantized(qw, bias, dtype=old.kernel[...].dtype))
    return model


__all__ = ["QuantLinear", "module_at", "pack_model", "quantized_linears"]
