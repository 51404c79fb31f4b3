"""asyncfile passes ``mypy --strict`` (configured in pyproject.toml's [tool.mypy]): run here so CI
fails on a type error as it does on a failing test."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_asyncfile_passes_mypy_strict() -> None:
    for module in ("mypy", "mypy_zope"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (it comes with: pip install -e '.[test]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "-p", "asyncfile"],
        cwd=str(ROOT),  # pyproject.toml's [tool.mypy]: the zope plugin, overrides
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mypy --strict found errors:\n{output}"
    assert "Success: no issues found" in output, output
