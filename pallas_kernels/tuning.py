"""Tile choice as data: ``tiles.json`` maps (device kind, M) to a kernel and its tiles (as tokamax keeps configs).

The table is read once. ``lookup(device_kind, m, dtype)`` returns the first matching rule as a ``Rule``; the dispatcher
(``matmul.select_plan``) then fits its tiles to the weight's shape. An explicit ``KernelConfig`` bypasses the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

TABLE = Path(__file__).with_name("tiles.json")
KERNELS = ("decode", "prefill")


@dataclasses.dataclass(frozen=True)
class Rule:
    device: str  # substring of jax's device_kind (case-insensitive), or "*"
    m_min: int
    m_max: int | None  # None: no upper bound
    dtype: str  # activation dtype name ("float32", ...) or "*"
    kernel: str  # "decode" | "prefill"
    tiles: tuple[tuple[str, int], ...]  # field -> value for DecodeTiles / PrefillTiles, sorted (hashable)
    tuned: bool  # False: untuned defaults, never measured on a GPU

    def matches(self, device_kind: str, m: int, dtype: str) -> bool:
        dev_ok = self.device == "*" or self.device.lower() in device_kind.lower()
        dtype_ok = self.dtype in ("*", dtype)
        return dev_ok and dtype_ok and self.m_min <= m and (self.m_max is None or m <= self.m_max)


def parse(table: dict) -> tuple[Rule, ...]:
    """Rules from the table's JSON object; ``ValueError`` naming the bad row."""
    rules = []
    for i, row in enumerate(table.get("rules", [])):
        try:
            rule = Rule(device=str(row["device"]), m_min=int(row["m_min"]),
                        m_max=None if row.get("m_max") is None else int(row["m_max"]),
                        dtype=str(row.get("dtype", "*")), kernel=str(row["kernel"]),
                        tiles=tuple(sorted((str(k), int(v)) for k, v in row.get("tiles", {}).items())),
                        tuned=bool(row.get("tuned", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tile table rule {i} ({row!r}) is malformed: {e!r}") from None
        if rule.kernel not in KERNELS:
            raise ValueError(f"tile table rule {i}: kernel={rule.kernel!r} is not one of {KERNELS}")
        if rule.m_min < 1 or (rule.m_max is not None and rule.m_max < rule.m_min):
            raise ValueError(f"tile table rule {i}: M range [{rule.m_min}, {rule.m_max}] is empty")
        rules.append(rule)
    return tuple(rules)


@functools.cache
def rules(path: Path = TABLE) -> tuple[Rule, ...]:
    return parse(json.loads(Path(path).read_text()))


def lookup(device_kind: str, m: int, dtype: str, table: tuple[Rule, ...] | None = None) -> Rule:
    """The first rule for this device kind, M and activation dtype name; ``LookupError`` when none matches."""
    for rule in rules() if table is None else table:
        if rule.matches(device_kind, m, dtype):
            return rule
    raise LookupError(f"no tile table rule for device_kind={device_kind!r}, M={m}, dtype={dtype} in {TABLE}")
