"""A file read with plain reads, each read checked against the file as it was opened.

A memory map of a file (``np.memmap``, ``safetensors.safe_open``, ``gguf.GGUFReader``) that is truncated while mapped
(a download or a copy rewriting it) kills the process with SIGBUS, with no message, as soon as a page past the new end
is touched. And a file rewritten in place while a long run reads it piece by piece would mix old and new contents. So
every weight file a user hands us (safetensors, GGUF) is read through ``CheckedFile``:

- ``read_into`` uses ``os.preadv``: a short read is an error naming the file, not a signal;
- ``check_unchanged`` (called before every read) compares the file's size, modification time and inode with what
  they were at open, so a rewrite during a run stops it with a message naming the file.
"""

from __future__ import annotations

import os


def identity(st: os.stat_result) -> tuple[int, int, int]:
    """What ``check_unchanged`` compares: size, modification time (ns) and inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


class CheckedFile:
    """An open file descriptor with the file's ``identity`` at open; usable as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise ValueError(f"cannot open {self.path}: {e.strerror or e}") from None
        self.identity = identity(os.fstat(self._fd))

    @property
    def size(self) -> int:
        return self.identity[0]

    def check_unchanged(self) -> None:
        """Raise ``ValueError`` if the file at ``path`` is no longer the file opened (size, mtime or inode)."""
        try:
            now = identity(os.stat(self.path))
        except OSError as e:
            raise ValueError(f"{self.path} changed while it was being read ({e.strerror or e}); "
                             "nothing was written: run again once the file is complete") from None
        if now != self.identity or identity(os.fstat(self._fd)) != self.identity:
            raise ValueError(
                f"{self.path} changed while it was being read (size {self.identity[0]:,} -> {now[0]:,} bytes, "
                "modified again); nothing was written: run again once the file is complete"
            )

    def read_into(self, buf: memoryview, start: int, what: str) -> None:
        """Fill ``buf`` (bytes) from offset ``start``, after ``check_unchanged``; a file that ends early is an error
        naming ``what`` (``tensor X``)."""
        self.check_unchanged()
        done = 0
        while done < len(buf):  # pread may return less than asked (at most ~2 GiB a call on Linux)
            got = os.preadv(self._fd, [buf[done:]], start + done)
            if got == 0:
                raise ValueError(f"{self.path}: {what} is cut short ({done:,} of {len(buf):,} bytes): the file "
                                 "was truncated")
            done += got

    def read_bytes(self, start: int, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf), start, what)
        return bytes(buf)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # the streaming loader keeps its files open for as long as it is referenced
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
