"""The README's first quick-start command: ``python3 -m imgserver --demo``."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_the_samples_and_exits_zero():
    out = subprocess.run([sys.executable, "-m", "imgserver", "--demo"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert re.search(r"HTTP 200 /images/photo\.jpg\?w=320 +[\d.]+ ms  JPEG 320x213", text)
    assert re.search(r"HTTP 200 /images/photo\.jpg\?w=200&h=200&fit=crop&fm=webp&q=80 +[\d.]+ ms  WEBP 200x200", text)
    assert re.search(r"HTTP 403 /images/\.\./etc/passwd", text)
    assert re.search(r"HTTP 404 /images/missing\.jpg", text)
    assert re.search(r"PB   thumbnail\('photo\.jpg', 256, 256, fit='crop'\) +[\d.]+ ms  JPEG 256x256", text)
    assert re.search(r"cache [1-9]\d* hits", text)
    assert "Traceback" not in out.stderr
