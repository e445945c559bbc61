"""Small random Llama-family checkpoints for tests (shared: other test files import these; keep them stable).

- ``ARCHS``: the named tiny variants ``tiny_config`` knows.
- ``tiny_config(arch, **overrides) -> dict``: a HF ``config.json`` dict for a 2-layer model (vocab 128, D 64).
- ``write_hf_checkpoint(tmp_path, arch, seed=0, *, dtype="float32", max_shard_size=None, name=None,
  with_tokenizer=False, **overrides) -> Path``: builds the transformers PyTorch model with ``torch.manual_seed(seed)``,
  saves it (safetensors, optionally with a tiny tokenizer) and returns the dir.
- ``torch_model(path)``, ``torch_logits(path_or_model, tokens, attention_mask=None, position_ids=None)``:
  the reference logits as a float32 numpy array.
- ``write_tiny_tokenizer(path, vocab_size=128)``: a word-level tokenizer ("w0 w1 ...") for the tiny configs.
- ``random_tokens(batch, length, vocab_size, seed)``, ``right_padding_mask(lengths, length)``,
  ``left_padding_mask(lengths, length)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

# Each variant exercises one feature of the family on top of the shared tiny shape.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    # Llama 3.1 RoPE scaling; original_max_position_embeddings is small so all three frequency bands occur.
    "llama3": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    # Llama with attention and MLP biases (rare in practice, but the config allows it).
    "llama_bias": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": True,
        "mlp_bias": True,
    },
    # SmolLM-style: tied embeddings, plain multi-head attention.
    "llama_tied": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": True,
        "num_key_value_heads": 4,
    },
    # A window shorter than the test sequences, so the sliding mask matters.
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 8},
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "use_sliding_window": False,
        "sliding_window": None,
    },
    # head_dim differs from hidden_size / num_attention_heads, as in real Qwen3 models.
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 24,
        "use_sliding_window": False,
        "sliding_window": None,
    },
}

_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    # Larger than HF's 0.02 so attention is far from uniform and RoPE / masks visibly change the logits.
    "initializer_range": 0.125,
}


def tiny_config(arch: str, **overrides: Any) -> dict:
    """A HF config dict for a tiny 2-layer model of variant ``arch`` (a key of ``ARCHS``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {sorted(ARCHS)}")
    d = {**_BASE, **ARCHS[arch], **overrides}
    return d


def _config_class(d: dict):
    import transformers

    return {
        "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "MistralForCausalLM": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "Qwen3ForCausalLM": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[d["architectures"][0]]


def build_torch_model(config: dict, seed: int = 0):
    """The transformers model for a HF config dict, with random weights from ``torch.manual_seed(seed)``.

    Norm weights and biases are randomised too (HF initialises them to 1 and 0, which would hide mix-ups)."""
    import torch

    config_cls, model_cls = _config_class(config)
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = config_cls(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def write_hf_checkpoint(
    tmp_path: str | os.PathLike,
    arch: str,
    seed: int = 0,
    *,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    name: str | None = None,
    with_tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Saves a random transformers model of variant ``arch`` under ``tmp_path/name`` and returns that directory.

    ``with_tokenizer=True`` also writes ``write_tiny_tokenizer`` there, so the directory is a complete checkpoint."""
    import torch

    config = tiny_config(arch, **overrides)
    model = build_torch_model(config, seed).to(getattr(torch, dtype))
    out = Path(tmp_path) / (name or f"{arch}-{seed}-{dtype}" + ("-sharded" if max_shard_size else ""))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    if with_tokenizer:
        write_tiny_tokenizer(out, config["vocab_size"])
    return out


def torch_model(path: str | os.PathLike):
    """Loads a saved checkpoint with transformers (eager attention, float32 unless the files say otherwise)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path), local_files_only=True, attn_implementation="eager", dtype="auto"
    ).eval()


def torch_logits(
    model_or_path: Any,
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Reference logits ``(B, T, V)`` float32 from the transformers model."""
    import torch

    model = torch_model(model_or_path) if isinstance(model_or_path, str | os.PathLike) else model_or_path
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def random_tokens(batch: int, length: int, vocab_size: int = 128, seed: int = 0) -> np.ndarray:
    """``(batch, length)`` int32 tokens in [3, vocab_size), avoiding the special ids 0-2."""
    return np.random.default_rng(seed).integers(3, vocab_size, size=(batch, length), dtype=np.int32)


def right_padding_mask(lengths: list[int], length: int) -> np.ndarray:
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def left_padding_mask(lengths: list[int], length: int) -> np.ndarray:
    return (np.arange(length)[None, :] >= length - np.asarray(lengths)[:, None]).astype(np.int32)


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 128) -> Path:
    """A word-level tokenizer matching the tiny configs' ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then
    the words ``w0 w1 ...`` (split on whitespace). Loadable with ``AutoTokenizer.from_pretrained(path)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    path = Path(path)
    fast.save_pretrained(path)
    return path
