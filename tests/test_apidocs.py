"""asyncfile's API reference builds with pydoctor without a warning: a broken reference
(:class:`Nope`), a docstring that is not valid reStructuredText or a documented parameter that
does not exist fails CI here. The command is the README's, ``python3 -m pydoctor`` (its settings
are pyproject.toml's [tool.pydoctor]), writing into a temporary folder instead of build/apidocs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What pydoctor prints on a problem (with warnings-as-errors it also exits 3): "path.py:12: ..."
# warnings, the summary of docstrings with syntax errors, a crash.
_PROBLEM = re.compile(r"\.py:\d+: |contain syntax errors|Traceback")


@pytest.mark.timeout(900)
def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("pydoctor") is None:
        pytest.skip("pydoctor is not installed (it comes with: pip install -e '.[test]')")
    out = tmp_path / "apidocs"
    proc = subprocess.run(
        [sys.executable, "-m", "pydoctor", f"--html-output={out}"],
        cwd=str(ROOT),  # pyproject.toml's [tool.pydoctor]
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = proc.stdout + proc.stderr
    problems = [line for line in output.splitlines() if _PROBLEM.search(line)]
    assert proc.returncode == 0 and not problems, f"pydoctor (exit {proc.returncode}):\n{output}"
    for page in ("index.html", "asyncfile.html", "asyncfile.loader.FileLoader.html",
                 "asyncfile.testing.html"):
        assert (out / page).is_file(), sorted(p.name for p in out.iterdir())[:50]
    assert "FileLoader" in (out / "asyncfile.html").read_text(encoding="utf-8")
