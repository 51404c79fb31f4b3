"""The twistd plugin: ``python -m twisted imgserver`` serves, and SIGTERM stops it cleanly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_twist_plugin_serves_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "twisted", "imgserver", "--http", f"tcp:{port}:interface=127.0.0.1",
         "--pb", "none", "--workers", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/images/logo.png?w=32", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        # twist re-raises the signal once the reactor has stopped cleanly, so that
        # its parent sees how it ended: -SIGTERM (or 0), after a clean main loop.
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Main loop terminated" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
