"""Per-weight quantization rules: one ``QuantConfig`` for everything, or an ordered list of (regex, config).

``[(r"mlp\\.down_proj", QuantConfig(bits=8)), (r"lm_head", None), (r".*", QuantConfig(bits=4))]``: the first
pattern that matches a parameter's path (``re.search``) decides; ``None`` keeps the weight in float. A path that
no pattern matches stays float too. This is the shape of the PyTorch tools' per-module overrides.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from gptq_jax.core.config import QuantConfig

Rules = QuantConfig | Sequence[tuple[str, QuantConfig | None]]


def compile_rules(rules: Rules) -> list[tuple[re.Pattern, QuantConfig | None]]:
    if isinstance(rules, QuantConfig):
        return [(re.compile(".*"), rules)]
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"quant_config must be a QuantConfig or a list of (regex, QuantConfig | None), got {rules!r}")
    out = []
    for i, item in enumerate(rules):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"quant_config[{i}] must be a (regex, QuantConfig | None) pair, got {item!r}")
        pattern, qc = item
        if qc is not None and not isinstance(qc, QuantConfig):
            raise TypeError(f"quant_config[{i}]: {qc!r} is neither a QuantConfig nor None")
        try:
            out.append((re.compile(pattern), qc))
        except (re.error, TypeError) as e:
            raise ValueError(f"quant_config[{i}]: {pattern!r} is not a valid regular expression ({e})") from None
    return out


def config_for(rules: list[tuple[re.Pattern, QuantConfig | None]], path: str) -> QuantConfig | None:
    for pattern, qc in rules:
        if pattern.search(path):
            return qc
    return None


def describe(rules: Rules) -> Any:
    """A JSON-able description for reports and fingerprints."""
    if isinstance(rules, QuantConfig):
        return dataclasses.asdict(rules)
    return [[p, None if qc is None else dataclasses.asdict(qc)] for p, qc in rules]
