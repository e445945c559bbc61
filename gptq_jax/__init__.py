"""GPTQ post-training quantization for JAX.

Core (one layer at a time, pure and jitted):

- ``QuantConfig``: bits, group size, symmetry, act-order, static groups, damping.
- ``accumulate_hessian(h, n, x, mask=None)``: fold calibration activations into ``H = 2/n sum x x^T``.
- ``quantize_weight(w, h, config) -> QuantizedWeight``: GPTQ on ``w`` ``[out, in]``.
- ``rtn_quantize(w, config)``: the round-to-nearest baseline.

Whole models:

- ``quantize(model, calib, quant_config=...)``: layer-by-layer GPTQ of a Llama-family model
  (``gptq_jax.models.load_pretrained``), calibrated on ``gptq_jax.calibration`` windows.
"""

from gptq_jax.config import SUPPORTED_BITS, QuantConfig
from gptq_jax.gptq import quantize_weight
from gptq_jax.hessian import accumulate_hessian, init_hessian
from gptq_jax.pipeline import QuantizeResult, QuantReport, quantize
from gptq_jax.quantizer import QuantizedWeight, rtn_quantize

__all__ = [
    "SUPPORTED_BITS",
    "QuantConfig",
    "QuantReport",
    "QuantizeResult",
    "QuantizedWeight",
    "accumulate_hessian",
    "init_hessian",
    "quantize",
    "quantize_weight",
    "rtn_quantize",
]
