"""A burst of heavy requests against imgserver's admission control, and cached requests meanwhile.

    python bench/server_burst.py CORPUS [--requests 2000] [--max-queue 100] [--workers 2]
                                        [--all-formats]

imgserver runs as a subprocess (this checkout, result cache on) on
127.0.0.1.  A one-thread asyncio client opens ``--requests`` connections at
once, each asking for a different transform (every corpus JPEG in turn, then
all again one pixel wider...: nothing can be shared or cached), so at most
``workers`` are processed and ``--max-queue`` wait; the server must answer
every other one 503 at once, never fail a connection, and keep its memory
bounded.  Meanwhile a separate small process (so the burst client's own
event loop does not delay it) fetches a warm small thumbnail over and over,
one new connection each time: how long a cached answer takes while the
server is swamped (target: p99 <= 10 ms).

Printed: counts per status (anything but 200/503 is a failure), latency
percentiles per status, the cached requests' latency, and the server's peak
RSS (VmHWM) before and after the burst.  ``--all-formats`` adds the corpus PNGs
and WebPs (5120x2880 PNGs cost several times a JPEG: with 2 workers a queue
of 100 then takes longer than the server's 30 s timeout to drain on a busy
machine, and the last ones get 504).  The listening socket's backlog is
``--backlog`` (Twisted's default of 50 would make the kernel drop most of
the simultaneous SYNs and the clients retry after 1 s, 3 s...: a measure of
the kernel's accept queue, not of the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence
from urllib.parse import quote

import _common  # noqa: F401  (puts the project on sys.path)
import _servers
from _common import table
from pipeline import corpus_files

CACHED_QUERY = "w=64&h=64&fit=crop&fm=jpg&q=80"


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _request(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {_servers.HOST}\r\nConnection: close\r\n\r\n").encode()


def _status(response: bytes) -> int | None:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


# -- the burst (asyncio, one thread) -------------------------------------------

class _OneRequest(asyncio.Protocol):
    def __init__(self, payload: bytes, done: asyncio.Future) -> None:
        self.payload = payload
        self.done = done
        self.chunks: list[bytes] = []
        self.sent_at: float | None = None

    def connection_made(self, transport: Any) -> None:
        transport.write(self.payload)
        self.sent_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None and not self.chunks:
                self.done.set_exception(exc)
            else:
                self.done.set_result(b"".join(self.chunks))


async def _one(loop: asyncio.AbstractEventLoop, port: int, path: str,
               timeout: float, sent: list[float]) -> tuple[str, float, float]:
    """(status or error name, start, seconds) of one request on a new connection;
    appends the time the request was written to ``sent``."""
    started = time.monotonic()
    transport = None
    try:
        done: asyncio.Future = loop.create_future()
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _OneRequest(_request(path), done), _servers.HOST, port),
            timeout)
        sent.append(protocol.sent_at)
        response = await asyncio.wait_for(done, max(0.1, timeout - (time.monotonic() - started)))
        status = _status(response)
        outcome = str(status) if status is not None else "bad response"
    except asyncio.TimeoutError:
        outcome = "client timeout"
    except OSError as e:
        outcome = f"error: {type(e).__name__}"
    finally:
        if transport is not None:
            transport.close()
    return outcome, started, time.monotonic() - started


async def _burst(port: int, paths: Sequence[str], timeout: float,
                 sent: list[float]) -> list[tuple[str, float, float]]:
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(_one(loop, port, p, timeout, sent) for p in paths))


def run_burst(port: int, paths: Sequence[str],
              timeout: float) -> tuple[list[tuple[str, float, float]], list[float], float]:
    """All requests at once; (results, times the requests were written, client CPU seconds)."""
    sent: list[float] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    results = asyncio.run(_burst(port, paths, timeout, sent))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return results, sent, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# -- the cached-request probe (a process of its own) -------------------------------

def probe_main(port: int, path: str, gap: float, limit: float) -> int:
    """Fetch ``path`` on a new connection each time until stdin closes; print JSON."""
    payload = _request(path)
    samples = []
    deadline = time.monotonic() + limit
    first = True
    while time.monotonic() < deadline:
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            with socket.create_connection((_servers.HOST, port), timeout=30) as s:
                s.sendall(payload)
                chunks = []
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            status = _status(b"".join(chunks))
            outcome = str(status) if status is not None else "bad response"
        except OSError as e:
            outcome = f"error: {type(e).__name__}"
        samples.append((outcome, started, time.perf_counter() - t0))
        if first:
            print("ready", flush=True)
            first = False
        readable, _, _ = select.select([sys.stdin], [], [], gap)
        if readable and not sys.stdin.buffer.read1(1):
            break  # stdin closed: the burst is over
    print(json.dumps(samples), flush=True)
    return 0


def start_probe(port: int, path: str, gap: float, limit: float) -> _servers.Proc:
    argv = [sys.executable, os.path.abspath(__file__), "--probe", str(port), path,
            "--probe-gap", str(gap), "--probe-limit", str(limit)]
    proc = _servers.Proc("cached-probe", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = proc.popen.stdout.readline()
    if line.strip() != b"ready":
        proc.stop()
        raise RuntimeError(f"the cached-request probe did not start: {line!r}")
    return proc


def finish_probe(proc: _servers.Proc) -> list[tuple[str, float, float]]:
    try:
        out, _ = proc.popen.communicate(input=b"", timeout=60)
    finally:
        proc.stop()
    return [tuple(s) for s in json.loads(out.decode().strip().splitlines()[-1])]


# -- main ----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", help="directory of JPEG/PNG/WebP images")
    parser.add_argument("--requests", type=int, default=2000, help="simultaneous requests (default 2000)")
    parser.add_argument("--max-queue", type=int, default=100, help="server --max-queue (default 100)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="server --workers (default: CPUs)")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog of the server's socket (default 4096)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s")
    parser.add_argument("--all-formats", action="store_true",
                        help="use the corpus PNG and WebP images too (default: its JPEGs)")
    parser.add_argument("--baseline", type=float, default=1.0,
                        help="seconds of cached requests before the burst, as a baseline (default 1)")
    parser.add_argument("--probe-gap", type=float, default=0.005,
                        help="pause between cached requests, s (default 0.005)")
    parser.add_argument("--probe", nargs=2, metavar=("PORT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-limit", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _servers.install_cleanup()
    if args.probe:
        return probe_main(int(args.probe[0]), args.probe[1], args.probe_gap, args.probe_limit)

    if not args.corpus:
        parser.error("the corpus directory is required")
    corpus = os.path.abspath(args.corpus)
    kinds = (".jpg", ".jpeg", ".png", ".webp") if args.all_formats else (".jpg", ".jpeg")
    images = corpus_files(corpus, kinds)
    if not images:
        parser.error(f"no images in {corpus}")
    names = [quote(os.path.relpath(p, corpus)) for p in images]
    # Distinct transforms: every image in turn, then again one pixel wider, ...
    paths = [f"/images/{names[i % len(names)]}?w={256 + i // len(names)}&fm=jpg&q=80"
             for i in range(args.requests)]
    smallest = min((p for p in images if p.lower().endswith((".jpg", ".jpeg"))) or images,
                   key=os.path.getsize)
    cached = f"/images/{quote(os.path.relpath(smallest, corpus))}?{CACHED_QUERY}"

    limit = _servers.raise_fd_limit(args.requests + 1024)
    if limit < args.requests + 256:
        print(f"warning: only {limit} file descriptors allowed; connections may fail", file=sys.stderr)
    work = tempfile.mkdtemp(prefix="bench-burst-")
    server, port = _servers.start_imgserver(corpus, workers=args.workers, max_queue=args.max_queue,
                                            cache_mb=64, backlog=args.backlog, log_dir=work)
    probe = None
    try:
        # Warm: the cached thumbnail, and one of each format through the pipeline.
        for path in [cached] + [f"/images/{n}?w=100&fm=jpg&q=80" for n in names[:3]]:
            status, _ = _servers.http_get(port, path, timeout=60)
            if status != 200:
                raise RuntimeError(f"imgserver answered {status} for {path}:\n{server.tail()}")
        rss_before = _servers.peak_rss_mb([server.pid])
        hits0 = _servers.metric(port, "imgserver_cache_hits_total") or 0

        print(f"{len(images)} corpus images; {args.requests:,} simultaneous requests, each a different "
              f"transform (each image at w=256, 257, ... {256 + (args.requests - 1) // len(names)}, JPEG q80); {os.cpu_count()} CPUs; "
              f"load average {_servers.load_average()}")
        print(f"server: imgserver (this checkout) --workers {args.workers} --max-queue {args.max_queue} "
              f"--cache-mb 64 --quiet, listen backlog {args.backlog}, pid {server.pid}")
        print(f"burst client: asyncio, one thread, one connection per request (Connection: close); "
              f"cached probe: a separate process fetching {cached} on a new connection every "
              f"{args.probe_gap * 1000:g} ms\n")

        probe = start_probe(port, cached, args.probe_gap, limit=args.timeout + 120)
        time.sleep(args.baseline)  # cached requests on an idle server, for comparison
        burst_start = time.monotonic()
        with _servers.Window([server.pid]) as win:
            results, sent, client_cpu = run_burst(port, paths, args.timeout)
        burst_end = time.monotonic()
        samples = finish_probe(probe)
        probe = None

        hits = (_servers.metric(port, "imgserver_cache_hits_total") or 0) - hits0
        healthy, _ = _servers.http_get(port, "/healthz", timeout=10)
        rss_after = _servers.peak_rss_mb([server.pid])
        rss_now = _servers.status_kb(server.pid, "VmRSS") / 1024

        sent_by = max(sent, default=burst_start)
        by_outcome: dict[str, list[float]] = {}
        for outcome, _, seconds in results:
            by_outcome.setdefault(outcome, []).append(seconds)
        during = [s for s in samples if burst_start <= s[1] <= burst_end]
        idle_ok = [sec for outcome, st, sec in samples if outcome == "200" and st < burst_start]
        cached_ok = [sec for outcome, _, sec in during if outcome == "200"]
        cached_bad = [outcome for outcome, _, _ in during if outcome != "200"]

        def row(name: str, values: list[float], note: str = "") -> list[Any]:
            ms = lambda v: f"{v * 1000:,.1f}"
            return [name, len(values), ms(percentile(values, 50)), ms(percentile(values, 99)),
                    ms(max(values)) if values else "-", note]

        rows = []
        for outcome in sorted(by_outcome, key=lambda o: (o not in ("200", "503"), o)):
            note = {"200": "processed", "503": "refused: queue full"}.get(outcome, "FAILURE")
            rows.append(row(f"burst: {outcome}", by_outcome[outcome], note))
        rows.append(row("burst: all", [sec for _, _, sec in results]))
        rows.append(row("cached thumbnail, idle server (before the burst)", idle_ok))
        rows.append(row("cached thumbnail during the burst", cached_ok,
                        f"target p99 <= 10 ms; {len(cached_bad)} not 200"))
        refused_by = max((st + sec for o, st, sec in results if o == "503"), default=burst_start)
        first = [sec for o, st, sec in during if o == "200" and st <= refused_by]
        rest = [sec for o, st, sec in during if o == "200" and st > refused_by]
        rows.append(row("  - until the last 503 was answered", first,
                        f"first {refused_by - burst_start:.2f} s"))
        rows.append(row("  - while the queue drained", rest))
        print(table(["requests", "count", "p50 ms", "p99 ms", "max ms", "note"], rows))
        print()
        others = sum(len(v) for k, v in by_outcome.items() if k not in ("200", "503"))
        summary = [
            ["answers other than 200/503 (must be 0)", others],
            ["burst duration (first request to last answer)", f"{burst_end - burst_start:.2f} s"],
            ["last request written by the client at", f"{sent_by - burst_start:.2f} s"],
            ["server peak RSS (VmHWM) before / after the burst",
             f"{rss_before:.0f} / {rss_after:.0f} MiB (RSS now {rss_now:.0f} MiB)"],
            ["server CPU during the burst", f"{win.cpu:.1f} s ({win.cpu_per_s:.2f} s/s)"],
            ["machine CPU left idle during the burst", f"{100 * win.idle:.0f}%"],
            ["burst client CPU (same machine)", f"{client_cpu:.1f} s"],
            ["cached requests during the burst / cache hits counted",
             f"{len(during)} / {hits:.0f}"],
            ["/healthz after the burst", healthy],
        ]
        print(table(["", "value"], summary))
        print(f"\nload average after: {_servers.load_average()}")
    finally:
        if probe is not None:
            probe.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _servers.run_main(main)
