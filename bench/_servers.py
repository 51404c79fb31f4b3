"""Shared pieces of the HTTP server benchmarks: server subprocesses, wrk, /proc readings.

Every process started here is put in a session of its own and registered, so
that :func:`stop_all` (run at exit and on SIGTERM/SIGHUP once a benchmark has
called :func:`install_cleanup`) can end its whole process group; on Linux
each also gets ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies even if the
benchmark is killed with SIGKILL.  Everything listens and connects on
127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

import _common  # noqa: F401  (puts the project on sys.path)

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_procs: list["Proc"] = []


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Proc:
    """A subprocess in its own process group, stopped (with its children) by :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, log: str | None = None, stdin: Any = subprocess.DEVNULL,
                 stdout: Any = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        out: Any = stdout
        if out is None:
            out = open(log, "wb") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(self.argv, env=env, cwd=cwd, stdin=stdin, stdout=out,
                                      stderr=subprocess.STDOUT if stdout is None else None,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        if out is not stdout and out is not subprocess.DEVNULL:
            out.close()
        self.pid = self.popen.pid
        _procs.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and its descendants (e.g. forked workers)."""
        return process_tree(self.pid) if self.alive() else []

    def tail(self, lines: int = 15) -> str:
        if not self.log or not os.path.exists(self.log):
            return ""
        with open(self.log, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")

    def stop(self, grace: float = 5.0) -> None:
        if self in _procs:
            _procs.remove(self)
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may still hold children of a leader that already left
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_all() -> None:
    for proc in list(reversed(_procs)):
        proc.stop(grace=2.0)


def _on_signal(signum: int, frame: Any) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """For a benchmark's main(): stop every Proc at exit and on SIGTERM/SIGHUP
    (Ctrl-C raises KeyboardInterrupt, which the benchmarks' finally blocks handle)."""
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def raise_fd_limit(wanted: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(proc: Proc, port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            status, _ = http_get(port, path, timeout=2.0)
            if status < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not answer {path} within {timeout:g} s:\n{proc.tail()}")
        time.sleep(0.1)


# -- /proc -------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmHWM = peak RSS, VmRSS = current)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pids: Sequence[int]) -> float:
    """Sum of the processes' peak resident set sizes (VmHWM), MiB."""
    return sum(status_kb(p, "VmHWM") for p in pids) / 1024


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the processes (threads included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK_TCK


def system_idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else float("nan")


def wait_quiet(pids: Sequence[int], timeout: float = 60.0, threshold: float = 0.05) -> float:
    """Wait until the processes use under ``threshold`` CPU s/s over 0.5 s (work left
    over from a load run has finished); returns the seconds waited."""
    started = time.monotonic()
    last = cpu_seconds(pids)
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = cpu_seconds(pids)
        if now - last < threshold * 0.5:
            break
        last = now
    return time.monotonic() - started


def link_copies(files: Sequence[str], copies: int, dest: str) -> list[str]:
    """``copies`` copies of each file in ``dest`` (real copies: distinct inodes),
    ordered copy by copy (every file once, then every file again...).

    Distinct files make distinct requests: imgserver shares one processing among
    identical requests in flight and keys them (and its result cache) by the
    file's dev, inode, size and mtime, so hard links, which share an inode,
    would be one image to it, and a load that cycles them would measure that
    sharing, not the processing.
    """
    os.makedirs(dest, exist_ok=True)
    out = []
    for c in range(copies):
        for src in files:
            name = f"c{c:03d}-{os.path.basename(src)}"
            path = os.path.join(dest, name)
            if not os.path.exists(path):
                shutil.copyfile(src, path)
            out.append(path)
    return out


def metric(port: int, name: str) -> float | None:
    """One unlabelled sample from imgserver's /metrics (e.g. imgserver_coalesced_total)."""
    try:
        status, body = http_get(port, "/metrics", timeout=5.0)
    except OSError:
        return None
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# -- imgserver -----------------------------------------------------------------

def start_imgserver(root: str, *, workers: int, max_queue: int, cache_mb: float,
                    backlog: int | None = None, extra: Sequence[str] = (),
                    log_dir: str | None = None) -> tuple[Proc, int]:
    """imgserver from this checkout as a subprocess on 127.0.0.1; (proc, port)."""
    port = free_port()
    endpoint = f"tcp:{port}:interface={HOST}" + (f":backlog={backlog}" if backlog else "")
    env = dict(os.environ)
    env["PYTHONPATH"] = CHECKOUT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_dir = log_dir or tempfile.mkdtemp(prefix="imgserver-bench-")
    argv = [sys.executable, "-m", "imgserver.cli", "--root", root, "--http", endpoint, "--pb", "none",
            "--workers", str(workers), "--max-queue", str(max_queue), "--cache-mb", str(cache_mb),
            "--quiet", *extra]
    proc = Proc("imgserver", argv, env=env, cwd=CHECKOUT, log=os.path.join(log_dir, "imgserver.log"))
    wait_http(proc, port, "/healthz")
    return proc, port


def imgserver_idle(port: int) -> bool:
    try:
        status, body = http_get(port, "/healthz", timeout=5.0)
        doc = json.loads(body)
        return status == 200 and doc["in_processing"] == 0 and doc["queued"] == 0
    except (OSError, ValueError, KeyError):
        return False


def wait_imgserver_idle(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not imgserver_idle(port) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- wrk -----------------------------------------------------------------------

_WRK_LUA = r"""
local paths = {%(paths)s}
local threads = {}
local counter = 0
statuses = {}

function setup(thread)
  thread:set("first", #threads * 7)
  table.insert(threads, thread)
end

function init(args)
  counter = first or 0
  statuses = {}
end

function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter - 1) %% #paths + 1])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do counts[k] = (counts[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%%d": %%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"requests": %%d, "duration_us": %%d, "bytes": %%d, "statuses": {%%s}, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"p50": %%d, "p90": %%d, "p99": %%d, "max": %%d, "mean": %%f}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_ms: dict[str, float]
    cpu: float  # wrk's own CPU seconds
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def ok_rate(self) -> float:
        return self.ok / self.seconds

    @property
    def other(self) -> int:
        """Answers that were not 200, plus socket errors and timeouts."""
        e = self.errors
        return (sum(v for k, v in self.statuses.items() if k != 200)
                + e["connect"] + e["read"] + e["write"] + e["timeout"])


def wrk_available() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).split("Copyright")[0].strip()
    except (OSError, subprocess.SubprocessError):
        return "wrk"


def run_wrk(port: int, paths: Sequence[str], *, connections: int, seconds: float,
            threads: int = 1, timeout: float = 60.0, workdir: str | None = None) -> WrkResult:
    """Drive ``paths`` (cycled, per connection in turn) with wrk; only 127.0.0.1."""
    workdir = workdir or tempfile.mkdtemp(prefix="wrk-")
    script = os.path.join(workdir, "paths.lua")
    with open(script, "w") as f:
        f.write(_WRK_LUA % {"paths": ", ".join(json.dumps(p) for p in paths)})
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s",
            "-s", script, f"http://{HOST}:{port}/"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = Proc("wrk", argv, stdout=subprocess.PIPE)
    try:
        out, _ = proc.popen.communicate(timeout=seconds + timeout + 30)
    finally:
        proc.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode("utf-8", "replace")
    line = next((l for l in text.splitlines() if l.startswith("WRK-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {proc.popen.returncode}):\n{text}")
    doc = json.loads(line[len("WRK-JSON "):])
    return WrkResult(
        requests=doc["requests"],
        seconds=doc["duration_us"] / 1e6,
        statuses={int(k): v for k, v in doc["statuses"].items()},
        errors=doc["errors"],
        latency_ms={k: v / 1000 for k, v in doc["latency_us"].items()},
        cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        raw=doc,
    )


@dataclass
class Window:
    """CPU use of some processes and of the whole machine over a stretch of time."""

    pids: Sequence[int]
    wall: float = 0.0
    cpu: float = 0.0
    idle: float = float("nan")

    def __enter__(self) -> "Window":
        self._cpu = cpu_seconds(self.pids)
        self._idle = system_idle()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t
        self.cpu = cpu_seconds(self.pids) - self._cpu
        self.idle = idle_share(self._idle, system_idle())

    @property
    def cpu_per_s(self) -> float:
        return self.cpu / self.wall if self.wall else float("nan")

    def mark(self, what: str) -> None:
        """``mark("start")`` / ``mark("end")``: the same as entering / leaving, for a
        window opened and closed by callbacks (e.g. ``_load.closed_loop(mark=...)``)."""
        if what == "start":
            self.__enter__()
        else:
            self.__exit__(None, None, None)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_main(main: Any) -> None:
    """``sys.exit(main())``; Ctrl-C stops the servers (atexit) and exits 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        sys.exit(130)
