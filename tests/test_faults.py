"""Faults a careful user hits (issue 15), each through the command line: the exit status, the one-line message, and
that nothing the user owns was changed. Interrupts use real signals in a subprocess; a full disk is a patched writer
(a tmpfs needs root and a mount, which CI machines do not promise)."""

from __future__ import annotations

import pytest

from gptq_jax import cli
from gptq_jax.cli_common import CommandError


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error line of a failed command (log lines start with a level name)."""
    lines = [line for line in err.splitlines() if line.startswith("gptq-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# 10. -v is accepted after the subcommand as well as before it


def test_verbose_after_the_subcommand(capsys, tmp_path):
    missing = tmp_path / "missing"
    code, _, err = run(capsys, "eval", missing)
    assert code == 1 and "does not exist" in one_line(err)
    for argv in (["-v", "eval", str(missing)], ["eval", str(missing), "-v"]):
        with pytest.raises(CommandError, match="does not exist"):  # -v shows the traceback: the error propagates
            cli.main(argv)
