"""What ``quantize`` returns (the quantized weights and a report of what happened to every parameter), and the
progress it reports while it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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


def progress_reporter(progress: bool | Callable[[str], None], method: str) -> tuple[Any, Callable[[str], None]]:
    """``quantize``'s ``progress=``: True draws a bar (tqdm), a callable gets each block's status line; returns
    (the bar or None, the function that reports a line)."""
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(desc=method, unit="block")
        return bar, lambda s: bar.set_postfix_str(s, refresh=True)
    if callable(progress):
        return None, progress
    if progress is not False and progress is not None:
        raise TypeError(f"progress={progress!r} must be True, False or a function of one status line")
    return None, lambda s: None
