"""A burst of heavy requests against imgserver's admission control, and cached requests meanwhile.

    python bench/server_burst.py CORPUS [--processes 1,2] [--requests 2000] [--max-queue 100]
                                        [--workers 2] [--split] [--all-formats] [--server-args "..."]

imgserver runs as a subprocess (this checkout, result cache on) on
127.0.0.1, once per ``--processes`` value (``1,2`` runs the same burst against
one process, then against a parent with two worker processes sharing the
port; ``auto`` = the core count; 1 runs the server without ``--processes``,
which is the same thing).  ``--workers`` and ``--max-queue`` are per process
(``--split``: totals, divided among the processes, so that every run has the
same capacity).  A one-thread asyncio client opens ``--requests`` connections at
once, each asking for a different transform (every corpus JPEG in turn, then
all again one pixel wider...: nothing can be shared or cached), so at most
``workers`` are processed and ``--max-queue`` wait per process; the server must
answer every other one 503 at once, never fail a connection, and keep its
memory bounded.  Meanwhile a separate small process (so the burst client's own
event loop does not delay it) fetches a warm small thumbnail over and over,
one new connection each time: how long a cached answer takes while the
server is swamped (target: p99 <= 10 ms; with 2 processes on 2 cores).  With
several processes every worker has a memory cache of its own: the thumbnail
is fetched until each worker's counters show a hit before the burst.

Printed per run: counts per status (anything but 200/503 is a failure),
latency percentiles per status, the cached requests' latency, every
process's peak RSS (VmHWM: the parent and each worker) and their total, the
server's own counters (summed over workers from ``/metrics``) next to the
load generator's, and how the requests spread over the workers; then the runs
side by side.  ``--all-formats`` adds the corpus PNGs
and WebPs (5120x2880 PNGs cost several times a JPEG: with 2 workers a queue
of 100 then takes longer than the server's 30 s timeout to drain on a busy
machine, and the last ones get 504).  The listening socket's backlog is
``--backlog`` (Twisted's default of 50 would make the kernel drop most of
the simultaneous SYNs and the clients retry after 1 s, 3 s...: a measure of
the kernel's accept queue, not of the server).  Exit status 1 when an answer
was neither 200 nor 503 or a server counter disagrees with the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import shlex
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


# -- the server: several processes, their counters and memory -----------------------

Sample = tuple[str, dict[str, str], float]


def parse_processes(text: str) -> list[int]:
    """``"1,2"`` / ``"auto"`` -> [1, 2] / [cores]; raises ValueError."""
    out = []
    for part in text.split(","):
        part = part.strip()
        n = (os.cpu_count() or 1) if part == "auto" else int(part)
        if n < 1:
            raise ValueError(f"--processes: {part!r} is not a positive number")
        out.append(n)
    if not out:
        raise ValueError("--processes: nothing given")
    return out


def processes_args(processes: int) -> list[str]:
    """The server's ``--processes`` option; none for 1 (today's single process, no parent)."""
    return [] if processes == 1 else ["--processes", str(processes)]


def start_server(root: str, processes: int, *, workers: int, max_queue: int, cache_mb: float,
                 backlog: int | None = None, extra: Sequence[str] = (), log_dir: str | None = None,
                 timeout: float = 60.0) -> tuple[_servers.Proc, int]:
    """imgserver with ``processes`` worker processes; returns once every worker answers
    (``/healthz`` below 500, and ``imgserver_processes{state="up"}`` = ``processes`` where exported)."""
    proc, port = _servers.start_imgserver(root, workers=workers, max_queue=max_queue, cache_mb=cache_mb,
                                          backlog=backlog, extra=[*processes_args(processes), *extra],
                                          log_dir=log_dir)
    if processes > 1:
        deadline = time.monotonic() + timeout
        while True:
            samples = scrape(port)
            up = metric_sum(samples, "imgserver_processes", state="up") if samples else None
            workers_seen = len([p for p in proc.pids() if worker_id(p) is not None])
            if samples and ((up or 0) >= processes or (not has_metric(samples, "imgserver_processes")
                                                       and workers_seen >= processes)):
                break
            if not proc.alive():
                raise RuntimeError(f"imgserver exited with {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"imgserver --processes {processes}: only {up} workers up after "
                                   f"{timeout:g} s:\n{proc.tail()}")
            time.sleep(0.2)
    return proc, port


def scrape(port: int) -> list[Sample] | None:
    """Every sample of the server's ``/metrics`` as (name, labels, value); None if it did not answer."""
    try:
        status, body = _servers.http_get(port, "/metrics", timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    return parse_metrics(body.decode("utf-8", "replace"))


def parse_metrics(text: str) -> list[Sample]:
    """A Prometheus exposition as (name, labels, value) samples (counters keep their ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def has_metric(samples: Sequence[Sample] | None, name: str) -> bool:
    return any(n == name for n, _, _ in samples or ())


def metric_sum(samples: Sequence[Sample] | None, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (over workers and other labels)."""
    return sum(v for n, lab, v in samples or () if n == name and all(lab.get(k) == w for k, w in labels.items()))


def metric_by(samples: Sequence[Sample] | None, name: str, label: str, **labels: str) -> dict[str, float]:
    """``name`` summed per value of ``label`` (e.g. per ``worker``); samples without it under ``""``."""
    out: dict[str, float] = {}
    for n, lab, v in samples or ():
        if n == name and all(lab.get(k) == w for k, w in labels.items()):
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
    return out


#: The server's counters cross-checked with the load generator's (summed over workers).
COUNTERS = {
    "images_200": ("imgserver_requests_total", {"endpoint": "images", "status": "200"}),
    "images_503": ("imgserver_requests_total", {"endpoint": "images", "status": "503"}),
    # Every cause of a 503: the processing queue full, the file loader full, over --max-connections.
    "rejected": ("imgserver_rejected_total", {}),
    "files_rejected": ("imgserver_files_rejected_total", {}),
    "connections_refused": ("imgserver_connections_refused_total", {}),
    "processed": ("imgserver_processing_seconds_count", {}),
    "cache_hits": ("imgserver_cache_hits_total", {}),
    "coalesced": ("imgserver_coalesced_total", {}),
}


def counters(samples: Sequence[Sample] | None) -> dict[str, float]:
    return {key: metric_sum(samples, name, **labels) for key, (name, labels) in COUNTERS.items()}


def settled_scrape(port: int, processes: int, timeout: float = 15.0) -> list[Sample] | None:
    """``/metrics`` once the counters stopped moving.  With several processes one worker
    answers and adds the others' snapshots, published every second: read until two reads
    1.2 s apart agree (bounded by ``timeout``)."""
    samples = scrape(port)
    if processes == 1:
        return samples
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.2)
        again = scrape(port)
        if again is not None and samples is not None and counters(again) == counters(samples):
            return again
        samples = again
    return samples


def worker_id(pid: int) -> str | None:
    """``IMGSERVER_WORKER_ID`` of a process (None: not a worker, or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"IMGSERVER_WORKER_ID="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def process_roles(proc: _servers.Proc) -> list[tuple[str, int]]:
    """(role, pid) of the server's processes: "server" alone, or "parent" and "worker N"."""
    pids = proc.pids()
    if len(pids) <= 1:
        return [("server", p) for p in pids]
    out = []
    for pid in pids:
        wid = worker_id(pid)
        out.append(("parent" if pid == proc.pid else f"worker {wid}" if wid is not None else "child", pid))
    return sorted(out, key=lambda r: (r[0] != "parent", r[0]))


def peak_rss(proc: _servers.Proc) -> list[tuple[str, int, float]]:
    """(role, pid, peak RSS MiB) per process, VmHWM (a worker restarted by the parent
    counts from its restart: its predecessor's peak is gone with it)."""
    return [(role, pid, _servers.status_kb(pid, "VmHWM") / 1024) for role, pid in process_roles(proc)]


def warm_every_worker(port: int, path: str, processes: int, timeout: float = 30.0) -> int:
    """Fetch ``path`` on new connections until every worker's memory cache holds it
    (each worker's ``imgserver_cache_hits_total`` > 0); returns the requests sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    while True:
        for _ in range(1 if processes == 1 else 4 * processes):
            status, _ = _servers.http_get(port, path, timeout=60)
            sent += 1
            if status != 200:
                raise RuntimeError(f"imgserver answered {status} for {path}")
        if processes == 1:
            return sent
        time.sleep(1.2)  # the other workers' snapshots are up to a second old
        hits = metric_by(scrape(port), "imgserver_cache_hits_total", "worker")
        if len([w for w, v in hits.items() if w and v > 0]) >= processes or (hits and "" in hits
                                                                             and len(hits) == 1):
            return sent  # every worker hit it (or no per-worker labels to tell)
        if time.monotonic() > deadline:
            print(f"warning: not every worker has {path} cached: hits per worker {hits}", file=sys.stderr)
            return sent


# -- one run ---------------------------------------------------------------------

def per_process(args: argparse.Namespace, processes: int) -> tuple[int, int]:
    """(--workers, --max-queue) of each server process: as given, or with ``--split`` the
    given totals divided among the processes (rounded up), so every run has the same capacity."""
    if not args.split:
        return args.workers, args.max_queue
    return max(1, -(-args.workers // processes)), max(1, -(-args.max_queue // processes))


def run_one(args: argparse.Namespace, processes: int, corpus: str, paths: Sequence[str], names: Sequence[str],
            cached: str, limit: int) -> dict[str, Any]:
    """One server with ``processes`` processes, one burst; prints its tables, returns its figures."""
    work = tempfile.mkdtemp(prefix="bench-burst-")
    extra = shlex.split(args.server_args or "")
    workers, max_queue = per_process(args, processes)
    server, port = start_server(corpus, processes, workers=workers, max_queue=max_queue,
                                cache_mb=64, backlog=args.backlog, extra=extra, log_dir=work)
    probe = None
    try:
        # Warm: the cached thumbnail (in every worker), and one of each format through the pipeline.
        warm_every_worker(port, cached, processes)
        for path in [f"/images/{n}?w=100&fm=jpg&q=80" for n in names[:3]]:
            status, _ = _servers.http_get(port, path, timeout=60)
            if status != 200:
                raise RuntimeError(f"imgserver answered {status} for {path}:\n{server.tail()}")
        roles = process_roles(server)
        pids = [pid for _, pid in roles]
        rss_before = _servers.peak_rss_mb(pids)
        before = settled_scrape(port, processes)

        mode = "one process" if processes == 1 else f"--processes {processes} (parent + {processes} workers)"
        print(f"== {mode} ==")
        print(f"{len(set(names))} corpus images; {args.requests:,} simultaneous requests, each a different "
              f"transform (each image at w=256, 257, ... {256 + (args.requests - 1) // len(names)}, JPEG q80); "
              f"{os.cpu_count()} CPUs; load average {_servers.load_average()}")
        print(f"server: imgserver (this checkout) {' '.join(processes_args(processes) + extra + [''])}"
              f"--workers {workers} --max-queue {max_queue} --cache-mb 64 --quiet, "
              f"listen backlog {args.backlog}; processes: "
              + ", ".join(f"{role} {pid}" for role, pid in roles))
        print(f"burst client: asyncio, one thread, one connection per request (Connection: close); "
              f"cached probe: a separate process fetching {cached} on a new connection every "
              f"{args.probe_gap * 1000:g} ms\n")

        probe = start_probe(port, cached, args.probe_gap, limit=args.timeout + 120)
        time.sleep(args.baseline)  # cached requests on an idle server, for comparison
        burst_start = time.monotonic()
        with _servers.Window(pids) as win:
            results, sent, client_cpu = run_burst(port, paths, args.timeout)
        burst_end = time.monotonic()
        samples = finish_probe(probe)
        probe = None

        healthy, _ = _servers.http_get(port, "/healthz", timeout=10)
        after = settled_scrape(port, processes)
        rss = peak_rss(server)
        rss_now = sum(_servers.status_kb(pid, "VmRSS") for _, pid, _ in rss) / 1024
        restarted = sorted(set(pid for _, pid, _ in rss) - set(pids))
        restarts = metric_sum(after, "imgserver_worker_restarts_total") - metric_sum(
            before, "imgserver_worker_restarts_total")

        sent_by = max(sent, default=burst_start)
        by_outcome: dict[str, list[float]] = {}
        for outcome, _, seconds in results:
            by_outcome.setdefault(outcome, []).append(seconds)
        during = [s for s in samples if burst_start <= s[1] <= burst_end]
        idle_ok = [sec for outcome, st, sec in samples if outcome == "200" and st < burst_start]
        cached_ok = [sec for outcome, _, sec in during if outcome == "200"]
        cached_bad = [outcome for outcome, _, _ in during if outcome != "200"]

        def ms(v: float) -> str:
            return f"{v * 1000:,.1f}"

        def row(name: str, values: list[float], note: str = "") -> list[Any]:
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

        # The server's counters next to the load generator's.
        delta = {k: counters(after)[k] - counters(before)[k] for k in COUNTERS} if before and after else {}
        if delta:
            delta["rejected"] += delta.pop("files_rejected") + delta.pop("connections_refused")
        def count(outcome: str, items: Sequence[tuple[str, float, float]]) -> int:
            return sum(1 for o, *_ in items if o == outcome)

        client = {
            "images_200": count("200", results) + count("200", samples),
            "images_503": count("503", results) + count("503", samples),
            "rejected": count("503", results) + count("503", samples),
            "processed": count("200", results),
            "cache_hits": count("200", samples),
        }
        check_rows = []
        labels = {
            "images_200": "200 answers (burst + cached probe)",
            "images_503": "503 answers",
            "rejected": "refused (queue, file loader or connections full) = 503s",
            "processed": "images processed = burst 200s",
            "cache_hits": "memory cache hits = cached probe 200s",
            "coalesced": "shared processings (must be 0: all distinct)",
        }
        mismatches = 0
        for key, label in labels.items():
            server_value = delta.get(key)
            expected = client.get(key, 0)
            ok = server_value is not None and round(server_value) == expected
            mismatches += not ok
            check_rows.append([label, expected, "-" if server_value is None else f"{server_value:.0f}",
                               "ok" if ok else "MISMATCH"])
        print(table(["server counter (from /metrics, all workers)", "load generator", "server", ""],
                    check_rows))
        print()

        per_worker = metric_by(after, "imgserver_requests_total", "worker", endpoint="images")
        per_worker_before = metric_by(before, "imgserver_requests_total", "worker", endpoint="images")
        spread = {w: per_worker.get(w, 0) - per_worker_before.get(w, 0) for w in per_worker}
        def answered(role: str) -> str:
            key = role.split()[1] if role.startswith("worker ") else "" if role == "server" else None
            return f"{spread[key]:.0f}" if key in spread else "-"

        rss_rows = [[role, str(pid), f"{mib:.0f}", answered(role)] for role, pid, mib in rss]
        total_rss = sum(mib for _, _, mib in rss)
        rss_rows.append(["total", "", f"{total_rss:.0f}", f"{sum(spread.values()):.0f}" if spread else "-"])
        print(table(["process", "pid", "peak RSS (VmHWM) MiB", "image requests answered in the run"], rss_rows))
        print()

        others = sum(len(v) for k, v in by_outcome.items() if k not in ("200", "503"))
        summary: list[list[Any]] = [
            ["answers other than 200/503 (must be 0)", others],
            ["burst duration (first request to last answer)", f"{burst_end - burst_start:.2f} s"],
            ["last request written by the client at", f"{sent_by - burst_start:.2f} s"],
            ["server peak RSS (VmHWM, all processes) before / after the burst",
             f"{rss_before:.0f} / {total_rss:.0f} MiB (RSS now {rss_now:.0f} MiB)"],
            ["server CPU during the burst", f"{win.cpu:.1f} s ({win.cpu_per_s:.2f} s/s)"],
            ["machine CPU left idle during the burst", f"{100 * win.idle:.0f}%"],
            ["burst client CPU (same machine)", f"{client_cpu:.1f} s"],
            ["server counters that disagree with the load generator", mismatches],
            ["processes restarted during the run: new pids / the parent's count",
             f"{len(restarted)} / {restarts:.0f}"],
            ["/healthz after the burst", healthy],
        ]
        print(table(["", "value"], summary))
        print(f"\nload average after: {_servers.load_average()}\n")
        return {
            "processes": processes,
            "workers": workers,
            "max_queue": max_queue,
            "ok": len(by_outcome.get("200", [])),
            "refused": len(by_outcome.get("503", [])),
            "other": others,
            "cached_p50": percentile(cached_ok, 50),
            "cached_p99": percentile(cached_ok, 99),
            "cached_max": max(cached_ok, default=float("nan")),
            "cached_count": len(cached_ok),
            "cached_bad": len(cached_bad),
            "idle_p99": percentile(idle_ok, 99),
            "duration": burst_end - burst_start,
            "rss": rss,
            "rss_total": total_rss,
            "cpu": win.cpu,
            "mismatches": mismatches,
            "spread": spread,
            "healthz": healthy,
        }
    finally:
        if probe is not None:
            probe.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def side_by_side(runs: Sequence[dict[str, Any]]) -> str:
    """The runs' main figures in columns."""
    def ms(v: float) -> str:
        return f"{v * 1000:,.1f}"

    rows: list[list[Any]] = [
        ["per process: --workers / --max-queue"] + [f"{r['workers']} / {r['max_queue']}" for r in runs],
        ["burst: 200 / 503 / other"] + [f"{r['ok']} / {r['refused']} / {r['other']}" for r in runs],
        ["cached p50 during the burst, ms"] + [ms(r["cached_p50"]) for r in runs],
        ["cached p99 during the burst, ms (target <= 10)"] + [ms(r["cached_p99"]) for r in runs],
        ["cached max during the burst, ms"] + [ms(r["cached_max"]) for r in runs],
        ["cached requests during the burst (not 200)"] + [f"{r['cached_count']} ({r['cached_bad']})" for r in runs],
        ["cached p99 on the idle server, ms"] + [ms(r["idle_p99"]) for r in runs],
        ["burst duration, s"] + [f"{r['duration']:.2f}" for r in runs],
        ["server CPU during the burst, s"] + [f"{r['cpu']:.1f}" for r in runs],
        ["peak RSS per process, MiB"] + [", ".join(f"{role} {mib:.0f}" for role, _, mib in r["rss"]) for r in runs],
        ["peak RSS in total, MiB"] + [f"{r['rss_total']:.0f}" for r in runs],
        ["image requests per worker"] + [", ".join(f"{w or 'all'}: {v:.0f}" for w, v in sorted(r["spread"].items()))
                                         or "-" for r in runs],
        ["server counters disagreeing with the client"] + [r["mismatches"] for r in runs],
        ["/healthz after"] + [r["healthz"] for r in runs],
    ]
    return table([""] + [f"--processes {r['processes']}" for r in runs], rows)


# -- main ----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", help="directory of JPEG/PNG/WebP images")
    parser.add_argument("--processes", default="1",
                        help="server processes, a comma-separated list run one after the other "
                             "(e.g. 1,2; auto = the core count; default 1)")
    parser.add_argument("--requests", type=int, default=2000, help="simultaneous requests (default 2000)")
    parser.add_argument("--max-queue", type=int, default=100, help="server --max-queue, per process (default 100)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="server --workers, per process (default: CPUs)")
    parser.add_argument("--backlog", type=int, default=4096,
                        help="listen backlog of the server's socket (default 4096)")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s")
    parser.add_argument("--all-formats", action="store_true",
                        help="use the corpus PNG and WebP images too (default: its JPEGs)")
    parser.add_argument("--baseline", type=float, default=1.0,
                        help="seconds of cached requests before the burst, as a baseline (default 1)")
    parser.add_argument("--probe-gap", type=float, default=0.005,
                        help="pause between cached requests, s (default 0.005)")
    parser.add_argument("--split", action="store_true",
                        help="--workers and --max-queue are totals, divided among the processes")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of pause between runs, for the machine to settle (default 2)")
    parser.add_argument("--server-args", default="",
                        help="more imgserver options, one shell-quoted string (e.g. \"--balance reuseport\")")
    parser.add_argument("--probe", nargs=2, metavar=("PORT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-limit", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _servers.install_cleanup()
    if args.probe:
        return probe_main(int(args.probe[0]), args.probe[1], args.probe_gap, args.probe_limit)

    if not args.corpus:
        parser.error("the corpus directory is required")
    try:
        processes = parse_processes(args.processes)
    except ValueError as e:
        parser.error(str(e))
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
    runs = []
    for i, n in enumerate(processes):
        if i:
            time.sleep(args.settle)  # let the machine settle after the last server
        runs.append(run_one(args, n, corpus, paths, names, cached, limit))
    if len(runs) > 1:
        print("== side by side ==")
        print(side_by_side(runs))
    return 1 if any(r["other"] or r["mismatches"] for r in runs) else 0


if __name__ == "__main__":
    _servers.run_main(main)
