"""Per-weight quantization rules: one ``QuantConfig`` for everything, or an ordered list of ``Rule``.

``[Rule(r".*\\.mlp\\.down_proj\\.kernel", QuantConfig(bits=8)), Rule(r"lm_head.*", None), Rule(r".*", QC)]``: the
first rule whose ``pattern`` matches a parameter's whole dotted path (``re.fullmatch``) decides; ``None`` keeps the
weight in float. A path that no rule matches stays float too. Whole-path matching means ``.*mlp\\.down`` does not
also catch ``mlp.down_proj_2``'s neighbours by accident: say ``.*`` where any text may follow.

Slice i of a scanned stack, ``layers.up.kernel[3]`` (``engine.scanned``), is matched both by its own name and by its
stacked parameter's path, so a rule for ``layers.up.kernel`` covers every layer.

A plain ``(regex, config)`` pair, the older form, is still accepted and keeps its meaning: it matches anywhere in
the path (``re.search``), so it becomes ``Rule(".*(?:regex).*", config)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from gptq_jax.core.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern``: a regex matched against a parameter's whole dotted path (``layers.3.mlp.up_proj.kernel``);
    ``config``: its ``QuantConfig``, or None to keep it float."""

    pattern: str
    config: QuantConfig | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule pattern must be a str, got {self.pattern!r}")
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise TypeError(f"Rule({self.pattern!r}): {self.config!r} is neither a QuantConfig nor None")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regular expression ({e})") from None

    def matches(self, path: str) -> bool:
        """Whole-path match; slice i of a stacked (scanned) parameter, ``path[i]``, also matches the rules of
        ``path``, so one rule covers every layer of a scanned stack."""
        rx = _compiled(self.pattern)
        stacked = _SLICE.fullmatch(path)
        return rx.fullmatch(path) is not None or (stacked is not None and rx.fullmatch(stacked.group(1)) is not None)


_SLICE = re.compile(r"(.*)\[\d+\]")  # a slice of a stacked parameter (engine.scanned.slice_name)
Rules = QuantConfig | Sequence[Rule | tuple[str, QuantConfig | None]]


def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def compile_rules(rules: Rules) -> list[Rule]:
    """``rules`` as a list of ``Rule``, checked (each problem named by its index)."""
    if isinstance(rules, QuantConfig):
        return [Rule(".*", rules)]
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"quant_config must be a QuantConfig or a list of Rule(pattern, QuantConfig | None), "
                        f"got {rules!r}")
    out = []
    for i, item in enumerate(rules):
        if isinstance(item, Rule):
            out.append(item)
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"quant_config[{i}] must be a Rule or a (regex, QuantConfig | None) pair, got {item!r}")
        pattern, qc = item
        if not isinstance(pattern, str):
            raise ValueError(f"quant_config[{i}]: {pattern!r} is not a valid regular expression (not a str)")
        try:
            re.compile(pattern)
            out.append(Rule(f".*(?:{pattern}).*", qc))
        except re.error as e:
            raise ValueError(f"quant_config[{i}]: {pattern!r} is not a valid regular expression ({e})") from None
        except TypeError as e:
            raise TypeError(f"quant_config[{i}]: {e}") from None
    return out


def config_for(rules: Sequence[Rule], path: str) -> QuantConfig | None:
    for rule in rules:
        if rule.matches(path):
            return rule.config
    return None


def describe(rules: Rules) -> Any:
    """A JSON-able description for reports and fingerprints: ``[pattern, config or None]`` per rule, as written."""
    if isinstance(rules, QuantConfig):
        return dataclasses.asdict(rules)
    pairs = [(r.pattern, r.config) if isinstance(r, Rule) else tuple(r) for r in rules]
    return [[p, None if qc is None else dataclasses.asdict(qc)] for p, qc in pairs]
