"""GPTQ post-training quantization for JAX.

Core (one layer at a time, pure and jitted):

- ``QuantConfig``: bits, group size, symmetry, act-order, static groups, damping.
- ``accumulate_hessian(h, n, x, mask=None)``: fold calibration activations into ``H = 2/n sum x x^T``.
- ``quantize_weight(w, h, config) -> QuantizedWeight``: GPTQ on ``w`` ``[out, in]``.
- ``quantize_weights(ws, h, config)``: several weights that read the same inputs, solved as one.
- ``rtn_quantize(w, config)``: the round-to-nearest baseline.

Whole models:

- ``quantize(model, calib, quant_config=...)``: block-by-block GPTQ of any Flax model (NNX, or a parameter pytree
  with a Linen ``apply_fn=`` or any ``forward=f(params, batch)``): every matmul that reads a parameter is found in
  the traced program (``gptq_jax.engine``). ``Rule(pattern, config)``: per-weight configs; ``Solver``: the
  per-weight solve, replaceable.
- ``pack(model, result)``: the quantized model computing from packed weights (``gptq_jax.engine.packed``).
"""

from gptq_jax.core.config import SUPPORTED_BITS, QuantConfig
from gptq_jax.core.gptq import quantize_weight, quantize_weights
from gptq_jax.core.hessian import accumulate_hessian, init_hessian
from gptq_jax.core.quantizer import QuantizedWeight, rtn_quantize
from gptq_jax.engine.driver import QuantizeResult, QuantReport, quantize
from gptq_jax.engine.packed import pack
from gptq_jax.engine.rules import Rule
from gptq_jax.engine.solve import Solver

__all__ = [
    "SUPPORTED_BITS",
    "QuantConfig",
    "QuantReport",
    "QuantizeResult",
    "QuantizedWeight",
    "Rule",
    "Solver",
    "accumulate_hessian",
    "init_hessian",
    "pack",
    "quantize",
    "quantize_weight",
    "quantize_weights",
    "rtn_quantize",
]
