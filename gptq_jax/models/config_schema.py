"""The fields of the JSON configs we read, each with its type and bounds, checked before anything is built.

A config is checked as a whole against a table (``MODEL_CONFIG``, ``QUANT_CONFIG``): a field of the wrong JSON type
or outside its bounds is a one-line ``ValueError`` naming the file, the field and the value, never a ``KeyError``
or ``TypeError`` from deep inside a constructor (ours or transformers', which reads the same config.json when it
loads a tokenizer), and never a model of 10^6 layers built before the weights are looked at. The bounds are far
beyond any real model and only keep a damaged or hostile file from reaching arithmetic that would divide by zero,
go negative or allocate without bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Field:
    """One config field: its kind (``int``, ``number``, ``bool``, ``str``, ``object``, ``list``, ``ids`` for a token
    id or a list of them), whether JSON ``null`` is allowed, and inclusive numeric bounds."""

    kind: str
    nullable: bool = True
    lo: int | float | None = None
    hi: int | float | None = None
    lo_open: bool = False  # lo itself is not allowed (``rms_norm_eps > 0``)
    choices: tuple[Any, ...] | None = None


_2_31 = 2**31 - 1
MODEL_CONFIG: dict[str, Field] = {
    "architectures": Field(kind="list"),
    "model_type": Field(kind="str"),
    "vocab_size": Field(kind="int", lo=1, hi=2**24),
    "hidden_size": Field(kind="int", lo=1, hi=2**17),
    "intermediate_size": Field(kind="int", lo=1, hi=2**20),
    "num_hidden_layers": Field(kind="int", lo=1, hi=4096),
    "num_attention_heads": Field(kind="int", lo=1, hi=4096),
    "num_key_value_heads": Field(kind="int", lo=1, hi=4096),
    "head_dim": Field(kind="int", lo=2, hi=4096),
    "max_position_embeddings": Field(kind="int", lo=1, hi=2**26),
    "rms_norm_eps": Field(kind="number", lo=0, lo_open=True, hi=1),
    "rope_theta": Field(kind="number", lo=0, lo_open=True, hi=1e12),
    "rope_scaling": Field(kind="object"),
    "rope_parameters": Field(kind="object"),
    "tie_word_embeddings": Field(kind="bool"),
    "attention_bias": Field(kind="bool"),
    "mlp_bias": Field(kind="bool"),
    "use_sliding_window": Field(kind="bool"),
    "sliding_window": Field(kind="int", lo=1, hi=2**26),
    "max_window_layers": Field(kind="int", lo=0, hi=4096),
    "layer_types": Field(kind="list"),
    "hidden_act": Field(kind="str"),
    "partial_rotary_factor": Field(kind="number", lo=0, hi=1),
    "bos_token_id": Field(kind="ids", lo=0, hi=_2_31),
    "eos_token_id": Field(kind="ids", lo=0, hi=_2_31),
    "pad_token_id": Field(kind="ids", lo=0, hi=_2_31),
    "quantization_config": Field(kind="object"),
    "torch_dtype": Field(kind="str"),
    "dtype": Field(kind="str"),
}

QUANT_CONFIG: dict[str, Field] = {
    "quant_method": Field(kind="str"),
    "bits": Field(kind="int", nullable=False, choices=(2, 3, 4, 8)),
    "group_size": Field(kind="int", nullable=False, lo=-1, hi=2**20),
    "desc_act": Field(kind="bool"),
    "sym": Field(kind="bool"),
    "static_groups": Field(kind="bool"),
    "act_group_aware": Field(kind="bool"),
    "true_sequential": Field(kind="bool"),
    "damp_percent": Field(kind="number", lo=0, hi=1),
    "checkpoint_format": Field(kind="str"),
    "lm_head": Field(kind="bool"),
}

_KIND_NAMES = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
               "object": "a JSON object", "list": "a JSON array", "ids": "a token id or a list of them"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == "int":
        return _is_int(v)
    if kind == "number":
        return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    if kind == "ids":
        return _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))
    return isinstance(v, {"bool": bool, "str": str, "object": Mapping, "list": list}[kind])


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_field(key: str, f: Field, v: Any) -> str | None:
    """What is wrong with value ``v`` of field ``key``, or None."""
    if v is None:
        return None if f.nullable else f"field {key!r} must be {_KIND_NAMES[f.kind]}, got null"
    if not _kind_ok(f.kind, v):
        return f"field {key!r} must be {_KIND_NAMES[f.kind]}, got {_short(v)}"
    if f.choices is not None and v not in f.choices:
        return f"field {key!r} must be one of {list(f.choices)}, got {_short(v)}"
    for x in v if isinstance(v, list) and f.kind == "ids" else [v] if f.kind in ("int", "number", "ids") else []:
        if (f.lo is not None and (x < f.lo or (f.lo_open and x == f.lo))) or (f.hi is not None and x > f.hi):
            lo = "" if f.lo is None else f"{'>' if f.lo_open else '>='} {f.lo}"
            hi = "" if f.hi is None else f"<= {f.hi}"
            return f"field {key!r} must be {' and '.join(b for b in (lo, hi) if b)}, got {_short(x)}"
    return None


def check_config(d: Any, schema: Mapping[str, Field], where: str) -> Mapping[str, Any]:
    """``d`` itself, after checking that it is a JSON object and that every field of ``schema`` it holds has the
    right type and lies in bounds; else ``ValueError`` ``"{where}: <problem>"`` (no prefix for an empty
    ``where``). Fields not in ``schema`` are not ours to judge and are left alone."""
    prefix = f"{where}: " if where else ""
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix}must hold a JSON object, got {type(d).__name__}")
    for key, f in schema.items():
        if key in d:
            problem = _check_field(key, f, d[key])
            if problem is not None:
                raise ValueError(prefix + problem)
    return d
