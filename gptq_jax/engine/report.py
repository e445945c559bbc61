"""What ``quantize`` returns: the quantized weights and a report of what happened to every parameter."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from gptq_jax.core.quantizer import QuantizedWeight


@dataclasses.dataclass
class QuantReport:
    """What happened: per quantized weight (``linears``: any matmul weight, whatever einsum reads it), per block
    (``layers``: one record per repeated block, or none in one-shot mode), and every matrix parameter left in float
    with the reason (``unquantized``). ``to_json()`` is the CLI's ``quant_report.json``; the JSON keys keep the names
    the CLI and its readers have always used."""

    method: str
    quant_config: Any
    calibration: dict[str, Any]
    mode: str = "blocks"
    linears: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    unquantized: list[dict[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    resumed_layers: int = 0

    @property
    def weights(self) -> list[dict[str, Any]]:
        """One record per quantized weight: ``name``, ``shape`` ``[N, K]``, ``bits``, ``group_size``, ``loss``,
        ``damp``, ``fallback``, ``seconds``."""
        return self.linears

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """One record per block: ``layer`` (its index), ``path``, ``relative_output_error``, ``seconds``."""
        return self.layers

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fallbacks(self) -> list[str]:
        return [r["name"] for r in self.linears if r["fallback"]]


class QuantizeResult(NamedTuple):
    """``model``: the input model with every quantized weight replaced by its dequantized value (ready to evaluate,
    or to pack); ``weights``: parameter path -> ``QuantizedWeight`` (paper orientation ``[N, K]``, see
    ``engine.trace.to_matrix``); ``axes``: parameter path -> its contracting axes; ``report``: a ``QuantReport``."""

    model: Any
    weights: dict[str, QuantizedWeight]
    report: QuantReport
    axes: dict[str, tuple[int, ...]] = {}
