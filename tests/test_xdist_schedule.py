"""The suite's own xdist scheduling (tests/conftest.py): the files it keeps on one worker exist, so that a renamed
file cannot quietly go back to building its expensive module fixture on both workers."""

from __future__ import annotations

from pathlib import Path

from conftest import ONE_WORKER_FILES

HERE = Path(__file__).resolve().parent


def test_every_one_worker_file_exists():
    assert sorted(name for name in ONE_WORKER_FILES if not (HERE / name).is_file()) == []
