"""benchmarks/gpu_check.py, the prepared GPU run, in its --cpu-smoke mode: every part's code path runs here (tiny
shapes, kernels in Pallas interpret mode), so the one GPU run we may get does not die on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("part_*.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + json.dumps(logs, indent=1)
    summary = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    assert summary["ok"] and summary["cpu_smoke"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert summary["provenance"]["commit"] == head.strip()  # every result says which code made it
    assert summary["provenance"]["device"].startswith("cpu")
    assert not any(p.get("partial") or p["timed_out"] for p in summary["parts"].values())
    parts = summary["parts"]
    assert list(parts) == ["kernels", "matmul", "gptq", "pipeline", "decode"]
    k = parts["kernels"]
    assert k["interpret"] and k["failures"] == 0 and k["cases"] == 2 * 3 * 3  # shapes x bits x M
    assert {r["dtype"] for r in k["results"]} == {"bfloat16", "float32"}
    assert {r["bits"] for r in k["results"]} == {2, 4, 8} and all(r["rel_err"] <= 2e-2 for r in k["results"])
    assert [r["shape"] for r in parts["matmul"]["runs"]] == ["256x256"]
    matmul = json.loads(Path(parts["matmul"]["runs"][0]["json"]).read_text())
    assert all("roofline" in r and r["roofline"]["H100_us"] > 0 for r in matmul["results"])
    assert any(r["impl"] == "pallas" and "interpret" in r["status"] for r in matmul["results"])
    assert json.loads(Path(parts["gptq"]["json"]).read_text())["results"][0]["codes_agree"] >= 0.98
    pipe = parts["pipeline"]
    layers, total = pipe["layer_seconds"], json.loads(Path(pipe["json"]).read_text())["quantize_seconds"]
    assert len(layers) == 2 and all(t > 0 for t in layers) and sum(layers) <= total
    # The extrapolation to 32 layers: the one-off cost (total - the layers), the first layer (compiles), 31 x the last.
    assert pipe["per_layer_seconds"] == layers[-1]
    expected = total - sum(layers) + layers[0] + 31 * layers[-1]
    assert abs(pipe["extrapolated_32_layers_seconds"] - expected) <= 1e-9 * expected, (pipe, total)
    dec = parts["decode"]
    assert dec["float"]["decode_tokens_per_second"] > 0 and dec["packed_4bit_g128"]["decode_tokens_per_second"] > 0
    assert not (REPO / "benchmarks" / "results" / "gpu_check" / "gpu_check_cpu_smoke.json").exists()  # never there
