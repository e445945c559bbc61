"""benchmarks/provenance.py: every benchmark result records the code, the machine and the load it ran under, and is
written whole or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402


def test_write_result_records_the_commit_and_the_load(tmp_path):
    started = provenance.start()
    path = provenance.write_result(tmp_path / "bench" / "r.json", {"rows": [1, 2]}, started=started)
    record = json.loads(path.read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert record["rows"] == [1, 2]
    p = record["provenance"]
    assert p["commit"] == head.strip() and isinstance(p["dirty"], bool)
    assert p["load_average_start"] == started["load_average"] and len(p["load_average_end"]) == 3
    assert p["device"].startswith("cpu") and p["jax_version"]
    assert [f.name for f in path.parent.iterdir()] == ["r.json"]  # no temporary file left beside it


def test_a_failed_write_leaves_the_previous_result(tmp_path):
    path = provenance.write_result(tmp_path / "r.json", {"v": 1})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        provenance.write_result(path, {"v": 2, "loop": loop})
    assert json.loads(path.read_text())["v"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_a_non_object_result_is_refused(tmp_path):
    with pytest.raises(TypeError, match="JSON object"):
        provenance.write_result(tmp_path / "r.json", [1, 2])
