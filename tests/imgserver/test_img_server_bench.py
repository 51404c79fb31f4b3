"""The HTTP server benchmarks' helpers: load generator arithmetic, profile summary,
and one short real run of imgserver as a subprocess under the closed-loop load."""

import os
import sys

import pytest

from imgserver.settings import SAMPLES_DIR

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import _load  # noqa: E402
import _servers  # noqa: E402
import server_burst  # noqa: E402
import server_throughput  # noqa: E402


def test_little_rate_counts_work_at_the_window_edges_in_part():
    # Two connections answered in waves: requests of 4 s each, back to back,
    # window of 6 s starting at 0: 2 connections x 6/4 = 3 requests' worth.
    samples = [(-2.0, 2.0, "200"), (2.0, 6.0, "200"), (6.0, 10.0, "200")] * 2
    r = _load.LoadResult(window=6.0, samples=samples)
    assert r.rate == pytest.approx(3 / 6)
    assert r.answered_rate == pytest.approx(4 / 6)  # both waves at 2 s and 6 s fall inside
    assert r.statuses() == {"200": 4}
    assert r.failures == 0


def test_little_rate_ignores_failures_and_requests_outside():
    samples = [(-5.0, -1.0, "200"), (0.0, 1.0, "200"), (1.0, 2.0, "503"), (9.0, 11.0, "200")]
    r = _load.LoadResult(window=2.0, samples=samples)
    assert r.rate == pytest.approx(1 / 2)
    assert r.statuses() == {"200": 1, "503": 1}
    assert r.failures == 1


def test_percentile_and_status_parsing():
    assert server_burst.percentile([3, 1, 2], 50) == 2
    assert server_burst.percentile(list(range(101)), 99) == 99
    assert server_burst._status(b"HTTP/1.1 503 Service Unavailable\r\n") == 503
    assert server_burst._status(b"garbage") is None


def test_summarize_profile(tmp_path):
    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "thread (1): MainThread;run (base.py:1);doPoll (epollreactor.py:2) 30\n"
        "thread (2): PoolThread-imgserver-work-0;transform (processing.py:3);load (ImageFile.py:4) 50\n"
        "thread (3): PoolThread-imgserver-work-1;transform (processing.py:3);resize (Image.py:5) 20\n"
    )
    text = server_throughput.summarize_profile(str(raw), samples_per_thread=100)
    assert "PoolThread-imgserver-work-*" in text and "0.70" in text
    assert "load (ImageFile.py)" in text and "50.0%" in text
    assert "doPoll (epollreactor.py)" in text


def test_link_copies(tmp_path):
    src = os.path.join(SAMPLES_DIR, "photo.jpg")
    out = _servers.link_copies([src], 3, str(tmp_path / "links"))
    assert [os.path.basename(p) for p in out] == ["c000-photo.jpg", "c001-photo.jpg", "c002-photo.jpg"]
    assert all(os.path.getsize(p) == os.path.getsize(src) for p in out)


@pytest.mark.timeout(60)
def test_imgserver_subprocess_under_closed_loop_load(tmp_path):
    proc, port = _servers.start_imgserver(SAMPLES_DIR, workers=1, max_queue=100, cache_mb=0,
                                          log_dir=str(tmp_path))
    try:
        paths = [f"/images/{n}?w={w}&h=32&fit=crop&fm=jpg&q=80"
                 for n in ("photo.jpg", "logo.png", "landscape.webp") for w in (32, 33)]
        win = _servers.Window(proc.pids())
        res = _load.closed_loop(port, paths, connections=4, warmup=0.2, seconds=0.5, mark=win.mark)
        assert res.statuses().get("200", 0) > 0
        assert res.failures == 0
        assert res.rate > 0 and win.cpu > 0
        assert _servers.peak_rss_mb(proc.pids()) > 10
        _servers.wait_imgserver_idle(port, timeout=10)
        assert _servers.imgserver_idle(port)
    finally:
        proc.stop()
    assert not proc.alive()
