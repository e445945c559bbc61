"""The package's layers: core -> engine -> models -> io -> tasks -> cli, each importing only from below, and the
engine knowing no model family."""

from __future__ import annotations

import ast
import re
import tokenize
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gptq_jax"
LAYERS = ["core", "engine", "models", "io", "tasks", "cli"]


def _imports(path: Path) -> list[str]:
    return re.findall(r"(?m)^\s*(?:from|import) gptq_jax\.([a-z_]+)", path.read_text())


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for f in PKG.rglob("*.py"):
        layer = f.relative_to(PKG).parts[0]
        if layer not in rank:
            continue
        upward += [f"{f.relative_to(PKG)} imports gptq_jax.{dep}" for dep in _imports(f)
                   if dep in rank and rank[dep] > rank[layer]]
    assert upward == []
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("__")) == sorted(LAYERS)


def test_engine_knows_no_model_family():
    """No import of our models, and no name in its code (docstrings may give examples) from a model family."""
    for f in (PKG / "engine").glob("*.py"):
        assert "models" not in _imports(f), f
        with f.open("rb") as fh:
            names = [t.string for t in tokenize.tokenize(fh.readline) if t.type == tokenize.NAME]
        family = [n for n in names if re.search(r"llama|q_proj|self_attn|decoder|qwen|gemma", n, re.IGNORECASE)]
        assert family == [], f"{f.name}: {family}"


MAX_FUNCTION_LINES = 80  # about a screen: a function longer than that is several functions (HOUSE_STYLE.md, 12)


def test_no_library_function_is_longer_than_a_screen():
    """Every function and method in ``gptq_jax`` and ``pallas_kernels``, from its ``def`` line to its last line
    (docstring and nested functions included), fits in ``MAX_FUNCTION_LINES``."""
    long = []
    for pkg in (PKG, PKG.parent / "pallas_kernels"):
        files = sorted(pkg.rglob("*.py"))
        assert files, pkg
        for f in files:
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{f.relative_to(pkg.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
