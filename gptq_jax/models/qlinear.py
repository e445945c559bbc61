"""``QuantLinear``: the quantized stand-in for ``models.Linear``, computing with packed weights.

It holds the checkpoint's arrays in the layout of ``pallas_kernels.packing`` and calls
``pallas_kernels.gptq_matmul`` (Pallas on GPU, the jnp reference on CPU), so a model with quantized linears is
the same NNX model class: ``eval`` and ``generate`` work unchanged. ``pack_model`` swaps a model's ``Linear``s
for ``QuantLinear``s after ``gptq_jax.quantize``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.models.llama import Linear, LlamaForCausalLM
from pallas_kernels import PackedWeight, gptq_matmul, packing


class QuantLinear(nnx.Module):
    """``y = x @ dequant(W) + bias`` with ``W`` packed (see ``pallas_kernels.packing.PackedWeight``).

    Arrays are ``nnx.Variable``s (not ``Param``: nothing here is trained) holding the fields of a
    ``PackedWeight``; ``bits``/``group_size`` are static. ``bias`` float ``[N]`` or None.
    """

    def __init__(self, packed: PackedWeight, bias: jax.Array | None, *, dtype: Any = jnp.float32):
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.dtype = jnp.dtype(dtype)
        children, self._treedef = jax.tree.flatten(packed)
        self.packed_leaves = nnx.List([nnx.Variable(c) for c in children])
        self.bias = None if bias is None else nnx.Variable(jnp.asarray(bias, dtype))

    @property
    def packed(self) -> PackedWeight:
        return jax.tree.unflatten(self._treedef, [v[...] for v in self.packed_leaves])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = gptq_matmul(x.astype(self.dtype), self.packed)  # (..., N) in x's dtype, f32 accumulation inside
        if self.bias is not None:
            y = (y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        return y

    # ---- construction ----

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: jax.Array | None = None, *, dtype: Any = jnp.float32, scale_dtype=jnp.float16
    ) -> QuantLinear:
        """From the solver's ``QuantizedWeight`` (``[N, K]`` orientation); scales are stored in ``scale_dtype``."""
        packed = PackedWeight.from_codes(
            np.asarray(qw.codes).T,  # (K, N)
            np.asarray(qw.scales).T.astype(scale_dtype),  # (G, N)
            np.asarray(qw.zeros).T,  # (G, N) true zeros
            np.asarray(qw.g_idx),
            bits=qw.bits,
            group_size=qw.group_size,
        )
        return cls(packed, bias, dtype=dtype)

    @classmethod
    def from_hf_tensors(
        cls,
        name: str,
        tensors: dict[str, np.ndarray],
        *,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        checkpoint_format: str,
        dtype: Any = jnp.float32,
    ) -> QuantLinear:
        """From one layer's checkpoint tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``, ``bias``)."""
        bias = tensors.get("bias")
        try:
            packed = PackedWeight.from_checkpoint(
                tensors["qweight"],
                tensors["qzeros"],
                tensors["scales"],
                tensors.get("g_idx"),
                bits=bits,
                group_size=group_size,
                checkpoint_format=checkpoint_format,
                in_features=in_features,
                out_features=out_features,
            )
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"tensor {name}.bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        return cls(packed, None if bias is None else jnp.asarray(bias), dtype=dtype)

    # ---- export ----

    def hf_tensors(self, name: str, *, checkpoint_format: str) -> dict[str, np.ndarray]:
        """This layer's checkpoint tensors under ``name.qweight`` etc. (FORMAT.md); scales and bias in float16."""
        arrays = packing.to_checkpoint(self.packed, checkpoint_format)
        out = {f"{name}.{key}": np.asarray(a) for key, a in arrays.items()}
        out[f"{name}.scales"] = out[f"{name}.scales"].astype(np.float16)
        if self.bias is not None:
            out[f"{name}.bias"] = np.asarray(jax.device_get(self.bias[...])).astype(np.float16)
        return out


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
