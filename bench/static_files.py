"""Static files over HTTP: asyncfile.web.File vs twisted.web.static.File, a threaded sender and nginx.

    python bench/static_files.py CORPUS [--seconds 8] [--rounds 1] [--plot docs/static_files.png]
                                        [--servers asyncfile-sendfile,asyncfile-read,static,threaded,nginx,nginx-aio]

Servers, each started here in a process of its own on 127.0.0.1 (so the load
generator and the server share no GIL; see ``bench/_static_servers.py``):

* ``asyncfile-sendfile``: ``asyncfile.web.File(dir)`` (``zero_copy=True``,
  the default loader);
* ``asyncfile-read``: the same with ``zero_copy=False`` (reads through Python);
* ``static``: ``twisted.web.static.File(dir)``;
* ``threaded``: a Synapse-style threaded sender (``ThreadedFileSender``'s
  pattern, re-implemented in ``_static_servers.py``: stat and open in the
  reactor thread, 16 KiB reads in a dedicated thread pool, each chunk handed
  over with ``callFromThread``);
* ``nginx``: Debian's ``/usr/sbin/nginx`` with a generated configuration:
  ``master_process on`` and ``worker_processes 1`` (one serving process, as
  each Python server has one reactor thread; the master only supervises),
  ``sendfile on``, ``tcp_nopush on``, ``access_log off``, no ``aio``: its
  worker reads a slow file in its event loop, as static.File does;
* ``nginx-aio``: the same with ``aio threads`` (reads and sendfile of
  uncached data in nginx's thread pool): nginx's answer to slow storage.

Both nginx are skipped, with a message, where nginx is missing.  The Python
servers run on the epoll reactor and write no access log either.  Load:
``wrk`` (C, one thread per wrk process, keep-alive), with a Lua script that
cycles through many distinct files, each wrk thread starting at its own
offset.

Files (copies in a temporary directory, never hard links): ``--small-files``
16 KiB files cut from the corpus's JPEGs (real JPEG bytes; slice k of a file
starts at k x 16 KiB), and ``--large-files`` 5 MB files (the first 5,000,000
bytes of each corpus file at least that big, copied as often as needed).

Cells, for every server:

1. cached 16 KiB: ``--connections`` connections for ``--seconds``;
2. cached 5 MB: ``--large-connections`` connections;
3. slow storage: a FUSE mount of the 5 MB files (``asyncfile.testing.slowfs``,
   direct I/O: never cached; every read sleeps ``--delay``) served at
   ``/slow/`` to a second wrk with ``--slow-connections`` connections, while
   cached 16 KiB files are asked for by ``--mixed-connections`` connections
   at ``--mixed-rate`` requests/s at most (a load every server can carry, so
   their latency shows the stalls, not a queue): the p99 of those small
   requests, and how much the slow streams got through.

Cached cells are preceded by ``--warmup`` seconds of the same load,
unmeasured (the files were read once before, so they are in the page cache);
each cell starts once the previous load's connections are closed.  Inside
each Python server a 1 ms ``LoopingCall`` measures how late the reactor runs
("stall": the worst lateness of a tick in the cell).  It also reads the
reactor thread's ``/proc/thread-self/schedstat``, so each tick's lateness
splits into time spent waiting for a CPU (other processes on a shared
machine) and the rest, the server's own: work in the reactor thread, or the
thread asleep in a blocking call or waiting for the GIL ("without CPU
wait"); "asleep" is the part spent asleep beyond the interval (blocking
calls, the GIL).  Server CPU time per request or per GB is given too: it is
the figure other processes disturb least.

The server's own counters (answers per status, answers whose client went
away first, bytes the client's kernel acknowledged from ``TCP_INFO``, so
sendfile's bytes count too) are checked against wrk's (answers, bytes read):
a mismatch is printed and fails the run (exit 1).  nginx is checked by its
request count (``stub_status``).

``--rounds N`` repeats everything N times, servers in a rotated order each
round, and reports the median of each figure.  ``--json FILE`` writes every
measurement; ``--plot FILE`` draws the figure (matplotlib).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import http.client
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import _common  # noqa: F401  (puts the project on sys.path)
import _servers
from _common import table, warm

HERE = os.path.dirname(os.path.abspath(__file__))
NGINX = "/usr/sbin/nginx"
ALL_SERVERS = ("asyncfile-sendfile", "asyncfile-read", "static", "threaded", "nginx", "nginx-aio")
LABELS = {
    "asyncfile-sendfile": "asyncfile.web.File (sendfile)",
    "asyncfile-read": "asyncfile.web.File (read path)",
    "static": "twisted.web.static.File",
    "threaded": "Synapse-style threaded sender",
    "nginx": "nginx 1 worker, sendfile",
    "nginx-aio": "nginx 1 worker, sendfile, aio threads",
}
PYTHON_KINDS = {"asyncfile-sendfile", "asyncfile-read", "static", "threaded"}
MB = 1e6


def size_label(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:g} MB"
    return f"{n / 1024:g} KiB" if n >= 1024 else f"{n} B"


# -- files ------------------------------------------------------------------------

def corpus_files(directory: str) -> list[str]:
    paths = [os.path.join(directory, n) for n in sorted(os.listdir(directory))
             if not n.startswith(".") and os.path.isfile(os.path.join(directory, n))]
    return [p for p in paths if os.path.splitext(p)[1].lower() in (".jpg", ".jpeg", ".png", ".webp")]


def make_small(corpus: Sequence[str], dest: str, count: int, size: int) -> list[str]:
    """``count`` files of ``size`` bytes cut from the corpus's JPEGs (all files if it has none)."""
    sources = [p for p in corpus if p.lower().endswith((".jpg", ".jpeg"))] or list(corpus)
    slices = []
    depth = 0
    while len(slices) < count:
        more = [(p, depth * size) for p in sources if os.path.getsize(p) >= (depth + 1) * size]
        if not more:
            raise SystemExit(f"the corpus holds fewer than {count} slices of {size:,} bytes")
        slices.extend(more)
        depth += 1
    os.makedirs(dest, exist_ok=True)
    out = []
    for i, (src, offset) in enumerate(slices[:count]):
        path = os.path.join(dest, f"s{i:05d}.jpg")
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            with open(src, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            with open(path, "wb") as f:
                f.write(data)
        out.append(path)
    return out


def make_large(corpus: Sequence[str], dest: str, count: int, size: int) -> list[str]:
    """``count`` files of ``size`` bytes: the start of each corpus file at least that big, copied round-robin."""
    sources = [p for p in corpus if os.path.getsize(p) >= size]
    if not sources:
        raise SystemExit(f"no corpus file of {size:,} bytes or more")
    os.makedirs(dest, exist_ok=True)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        path = os.path.join(dest, f"l{i:03d}{os.path.splitext(src)[1].lower()}")
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            with open(src, "rb") as f:
                data = f.read(size)
            with open(path, "wb") as f:  # a copy: a distinct inode
                f.write(data)
        out.append(path)
    return out


# -- wrk ----------------------------------------------------------------------------

_WRK_LUA = r"""
local paths = {%(paths)s}
local nthreads = %(threads)d
local threads = {}
local counter = 0

-- each wrk thread starts at its own offset: identical sequences would put the
-- same files in flight at the same time
function setup(thread)
  thread:set("first", math.floor(#threads * #paths / nthreads))
  table.insert(threads, thread)
end

function init(args)
  counter = first or 0
end

%(delay)s
function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter - 1) %% #paths + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests": %%d, "duration_us": %%d, "bytes": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"p50": %%d, "p90": %%d, "p99": %%d, "p999": %%d, "max": %%d, "mean": %%f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""


@dataclass
class Wrk:
    requests: int  # complete answers (any status)
    seconds: float
    bytes: int  # everything wrk read, headers and incomplete answers included
    errors: dict[str, int]
    latency_ms: dict[str, float]
    connections: int

    @property
    def ok(self) -> int:
        """Answers with a status below 400 (wrk counts the others in errors.status)."""
        return self.requests - self.errors["status"]

    @property
    def failures(self) -> int:
        e = self.errors
        return e["status"] + e["connect"] + e["read"] + e["write"] + e["timeout"]


def wrk(port: int, paths: Sequence[str], *, connections: int, seconds: int, threads: int = 1,
        timeout: float = 60.0, workdir: str, rate: float | None = None) -> Wrk:
    """One wrk run against 127.0.0.1:``port``; blocks until it ends.

    ``rate``: at most that many requests per second in all, each connection
    waiting ``connections / rate`` seconds (+-50%, at random) after an answer
    before it sends its next request; None: as fast as the server answers.
    """
    delay = ""
    if rate:
        gap_ms = max(1, round(connections / rate * 1000))
        delay = (f"function delay()\n  return math.random({max(1, gap_ms // 2)}, {gap_ms * 3 // 2})\nend\n")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", dir=workdir, delete=False)
    with script:
        script.write(_WRK_LUA % {"paths": ", ".join(json.dumps(p) for p in paths), "threads": threads,
                                 "delay": delay})
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout:g}s",
            "-s", script.name, f"http://{_servers.HOST}:{port}/"]
    proc = _servers.Proc("wrk", argv, stdout=subprocess.PIPE)
    try:
        out, _ = proc.popen.communicate(timeout=seconds + timeout + 30)
    finally:
        proc.stop()
        os.unlink(script.name)
    text = out.decode("utf-8", "replace")
    line = next((l for l in text.splitlines() if l.startswith("WRK-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {proc.popen.returncode}):\n{text}")
    doc = json.loads(line[len("WRK-JSON "):])
    return Wrk(requests=doc["requests"], seconds=doc["duration_us"] / 1e6, bytes=doc["bytes"],
               errors=doc["errors"], latency_ms={k: v / 1000 for k, v in doc["latency_us"].items()},
               connections=connections)


# -- servers ------------------------------------------------------------------------

class Server:
    """One server under test, in its own process (group)."""

    def __init__(self, kind: str, dirs: dict[str, str], workdir: str, gc_freeze: bool = False) -> None:
        self.kind = kind
        self.port = _servers.free_port()
        log = os.path.join(workdir, f"{kind}.log")
        if kind.startswith("nginx"):
            conf = write_nginx_conf(workdir, self.port, dirs, aio=(kind == "nginx-aio"))
            argv = [NGINX, "-p", workdir, "-c", conf, "-e", os.path.join(workdir, "nginx-error.log")]
            self.proc = _servers.Proc(kind, argv, cwd=workdir, log=log)
        else:
            env = dict(os.environ)
            env["PYTHONPATH"] = _servers.CHECKOUT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
            argv = [sys.executable, os.path.join(HERE, "_static_servers.py"), kind, "--port", str(self.port),
                    *(a for name, d in dirs.items() for a in ("--dir", f"{name}={d}")),
                    *(["--gc-freeze"] if gc_freeze else [])]
            self.proc = _servers.Proc(kind, argv, env=env, cwd=_servers.CHECKOUT, log=log)
        _servers.wait_http(self.proc, self.port, "/_bench/stats")

    def pids(self) -> list[int]:
        return self.proc.pids()

    def reset(self) -> dict[str, Any]:
        if self.kind.startswith("nginx"):
            return self.stats()
        _servers.http_get(self.port, "/_bench/reset")
        return {}

    def stats(self) -> dict[str, Any]:
        status, body = _servers.http_get(self.port, "/_bench/stats", timeout=120.0)
        if status != 200:
            raise RuntimeError(f"{self.kind}: /_bench/stats answered {status}")
        if self.kind.startswith("nginx"):  # stub_status: "Active connections: N\n server accepts handled
            lines = body.decode().splitlines()  # requests\n A H R\n ..."
            accepts, handled, requests = (int(x) for x in lines[2].split())
            return {"requests": requests, "connections": int(lines[0].split(":")[1])}
        doc: dict[str, Any] = json.loads(body)
        return doc

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the last load's connections are gone (only the stats request's own is left),
        so that nothing of it is counted in the next cell."""
        deadline = time.monotonic() + timeout
        while self.stats()["connections"] > 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()


def write_nginx_conf(workdir: str, port: int, dirs: dict[str, str], aio: bool = False) -> str:
    temp = os.path.join(workdir, "nginx-temp")
    os.makedirs(temp, exist_ok=True)
    aio_line = "\n    aio threads;" if aio else ""
    locations = "\n".join(f"        location /{name}/ {{ alias {path}/; }}" for name, path in dirs.items())
    text = f"""\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;{aio_line}
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {_servers.HOST}:{port} backlog=1024;
{locations}
        location = /_bench/stats {{ stub_status; }}
    }}
}}
"""
    path = os.path.join(workdir, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def unavailable(kind: str) -> str | None:
    """Why a server cannot run here (None: it can)."""
    if kind.startswith("nginx"):
        if not os.access(NGINX, os.X_OK):
            return f"{NGINX} not found (Debian: apt-get install nginx)"
        if os.geteuid() != 0:
            return "nginx needs to run as root here (its worker reads the benchmark's 0700 temp dirs)"
        return None
    if kind.startswith("asyncfile"):
        return asyncfile_web_problem()
    return None


@functools.lru_cache(maxsize=None)
def asyncfile_web_problem() -> str | None:
    """Why ``asyncfile.web.File`` cannot be imported, or None."""
    try:
        from asyncfile.web import File  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        return f"asyncfile.web is not importable: {type(e).__name__}: {e}"
    return None


# -- cells ---------------------------------------------------------------------------

@dataclass
class Cell:
    """One server's measurements in one cell of one round."""

    wrk: Wrk
    server: dict[str, Any]
    cpu: float  # server CPU seconds during the measured wrk run
    idle: float  # the machine's idle share meanwhile
    slow: Wrk | None = None  # the slow-storage streams (the mixed cell)
    served: int = 0  # answers with 200 by the server's own count
    problems: list[str] = field(default_factory=list)


def served_ok(kind: str, stats: dict[str, Any], before: dict[str, Any]) -> int:
    if kind.startswith("nginx"):
        return stats["requests"] - before["requests"] - 1  # the stub_status request itself
    return stats["statuses"].get("200", 0)


def check(kind: str, loads: Sequence[Wrk], stats: dict[str, Any], before: dict[str, Any],
          largest: int) -> list[str]:
    """What disagrees between wrk's counters and the server's (empty: all agrees)."""
    problems = []
    wrk_ok = sum(w.ok for w in loads)
    conns = sum(w.connections for w in loads)
    for w in loads:
        if w.failures:
            problems.append(f"wrk errors {w.errors}")
    served = served_ok(kind, stats, before)
    # An answer in flight when wrk stopped is finished by the server but not
    # counted by wrk; one whose last bytes wrk read just before it stopped may
    # be counted by wrk and reach the server as a lost connection ("gone")
    # before its finish().  Either way at most one per connection.
    gone = stats.get("gone", 0)
    if not (wrk_ok <= served + gone and served <= wrk_ok + conns and gone <= conns):
        problems.append(f"server finished {served} answers with 200 ({gone} more lost their client), "
                        f"wrk counted {wrk_ok}, {conns} connections")
    if kind in PYTHON_KINDS:
        others = {k: v for k, v in stats["statuses"].items() if k != "200"}
        if others:
            problems.append(f"server answered other statuses: {others}")
        acked, read = stats["bytes_acked"], sum(w.bytes for w in loads)
        # wrk reads at most what its kernel acknowledged, but the server samples
        # its TCP counters possibly before the last (delayed) ACKs arrive: a
        # segment per connection of slack; what wrk had not read yet when it
        # stopped (answers in flight, socket buffers) is bounded too.
        if not read - conns * 65536 <= acked <= read + conns * (largest + 64 * 2**20):
            problems.append(f"bytes: server's TCP counters {acked:,}, wrk read {read:,}")
    return problems


def head(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(_servers.HOST, port, timeout=120)
    try:
        conn.request("HEAD", path)
        return conn.getresponse().status
    finally:
        conn.close()


def run_cached(server: Server, paths: Sequence[str], *, connections: int, seconds: int, warmup: int,
               size: int, workdir: str, threads: int) -> Cell:
    if warmup:
        wrk(server.port, paths, connections=connections, seconds=warmup, threads=threads, workdir=workdir)
    server.wait_idle()
    before = server.reset()
    with _servers.Window(server.pids()) as window:
        load = wrk(server.port, paths, connections=connections, seconds=seconds, threads=threads, workdir=workdir)
    stats = server.stats()
    cell = Cell(load, stats, window.cpu, window.idle, served=served_ok(server.kind, stats, before))
    cell.problems = check(server.kind, [load], stats, before, size)
    return cell


def run_mixed(server: Server, small: Sequence[str], slow: Sequence[str], *, connections: int, rate: float,
              slow_connections: int, seconds: int, size: int, workdir: str, threads: int) -> Cell:
    """The slow-storage streams start ``lead`` seconds before the small requests and end after them."""
    lead = min(1.0, seconds / 2)
    head(server.port, slow[0])  # the servers' first use of the mount (lazy set-up) happens before the cell
    server.wait_idle()
    before = server.reset()
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        streams = ex.submit(wrk, server.port, slow, connections=slow_connections,
                            seconds=math.ceil(lead + seconds + 0.5), threads=1, workdir=workdir)
        time.sleep(lead)
        with _servers.Window(server.pids()) as window:
            load = wrk(server.port, small, connections=connections, seconds=seconds, threads=threads,
                       workdir=workdir, rate=rate)
        slow_load = streams.result()
    stats = server.stats()
    cell = Cell(load, stats, window.cpu, window.idle, slow=slow_load,
                served=served_ok(server.kind, stats, before))
    cell.problems = check(server.kind, [load, slow_load], stats, before, size)
    return cell


# -- report ---------------------------------------------------------------------------

def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    if value != value:
        return "-"
    return f"{value:,.{digits}f}"


def summarize(results: dict[str, dict[str, list[Cell]]], small_size: int,
              large_size: int) -> dict[str, dict[str, float]]:
    """Median over rounds of every figure, per server."""
    out: dict[str, dict[str, float]] = {}
    for kind, cells in results.items():
        row: dict[str, float] = {}
        small, large, mixed = cells.get("small", []), cells.get("large", []), cells.get("mixed", [])
        python = kind in PYTHON_KINDS
        if small:
            row["small_rps"] = med([c.wrk.ok / c.wrk.seconds for c in small])
            row["small_mbs"] = row["small_rps"] * small_size / MB
            row["small_p99"] = med([c.wrk.latency_ms["p99"] for c in small])
            row["small_cpu_ms"] = med([1000 * c.cpu / max(1, c.wrk.ok) for c in small])
            if python:
                row["small_stall"] = med([c.server["stall_worst"] * 1000 for c in small])
                row["small_own"] = med([c.server["own_worst"] * 1000 for c in small])
        if large:
            row["large_rps"] = med([c.wrk.ok / c.wrk.seconds for c in large])
            row["large_mbs"] = row["large_rps"] * large_size / MB
            row["large_p99"] = med([c.wrk.latency_ms["p99"] for c in large])
            row["large_cpu_per_gb"] = med([c.cpu / max(1e-9, c.wrk.ok * large_size / 1e9) for c in large])
            if python:
                row["large_stall"] = med([c.server["stall_worst"] * 1000 for c in large])
                row["large_own"] = med([c.server["own_worst"] * 1000 for c in large])
        if mixed:
            row["slow_mbs"] = med([c.slow.bytes / c.slow.seconds / MB for c in mixed if c.slow])
            row["slow_done"] = med([c.slow.ok for c in mixed if c.slow])
            row["mixed_rps"] = med([c.wrk.ok / c.wrk.seconds for c in mixed])
            # no answer at all: no latency (the table shows "-", the req/s column 0)
            answered = [c for c in mixed if c.wrk.requests]
            row["mixed_p50"] = med([c.wrk.latency_ms["p50"] for c in answered])
            row["mixed_p99"] = med([c.wrk.latency_ms["p99"] for c in answered])
            row["mixed_max"] = med([c.wrk.latency_ms["max"] for c in answered])
            if python:
                row["mixed_stall"] = med([c.server["stall_worst"] * 1000 for c in mixed])
                row["mixed_own"] = med([c.server["own_worst"] * 1000 for c in mixed])
                row["mixed_blocked"] = med([c.server["blocked_worst"] * 1000 for c in mixed])
                row["mixed_own_p99"] = med([c.server["own_p99"] * 1000 for c in mixed])
                row["mixed_over_5ms"] = med([c.server["own_over_5ms"] for c in mixed])
                row["mixed_gc"] = med([c.server["gc_worst"] * 1000 for c in mixed])
        out[kind] = row
    return out


def cached_table(kinds: Sequence[str], get: Any, args: Any, sl: str, ll: str) -> None:
    print(f"\nCached files ({args.small_files:,} x {sl} cut from JPEGs, {args.connections} "
          f"connections; {args.large_files} x {ll}, {args.large_connections} connections; "
          f"{args.seconds} s each, median of {args.rounds} round{'s' * (args.rounds > 1)}):\n")
    print(table(
        ["server", f"{sl} req/s", f"{sl} MB/s", f"{sl} p99 ms", "CPU ms/req", f"{ll} req/s", f"{ll} MB/s",
         "CPU s/GB", f"worst stall ms, {sl} / {ll} (without CPU wait)"],
        [[LABELS[k], fmt(get(k, "small_rps"), 0), fmt(get(k, "small_mbs")), fmt(get(k, "small_p99")),
          fmt(get(k, "small_cpu_ms"), 3), fmt(get(k, "large_rps")), fmt(get(k, "large_mbs"), 0),
          fmt(get(k, "large_cpu_per_gb"), 2),
          "-" if k not in PYTHON_KINDS else (f"{fmt(get(k, 'small_stall'))} / {fmt(get(k, 'large_stall'))} "
                                             f"({fmt(get(k, 'small_own'))} / {fmt(get(k, 'large_own'))})")]
         for k in kinds]))


def report(summary: dict[str, dict[str, float]], results: dict[str, dict[str, list[Cell]]], args: Any,
           small_size: int, large_size: int) -> list[str]:
    kinds = [k for k in ALL_SERVERS if k in summary]
    get = lambda k, key: summary.get(k, {}).get(key, float("nan"))  # noqa: E731
    sl, ll = size_label(small_size), size_label(large_size)
    if any("small_rps" in summary[k] or "large_rps" in summary[k] for k in kinds):
        cached_table(kinds, get, args, sl, ll)
    if any("mixed_rps" in summary[k] for k in kinds):
        print(f"\nSlow storage: {args.slow_connections} connections stream the {ll} files from a FUSE mount "
              f"(every read sleeps {args.delay * 1000:g} ms, never cached) while {args.mixed_connections} "
              f"connections ask for cached {sl} files"
              + (f", at most {args.mixed_rate:g} requests/s in all" if args.mixed_rate else "") + ":\n")
        print(table(
            ["server", "slow MB/s", "slow files done", f"{sl} req/s", f"{sl} p50 ms", f"{sl} p99 ms",
             f"{sl} max ms", "worst stall ms", "w/o CPU wait", "asleep", "p99 w/o CPU wait",
             "ticks > 5 ms w/o CPU wait", "worst GC ms"],
            [[LABELS[k], fmt(get(k, "slow_mbs"), 2), fmt(get(k, "slow_done"), 0), fmt(get(k, "mixed_rps"), 0),
              fmt(get(k, "mixed_p50")), fmt(get(k, "mixed_p99")), fmt(get(k, "mixed_max")),
              fmt(get(k, "mixed_stall")), fmt(get(k, "mixed_own")), fmt(get(k, "mixed_blocked")),
              fmt(get(k, "mixed_own_p99")), fmt(get(k, "mixed_over_5ms"), 0), fmt(get(k, "mixed_gc"))]
             for k in kinds if "mixed_rps" in summary[k]]))

    # the counters
    rows, problems = [], []
    for k in kinds:
        for name, cells in results[k].items():
            for r, c in enumerate(cells):
                loads = [c.wrk] + ([c.slow] if c.slow else [])
                acked = f"{c.server['bytes_acked'] / MB:,.1f}" if k in PYTHON_KINDS else "-"
                server_side = f"{c.served:,} / {acked}"
                client_side = f"{sum(w.ok for w in loads):,} / {sum(w.bytes for w in loads) / MB:,.1f}"
                rows.append([LABELS[k], name, r + 1, client_side, server_side,
                             "ok" if not c.problems else "MISMATCH"])
                problems += [f"{LABELS[k]}, {name}, round {r + 1}: {p}" for p in c.problems]
    print("\nCounters (wrk's answers with status < 400 / MB read, against the server's 200s / MB its clients' "
          "kernels acknowledged; nginx: requests counted by stub_status):\n")
    print(table(["server", "cell", "round", "wrk", "server", "check"], rows))
    for p in problems:
        print("  " + p)

    # targets
    print("\nTargets:\n")
    trows = []
    base_small = get("static", "small_rps")
    for k in ("asyncfile-sendfile", "asyncfile-read"):
        if k in summary and base_small == base_small:
            ratio = get(k, "small_rps") / base_small
            trows.append([f"cached {sl}: {LABELS[k]} >= static.File's req/s", f"{ratio:.2f}x",
                          "met" if ratio >= 1 else "NOT met"])
            cpu = get(k, "small_cpu_ms") / get("static", "small_cpu_ms")
            trows.append(["  (server CPU per request, vs static.File's)", f"{cpu:.2f}x", ""])
    for size_key, what in (("large_mbs", ll),):
        base = get("nginx", size_key)
        for k in ("asyncfile-sendfile", "asyncfile-read"):
            if k in summary and base == base:
                share = get(k, size_key) / base
                trows.append([f"cached {what}: {LABELS[k]} >= 50% of nginx's MB/s", f"{share * 100:.0f}%",
                              "met" if share >= 0.5 else "NOT met"])
    for k in ("asyncfile-sendfile", "asyncfile-read"):
        if k in summary and "mixed_stall" in summary[k]:
            stall, own, asleep = (get(k, x) for x in ("mixed_stall", "mixed_own", "mixed_blocked"))
            verdict = ("met" if stall <= 5 else "met without CPU wait" if own <= 5
                       else "NOT met" + (" (asleep <= 5 ms)" if asleep <= 5 else ""))
            trows.append([f"slow storage: {LABELS[k]} worst stall <= 5 ms (static.File: "
                          f"{fmt(get('static', 'mixed_stall'))} / {fmt(get('static', 'mixed_own'))} / "
                          f"{fmt(get('static', 'mixed_blocked'))} ms)",
                          f"{fmt(stall)} / {fmt(own)} / {fmt(asleep)} ms", verdict])
    if any(r[0].startswith("slow storage") for r in trows):
        trows.append(["  (stall: worst / without CPU wait / asleep in a blocking call or for the GIL)", "", ""])
    if trows:
        print(table(["target", "measured", ""], trows))
    return problems


def plot(summary: dict[str, dict[str, float]], path: str, title: str, *, delay_ms: float, seconds: float,
         small_size: int, large_size: int, rate: float = 0) -> None:
    """Four panels of bars, one bar per server (1200x800 px): cached small and large
    files, then the slow-storage cell's p99 of small requests and worst reactor stall."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    sl, ll = size_label(small_size), size_label(large_size)
    rate_note = f", {rate:g} req/s" if rate else ""
    kinds = [k for k in ALL_SERVERS if k in summary]
    colors = {"asyncfile-sendfile": "tab:green", "asyncfile-read": "yellowgreen", "static": "tab:red",
              "threaded": "tab:blue", "nginx": "0.4", "nginx-aio": "0.7"}
    short = {"asyncfile-sendfile": "asyncfile\nsendfile", "asyncfile-read": "asyncfile\nread path",
             "static": "static.File", "threaded": "threaded\n(Synapse-style)", "nginx": "nginx\n(1 worker)",
             "nginx-aio": "nginx\naio threads"}
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = [
        ("small_rps", f"cached {sl} files: requests/s", False, "{:,.0f}"),
        ("large_mbs", f"cached {ll} files: MB/s", False, "{:,.0f}"),
        ("mixed_p99", f"p99 latency of cached {sl} requests (ms, log scale)\nwhile {ll} files stream from "
                      f"slow storage ({delay_ms:g} ms per read){rate_note}", True, "{:,.1f}"),
        ("mixed_stall", "worst reactor stall in that cell (ms, log scale)", True, "{:,.1f}"),
    ]
    nan = float("nan")
    for ax, (key, label, log, form) in zip(axes, panels):
        shown, values, notes = [], [], []
        for k in kinds:
            v = summary[k].get(key, nan)
            if v == v:
                shown.append(k)
                values.append(max(v, 0.01) if log else v)
                notes.append(form.format(v))
            elif key == "mixed_p99" and summary[k].get("mixed_rps") == 0:
                shown.append(k)  # no answer in the whole window: a hatched bar as long as the window
                values.append(seconds * 1000)
                notes.append(f"no answer\nin {seconds:g} s")
        if key == "mixed_stall":  # each server's worst, without CPU wait, and asleep
            x = list(range(len(shown)))
            bars = ax.bar([i - 0.27 for i in x], values, width=0.27, color=[colors[k] for k in shown],
                          label="worst lateness of a 1 ms tick")
            for offset, part, alpha, hatch, what in (
                    (0.0, "mixed_own", 0.55, "..", "without the time spent waiting for a CPU"),
                    (0.27, "mixed_blocked", 0.3, "//", "asleep in a blocking call or for the GIL")):
                parts = [max(summary[k].get(part, nan), 0.01) for k in shown]
                extra = ax.bar([i + offset for i in x], parts, width=0.27, color=[colors[k] for k in shown],
                               alpha=alpha, hatch=hatch, label=what)
                for bar, v in zip(extra, parts):
                    ax.annotate(form.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(x, [short[k] for k in shown])
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        else:
            bars = ax.bar([short[k] for k in shown], values, color=[colors[k] for k in shown])
        for bar, note in zip(bars, notes):
            if note.startswith("no answer"):
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        if log:
            ax.set_yscale("log")
            room = 60 if key == "mixed_stall" else 8  # the stall panel's legend sits above its bars
            ax.set_ylim(min([0.1, *(v / 2 for v in values)]), max(values, default=1) * room)
        else:
            ax.set_ylim(0, max(values, default=1) * 1.15)
        if key == "mixed_stall":
            ax.axhline(5, color="darkred", linestyle="--", linewidth=1)
            ax.annotate("5 ms target", (0, 5), xycoords=("axes fraction", "data"), xytext=(4, 3),
                        textcoords="offset points", color="darkred", fontsize=9)
            if any(k not in shown for k in kinds):
                label += "\n(nginx: no reactor to probe)"
        ax.set_title(label, fontsize=10.5)
        ax.tick_params(labelsize=9)
        ax.grid(True, axis="y", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
    fig.suptitle(title, fontsize=12.5)
    fig.savefig(path, format="png", dpi=100)


# -- main --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", help="directory of images, e.g. made by ../shared/tools/fetch-corpus DIR")
    parser.add_argument("--seconds", type=int, default=8, help="measured seconds per cell (default 8)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds of load before each cached cell")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, servers rotated (default 1)")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help="comma-separated, of: " + ", ".join(ALL_SERVERS))
    parser.add_argument("--cells", default="small,large,mixed", help="comma-separated, of: small, large, mixed")
    parser.add_argument("--small-files", type=int, default=1500)
    parser.add_argument("--small-size", type=int, default=16 * 1024)
    parser.add_argument("--large-files", type=int, default=24)
    parser.add_argument("--large-size", type=int, default=5_000_000)
    parser.add_argument("--connections", type=int, default=64, help="16 KiB cell (default 64)")
    parser.add_argument("--large-connections", type=int, default=8, help="5 MB cell (default 8)")
    parser.add_argument("--slow-connections", type=int, default=8, help="streams from slow storage (default 8)")
    parser.add_argument("--mixed-connections", type=int, default=16, help="16 KiB requests meanwhile (default 16)")
    parser.add_argument("--mixed-rate", type=float, default=400.0,
                        help="at most this many 16 KiB requests per second meanwhile (default 400; 0: no limit)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds every slow-storage read sleeps")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="the Python servers call gc.freeze() once started (shorter GC pauses)")
    parser.add_argument("--plot", metavar="FILE", help="draw the figure as a PNG (needs matplotlib)")
    parser.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    parser.add_argument("--workdir", help="where the copies go (default: a new temporary directory, removed)")
    args = parser.parse_args(argv)

    if not _servers.wrk_available():
        print("wrk not found (Debian: apt-get install wrk): nothing to measure", file=sys.stderr)
        return 2
    servers = [s for s in args.servers.split(",") if s]
    cells = [c for c in args.cells.split(",") if c]
    for s in servers:
        if s not in ALL_SERVERS:
            parser.error(f"unknown server {s!r}")
    skipped = {}
    for s in servers:
        reason = unavailable(s)
        if reason:
            skipped[s] = reason
            print(f"skipping {LABELS[s]}: {reason}", file=sys.stderr)
    servers = [s for s in servers if s not in skipped]
    if not servers:
        print("no server to measure", file=sys.stderr)
        return 2

    _servers.install_cleanup()
    _servers.raise_fd_limit()
    own_workdir = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="static-files-bench-")
    os.makedirs(workdir, exist_ok=True)
    slowfs = None
    results: dict[str, dict[str, list[Cell]]] = {s: {} for s in servers}
    problems: list[str] = []
    try:
        corpus = corpus_files(args.corpus)
        if not corpus:
            parser.error(f"no JPEG/PNG/WebP files in {args.corpus}")
        small = make_small(corpus, os.path.join(workdir, "small"), args.small_files, args.small_size)
        large = make_large(corpus, os.path.join(workdir, "large"), args.large_files, args.large_size)
        warm(small + large)
        dirs = {"small": os.path.join(workdir, "small"), "large": os.path.join(workdir, "large")}
        if "mixed" in cells:
            from asyncfile.testing.slowfs import SlowFS

            try:
                slowfs = SlowFS(dirs["large"], read_delay=args.delay)
                dirs["slow"] = slowfs.start()
            except Exception as e:  # noqa: BLE001 - no FUSE here: say why, measure the rest
                slowfs = None
                skipped["slow storage"] = f"{type(e).__name__}: {e}"
                print(f"skipping the slow-storage cell: FUSE mount failed: {e}", file=sys.stderr)
                cells.remove("mixed")
        small_urls = [f"/small/{os.path.basename(p)}" for p in small]
        large_urls = [f"/large/{os.path.basename(p)}" for p in large]
        slow_urls = [f"/slow/{os.path.basename(p)}" for p in large]
        fs = subprocess.run(["stat", "-f", "-c", "%T", workdir], capture_output=True, text=True).stdout.strip()
        print(f"{_servers.wrk_version()}; files in {workdir} ({fs}); load average {_servers.load_average()}; "
              f"{os.cpu_count()} CPUs", file=sys.stderr)
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for kind in order:
                started = time.monotonic()
                server = Server(kind, dirs, workdir, gc_freeze=args.gc_freeze)
                try:
                    per = results[kind]
                    if "small" in cells:
                        per.setdefault("small", []).append(run_cached(
                            server, small_urls, connections=args.connections, seconds=args.seconds,
                            warmup=args.warmup, size=args.small_size, workdir=workdir, threads=args.wrk_threads))
                    if "large" in cells:
                        per.setdefault("large", []).append(run_cached(
                            server, large_urls, connections=args.large_connections, seconds=args.seconds,
                            warmup=args.warmup, size=args.large_size, workdir=workdir, threads=args.wrk_threads))
                    if "mixed" in cells:
                        per.setdefault("mixed", []).append(run_mixed(
                            server, small_urls, slow_urls, connections=args.mixed_connections,
                            rate=args.mixed_rate,
                            slow_connections=args.slow_connections, seconds=args.seconds,
                            size=args.large_size, workdir=workdir, threads=args.wrk_threads))
                finally:
                    server.stop()
                print(f"round {r + 1}: {LABELS[kind]} done in {time.monotonic() - started:.0f} s "
                      f"(load average {_servers.load_average()})", file=sys.stderr)
        summary = summarize(results, args.small_size, args.large_size)
        problems = report(summary, results, args, args.small_size, args.large_size)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({
                    "args": vars(args), "skipped": skipped, "summary": summary, "problems": problems,
                    "cells": {k: {name: [{"wrk": vars(c.wrk), "slow": vars(c.slow) if c.slow else None,
                                          "server": {x: y for x, y in c.server.items() if x != "late_ticks"},
                                          "cpu": c.cpu, "idle": c.idle, "problems": c.problems}
                                         for c in cs] for name, cs in per.items()}
                              for k, per in results.items()},
                }, f, indent=1)
        if args.plot:
            plot(summary, args.plot,
                 f"Static files over HTTP on 127.0.0.1 ({os.cpu_count()} CPUs shared with wrk; "
                 f"median of {args.rounds} round{'s' * (args.rounds > 1)})", delay_ms=args.delay * 1000,
                 seconds=args.seconds, small_size=args.small_size, large_size=args.large_size,
                 rate=args.mixed_rate)
            print(f"plot written to {args.plot}", file=sys.stderr)
    finally:
        _servers.stop_all()
        if slowfs is not None:
            slowfs.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    _servers.run_main(main)
