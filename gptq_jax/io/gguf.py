"""Import a Llama-architecture GGUF file as an ordinary Hugging Face checkpoint directory.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file with Q4_1 weights. GPTQ needs
full-precision weights to start from, so `convert_gguf` dequantizes every tensor to float32 with
the `gguf` package and writes what `transformers` (and `gptq_jax.models.load_pretrained`) read:

    OUT_DIR/config.json               LlamaConfig built from the `llama.*` metadata
    OUT_DIR/generation_config.json    bos / eos / pad token ids
    OUT_DIR/model.safetensors         float32 tensors under their HF names
    OUT_DIR/tokenizer.json, ...       fast tokenizer rebuilt by transformers from the GGUF metadata

Two layout facts the conversion must undo:

- GGUF records dimensions innermost-first (`ne[0]` is the row length), the reverse of a numpy
  shape. A torch Linear weight `[out, in]` is stored with `ne = [in, out]`.
- llama.cpp's converter reorders the rows of the Q and K projections of every head from HF's
  "rotate-half" layout (first half of the head, then second half) into interleaved pairs
  (`x0, x_{d/2}, x1, x_{d/2+1}, ...`), which is what its RoPE kernel expects. We put them back,
  per head, using `n_head` for Q and `n_head_kv` for K. Forgetting this still loads fine and
  yields a model with perplexity in the thousands.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptq_jax.models.checkpoint_dir import CheckpointDirError, naming, save_safetensors, staging, swap_into_place
from gptq_jax.models.checkpoint_dir import check_out_dir as check_out_dir_rules
from gptq_jax.models.config_schema import Field, check_config
from gptq_jax.models.llama import ModelConfig

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Bump when the files `convert_gguf` writes change, so cached conversions (gptq_jax.io.default_model) are redone.
CONVERSION_VERSION = 1


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: not GGUF, not Llama, an unsupported tensor or type."""


@dataclass(frozen=True, kw_only=True)
class ConversionReport:
    """What `convert_gguf` wrote."""

    out_dir: Path
    config: dict[str, Any]  # the config.json written
    num_tensors: int  # tensors in model.safetensors
    num_parameters: int
    quant_types: dict[str, int]  # GGUF tensor type name -> number of tensors of that type
    tokenizer: bool  # whether tokenizer files were written


# GGUF tensor name -> HF name. `{n}` is the layer index. Biases appear in a few Llama variants.
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str:
    """The HF Llama name of a GGUF tensor, e.g. `blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise GGUFError(
        f"tensor {gguf_name!r} has no Llama equivalent; known: {sorted(_GLOBAL_MAP)} and "
        f"blk.N.{{{', '.join(sorted(_LAYER_MAP))}}}"
    )


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves in a Q or K projection.

    `w` is `[n_head * head_dim, ...]` (a weight `[out, in]` or a bias `[out]`). In GGUF, row
    `2 * i + j` of a head holds HF row `j * head_dim / 2 + i` (i < head_dim / 2, j in {0, 1}).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp applies (inverse of `unpermute_rotary`); used to write test files."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path):
    """A `gguf.GGUFReader` for `path`, after checking that it is a GGUF file at all and that its header's counts
    fit in the file (`check_header`): the reader allocates what a count says before it finds out."""
    import gguf

    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    check_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/IndexError on corrupt files
        raise GGUFError(f"{path} could not be read as GGUF: {e}") from e


# GGUF value type -> size in bytes (strings: 8 + length; arrays: 12 + their elements)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4


class _Cursor:
    """Reads a GGUF header from a file, every length and count checked against the bytes left before it is used."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path} is corrupt: {what} (at byte {self.pos:,} of {self.size:,})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n:,} bytes, {self.size - self.pos:,} are left")

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        self.f.seek(self.pos)
        self.pos += n
        return struct.unpack(fmt, self.f.read(n))[0]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> None:
        self.skip(self.unpack("<Q", f"the length of {what}"), what)

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            etype = self.unpack("<I", f"the element type of {what}")
            count = self.unpack("<Q", f"the element count of {what}")
            smallest = _SCALAR_SIZES.get(etype, 8 if etype == _STRING else 12)
            self.need(count * smallest, f"{what}'s {count:,} elements")  # before any element is read
            if etype in _SCALAR_SIZES:
                self.skip(count * smallest, what)
            elif depth >= _MAX_NESTING:
                raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
            else:
                for _ in range(count):
                    self.value(etype, what, depth + 1)
        else:
            raise self.fail(f"{what} has an unknown value type {vtype}")


def check_header(path: Path) -> None:
    """Walk the GGUF header (metadata and tensor infos) without keeping any of it, checking that every string
    length, array count and tensor count fits in the bytes that are left, and every tensor's data lies in the
    file; a `GGUFError` naming the file otherwise."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        c = _Cursor(f, size, path)
        c.skip(4, "the magic")
        version = c.unpack("<I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = c.unpack("<Q", "the tensor count")
        n_kv = c.unpack("<Q", "the metadata count")
        c.need(n_kv * 13 + n_tensors * 24, f"{n_kv:,} metadata entries and {n_tensors:,} tensor infos")
        for i in range(n_kv):
            c.string(f"metadata key {i}")
            c.value(c.unpack("<I", f"the type of metadata entry {i}"), f"metadata entry {i}")
        infos = []
        for i in range(n_tensors):
            c.string(f"the name of tensor {i}")
            n_dims = c.unpack("<I", f"the rank of tensor {i}")
            if not 1 <= n_dims <= 4:
                raise c.fail(f"tensor {i} has {n_dims} dimensions (1 to 4)")
            dims = [c.unpack("<Q", f"a dimension of tensor {i}") for _ in range(n_dims)]
            qtype = c.unpack("<I", f"the type of tensor {i}")
            offset = c.unpack("<Q", f"the data offset of tensor {i}")
            infos.append((i, dims, qtype, offset))
        data_start = -(-c.pos // 32) * 32  # the default alignment; the reader checks a declared one itself
        for i, dims, qtype, offset in infos:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise c.fail(f"tensor {i} has an unknown type {qtype}") from None
            n = int(np.prod(dims, dtype=object))
            if n % block or data_start + offset + n // block * type_size > size:
                raise c.fail(f"tensor {i} ({' x '.join(map(str, dims))}) does not fit in the file")


def _metadata(reader) -> dict[str, Any]:
    """Scalar and short metadata fields as Python values (the long tokenizer arrays are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # an exotic field type we do not need; do not fail the conversion on it
            logger.debug("skipping unreadable GGUF field %s", key)
    return out


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise GGUFError(f"{path}: GGUF metadata lacks {key!r}, needed for config.json")
    return meta[key]


def _f32(x: float) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def hf_config(meta: dict[str, Any], *, tied: bool, vocab_size: int, path: Path) -> dict[str, Any]:
    """The HF `config.json` of a Llama model from its GGUF metadata."""
    hidden = int(_required(meta, "llama.embedding_length", path))
    n_head = int(_required(meta, "llama.attention.head_count", path))
    n_head_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (only none and linear)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(_required(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_required(meta, "llama.block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_required(meta, "llama.context_length", path)),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp's default when the key is absent, as in the original Llama.
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": (
            {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])} if scaling == "linear" else None
        ),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in meta:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(meta[key])
    return config


def _check_architecture(meta: dict[str, Any], path: Path) -> None:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; only 'llama' GGUF files can be converted")


def _check_dequantizable(reader, path: Path) -> None:
    """Fail before any work if some tensor's type cannot be dequantized by the `gguf` package."""
    import gguf

    seen = {}
    for t in reader.tensors:
        seen.setdefault(t.tensor_type, t.name)
    for qtype, name in seen.items():
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # dequantizing one zero block is the cheapest reliable "is this type supported?"
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            raise GGUFError(
                f"{path}: tensor {name!r} has type {qtype.name}, which cannot be dequantized "
                "(the gguf package dequantizes F32, F16, BF16 and the Q*/IQ*/TQ* block types)"
            ) from None


_2_31 = 2**31 - 1
METADATA = {  # the GGUF fields config.json is made from, with the bounds config_schema.MODEL_CONFIG sets there
    "llama.embedding_length": Field(kind="int", lo=1, hi=2**17),
    "llama.attention.head_count": Field(kind="int", lo=1, hi=4096),
    "llama.attention.head_count_kv": Field(kind="int", lo=1, hi=4096),
    "llama.attention.key_length": Field(kind="int", lo=2, hi=4096),
    "llama.block_count": Field(kind="int", lo=1, hi=4096),
    "llama.feed_forward_length": Field(kind="int", lo=1, hi=2**20),
    "llama.context_length": Field(kind="int", lo=1, hi=2**26),
    "llama.attention.layer_norm_rms_epsilon": Field(kind="number", lo=0, lo_open=True, hi=1),
    "llama.rope.freq_base": Field(kind="number", lo=0, lo_open=True, hi=1e12),
    "llama.rope.scaling.factor": Field(kind="number", lo=0, lo_open=True, hi=1e6),
    "llama.rope.scaling.type": Field(kind="str"),
    "tokenizer.ggml.bos_token_id": Field(kind="int", lo=0, hi=_2_31),
    "tokenizer.ggml.eos_token_id": Field(kind="int", lo=0, hi=_2_31),
    "tokenizer.ggml.padding_token_id": Field(kind="int", lo=0, hi=_2_31),
}


def check_metadata(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """The metadata config.json is made from, checked by type and bounds, then against the tensors' shapes (from
    the tensor infos: no data is read), so that a file whose metadata contradicts its tensors is refused instead of
    converted into a checkpoint that fails, hangs or divides by zero later."""
    try:
        check_config(meta, METADATA, f"{path}: GGUF metadata")
    except ValueError as e:
        raise GGUFError(str(e)) from None
    try:
        hf = {hf_tensor_name(n): s for n, s in shapes.items() if n != "rope_freqs.weight"}
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    if "model.embed_tokens.weight" not in hf or len(hf["model.embed_tokens.weight"]) != 2:
        raise GGUFError(f"{path}: no 2-D token_embd.weight tensor; not a complete Llama model")
    config = hf_config(meta, tied="lm_head.weight" not in hf, vocab_size=hf["model.embed_tokens.weight"][0], path=path)
    try:
        ModelConfig.from_hf_dict(config)
    except ValueError as e:
        raise GGUFError(f"{path}: its metadata makes an invalid config.json: {e}") from None
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER_RE.match(n))}
    if layers != set(range(config["num_hidden_layers"])):
        raise GGUFError(f"{path}: llama.block_count is {config['num_hidden_layers']}, the tensors hold "
                        f"{len(layers)} block(s) (blk.{min(layers, default=0)}..blk.{max(layers, default=-1)})")
    h, i, hd, v = config["hidden_size"], config["intermediate_size"], config["head_dim"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    want = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q), "self_attn.q_proj.bias": (q,),
                 "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    for name, shape in hf.items():
        m = re.match(r"model\.layers\.\d+\.(.+)", name)
        expect = per_layer.get(m.group(1)) if m else want.get(name)
        if expect is not None and tuple(shape) != expect:
            raise GGUFError(f"{path}: tensor {name} has shape {tuple(shape)}, the metadata implies {expect} "
                            "(embedding_length, head counts, key_length, feed_forward_length)")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a Llama GGUF file as float32 numpy arrays under HF names, and its metadata.

    The metadata also gets `gguf.tensor_types`: GGUF tensor type name -> number of tensors.

    Q and K projections are returned in HF's layout (the llama.cpp permutation undone).
    """
    import gguf

    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    _check_architecture(meta, path)
    _check_dequantizable(reader, path)
    check_metadata(meta, {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}, path)
    n_head = int(_required(meta, "llama.attention.head_count", path))
    n_head_kv = int(meta.get("llama.attention.head_count_kv", n_head))

    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise GGUFError(f"{path}: per-dimension rope frequencies (Llama 3.1 rope scaling) are not supported")
        name = hf_tensor_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne is innermost-first
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if t.name.startswith("blk.") and ".attn_q." in t.name:
            w = unpermute_rotary(w, n_head)
        elif t.name.startswith("blk.") and ".attn_k." in t.name:
            w = unpermute_rotary(w, n_head_kv)
        tensors[name] = np.ascontiguousarray(w)
    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor; not a complete Llama model")
    meta["gguf.tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return tensors, meta


def _write_tokenizer(gguf_path: Path, out_dir: Path, meta: dict[str, Any]) -> bool:
    """Rebuild the fast tokenizer from the GGUF tokenizer metadata with transformers and save it."""
    if "tokenizer.ggml.model" not in meta:
        logger.warning("%s has no tokenizer metadata; writing the model without a tokenizer", gguf_path)
        return False
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(gguf_path.parent.resolve()), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as e:  # transformers knows fewer tokenizer models than GGUF can hold
        raise GGUFError(f"{gguf_path}: transformers could not build a tokenizer from the GGUF metadata: {e}") from e
    if "llama.context_length" in meta:
        tok.model_max_length = int(meta["llama.context_length"])
    tok.save_pretrained(str(out_dir))
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_out_dir(out_dir: str | os.PathLike, *, gguf_path: str | os.PathLike, overwrite: bool,
                  option: str = "overwrite=True") -> Path:
    """OUT_DIR's rules (``checkpoint_dir.check_out_dir``): it may not be or contain the GGUF file, and a non-empty
    OUT_DIR is replaced only with ``overwrite`` and only when gptq-jax wrote it."""
    try:
        return check_out_dir_rules(out_dir, inputs={"the GGUF file": gguf_path}, overwrite=overwrite, option=option)
    except CheckpointDirError as e:
        raise GGUFError(str(e)) from None


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False, tokenizer: bool = True,
    overwrite_option: str = "overwrite=True",
) -> ConversionReport:
    """Convert a Llama GGUF file into an HF checkpoint directory with float32 weights.

    Args:
      gguf_path: the `.gguf` file.
      out_dir: directory to create; must be absent or empty unless `overwrite`, and may not be or contain the
        GGUF file.
      overwrite: replace an existing non-empty `out_dir` that gptq-jax wrote (only once the new one is complete).
      overwrite_option: how errors name `overwrite` (the CLI says `--overwrite`).
      tokenizer: also write tokenizer files (when the GGUF carries tokenizer metadata).

    Raises:
      GGUFError: not a GGUF file, not the llama architecture, a tensor type the `gguf` package
        cannot dequantize, an unknown tensor name, or a non-empty `out_dir` without `overwrite`.
    """
    gguf_path = Path(gguf_path)
    out_dir = check_out_dir(out_dir, gguf_path=gguf_path, overwrite=overwrite, option=overwrite_option)
    tensors, meta = read_tensors(gguf_path)
    tied = "lm_head.weight" not in tensors
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    config = hf_config(meta, tied=tied, vocab_size=vocab_size, path=gguf_path)
    if "model.layers.0.self_attn.q_proj.bias" in tensors:
        config["attention_bias"] = True
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}

    with staging(out_dir) as tmp_name:
        tmp = Path(tmp_name)
        save_safetensors(tensors, str(tmp / "model.safetensors"), str(out_dir / "model.safetensors"))
        for name, obj in (("config.json", config), ("generation_config.json", generation)):
            with naming(str(out_dir / name)):
                _write_json(tmp / name, obj)
        with naming(str(out_dir)):
            wrote_tokenizer = _write_tokenizer(gguf_path, tmp, meta) if tokenizer else False
        swap_into_place(tmp_name, out_dir)
    logger.info("converted %s -> %s (%d tensors)", gguf_path, out_dir, len(tensors))
    return ConversionReport(
        out_dir=out_dir,
        config=config,
        num_tensors=len(tensors),
        num_parameters=int(sum(t.size for t in tensors.values())),
        quant_types=dict(meta["gguf.tensor_types"]),
        tokenizer=wrote_tokenizer,
    )
