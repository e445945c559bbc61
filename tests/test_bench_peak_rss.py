"""The peak memory that benchmarks/vs_gptqmodel.py reports for a quantization is that process's own."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_gptqmodel.py"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_a_child_does_not_report_its_parents_peak():
    """A child started by fork and exec inherits its parent's peak in ru_maxrss: with a parent holding 400 MB, the
    child (a bare Python with numpy) must still report tens of MB, and the parent, measured the same way, its 400."""
    spec = importlib.util.spec_from_file_location("vs_gptqmodel", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    big = np.ones(400 * 1024 * 1024 // 8)
    big += 1.0  # touched: resident
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('vs', {str(BENCH)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.peak_rss_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_mb = float(out.stdout.strip().splitlines()[-1])
    assert 5.0 < child_mb < 200.0, child_mb
    # The premise: the parent's own peak holds the 400 MB (else a child inheriting it would prove nothing).
    parent_mb = bench.peak_rss_mb()
    assert parent_mb >= 400.0 + child_mb / 2, (parent_mb, child_mb)
    del big
