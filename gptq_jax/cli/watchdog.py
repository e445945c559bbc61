"""A deadline on progress: a run that makes no progress for ``seconds`` ends with a message naming its step.

``quantize`` reports progress before each stage's solve (its ``progress`` callback). A step that never returns (a
device program waiting forever, as a 4x2 mesh on XLA:CPU once did in its first solve) would otherwise hold the
command in a futex wait with no output. The watchdog is a daemon thread with a deadline that each progress report
moves; when the deadline passes it logs the step and the seconds without progress and ends the process with
``EXIT_STALLED``. It cannot raise in the main thread: a thread blocked inside a native wait never returns to Python
to see an exception, so the process exits directly (``os._exit``). Finished blocks are already in the work directory
(each is written to a temporary name and renamed), so the same command resumes after them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_STALLED = 3


class Watchdog:
    """``with Watchdog(600, advice) as dog: ... dog.progress("layers.3.mlp.down_proj") ...``; ``seconds=0``: off.

    ``advice`` (a callable, read when the deadline passes) says what is kept and how to go on. ``exit`` ends the
    process (``os._exit`` by default; tests pass their own)."""

    def __init__(self, seconds: float, advice: Callable[[], str] = lambda: "", *,
                 exit: Callable[[int], None] = os._exit):
        if seconds < 0:
            raise ValueError(f"the watchdog's seconds must be >= 0 (0 turns it off), not {seconds}")
        self.seconds = seconds
        self.advice = advice
        self._exit = exit
        self._step = "start (loading, calibration data, the first block's trace and compile)"
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired = False

    def progress(self, step: str) -> None:
        """The run has reached ``step``: the next deadline is ``seconds`` from now."""
        with self._lock:
            self._step = step
            self._deadline = time.monotonic() + self.seconds

    def _watch(self) -> None:
        while True:
            with self._lock:
                left = self._deadline - time.monotonic()
                step = self._step
            if left <= 0:
                break
            if self._stop.wait(left):
                return
        self.expired = True
        advice = self.advice()
        log.error("no progress for %.0f s in step %s; stopping%s", self.seconds, step, f": {advice}" if advice else "")
        for stream in (sys.stderr, sys.stdout):
            stream.flush()
        self._exit(EXIT_STALLED)

    def __enter__(self) -> Watchdog:
        if self.seconds > 0:
            self.progress(self._step)
            self._thread = threading.Thread(target=self._watch, name="gptq-jax watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
