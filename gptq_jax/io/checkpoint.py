"""GPTQ checkpoints in the Hugging Face format the PyTorch tools read and write (docs/checkpoints.md).

A directory with ``config.json`` (the model's config plus ``quantization_config``), ``quantize_config.json``
(the same fields, for AutoGPTQ-era readers), safetensors weights (``model.safetensors`` or shards with
``model.safetensors.index.json``, metadata ``{"format": "pt"}``) and the tokenizer files. Per quantized linear,
``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]``, ``scales`` float16 ``[G, N]``,
``g_idx`` int32 ``[K]`` and ``bias`` where the layer has one; embeddings, norms and ``lm_head`` unquantized.

Symmetric models are written as ``checkpoint_format: "gptq"`` (v1: stored zero - 1, what every reader expects);
asymmetric ones as ``gptq_v2`` (true zeros), since v1 cannot store a zero of 0. Reading honours
``checkpoint_format`` and defaults to v1. JAX-native pipelines save packed models with Orbax instead:
``gptq_jax.engine.packed.save_packed`` / ``load_packed``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.core.config import QuantConfig
from gptq_jax.core.quantizer import QuantizedWeight
from gptq_jax.models.checkpoint_dir import (
    check_out_dir,
    naming,
    read_json_file,
    save_safetensors,
    shard_names,
    staging,
    swap_into_place,
    weight_files,
    write_index,
)
from gptq_jax.models.config_schema import MODEL_CONFIG, QUANT_CONFIG, check_config
from gptq_jax.models.llama import Linear, LlamaForCausalLM, ModelConfig
from gptq_jax.models.params import check_finite, hf_to_nnx, nnx_to_hf
from gptq_jax.models.qlinear import QuantLinear, module_at, quantized_linears
from gptq_jax.models.safetensors_file import SafetensorsFile

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def quantization_config(qc: QuantConfig, *, checkpoint_format: str, true_sequential: bool = True) -> dict[str, Any]:
    """The ``quantization_config`` object of ``config.json`` for a model quantized with ``qc``."""
    return {
        "quant_method": "gptq",
        "bits": qc.bits,
        "group_size": qc.group_size,
        "desc_act": qc.act_order,
        "sym": qc.sym,
        "static_groups": qc.static_groups,
        # Informational, as GPTQModel records it: the group-aware order leaves g_idx trivial, so readers need nothing.
        "act_group_aware": qc.act_group_aware,
        "true_sequential": true_sequential,
        "damp_percent": qc.damp_percent,
        "checkpoint_format": checkpoint_format,
        "lm_head": False,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def _float_tensors(model: LlamaForCausalLM, dtype: Any, streamed: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Every unquantized parameter under its HF name (torch orientation), cast to ``dtype``; ``streamed``: NNX paths
    of linears whose quantized tensors are written from the weights instead."""
    quantized = {name.removeprefix("model.") for name in quantized_linears(model)}  # NNX paths of QuantLinears
    quantized |= set(streamed)
    out = {}
    for key, var in nnx.to_flat_state(nnx.state(model)):
        path = ".".join(str(p) for p in key)
        if _owner(path, quantized):
            continue  # written by the quantized layer itself
        mapped = nnx_to_hf(path)
        if mapped is None:
            raise ValueError(f"cannot save parameter {path}: it has no Hugging Face name")
        hf, transpose = mapped
        a = np.asarray(jax.device_get(var[...])).astype(dtype)
        out[hf] = np.ascontiguousarray(a.T if transpose else a)
    return out


def _owner(path: str, modules: set[str]) -> bool:
    """Whether parameter ``path`` lies inside one of ``modules`` (NNX paths)."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def save_quantized(
    model: LlamaForCausalLM,
    out_dir: str | os.PathLike,
    *,
    quant_config: QuantConfig,
    checkpoint_format: str | None = None,
    float_dtype: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES,
    true_sequential: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    weights: Mapping[str, QuantizedWeight] | None = None,
) -> str:
    """Write a model whose decoder linears are ``QuantLinear`` (see ``gptq_jax.models.qlinear.pack_model``) as a GPTQ
    checkpoint. ``checkpoint_format`` defaults to ``gptq`` for symmetric and ``gptq_v2`` for asymmetric grids
    (v1 cannot hold asymmetric zeros of 0). ``float_dtype`` (default: the model's) is the dtype of embeddings and
    norms. The directory is built under a temporary name and renamed into place at the end, so an interrupted save
    never leaves a directory that looks complete. ``extra_files``: name -> text to write beside (e.g. a report).

    ``weights`` (parameter path -> ``QuantizedWeight``, e.g. a streamed ``quantize``'s ``StoredWeights``): write
    these linears from the weights instead of from ``QuantLinear`` layers; their layers in ``model`` may be float
    or abstract. Each block's weights are packed, written to a shard of their own and dropped, one block at a time,
    so the packed model is never whole in memory. Returns the output path.
    """
    fmt = checkpoint_format or ("gptq" if quant_config.sym else "gptq_v2")
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={fmt!r} is not one of {CHECKPOINT_FORMATS}")
    if fmt == "gptq" and not quant_config.sym:
        raise ValueError(
            "an asymmetric model cannot be written as checkpoint_format='gptq' (v1 stores zero - 1, so a zero of 0 "
            "overflows its field); use 'gptq_v2'"
        )
    qlins = quantized_linears(model)
    if not qlins and not weights:
        raise ValueError("the model has no QuantLinear layers; quantize it and pack it (qlinear.pack_model) first")
    out_dir = os.path.abspath(os.fspath(check_out_dir(out_dir, overwrite=overwrite, option="overwrite=True")))
    float_dtype = np.dtype(jnp.dtype(float_dtype or model.dtype).name)

    streamed = [name.removesuffix(".kernel") for name in (weights or {})]
    tensors: dict[str, np.ndarray] = _float_tensors(model, float_dtype, streamed)
    for name, lin in qlins.items():
        tensors.update(lin.hf_tensors(name, checkpoint_format=fmt))

    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = float_dtype.name
    qconf = quantization_config(quant_config, checkpoint_format=fmt, true_sequential=true_sequential)
    hf_config["quantization_config"] = qconf

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    need = sum(a.nbytes for a in tensors.values())
    need += sum(_packed_bytes(module_at(model, n.removesuffix(".kernel")), quant_config) for n in (weights or {}))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough space to write {out_dir}: its weights need {_size(need)}, {_size(free)} are free in {parent}",
        )
    with staging(out_dir) as tmp:
        if weights:  # blocks packed as their shard is written, shards planned from the shapes
            shards = _plan_shards(model, weights, quant_config, tensors, max_shard_bytes)
            _write_files(tmp, _packed_shards(model, weights, shards, tensors, fmt), len(shards), out_dir)
        else:
            _write_shards(tmp, tensors, max_shard_bytes, final_dir=out_dir)
        texts = {"config.json": json.dumps(hf_config, indent=2), "quantize_config.json": json.dumps(qconf, indent=2)}
        for fname, text in {**texts, **(extra_files or {})}.items():
            with naming(os.path.join(out_dir, fname)), open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, fname)
                if os.path.isfile(src):
                    with naming(os.path.join(out_dir, fname)):
                        shutil.copy2(src, os.path.join(tmp, fname))
        swap_into_place(tmp, out_dir)
    return out_dir


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _packed_bytes(lin: Any, qc: QuantConfig) -> int:
    """About the bytes of a linear in a checkpoint (from its shape, before it is packed): codes at ``bits`` each,
    fp16 scales and packed zeros per group, int32 g_idx."""
    n, k = int(lin.out_features), int(lin.in_features)
    groups = qc.groups(k)
    return int(n * k * qc.bits / 8 + groups * n * (2 + qc.bits / 8) + 4 * k)


def _block_groups(weights: Mapping[str, QuantizedWeight]) -> list[list[str]]:
    """``weights``' names in runs of one block (the ``layers.<i>`` of their path), in ``weights``' order."""
    groups: list[list[str]] = []
    last = None
    for name in weights:
        m = re.match(r"(.*?layers\.\d+)\.", name)
        key = m.group(1) if m else name
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(name)
    return groups


def _plan_shards(model: LlamaForCausalLM, weights: Mapping[str, QuantizedWeight], qc: QuantConfig,
                 tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[list[str]]]:
    """Whole blocks of ``weights`` per shard, filled up to ``max_shard_bytes`` by the sizes their shapes imply; the
    float ``tensors`` go into the last shard, or one of their own when it is full."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    shards: list[list[list[str]]] = [[]]
    size = 0
    for names in _block_groups(weights):
        b = sum(_packed_bytes(module_at(model, n.removesuffix(".kernel")), qc) for n in names)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(names)
        size += b
    if shards[-1] and size + sum(a.nbytes for a in tensors.values()) > max_shard_bytes:
        shards.append([])
    return shards


def _packed_shards(model: LlamaForCausalLM, weights: Mapping[str, QuantizedWeight], shards: list[list[list[str]]],
                   tensors: dict[str, np.ndarray], fmt: str) -> Iterator[dict[str, np.ndarray]]:
    """Each shard's tensors, its blocks packed only when it is reached; the float ``tensors`` in the last."""
    for s, blocks in enumerate(shards):
        out = {}
        for names in blocks:
            for n in names:
                lin = module_at(model, n.removesuffix(".kernel"))
                bias = None if getattr(lin, "bias", None) is None else lin.bias[...]
                q = QuantLinear.from_quantized(weights[n], bias)
                out.update(q.hf_tensors("model." + n.removesuffix(".kernel"), checkpoint_format=fmt))
        if s == len(shards) - 1:
            out.update(tensors)
        yield out


def _write_shards(
    directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int, final_dir: str | None = None
) -> None:
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    _write_files(directory, shards, len(shards), final_dir)


def _write_files(directory: str, shards: Iterable[dict[str, np.ndarray]], n: int, final_dir: str | None) -> None:
    """``n`` safetensors files, one per shard, each written (and dropped) as ``shards`` yields it; the index."""
    names = shard_names(n)
    weight_map: dict[str, str] = {}
    total = i = 0
    for i, shard in enumerate(shards):  # noqa: B007 - i is checked below
        if i >= n:
            raise ValueError(f"more than the {n} shards announced")
        save_safetensors(shard, os.path.join(directory, names[i]), os.path.join(final_dir or directory, names[i]))
        weight_map.update(dict.fromkeys(shard, names[i]))
        total += sum(a.nbytes for a in shard.values())
    if i + 1 != n:
        raise ValueError(f"{i + 1} shards written, {n} announced")
    if n > 1:
        write_index(directory, weight_map, total)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    """``quantization_config`` from ``config.json``, or ``quantize_config.json`` beside it (AutoGPTQ era), checked
    field by field (``config_schema.QUANT_CONFIG``); errors name the file."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path} has no config.json")
    config = check_config(read_json_file(cfg_file, max_bytes=16 * 2**20, what="config.json"), MODEL_CONFIG, cfg_file)
    qc, source = config.get("quantization_config"), f"{cfg_file} quantization_config"
    side = os.path.join(path, "quantize_config.json")
    if qc is None and os.path.isfile(side):
        qc, source = read_json_file(side, max_bytes=2**20, what="quantize_config.json"), side
        if isinstance(qc, dict):
            qc.setdefault("quant_method", "gptq")
    if qc is None:
        raise ValueError(f"{path} is not a quantized checkpoint: config.json has no quantization_config")
    qc = dict(check_config(qc, QUANT_CONFIG, source))
    if qc.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{source}: quant_method={qc.get('quant_method')!r} is not supported (only 'gptq')")
    for key in ("bits", "group_size"):
        if key not in qc:
            raise ValueError(f"{source} has no {key!r}")
    if qc["group_size"] == 0:
        raise ValueError(f"{source}: group_size 0 is not a group size (-1 for one group per row, else positive)")
    fmt = qc.get("checkpoint_format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"{source}: checkpoint_format={fmt!r} is not one of {CHECKPOINT_FORMATS}")
    qc["checkpoint_format"] = fmt
    return qc


def _check_consistency(path: str, name: str, raw: Mapping[str, np.ndarray], lin: Linear, qc: Mapping[str, Any],
                       arch: str) -> None:
    """What the loader can tell about one quantized linear beyond shapes, before it is used: a bias the
    architecture needs, ``g_idx`` against the group size, and, for a symmetric grid, the stored zeros against the
    checkpoint format (v1 stores zero - 1, v2 the zero itself). Each is a checkpoint that would load and run with
    wrong values."""
    if getattr(lin, "bias", None) is not None and f"{name}.bias" not in raw:
        raise ValueError(f"{path}: {name} has no bias, but a {arch} model has one there (config.json's "
                         "architectures); the checkpoint was made for another architecture")
    bits, group_size, fmt = int(qc["bits"]), int(qc["group_size"]), qc["checkpoint_format"]
    k = int(lin.in_features)
    g_idx = raw.get(f"{name}.g_idx")
    if g_idx is not None and group_size != -1 and g_idx.shape == (k,) and np.issubdtype(g_idx.dtype, np.integer):
        groups = -(-k // group_size)
        want = np.minimum(group_size, k - group_size * np.arange(groups))
        if g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups or not np.array_equal(
            np.bincount(g_idx.astype(np.int64), minlength=groups), want
        ):
            raise ValueError(f"{path}: {name}.g_idx does not give groups of group_size={group_size} over {k} "
                             "inputs; the checkpoint was made with another group size")
    qzeros = raw.get(f"{name}.qzeros")
    if qc.get("sym") is True and bits in (2, 4, 8) and qzeros is not None and qzeros.dtype == np.int32:
        shifts = np.arange(32 // bits, dtype=np.uint32) * bits
        stored = (qzeros.view(np.uint32)[..., None] >> shifts) & (2**bits - 1)
        v1, v2 = 2 ** (bits - 1) - 1, 2 ** (bits - 1)  # a symmetric grid's zero, as each format stores it
        other = {"gptq": ("gptq_v2", v2), "gptq_v2": ("gptq", v1)}[fmt]
        if stored.size and np.all(stored == other[1]):
            raise ValueError(f"{path}: {name}.qzeros all hold {other[1]}, the symmetric zero as {other[0]} stores "
                             f"it, but checkpoint_format is {fmt!r}: the file is labelled with the wrong format")


def load_quantized(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load a GPTQ checkpoint (ours or the PyTorch tools') as a model whose quantized linears are ``QuantLinear``.

    ``dtype`` is the compute dtype of activations and unquantized weights. Honours ``checkpoint_format`` (v1 zeros
    are converted to true zeros), ``desc_act`` checkpoints with a non-monotone ``g_idx``, old AutoGPTQ file names,
    and bias tensors (all-zero or not). Shape mismatches against ``config.json`` name the tensor and both shapes.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    qc = read_quantization_config(path)
    if int(qc["bits"]) not in (2, 3, 4, 8):
        raise ValueError(f"{path}: bits={int(qc['bits'])} is not supported (2, 3, 4 or 8)")
    config = ModelConfig.from_json(path)
    dtype = jnp.dtype(dtype)
    raw = _read_all_tensors(path)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_state))
    quantized = _place_quantized_linears(model, raw, path, qc, config, dtype)  # takes their tensors out of raw
    _fill_unquantized(model, raw, path, config, dtype, quantized)
    return model, config


def _read_all_tensors(path: str) -> dict[str, np.ndarray]:
    raw: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        with SafetensorsFile(file) as f:
            for name in f.keys():
                if name in raw:
                    raise ValueError(f"{path}: tensor {name} is stored twice (again in {file})")
                raw[name] = f.read(name)
                check_finite(raw[name], name, file)  # a NaN scale would otherwise run silently to NaN logits
    return raw


def _linear_at(model: LlamaForCausalLM, name: str, path: str) -> tuple[Any, str, Linear]:
    """(parent module, attribute, the ``Linear`` there) for the HF module ``name`` of a ``.qweight``."""
    parent_path, _, attr = name.removeprefix("model.").rpartition(".")
    try:
        parent = module_at(model, parent_path) if re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name) else None
    except (AttributeError, IndexError, TypeError):
        parent = None
    old = getattr(parent, attr, None)
    if not isinstance(old, Linear):
        raise ValueError(f"{path}: quantized tensor {name}.qweight has no place in this model")
    return parent, attr, old


def _place_quantized_linears(model: LlamaForCausalLM, raw: dict[str, np.ndarray], path: str, qc: dict[str, Any],
                             config: ModelConfig, dtype: Any) -> set[str]:
    """Every HF module with a ``qweight`` becomes a ``QuantLinear`` in ``model``; its tensors are taken out of
    ``raw``. Returns the NNX paths of those modules."""
    quant_names = sorted({n[: -len(".qweight")] for n in raw if n.endswith(".qweight")})
    if not quant_names:
        raise ValueError(f"{path}: quantization_config is present but no tensor ends in .qweight")
    for name in quant_names:
        parent, attr, old = _linear_at(model, name, path)
        missing = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales") if f"{name}.{s}" not in raw]
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing}")
        _check_consistency(path, name, raw, old, qc, config.architecture)
        lin = QuantLinear.from_hf_tensors(
            name,
            {s: raw.pop(f"{name}.{s}") for s in (*_QUANT_SUFFIXES, "bias") if f"{name}.{s}" in raw},
            in_features=old.in_features,
            out_features=old.out_features,
            bits=int(qc["bits"]),
            group_size=int(qc["group_size"]),
            checkpoint_format=qc["checkpoint_format"],
            dtype=dtype,
        )
        setattr(parent, attr, lin)
    return {n.removeprefix("model.") for n in quant_names}


def _fill_unquantized(model: LlamaForCausalLM, raw: dict[str, np.ndarray], path: str, config: ModelConfig,
                      dtype: Any, quantized: set[str]) -> None:
    """Every other tensor of ``raw`` into its parameter, through the model's name table; then every parameter
    outside the ``quantized`` modules must have been filled."""
    _, state = nnx.split(model)
    slots = {".".join(str(p) for p in key): var for key, var in nnx.to_flat_state(state)}
    filled = set()
    for name, a in raw.items():
        if re.fullmatch(r".*rotary_emb\.inv_freq", name):
            continue
        mapped = hf_to_nnx(name)
        if mapped is None:
            raise ValueError(f"{path}: tensor {name} has no place in a {config.architecture} model")
        target, transpose = mapped
        if target == "lm_head.kernel" and config.tie_word_embeddings:
            continue
        if target not in slots:
            raise ValueError(f"{path}: tensor {name} has no place in this model (is it quantized elsewhere?)")
        var = slots[target]
        a = a.T if transpose else a
        if tuple(a.shape) != tuple(var[...].shape):
            want = tuple(var[...].shape)[::-1] if transpose else tuple(var[...].shape)
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(a.shape)[::-1] if transpose else a.shape}, "
                f"config.json implies {want}"
            )
        var.set_value(jnp.asarray(a, dtype))
        filled.add(target)
    unfilled = [t for t in slots if t not in filled and not _owner(t, quantized)]
    if unfilled:
        raise ValueError(f"{path}: {len(unfilled)} tensor(s) missing from the checkpoint, e.g. {unfilled[:5]}")


__all__ = [
    "CHECKPOINT_FORMATS",
    "load_quantized",
    "quantization_config",
    "read_quantization_config",
    "save_quantized",
]
