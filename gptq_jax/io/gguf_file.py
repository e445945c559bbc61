"""A GGUF file read with plain reads: the header walked with bounds, each tensor's bytes read at its offset.

``gguf.GGUFReader`` memory-maps the whole file: a file truncated while mapped (a download or a copy rewriting it)
kills the process with SIGBUS, with no message, when a page past the new end is touched (``models.checked_file``). It
also allocates what a header count says before it finds out that the file is shorter. So ``GGUFFile``:

- walks the header (metadata, then tensor infos) itself, every string length, array count and tensor count checked
  against the bytes that are left before it is used, keeping only ``general.alignment`` and the tensor infos, and
  checks that every tensor's data lies in the file;
- hands the metadata on as a small GGUF file of its own (``metadata_copy``: the same metadata entries, no tensors),
  which ``gguf.GGUFReader`` and transformers' tokenizer builder then map: our private copy, never the user's file;
- reads each tensor's bytes with ``CheckedFile.read_into`` (the file's size, mtime and inode compared with those at
  open before each read; a short read is an error).

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count, the metadata
entries (string key, u32 value type, value), the tensor infos (string name, u32 rank, u64 dims innermost-first, u32
type, u64 offset into the data section), padding to ``general.alignment`` (default 32), the data section.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gptq_jax.models.checked_file import CheckedFile

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 2**16 - 1  # the GGUF spec's bound on a key; tensor names are far shorter (64)
MAX_METADATA_BYTES = 512 * 2**20  # a 256k-token vocabulary with merges is a few tens of MB

# GGUF value type -> size in bytes (strings: 8 + length; arrays: 12 + their elements)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_MAX_NESTING = 4


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: not GGUF, not Llama, an unsupported tensor or type, or corrupt."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # GGUF's `ne`, innermost first: a torch Linear weight [out, in] has dims (in, out)
    qtype: int  # a gguf.GGMLQuantizationType value
    start: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape (outermost first)."""
        return self.dims[::-1]


class _Cursor:
    """Reads a GGUF header from a file, every length and count checked against the bytes left before it is used."""

    def __init__(self, f: BinaryIO, size: int, path: str):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path} is corrupt: {what} (at byte {self.pos:,} of {self.size:,})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n:,} bytes, {self.size - self.pos:,} are left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.f.seek(self.pos)
        raw = self.f.read(n)
        if len(raw) < n:
            raise GGUFError(f"{self.path} changed while it was being read (it ends at byte {self.pos + len(raw):,}, "
                            f"it had {self.size:,}); nothing was written: run again once the file is complete")
        self.pos += n
        return raw

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> None:
        self.skip(self.unpack("<Q", f"the length of {what}"), what)

    def name(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if n > MAX_NAME_BYTES:
            raise self.fail(f"{what} is {n:,} bytes long (at most {MAX_NAME_BYTES:,})")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

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


class GGUFFile(CheckedFile):
    """One GGUF file: ``tensors`` (``GGUFTensor`` in file order), ``metadata_copy()``, ``read(tensor)``.

    Opening it walks the header; a file that is not GGUF, or whose counts, names or tensor extents do not fit, is a
    ``GGUFError`` naming the file, before anything the header's counts ask for is allocated.
    """

    def __init__(self, path: str | os.PathLike):
        if not os.path.isfile(path):
            raise GGUFError(f"GGUF file not found: {os.fspath(path)}")
        try:
            super().__init__(path)
        except ValueError as e:
            raise GGUFError(str(e)) from None
        try:
            with os.fdopen(os.dup(self._fd), "rb") as f:  # buffered, for the header's many small fields
                self._walk(_Cursor(f, self.size, self.path))
        except BaseException:
            self.close()
            raise

    def _walk(self, c: _Cursor) -> None:
        magic = c.take(4, "the magic") if self.size >= 4 else b""
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        version = c.unpack("<I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = c.unpack("<Q", "the tensor count")
        n_kv = c.unpack("<Q", "the metadata count")
        c.need(n_kv * 13 + n_tensors * 24, f"{n_kv:,} metadata entries and {n_tensors:,} tensor infos")
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = c.name(f"metadata key {i}")
            vtype = c.unpack("<I", f"the type of metadata entry {i}")
            if key == "general.alignment":
                alignment = c.unpack("<I", key) if vtype == _UINT32 else 0
                if alignment <= 0 or alignment & (alignment - 1):
                    raise c.fail(f"general.alignment must be a power of two held as uint32 (type {vtype})")
            else:
                c.value(vtype, f"metadata entry {i}")
        self.metadata_end = c.pos
        if self.metadata_end > MAX_METADATA_BYTES:
            raise c.fail(f"its metadata takes {self.metadata_end:,} bytes, more than any GGUF file's should "
                         f"({MAX_METADATA_BYTES:,})")
        infos = [self._tensor_info(c, i) for i in range(n_tensors)]
        data_start = -(-c.pos // alignment) * alignment
        self.tensors = [self._tensor(c, *info, data_start) for info in infos]
        if len({t.name for t in self.tensors}) < len(self.tensors):
            raise c.fail("two tensors have the same name")

    @staticmethod
    def _tensor_info(c: _Cursor, i: int) -> tuple[int, str, list[int], int, int]:
        name = c.name(f"the name of tensor {i}")
        n_dims = c.unpack("<I", f"the rank of tensor {i}")
        if not 1 <= n_dims <= 4:
            raise c.fail(f"tensor {i} has {n_dims} dimensions (1 to 4)")
        dims = [c.unpack("<Q", f"a dimension of tensor {i}") for _ in range(n_dims)]
        qtype = c.unpack("<I", f"the type of tensor {i}")
        offset = c.unpack("<Q", f"the data offset of tensor {i}")
        return i, name, dims, qtype, offset

    @staticmethod
    def _tensor(c: _Cursor, i: int, name: str, dims: list[int], qtype: int, offset: int, data_start: int) -> GGUFTensor:
        import gguf

        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {i} ({name}) has an unknown type {qtype}") from None
        n = int(np.prod(dims, dtype=object))
        nbytes = n // block * type_size
        if n % block or data_start + offset + nbytes > c.size:
            raise c.fail(f"tensor {i} ({name}, {' x '.join(map(str, dims))}) does not fit in the file")
        return GGUFTensor(name, tuple(dims), qtype, data_start + offset, nbytes)

    @contextlib.contextmanager
    def metadata_copy(self) -> Iterator[Path]:
        """A private GGUF file with this file's metadata and no tensors (same file name, in a temporary directory),
        for readers that memory-map what they read; removed on the way out."""
        raw = self.read_bytes(0, self.metadata_end, "the metadata")
        with tempfile.TemporaryDirectory(prefix="gptq-jax-gguf-") as d:
            copy = Path(d) / Path(self.path).name
            copy.write_bytes(raw[:8] + struct.pack("<Q", 0) + raw[16:])  # the tensor count, 0
            yield copy

    def read(self, t: GGUFTensor) -> np.ndarray:
        """The raw bytes of tensor ``t``, ``uint8 [nbytes]``, read from the file as it was opened."""
        out = np.empty(t.nbytes, np.uint8)
        self.read_into(memoryview(out), t.start, f"tensor {t.name}")
        return out

    def check_unchanged(self) -> None:
        try:
            super().check_unchanged()
        except ValueError as e:
            raise GGUFError(str(e)) from None

    def read_into(self, buf: memoryview, start: int, what: str) -> None:
        try:
            super().read_into(buf, start, what)
        except ValueError as e:
            raise GGUFError(str(e)) from None
