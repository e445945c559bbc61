"""Import a Llama-architecture GGUF file as an ordinary Hugging Face checkpoint directory.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file with Q4_1 weights. GPTQ needs
full-precision weights to start from, so `convert_gguf` dequantizes every tensor to float32 with
the `gguf` package and writes what `transformers` (and `gptq_jax.models.load_pretrained`) read.
The file itself is read with plain reads, never memory-mapped (`gptq_jax.io.gguf_file`), so a file
truncated or rewritten during the conversion ends it with a message, and nothing is written:

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptq_jax.io.gguf_file import GGUFError, GGUFFile, GGUFTensor
from gptq_jax.models.checkpoint_dir import CheckpointDirError, naming, save_safetensors, staging, swap_into_place
from gptq_jax.models.checkpoint_dir import check_out_dir as check_out_dir_rules
from gptq_jax.models.config_schema import Field, check_config
from gptq_jax.models.llama import ModelConfig

logger = logging.getLogger(__name__)

# Bump when the files `convert_gguf` writes change, so cached conversions (gptq_jax.io.default_model) are redone.
CONVERSION_VERSION = 1


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


def read_metadata(header: Path, path: Path) -> dict[str, Any]:
    """Scalar and short metadata fields as Python values (the long tokenizer arrays are skipped), read with
    `gguf.GGUFReader` from ``header``, the private copy `GGUFFile.metadata_copy` made of ``path``'s metadata."""
    import gguf

    try:
        reader = gguf.GGUFReader(header)
    except Exception as e:  # the reader raises bare ValueError/KeyError on a corrupt header
        raise GGUFError(f"{path} could not be read as GGUF: {e}") from None
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


def _check_dequantizable(tensors: list[GGUFTensor], path: Path) -> None:
    """Fail before any work if some tensor's type cannot be dequantized by the `gguf` package."""
    import gguf

    seen = {}
    for t in tensors:
        seen.setdefault(gguf.GGMLQuantizationType(t.qtype), t.name)
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


def checked_metadata(f: GGUFFile, header: Path) -> dict[str, Any]:
    """The metadata of ``f`` (read from ``header``, its `metadata_copy`), checked before any tensor is read: a Llama
    model, every tensor type dequantizable, the fields config.json needs in bounds and matching the tensors' shapes.

    The metadata also gets `gguf.tensor_types`: GGUF tensor type name -> number of tensors.
    """
    import gguf

    path = Path(f.path)
    meta = read_metadata(header, path)
    _check_architecture(meta, path)
    _check_dequantizable(f.tensors, path)
    check_metadata(meta, {t.name: t.shape for t in f.tensors}, path)
    meta["gguf.tensor_types"] = dict(Counter(gguf.GGMLQuantizationType(t.qtype).name for t in f.tensors))
    return meta


def dequantized_tensors(f: GGUFFile, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of ``f`` as float32 under its HF name, Q and K projections in HF's layout (the llama.cpp
    permutation undone). Each tensor's bytes are read with a plain read, checked against the file as it was opened."""
    import gguf

    path = Path(f.path)
    n_head = int(_required(meta, "llama.attention.head_count", path))
    n_head_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    tensors = {}
    for t in f.tensors:
        if t.name == "rope_freqs.weight":
            raise GGUFError(f"{path}: per-dimension rope frequencies (Llama 3.1 rope scaling) are not supported")
        name = hf_tensor_name(t.name)
        w = gguf.quants.dequantize(f.read(t), gguf.GGMLQuantizationType(t.qtype))
        w = w.astype(np.float32, copy=False).reshape(t.shape)
        if t.name.startswith("blk.") and ".attn_q." in t.name:
            w = unpermute_rotary(w, n_head)
        elif t.name.startswith("blk.") and ".attn_k." in t.name:
            w = unpermute_rotary(w, n_head_kv)
        tensors[name] = np.ascontiguousarray(w)
    f.check_unchanged()  # the metadata and every tensor came from the file as it was opened
    return tensors


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a Llama GGUF file as float32 numpy arrays under HF names (`dequantized_tensors`), and its
    metadata (`checked_metadata`)."""
    with GGUFFile(path) as f, f.metadata_copy() as header:
        meta = checked_metadata(f, header)
        return dequantized_tensors(f, meta), meta


def _write_tokenizer(header: Path, gguf_path: Path, out_dir: Path, meta: dict[str, Any]) -> bool:
    """Rebuild the fast tokenizer from the GGUF tokenizer metadata (in ``header``, the private copy of
    ``gguf_path``'s metadata: transformers memory-maps what it reads) with transformers and save it."""
    if "tokenizer.ggml.model" not in meta:
        logger.warning("%s has no tokenizer metadata; writing the model without a tokenizer", gguf_path)
        return False
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(header.parent), gguf_file=header.name, local_files_only=True)
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
        cannot dequantize, an unknown tensor name, a non-empty `out_dir` without `overwrite`, or a file that
        changed while it was being read.
    """
    gguf_path = Path(gguf_path)
    out_dir = check_out_dir(out_dir, gguf_path=gguf_path, overwrite=overwrite, option=overwrite_option)
    with GGUFFile(gguf_path) as f, f.metadata_copy() as header:
        meta = checked_metadata(f, header)
        tensors = dequantized_tensors(f, meta)
        tied = "lm_head.weight" not in tensors
        config = hf_config(meta, tied=tied, vocab_size=tensors["model.embed_tokens.weight"].shape[0], path=gguf_path)
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
                wrote_tokenizer = _write_tokenizer(header, gguf_path, tmp, meta) if tokenizer else False
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
