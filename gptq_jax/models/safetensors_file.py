"""Reading safetensors files with plain reads, each read checked against the file as it was opened.

``safetensors.safe_open`` memory-maps the file, so a truncation while mapped means SIGBUS, and a rewrite in place
mixes old and new weights (``checked_file`` says more). So the loaders read through here:

- the header (an 8-byte little-endian length, then JSON) is parsed with bounds: its length against the file size,
  each tensor's dtype, shape and byte range against each other and the data section, before anything is allocated;
- each tensor is read with ``CheckedFile.read_into`` (``os.preadv``, after comparing the file's size, modification
  time and inode with what they were at open), and ``read`` can compare each tensor's bytes with a digest taken
  earlier, so a rewrite during a run stops it with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from gptq_jax.models.checked_file import CheckedFile

# safetensors dtype -> numpy dtype
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class SafetensorsFile(CheckedFile):
    """One safetensors file: ``keys()``, ``info(name)``, ``read(name)``; usable as a context manager."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        try:
            self.tensors = self._parse_header(self.size)
        except BaseException:
            self.close()  # and mark it closed, so that __del__ cannot close a descriptor reused since
            raise

    def _fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.path} is not a readable safetensors file (corrupt or truncated?): {problem}")

    def _parse_header(self, size: int) -> dict[str, TensorInfo]:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._fail(f"{size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise self._fail(f"its header claims {n:,} bytes, the file has {size - 8:,} after the length")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise self._fail(f"its header is not valid JSON ({str(e)[:100]})") from None
        if not isinstance(header, dict):
            raise self._fail("its header is not a JSON object")
        data_start, data_len = 8 + n, size - 8 - n
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = self._entry(name, entry, data_start, data_len)
        return tensors

    def _entry(self, name: str, e: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"}:
            raise self._fail(f"tensor {name!r} has a malformed header entry")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has dtype {dtype!r}; known: {sorted(DTYPES)}")
        ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)  # noqa: E731
        if not ints(shape) or len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise self._fail(f"tensor {name!r} has shape {shape!r}; expected up to {MAX_DIMS} sizes >= 0")
        if not ints(offs) or len(offs) != 2 or not 0 <= offs[0] <= offs[1] <= data_len:
            raise self._fail(f"tensor {name!r} has data_offsets {offs!r} outside the {data_len:,} data bytes")
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
        if nbytes != offs[1] - offs[0]:
            raise self._fail(f"tensor {name!r} of shape {shape} {dtype} needs {nbytes:,} bytes, its offsets give "
                             f"{offs[1] - offs[0]:,}")
        return TensorInfo(dtype, tuple(shape), data_start + offs[0], data_start + offs[1])

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, *, expect_digest: str | None = None, want_digest: bool = False):
        """Tensor ``name`` as a fresh numpy array (nothing stays mapped). With ``expect_digest`` (from an earlier
        ``want_digest=True`` read, which returns ``(array, digest)``), a tensor whose bytes changed since is an
        error."""
        t = self.tensors[name]
        out = np.empty(t.shape, DTYPES[t.dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        self.read_into(buf, t.start, f"tensor {name}")
        if expect_digest is not None and digest(buf) != expect_digest:
            raise ValueError(f"{self.path}: tensor {name} changed since it was first read (the file was rewritten "
                             "in place); nothing was written: run again once the file is complete")
        return (out, digest(buf)) if want_digest else out
