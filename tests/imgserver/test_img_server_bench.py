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


# -- issue 11: several processes, result tiers ------------------------------------------------

import subprocess  # noqa: E402

import result_tiers  # noqa: E402
from memcached_helpers import memcached, memcached_factory  # noqa: E402,F401  (pytest fixtures)

EXPOSITION = """\
# HELP imgserver_requests_total Requests answered, by endpoint and status
# TYPE imgserver_requests_total counter
imgserver_requests_total{endpoint="images",status="200",worker="0"} 5.0
imgserver_requests_total{endpoint="images",status="200",worker="1"} 7.0
imgserver_requests_total{endpoint="images",status="503",worker="1"} 2.0
imgserver_requests_total{endpoint="healthz",status="200",worker="0"} 1.0
# HELP imgserver_processes Worker processes: expected, and up (fresh snapshot)
# TYPE imgserver_processes gauge
imgserver_processes{state="expected"} 2.0
imgserver_processes{state="up"} 2.0
# HELP imgserver_tier_hits_total Results answered from a tier
# TYPE imgserver_tier_hits_total counter
imgserver_tier_hits_total{tier="store",worker="0"} 3.0
imgserver_tier_hits_total{tier="store",worker="1"} 4.0
imgserver_tier_hits_total{tier="memcached",worker="1"} 1.0
"""


def test_processes_option_parsing():
    assert server_burst.parse_processes("1,2") == [1, 2]
    assert server_burst.parse_processes("auto") == [os.cpu_count() or 1]
    for bad in ("0", "x", "1,-1"):
        with pytest.raises(ValueError):
            server_burst.parse_processes(bad)
    assert server_burst.processes_args(1) == []  # today's single process: no parent, no option
    assert server_burst.processes_args(2) == ["--processes", "2"]


def test_counters_are_summed_over_workers_and_labels():
    samples = server_burst.parse_metrics(EXPOSITION)
    assert server_burst.metric_sum(samples, "imgserver_requests_total", endpoint="images", status="200") == 12
    assert server_burst.metric_sum(samples, "imgserver_requests_total", endpoint="images") == 14
    assert server_burst.metric_by(samples, "imgserver_requests_total", "worker", endpoint="images") == {
        "0": 5, "1": 9}
    assert server_burst.metric_sum(samples, "imgserver_processes", state="up") == 2
    assert server_burst.counters(samples)["images_503"] == 2
    assert server_burst.counters(samples)["processed"] == 0  # absent: 0, not an error
    assert result_tiers.tier_hits(samples, "store") == 7
    assert result_tiers.tier_hits(samples, "memcached") == 1
    # A server that exports its tiers some other way is understood; one that does not says so.
    other = server_burst.parse_metrics('# TYPE imgserver_store_hits_total counter\nimgserver_store_hits_total 9.0\n')
    assert result_tiers.tier_hits(other, "store") == 9
    assert result_tiers.tier_hits(other, "memcached") is None


def test_store_files_are_evicted_and_their_file_system_named(tmp_path):
    (tmp_path / "v1" / "ab").mkdir(parents=True)
    (tmp_path / "v1" / "ab" / "x.img").write_bytes(b"x" * 5000)
    files = result_tiers.store_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["x.img"]
    assert result_tiers.evict(files + [str(tmp_path / "gone")]) == 5000
    assert result_tiers.file_system(str(tmp_path)) not in ("", "?")


def _run_bench(argv, timeout):
    """A benchmark as the lead runs it (a subprocess: its own signal handlers and atexit)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(BENCH))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _processes_supported():
    out = subprocess.run([sys.executable, "-m", "imgserver.cli", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=os.path.dirname(BENCH)).stdout
    return "--processes" in out


@pytest.mark.timeout(90)
def test_burst_one_and_two_processes_side_by_side():
    if not _processes_supported():
        pytest.skip("imgserver has no --processes option in this checkout")
    out = _run_bench([os.path.join(BENCH, "server_burst.py"), SAMPLES_DIR, "--processes", "1,2",
                      "--requests", "20", "--max-queue", "2", "--workers", "2", "--split",
                      "--baseline", "0.1", "--settle", "0"], 80)
    assert "== side by side ==" in out
    assert "| worker 0 " in out and "| worker 1 " in out and "| parent " in out
    assert "MISMATCH" not in out  # the server's counters (summed over workers) match the client's
    side = out.split("== side by side ==")[1]
    assert "--processes 1" in side and "--processes 2" in side
    assert "| 2 / 2 " in side and "| 1 / 1 " in side  # --split: the same capacity in both runs


@pytest.mark.timeout(90)
def test_result_tiers_answers_come_from_each_tier(memcached):
    out = _run_bench([os.path.join(BENCH, "result_tiers.py"), SAMPLES_DIR, "--all-formats", "--widths", "1",
                      "--seconds", "0.3", "--warmup", "0.1", "--memcached", memcached.address,
                      "--cells", "memory,store-cold,memcached"], 80)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ")}
    for cell in ("memory", "store-cold", "memcached"):  # "store" and "processing" share their code
        assert rows[cell][10] == "ok", out  # exit 0 says the same: every answer came from its tier
        assert int(rows[cell][2].replace(",", "")) > 0
        assert rows[cell][8] == "0"  # nothing processed while measuring
