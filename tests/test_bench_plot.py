"""bench/slow_storage.py's --plot figure: drawn from a synthetic series (no FUSE)."""

import os
import random
import struct
import sys

import pytest

pytest.importorskip("matplotlib")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import slow_storage  # noqa: E402


def test_plot_lateness_writes_a_1200x800_png(tmp_path):
    rng = random.Random(1)
    quiet = [i * 0.0012 for i in range(1, 300)]
    series = [
        slow_storage.Series("naive FileReader (os.read in doRead)", 17.0, 1.02,
                            [float(i) for i in range(1, 18)], [1.0] * 16 + [1.02]),
        slow_storage.Series("blocking read in the reactor", 3.0, 3.0, [3.0], [3.0]),
        slow_storage.Series("asyncfile (nowait engine)", 0.36, 0.003,
                            quiet, [rng.uniform(-0.0001, 0.003) for _ in quiet]),
        slow_storage.Series("asyncfile (threads engine)", 0.0, 0.0, [], []),  # no tick at all
    ]
    out = tmp_path / "lateness.png"
    slow_storage.plot_lateness(series, str(out), "20 × 1 MiB, 50 ms per read, FUSE")
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (1200, 800)
