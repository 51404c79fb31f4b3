"""bench/static_files.py at its smallest setting, once: it runs, and its counters agree.

No timing is asserted: the benchmark itself compares every server's own
counters (answers, bytes acknowledged by TCP) with wrk's and exits 1 on a
mismatch; this test checks that exit status and the JSON it writes.  nginx,
FUSE and wrk are used where present (the benchmark skips nginx and the
slow-storage cell with a reason where they are missing; no wrk: skip).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def make_corpus(directory):
    """Three real JPEGs of noise (noise does not compress: each is well over 256 KiB)."""
    from PIL import Image

    os.makedirs(directory)
    for i in range(3):
        image = Image.frombytes("RGB", (480, 480), os.urandom(480 * 480 * 3))
        image.save(os.path.join(directory, f"noise{i}.jpg"), quality=95)


@pytest.mark.timeout(150)
def test_smallest_setting_runs_and_counters_agree(tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk not found (Debian: apt-get install wrk)")
    pytest.importorskip("PIL")
    corpus = tmp_path / "corpus"
    make_corpus(str(corpus))
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = [sys.executable, os.path.join(BENCH, "static_files.py"), str(corpus),
            "--seconds", "1", "--warmup", "0", "--rounds", "1",
            "--servers", "asyncfile-sendfile,asyncfile-read,static,threaded,nginx",
            "--small-files", "40", "--large-files", "4", "--large-size", str(256 * 1024),
            "--connections", "8", "--large-connections", "2", "--slow-connections", "2",
            "--mixed-connections", "4", "--workdir", str(tmp_path / "work"),
            "--json", str(out)]
    try:  # the plot needs the bench extra's matplotlib; the counters do not
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    else:
        argv += ["--plot", str(png)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=140)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    doc = json.loads(out.read_text())
    assert doc["problems"] == [], report

    ran = set(doc["cells"])
    # asyncfile.web.File, static.File and the threaded sender always run here;
    # nginx only where installed (the benchmark says why not).
    assert {"asyncfile-sendfile", "asyncfile-read", "static", "threaded"} <= ran, report
    if "nginx" not in ran:
        assert "nginx" in doc["skipped"], report
    slow_cell = "mixed" in doc["cells"]["static"]
    for kind, cells in doc["cells"].items():
        assert cells["small"][0]["wrk"]["requests"] > 0, (kind, report)
        assert cells["large"][0]["wrk"]["requests"] > 0, (kind, report)
        if slow_cell:
            assert cells["mixed"][0]["slow"]["bytes"] > 0, (kind, report)
        if not kind.startswith("nginx"):
            for cell in cells.values():
                server = cell[0]["server"]
                assert set(server["statuses"]) <= {"200"}, (kind, server)
                # The server samples tcpi_bytes_acked possibly before the last delayed
                # ACKs: a segment per connection of slack, as the benchmark's own check.
                slack = 65536 * cell[0]["wrk"].get("connections", 64)
                assert server["bytes_acked"] >= cell[0]["wrk"]["bytes"] - slack, (kind, server)
    if png is None:
        return
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1200, 800)
