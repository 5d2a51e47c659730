"""Running `coheara` the ways the tests need: as a subprocess (as a user would), in this
process (`main()`, with its real exit codes and error lines), and stopping a server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


def run_coheara(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`coheara ARGS...` in its own process; no stdin, every wait bounded."""
    return subprocess.run(
        [sys.executable, "-m", "coheara.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """A runner of `coheara ARGS...` through `main()` in this process."""
    monkeypatch.setenv("COLUMNS", "200")
    from coheara.cli.main import main

    def run(*args: str) -> Ran:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["coheara", *args])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def stop(process: subprocess.Popen[str]) -> None:
    """Terminate a server process, killing it if it will not stop."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
