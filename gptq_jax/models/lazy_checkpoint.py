"""Read a Hugging Face safetensors checkpoint one block at a time, never the whole model.

``models.load_pretrained`` builds the whole model in memory: 140 GB for a 70B model in bf16. GPTQ needs one
decoder layer at a time (the paper quantizes "layer by layer", Sec. 3), so ``LazyCheckpoint`` reads only the
headers up front (names, shapes, dtypes: kilobytes) and each tensor when asked, through ``safetensors.safe_open``
(a memory map that is closed again after each read). Peak host memory is then one block in the requested dtype
plus whatever the caller keeps.

- ``LazyCheckpoint(path)``: the index. ``.config``, ``.names``, ``.shape(name)``, ``.read(name, dtype)``.
- ``.block_names(i)`` / ``.read_block(i, dtype)``: the HF tensors of decoder layer ``i`` (torch orientation,
  ``[out, in]`` for linears), as numpy arrays.
- ``.load_layer(i, dtype)``: decoder layer ``i`` as an NNX ``DecoderLayer`` (kernels ``[in, out]``, as the model
  holds them), built abstractly and filled from that block alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from gptq_jax.models.llama import DecoderLayer, ModelConfig
from gptq_jax.models.params import hf_to_nnx, weight_files

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class LazyCheckpoint:
    """Headers-only index of a safetensors checkpoint directory (``model.safetensors`` or sharded with an index).

    Raises ``FileNotFoundError`` / ``ValueError`` as ``models.load_pretrained`` does for a missing directory,
    config or shard, an unreadable file, or a tensor stored twice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_json(self.path)
        self._where: dict[str, str] = {}  # tensor name -> file
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
        for file in weight_files(self.path):
            try:
                f = safe_open(file, framework="numpy")
            except Exception as e:
                raise ValueError(f"{file} is not a readable safetensors file (corrupt or truncated?): {e}") from None
            with f:
                for name in f.keys():
                    if name in self._where:
                        raise ValueError(f"tensor {name} is stored twice: in {self._where[name]} and {file}")
                    sl = f.get_slice(name)
                    self._where[name] = file
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())

    @property
    def names(self) -> list[str]:
        return list(self._where)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)][0]

    def _check(self, name: str) -> str:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}")
        return name

    def read(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """One tensor as a numpy array of ``dtype`` (None keeps the stored dtype; bf16 via ``ml_dtypes``)."""
        file = self._where[self._check(name)]
        with safe_open(file, framework="numpy") as f:
            try:
                x = f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"{file}: cannot read tensor {name} (corrupt or truncated file?): {e}") from None
        return x if dtype is None else x.astype(dtype, copy=False)

    def block_names(self, i: int) -> list[str]:
        """The tensors of decoder layer ``i`` (``model.layers.{i}.*``), in file order."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} is out of range: the model has {self.num_layers} layers")
        prefix = f"model.layers.{i}."
        return [n for n in self._where if n.startswith(prefix)]

    def read_block(self, i: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
        """HF name -> array for decoder layer ``i`` (linears ``[out, in]``, as torch stores them)."""
        names = self.block_names(i)
        if not names:
            raise ValueError(f"{self.path}: no tensors for layer {i} (model.layers.{i}.*)")
        return {n: self.read(n, dtype) for n in names}

    def iter_blocks(self, dtype: Any = np.float32) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(i, read_block(i))`` for each layer in order; each block is read only when the loop reaches it."""
        for i in range(self.num_layers):
            yield i, self.read_block(i, dtype)

    def load_layer(self, i: int, dtype: Any = jnp.float32) -> DecoderLayer:
        """Decoder layer ``i`` as an NNX module with its weights from this block only (cast to ``dtype``)."""
        abstract = nnx.eval_shape(lambda: DecoderLayer(self.config, i, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        slots = {".".join(str(p) for p in path): (path, var) for path, var in nnx.to_flat_state(state)}
        prefix = f"layers.{i}."
        values = {}
        for name in self.block_names(i):
            mapped = hf_to_nnx(name)
            if mapped is None or not mapped[0].startswith(prefix) or mapped[0][len(prefix):] not in slots:
                if _LAYER.match(name) and name.endswith("rotary_emb.inv_freq"):
                    continue  # a buffer the model recomputes
                raise ValueError(f"tensor {name} has no place in a {self.config.architecture} decoder layer")
            target, transpose = mapped[0][len(prefix):], mapped[1]
            x = self.read(name, None)
            x = x.T if transpose else x
            want = tuple(slots[target][1].shape)
            if tuple(x.shape) != want:
                raise ValueError(f"tensor {name} has shape {tuple(x.shape)[::-1] if transpose else x.shape}, "
                                 f"config.json implies {want[::-1] if transpose else want}")
            values[target] = jnp.asarray(x, dtype)
            del x
        missing = [t for t in slots if t not in values]
        if missing:
            raise ValueError(f"{self.path}: layer {i} is missing {', '.join(missing)}")
        flat = [(path, var.replace(values[t])) for t, (path, var) in slots.items()]
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
