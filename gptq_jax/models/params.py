"""Hugging Face checkpoints <-> ``LlamaForCausalLM``: the name table, loading, saving, the tokenizer.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``. ``PARAM_TABLE`` below is the one
place that says which HF tensor becomes which NNX parameter; saving runs the same table backwards.

Error policy (all raised before any tensor data is read, except for data corruption):

- missing directory / config.json / weight file: ``FileNotFoundError`` naming the path;
- malformed config, unsupported architecture, a corrupt or truncated safetensors file, a missing tensor, a tensor of
  the wrong shape or a non-float dtype, a tensor stored twice: ``ValueError`` naming the tensor and the values;
- a tensor holding NaN or Inf: ``ValueError`` naming the tensor, its file and the count, when the weights are read
  (all of them, before any work: quantizing a model with a NaN would otherwise fail layers later or silently);
- tensors the model has no place for (e.g. GPTQ ``qweight``, a 3rd layer in a 2-layer config): ``ValueError``
  listing them, or with ``strict=False`` a warning and they are skipped. ``rotary_emb.inv_freq`` buffers (old Llama
  checkpoints) and a redundant ``lm_head.weight`` in a tied model are skipped silently: we recompute / share them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.models.checkpoint_dir import (
    read_json_file,
    shard_names,
    staging,
    swap_into_place,
    weight_files,
    write_index,
)
from gptq_jax.models.llama import LlamaForCausalLM, ModelConfig
from gptq_jax.models.safetensors_file import SafetensorsFile

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# The name table

# (HF tensor name regex, NNX path template, transpose). torch Linear stores weight (out, in); our kernels are (in, out).
PARAM_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", False),
    (r"model\.norm\.weight", "norm.scale", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.scale", False),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", r"layers.\1.self_attn.\2.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias", r"layers.\1.self_attn.\2.bias", False),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", r"layers.\1.self_attn.\2.scale", False),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"layers.\1.mlp.\2.kernel", True),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", r"layers.\1.mlp.\2.bias", False),
)
# Buffers some checkpoints carry that the model recomputes from the config.
IGNORED_TENSORS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors name -> numpy name
_DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")


def _reverse_entry(hf_regex: str, nnx_template: str) -> tuple[re.Pattern, str]:
    """Runs a table row backwards: (regex over NNX paths, HF name template). The regexes in the table only hold
    escaped dots and capture groups, so swapping groups for backrefs and back is exact."""
    groups = re.findall(r"\(([^()]*)\)", hf_regex)
    parts = re.split(r"\\(\d)", nnx_template)  # literal, group number, literal, ...
    nnx_regex = "".join(re.escape(p) if i % 2 == 0 else f"({groups[int(p) - 1]})" for i, p in enumerate(parts))
    k = iter(range(1, len(groups) + 1))
    hf_template = re.sub(r"\([^()]*\)", lambda _: f"\\{next(k)}", hf_regex).replace(r"\.", ".")
    return re.compile(nnx_regex), hf_template


_FORWARD = tuple((re.compile(h), n, t) for h, n, t in PARAM_TABLE)
_BACKWARD = tuple((*_reverse_entry(h, n), t) for h, n, t in PARAM_TABLE)
_IGNORED = tuple(re.compile(p) for p in IGNORED_TENSORS)


def hf_to_nnx(name: str) -> tuple[str, bool] | None:
    """HF tensor name -> (dotted NNX path, transpose?), or None if the table has no row for it."""
    for regex, template, transpose in _FORWARD:
        m = regex.fullmatch(name)
        if m:
            return m.expand(template), transpose
    return None


def nnx_to_hf(path: str) -> tuple[str, bool] | None:
    """Dotted NNX path -> (HF tensor name, transpose?), or None."""
    for regex, template, transpose in _BACKWARD:
        m = regex.fullmatch(path)
        if m:
            return m.expand(template), transpose
    return None


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _check_dtype(dtype: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return dt


def check_finite(x: Any, name: str, file: str) -> None:
    """Raise ``ValueError`` naming tensor ``name`` of ``file`` if ``x`` (numpy or jax, any dtype) holds NaN or Inf."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return
    finite = jnp.isfinite(jnp.asarray(x))
    if bool(jnp.all(finite)):
        return
    bad = int(finite.size - jnp.count_nonzero(finite))
    first = tuple(int(i) for i in np.unravel_index(int(jnp.argmin(finite.reshape(-1))), finite.shape))
    raise ValueError(
        f"tensor {name} in {file} has {bad} NaN/Inf value(s) (the first at index {list(first)}); "
        "the checkpoint is damaged or was saved from a diverged model"
    )


def _open(file: str) -> SafetensorsFile:
    return SafetensorsFile(file)


def _check_layer_count(config: ModelConfig, files: list[str], path: str) -> None:
    """config.json's layer count against the layers the headers hold, before the model is built: a config that
    claims 10^6 layers on a 2-layer file would otherwise spend minutes building a model that cannot be loaded."""
    layers = set()
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                m = re.match(r"model\.layers\.(\d+)\.", name)
                if m:
                    layers.add(int(m.group(1)))
    if config.num_hidden_layers > len(layers):  # fewer is reported (or skipped, strict=False) by name below
        raise ValueError(
            f"{path}: config.json says num_hidden_layers={config.num_hidden_layers}, the weight files hold "
            f"{len(layers)} layer(s)"
        )


def load_pretrained(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, strict: bool = True
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Loads a HF Llama/Mistral/Qwen2/Qwen3 safetensors checkpoint into a ``LlamaForCausalLM`` of ``dtype``.

    The model is built abstractly (``nnx.eval_shape``, no memory), then filled a layer at a time, each tensor read
    lazily, cast and transposed on its own, so peak memory stays near one copy of the model in ``dtype`` (plus one
    layer). ``strict=False`` turns unexpected tensors into a warning. See the module docstring for the errors raised.
    """
    model, config, load = open_pretrained(path, dtype=dtype, strict=strict)
    graphdef, state = nnx.split(model)
    # A layer at a time (``layers.3``, ``embed_tokens``), made jax arrays before the next is read: never the whole
    # model twice (numpy and jax), and each file opened once per layer, not once per tensor.
    flat = nnx.to_flat_state(state)
    by_layer: dict[str, list[str]] = {}
    for key, _ in flat:
        path = _dotted(key)
        by_layer.setdefault(".".join(path.split(".")[:2]) if path.startswith("layers.") else path.split(".")[0],
                            []).append(path)  # fmt: skip
    values = {}
    for paths in by_layer.values():
        values.update((p, jnp.asarray(x)) for p, x in load(paths).items())
    flat = [(key, var.replace(values.pop(_dotted(key)))) for key, var in flat]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, config


def open_pretrained(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, strict: bool = True, check_values: bool = False
) -> tuple[LlamaForCausalLM, ModelConfig, Callable[[list[str]], dict[str, np.ndarray]]]:
    """A checkpoint's model without its weights, for streaming: ``(model, config, load)``.

    ``model`` is abstract (every parameter a ``jax.ShapeDtypeStruct``); ``load(paths)`` reads, checks, casts and
    transposes the tensors of those NNX parameter paths (``layers.3.mlp.up_proj.kernel``), and nothing else. Every
    name, shape and dtype is checked against config.json from the file headers first, as ``load_pretrained`` does;
    this is what ``gptq_jax.quantize(..., load=load)`` streams from. ``check_values`` also reads every tensor
    once, one at a time, so that a NaN or Inf anywhere is reported before any work starts rather than when its
    block is reached.
    """
    path = os.fspath(path)
    dtype = _check_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_json(path)
    _check_not_quantized(path)
    files = weight_files(path)
    _check_layer_count(config, files, path)

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    _, abstract_state = nnx.split(abstract)
    shapes = {_dotted(p): tuple(v.shape) for p, v in nnx.to_flat_state(abstract_state)}  # NNX path -> shape
    plan = _read_plan(files, shapes, config, path, strict)
    digests = _first_read_digests(files, plan) if check_values else {}
    return abstract, config, _streaming_loader(path, files, plan, digests, dtype)


def _check_not_quantized(path: str) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        if "quantization_config" in json.load(f):
            raise ValueError(
                f"{path} is a quantized checkpoint (config.json has quantization_config); "
                "load_pretrained reads unquantized float checkpoints only"
            )


_Plan = dict[str, tuple[str, str, bool]]  # NNX path -> (file, HF name, transpose)


def _read_plan(files: list[str], shapes: dict[str, tuple[int, ...]], config: ModelConfig, path: str,
               strict: bool) -> _Plan:
    """Pass 1, headers only: where each NNX parameter (path -> shape) is read from. Every name, shape and dtype
    problem is reported before any data is read."""
    plan: _Plan = {}
    unexpected: list[str] = []
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                if any(r.fullmatch(name) for r in _IGNORED):
                    continue
                mapped = hf_to_nnx(name)
                if mapped is not None and mapped[0] == "lm_head.kernel" and config.tie_word_embeddings:
                    log.info("%s: tied embeddings, ignoring lm_head.weight", path)
                    continue
                if mapped is None or mapped[0] not in shapes:
                    unexpected.append(name)
                    continue
                target, transpose = mapped
                if target in plan:
                    raise ValueError(f"tensor {name} is stored twice: in {plan[target][0]} and {file}")
                st_dtype, shape = f.info(name).dtype, f.info(name).shape
                want = shapes[target][::-1] if transpose else shapes[target]
                if shape != want:
                    raise ValueError(f"tensor {name} has shape {shape}, config.json implies {want}")
                if st_dtype not in _ST_DTYPES:
                    raise ValueError(f"tensor {name} has dtype {st_dtype}; expected one of {sorted(_ST_DTYPES)}")
                plan[target] = (file, name, transpose)
    _check_complete(plan, shapes, unexpected, config, path, strict)
    return plan


def _check_complete(plan: _Plan, shapes: dict[str, tuple[int, ...]], unexpected: list[str], config: ModelConfig,
                    path: str, strict: bool) -> None:
    """Every parameter found a tensor; tensors with no place are an error (a warning with ``strict=False``)."""
    missing = [nnx_to_hf(t)[0] for t in shapes if t not in plan]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    if unexpected:
        msg = (
            f"{path}: {len(unexpected)} tensor(s) have no place in a {config.architecture} model with this config: "
            f"{', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
        if strict:
            raise ValueError(msg + " (pass strict=False to skip them)")
        warnings.warn(msg + "; skipped", stacklevel=4)


def _first_read_digests(files: list[str], plan: _Plan) -> dict[str, str]:
    """Every tensor read once, one at a time, checked for NaN/Inf: NNX path -> digest of its bytes, so that a later
    read of a rewritten file is caught."""
    digests: dict[str, str] = {}
    for file in files:
        with _open(file) as f:
            for target, (_, name, _) in ((t, v) for t, v in plan.items() if v[0] == file):
                x, digests[target] = f.read(name, want_digest=True)
                check_finite(x, name, file)
                del x
    return digests


def _streaming_loader(path: str, files: list[str], plan: _Plan, digests: dict[str, str],
                      dtype: Any) -> Callable[[list[str]], dict[str, np.ndarray]]:
    opened = {file: _open(file) for file in files}  # kept open: each read is checked against the file as opened

    def load(paths: list[str]) -> dict[str, np.ndarray]:
        """Pass 2, for ``paths`` only: read, cast and transpose one tensor at a time. A weight file rewritten since
        ``open_pretrained`` (size, mtime, inode, or a tensor's digest) is an error naming it."""
        unknown = [t for t in paths if t not in plan]
        if unknown:
            raise KeyError(f"no tensor of {path} maps to the parameter(s) {', '.join(unknown[:8])}")
        values: dict[str, np.ndarray] = {}
        for target in paths:
            file, name, transpose = plan[target]
            x = opened[file].read(name, expect_digest=digests.get(target))
            check_finite(x, name, file)
            x = x.astype(dtype, copy=False)
            values[target] = x.T if transpose else x
            del x
        return values

    return load


MAX_TOKENIZER_JSON_BYTES = 128 * 2**20  # the largest real tokenizer.json files are a few tens of MB
_TOKENIZER_JSON = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
# Any one of these sets of files is a tokenizer transformers can load without the network.
_TOKENIZER_SETS = ({"tokenizer.json"}, {"tokenizer.model"}, {"vocab.json", "merges.txt"}, {"vocab.txt"})


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` from a local directory (never the network)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    # transformers reports a malformed JSON file or a missing tokenizer file only vaguely ("cannot load a
    # tokenizer", "you need sentencepiece"): name the file, and the JSON error with its line, first.
    for fname in _TOKENIZER_JSON:
        file = os.path.join(path, fname)
        if os.path.isfile(file):
            data = read_json_file(file, max_bytes=MAX_TOKENIZER_JSON_BYTES, what=fname)
            if not isinstance(data, dict):
                raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
            if fname == "tokenizer.json" and not isinstance(data.get("model"), dict):
                raise ValueError(f"{file} is not a tokenizers file: its \"model\" must be a JSON object, "
                                 f"got {str(data.get('model'))[:40]!r}")
    present = set(os.listdir(path))
    if not any(need <= present for need in _TOKENIZER_SETS):
        if "vocab.json" in present and "merges.txt" not in present:
            raise FileNotFoundError(f"{path} has vocab.json but no merges.txt (a BPE tokenizer needs both)")
        raise FileNotFoundError(
            f"{path} has no tokenizer: expected tokenizer.json (or tokenizer.model, or vocab.json with merges.txt)"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise many types (and Rust panics) on a malformed file
        raise ValueError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def _named_tensors(model: LlamaForCausalLM) -> Iterator[tuple[str, jax.Array, bool]]:
    _, state = nnx.split(model)
    for key, var in nnx.to_flat_state(state):
        path = _dotted(key)
        mapped = nnx_to_hf(path)
        if mapped is None:
            raise ValueError(
                f"cannot save {path} ({type(var).__name__}): save_pretrained writes the unquantized model only "
                "(every projection a plain Linear)"
            )
        yield mapped[0], var[...], mapped[1]


def _write_safetensors(file: str, tensors: list[tuple[str, jax.Array, bool]]) -> None:
    """Writes one safetensors file, one tensor at a time (no full in-memory copy of the file)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x, transpose in tensors:
        st = {v: k for k, v in _ST_DTYPES.items()}.get(jnp.dtype(x.dtype).name)
        if st is None:
            raise ValueError(f"cannot save tensor {name} of dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
        shape = list(x.shape[::-1] if transpose else x.shape)
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for an 8-byte aligned data section
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, x, transpose in tensors:
            a = np.asarray(jax.device_get(x))
            f.write(np.ascontiguousarray(a.T if transpose else a).tobytes())


def save_pretrained(
    model: LlamaForCausalLM,
    config: ModelConfig | None,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``) in HF format, in the dtype the model holds. ``config`` defaults to
    ``model.config``.

    The directory is written beside ``out_dir`` and renamed into place (``checkpoint_dir.swap_into_place``), so a
    reader sees the old directory or the whole new one. The weights and config.json of an earlier save are
    replaced (stale shards go); other files already in ``out_dir`` (e.g. a tokenizer) are kept.
    """
    config = model.config if config is None else config
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    hf_config = config.to_hf_dict()
    tensors = list(_named_tensors(model))
    hf_config["torch_dtype"] = jnp.dtype(tensors[0][1].dtype).name

    shards: list[list[tuple[str, jax.Array, bool]]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t[1].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t[1].nbytes
    names = shard_names(len(shards))

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    with staging(out_dir) as tmp:
        for name, shard in zip(names, shards, strict=True):
            _write_safetensors(os.path.join(tmp, name), shard)
        if len(shards) > 1:
            weight_map = {t[0]: name for name, shard in zip(names, shards, strict=True) for t in shard}
            write_index(tmp, weight_map, sum(t[1].nbytes for t in tensors))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        _keep_other_files(out_dir, tmp)
        swap_into_place(tmp, out_dir)


def _keep_other_files(out_dir: str, tmp: str) -> None:
    """Copy into ``tmp`` what ``out_dir`` holds besides an earlier save's weights and config (e.g. a tokenizer),
    so that replacing the directory keeps them."""
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        if name == "config.json" or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", name):
            continue
        src, dst = os.path.join(out_dir, name), os.path.join(tmp, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
