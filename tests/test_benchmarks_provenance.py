"""benchmarks/provenance.py: every benchmark result records the code, the machine and the load it ran under, and is
written whole or not at all."""

from __future__ import annotations

import json
import re
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


def test_a_run_records_the_commit_it_started_at_when_the_checkout_moves(tmp_path, monkeypatch):
    """A run of hours imports its code at the start; a commit checked out meanwhile is not the code that ran."""
    states = iter([("a" * 40, False), ("b" * 40, True)])
    monkeypatch.setattr(provenance, "_tree", lambda own=None: next(states))
    started = provenance.start()
    p = json.loads(provenance.write_result(tmp_path / "r.json", {}, started=started).read_text())["provenance"]
    assert (p["commit"], p["dirty"], p["checkout_moved"]) == ("a" * 40, False, True)


def test_the_result_being_rewritten_does_not_make_the_tree_dirty(monkeypatch):
    """A run rewrites its own JSON after every row, and a series of runs leaves results not committed yet; only
    changed files outside benchmarks/results/ mean the code that ran was not HEAD."""
    own = RESULTS / "bench" / "r.json"
    status = f"M {own.relative_to(REPO)}\n M benchmarks/results/bench/r_seed1.json"  # as _git gives it: stripped
    monkeypatch.setattr(provenance, "_git", lambda *a: status if a[0] == "status" else "c" * 40)
    assert provenance._tree(own) == ("c" * 40, False)
    status += "\n M gptq_jax/core/gptq.py"
    assert provenance._tree(own) == ("c" * 40, True)


def test_a_clean_tree_but_for_the_result_being_written_is_clean(tmp_path):
    """Against real git: a worktree whose only change is the result being written is not dirty."""
    repo = tmp_path / "repo"
    bench = repo / "benchmarks"
    (bench / "results" / "b").mkdir(parents=True)
    (bench / "provenance.py").write_text((REPO / "benchmarks" / "provenance.py").read_text())
    result = bench / "results" / "b" / "r.json"
    result.write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "r"], check=True)
    result.write_text('{"rows": []}')
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import provenance as p; from pathlib import Path; "
            "print(p._tree(Path(sys.argv[2]))[1], p._tree()[1])")
    out = subprocess.run([sys.executable, "-c", code, str(bench), str(result)], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
    (bench / "provenance.py").write_text((bench / "provenance.py").read_text() + "\n")
    out = subprocess.run([sys.executable, "-c", code, str(bench), str(result)], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr


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


RESULTS = REPO / "benchmarks" / "results"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def cited(text: str, files: list[Path]) -> list[Path]:
    """The result files ``text`` names: by their whole name, in the shorthand ``name[_seed1]_cpu.json`` (the name with
    and without the bracketed part), or as ``..._seed4_cpu.json`` after a full name (a name in that file's folder that
    ends so)."""
    found: set[Path] = set()
    folder = None
    for token in re.findall(r"[A-Za-z0-9_.\-\[\]]+\.json", text):
        if token.startswith("..."):
            found.update(f for f in files if f.parent.name == folder and f.name.endswith(token[3:]))
            continue
        forms = [""]
        for plain, optional in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", token):
            forms = [f + plain + o for f in forms for o in ({"", optional} if optional else {""})]
        named = [f for f in files if f.name in forms]
        found.update(named)
        folder = named[0].parent.name if named else None
    return [f for f in files if f in found]


def test_citations_are_read_in_their_shorthands(tmp_path):
    files = [tmp_path / d / n for d, n in (("a", "a_cpu.json"), ("a", "a_seed1_cpu.json"), ("b", "b_seed4_cpu.json"),
                                           ("b", "b_seed5_cpu.json"), ("c", "c_seed5_cpu.json"))]
    got = cited("`a[_seed1]_cpu.json` and `b_seed4_cpu.json`, `..._seed5_cpu.json`", files)
    assert [f.name for f in got] == ["a_cpu.json", "a_seed1_cpu.json", "b_seed4_cpu.json", "b_seed5_cpu.json"]


def test_every_cited_result_records_its_commit():
    """A results JSON that the README or docs/ name records the commit it ran at (its ``provenance``)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    cited_files = cited(text, sorted(RESULTS.rglob("*.json")))
    assert any(f.parent.name == "bench_gptq" for f in cited_files)  # the docs do cite results
    unrecorded = [str(f.relative_to(RESULTS)) for f in cited_files
                  if not (json.loads(f.read_text()).get("provenance") or {}).get("commit")]
    assert unrecorded == []


def test_every_cited_result_exists():
    """``folder/file.json`` (or ``benchmarks/results/folder/file.json``) in the README or docs/, where ``folder`` is
    a benchmark's results folder, names a file that is there: a result dropped from results/ is not cited as if it
    were."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
    folders = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    named = re.findall(r"`(?:benchmarks/results/)?([a-z0-9_]+)/([A-Za-z0-9_.-]+\.json)`", text)
    assert named
    missing = [f"{d}/{n}" for d, n in named if d in folders and not (RESULTS / d / n).is_file()]
    assert missing == []
