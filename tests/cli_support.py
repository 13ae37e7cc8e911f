"""Run a command line as a user would (a subprocess) and check its errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_cli(*argv: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python ARGV...`` from the repository root, this checkout first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, prefix: str, usage: bool = False) -> str:
    """Exit status 2, no traceback, and the error as the last (with ``usage=False``: the only) line of stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(prefix), proc.stderr
    if not usage:  # argparse prints its usage above its error line; a run-time error is the line alone
        assert len(lines) == 1, proc.stderr
    return lines[-1]
