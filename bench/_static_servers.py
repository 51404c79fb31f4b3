"""The Python servers of ``bench/static_files.py``, one per process.

    python bench/_static_servers.py KIND --port N --dir small=DIR --dir large=DIR [--dir slow=MOUNT]

KIND is one of :data:`KINDS`.  Each ``--dir NAME=DIR`` is served at
``/NAME/``; everything listens on 127.0.0.1 only.  The process prints
``READY <port>`` once it listens and runs until SIGTERM.

Every server is measured the same way, from inside its own process:

* ``/_bench/stats`` (JSON): requests finished per status, requests whose
  client went away, bytes the clients' kernels acknowledged (``TCP_INFO``
  ``tcpi_bytes_acked`` of every connection: headers and bodies, sendfile's
  bytes included, which never pass through Python), how late a 1 ms
  ``LoopingCall`` ran (the reactor's stalls: worst, p99, how many ticks
  were more than 5 ms late; each split with the reactor thread's
  ``schedstat`` into time waiting for a CPU and the rest, see ``Stats``),
  and the longest garbage collection (``gc.callbacks``).  ``/_bench/reset``
  starts all of it afresh.  ``/_bench/...`` requests are not counted.
* No access log (``Site.log`` does nothing), as nginx runs with
  ``access_log off``.

The threaded sender (``threaded``) is a minimal re-implementation, written
for this benchmark from its description, of the pattern of Synapse's
``ThreadedFileSender`` (``synapse/media/_base.py``): the file is checked,
stat'ed and opened in the reactor thread, as Synapse's ``respond_with_file``
does; a push producer then runs its read loop in a dedicated thread pool
(``ThreadPool(1, 50)``, as Synapse's media pool), reading 16 KiB chunks and
handing each to the reactor with ``callFromThread``.  A pause clears a
``threading.Event``: the loop leaves the pool thread (so no thread waits
while paused) and the reactor side waits for ``resumeProducing`` (at most
90 s) before starting it again.
"""

from __future__ import annotations

import argparse
import gc
import json
import mimetypes
import os
import socket
import struct
import sys
import threading
import time
from array import array
from typing import Any, BinaryIO

from twisted.web.resource import NoResource, Resource

KINDS = {
    "asyncfile-sendfile": "asyncfile.web.File (zero_copy=True)",
    "asyncfile-read": "asyncfile.web.File (zero_copy=False)",
    "static": "twisted.web.static.File",
    "threaded": "Synapse-style threaded sender",
}

TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in struct tcp_info (Linux >= 4.1)
CHUNK = 16 * 1024  # the threaded sender's read size (Synapse: 2**14)
RESUME_TIMEOUT = 90.0  # Synapse waits this long for a paused consumer


def bytes_acked(fd: int) -> int:
    """Bytes of this TCP connection the peer's kernel acknowledged."""
    try:
        info = socket.socket(fileno=os.dup(fd))
    except OSError:
        return 0
    try:
        raw = info.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return 0
    finally:
        info.close()
    return struct.unpack_from("=Q", raw, TCPI_BYTES_ACKED)[0] if len(raw) >= TCPI_BYTES_ACKED + 8 else 0


class Stats:
    """The counters behind ``/_bench/stats``.

    The stall probe also reads the reactor thread's ``schedstat`` (time on
    a CPU, time waiting for one) at every tick, so each tick's lateness
    splits into: time the thread waited for a CPU (other processes: the
    machine, not the server), and the rest ("own" lateness: work in the
    reactor thread, or the thread asleep in a blocking call or waiting
    for the GIL).  ``blocked`` is the part spent asleep beyond the tick's
    interval: blocking calls and the GIL, not CPU work.
    """

    def __init__(self, reactor: Any, interval: float) -> None:
        from twisted.internet import task

        self.reactor = reactor
        self.interval = interval
        self.channels: dict[Any, int] = {}  # live channel -> bytes_acked at reset (or 0)
        self.reset()
        self._last = 0.0
        self._sched_fd: int | None = None
        self._gc_started = self._gc_cpu = 0.0
        self._run = self._wait = 0
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def reset(self) -> None:
        self.statuses: dict[int, int] = {}
        self.gone = 0
        self.closed_bytes = 0
        self.lateness = array("d")
        self.own = array("d")
        self.worst = self.worst_own = self.worst_blocked = 0.0
        self.worst_own_at = 0.0
        self.gc_worst = self.gc_worst_cpu = 0.0
        self.gc_worst_generation = -1
        self.gc_runs = self.gc_collected = 0
        self.started = time.perf_counter()
        for channel in self.channels:
            self.channels[channel] = channel.acked()

    def _schedstat(self) -> tuple[int, int]:
        if self._sched_fd is None:
            return 0, 0
        fields = os.pread(self._sched_fd, 128, 0).split()
        return int(fields[0]), int(fields[1])

    def start(self) -> None:
        """In the reactor thread (``/proc/thread-self`` is the caller's thread)."""
        try:
            self._sched_fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._sched_fd = None
        self._run, self._wait = self._schedstat()
        self._last = time.perf_counter()
        self._loop.start(self.interval, now=False)
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        """Garbage collections stop the reactor too: their worst pause is reported apart."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            self._gc_cpu = time.thread_time()
        else:
            self.gc_runs += 1
            self.gc_collected += info.get("collected", 0)
            wall = time.perf_counter() - self._gc_started
            if wall > self.gc_worst:
                self.gc_worst = wall
                self.gc_worst_cpu = time.thread_time() - self._gc_cpu
                self.gc_worst_generation = info.get("generation", -1)

    def _tick(self) -> None:
        now = time.perf_counter()
        run, wait = self._schedstat()
        gap = now - self._last
        on_cpu, queued = (run - self._run) / 1e9, (wait - self._wait) / 1e9
        self._last, self._run, self._wait = now, run, wait
        late = max(0.0, gap - self.interval)
        own = max(0.0, late - queued)
        blocked = max(0.0, gap - on_cpu - queued - self.interval)
        self.lateness.append(late)
        self.own.append(own)
        if late > self.worst:
            self.worst = late
        if own > self.worst_own:
            self.worst_own = own
            self.worst_own_at = now - self.started
        if blocked > self.worst_blocked:
            self.worst_blocked = blocked

    def snapshot(self) -> dict[str, Any]:
        live = sum(max(0, channel.acked() - base) for channel, base in self.channels.items())
        pending = max(0.0, time.perf_counter() - self._last - self.interval)

        def pct(values: Any, p: float) -> float:
            values = sorted(values)
            return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else 0.0

        return {
            "pid": os.getpid(),
            "seconds": time.perf_counter() - self.started,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "finished": sum(self.statuses.values()),
            "gone": self.gone,
            "bytes_acked": self.closed_bytes + live,
            "connections": len(self.channels),
            "ticks": len(self.lateness),
            "schedstat": self._sched_fd is not None,
            "stall_worst": max(self.worst, pending),
            "stall_p99": pct(self.lateness, 99),
            "ticks_over_5ms": sum(1 for x in self.lateness if x > 0.005),
            "own_worst": self.worst_own,
            "own_p99": pct(self.own, 99),
            "own_worst_at": self.worst_own_at,
            "own_over_5ms": sum(1 for x in self.own if x > 0.005),
            "blocked_worst": self.worst_blocked,
            "gc_worst": self.gc_worst,
            "gc_worst_cpu": self.gc_worst_cpu,
            "gc_worst_generation": self.gc_worst_generation,
            "gc_runs": self.gc_runs,
            "gc_collected": self.gc_collected,
            "gc_objects": len(gc.get_objects()),
            "late_ticks": [round(x, 6) for x in self.lateness if x > 0.001][:20000],
        }


def make_site(kind: str, dirs: dict[str, str], reactor: Any, probe_interval: float) -> tuple[Any, Stats, Any]:
    """(site, stats, thread pool or None) for one server KIND."""
    from twisted.web import http, resource, server

    stats = Stats(reactor, probe_interval)
    pool = None

    class CountingChannel(http.HTTPChannel):
        """Notes its connection's acknowledged bytes when it closes.

        A duplicate of the socket's descriptor keeps the socket readable for
        ``TCP_INFO`` after Twisted closed its own (Twisted closes the socket
        before the protocol's ``connectionLost``).
        """

        _dup: int | None = None

        def connectionMade(self) -> None:
            super().connectionMade()
            self._dup = os.dup(self.transport.fileno())
            stats.channels[self] = 0

        def acked(self) -> int:
            return bytes_acked(self._dup) if self._dup is not None else 0

        def connectionLost(self, reason: Any) -> None:
            base = stats.channels.pop(self, None)
            if self._dup is not None:
                if base is not None:
                    stats.closed_bytes += max(0, self.acked() - base)
                os.close(self._dup)
                self._dup = None
            super().connectionLost(reason)

    class CountingRequest(server.Request):
        def process(self) -> None:
            if not self.path.startswith(b"/_bench/"):
                self.notifyFinish().addCallbacks(self._done, self._gone)
            super().process()

        def _done(self, _: Any) -> None:
            stats.statuses[self.code] = stats.statuses.get(self.code, 0) + 1

        def _gone(self, _: Any) -> None:
            stats.gone += 1

    class StatsResource(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            if request.postpath == [b"reset"]:
                stats.reset()
                return b"{}"
            return json.dumps(stats.snapshot()).encode()

    class QuietSite(server.Site):
        def log(self, request: Any) -> None:  # nginx runs with access_log off
            pass

    root = resource.Resource()
    if kind in ("asyncfile-sendfile", "asyncfile-read"):
        from asyncfile.web import File as AsyncFile

        for name, path in dirs.items():
            root.putChild(name.encode(), AsyncFile(path, zero_copy=(kind == "asyncfile-sendfile")))
    elif kind == "static":
        from twisted.web.static import File as StaticFile

        for name, path in dirs.items():
            root.putChild(name.encode(), StaticFile(path))
    elif kind == "threaded":
        from twisted.python.threadpool import ThreadPool

        pool = ThreadPool(minthreads=1, maxthreads=50, name="media-sender")
        for name, path in dirs.items():
            root.putChild(name.encode(), ThreadedFileResource(path, reactor, pool))
    else:
        raise SystemExit(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    root.putChild(b"_bench", StatsResource())
    site = QuietSite(root)
    site.requestFactory = CountingRequest
    try:
        from twisted.web.http import _GenericHTTPChannelProtocol  # what Site builds by default

        site.protocol = lambda: _GenericHTTPChannelProtocol(CountingChannel())  # type: ignore[method-assign]
    except ImportError:  # pragma: no cover - other Twisted versions
        site.protocol = CountingChannel  # type: ignore[assignment]
    return site, stats, pool


# -- the Synapse-style threaded sender ----------------------------------------

class ThreadedSender:
    """An ``IPushProducer`` reading a file in a pool thread (see the module doc)."""

    def __init__(self, reactor: Any, pool: Any) -> None:
        from twisted.internet import defer

        self.reactor = reactor
        self.pool = pool
        self.file: BinaryIO | None = None
        self.consumer: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self._go = threading.Event()  # set: the pool thread may read on; clear: paused
        self._stopping = False  # read by the pool thread
        self._resumed: defer.Deferred[None] | None = None

    def beginFileTransfer(self, file: BinaryIO, consumer: Any) -> Any:
        from twisted.internet import defer

        self.file, self.consumer = file, consumer
        consumer.registerProducer(self, True)
        self._go.set()
        defer.ensureDeferred(self._drive())
        return self.done

    # IPushProducer, called in the reactor thread
    def pauseProducing(self) -> None:
        self._go.clear()

    def resumeProducing(self) -> None:
        self._go.set()
        waiting, self._resumed = self._resumed, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._stopping = True
        self._go.set()
        waiting, self._resumed = self._resumed, None
        if waiting is not None:
            waiting.callback(None)  # _drive wakes up, sees _stopping and ends
        self._finish(ConnectionError("the consumer stopped the transfer"))

    # the loops
    def _read_until_paused(self) -> bool:
        """In a pool thread: read and push chunks while not paused; False at the end of the file."""
        assert self.file is not None
        while not self._stopping and self._go.is_set():
            chunk = self.file.read(CHUNK)
            if not chunk:
                return False
            self.reactor.callFromThread(self._write, chunk)
        return True

    def _write(self, chunk: bytes) -> None:
        if self.consumer is not None:
            self.consumer.write(chunk)

    async def _drive(self) -> None:
        """In the reactor thread: run the read loop in the pool, wait while paused, again."""
        from twisted.internet import defer, threads

        error: BaseException | None = None
        try:
            while not self._stopping:
                more = await threads.deferToThreadPool(self.reactor, self.pool, self._read_until_paused)
                if not more:
                    break
                if not self._go.is_set() and not self._stopping:
                    self._resumed = defer.Deferred()
                    self._resumed.addTimeout(RESUME_TIMEOUT, self.reactor)
                    await self._resumed
        except Exception as e:  # noqa: BLE001 - handed to the caller's Deferred
            error = e
        finally:
            # Only here: no pool thread is inside read() any more.
            assert self.file is not None
            self.file.close()
            self.file = None
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None and getattr(consumer, "channel", True) is not None:
            consumer.unregisterProducer()
        if not self.done.called:
            if error is None:
                self.done.callback(None)
            else:
                self.done.errback(error)


class ThreadedFileResource(Resource):
    """Serves the files beneath ``root`` the way Synapse's ``respond_with_file`` does."""

    isLeaf = True

    def __init__(self, root: str, reactor: Any, pool: Any) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.reactor = reactor
        self.pool = pool
        self._not_found = NoResource()

    def render(self, request: Any) -> Any:
        from twisted.web import server

        names = [n.decode("utf-8", "replace") for n in request.postpath]
        if not names or any(n in ("", ".", "..") or "/" in n or "\0" in n or n.startswith(".") for n in names):
            return self._not_found.render(request)
        path = os.path.join(self.root, *names)
        # Synapse: os.path.isfile, os.stat and open in the reactor thread
        if not os.path.isfile(path):
            return self._not_found.render(request)
        size = os.stat(path).st_size
        request.setHeader(b"content-type", (mimetypes.guess_type(path)[0] or "application/octet-stream").encode())
        request.setHeader(b"content-length", str(size).encode())
        if request.method == b"HEAD":
            return b""
        f = open(path, "rb")
        sender = ThreadedSender(self.reactor, self.pool)
        d = sender.beginFileTransfer(f, request)

        def finished(_: Any) -> None:
            if not request._disconnected and not request.finished:
                request.finish()

        def failed(_: Any) -> None:
            if not request._disconnected and not request.finished:
                request.loseConnection()

        d.addCallbacks(finished, failed)
        return server.NOT_DONE_YET


# -- main -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--probe-interval", type=float, default=0.001)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() once listening: later collections skip the objects of start-up")
    parser.add_argument("--profile", metavar="FILE", help="run under cProfile, stats to FILE at exit")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    from twisted.internet import reactor

    dirs = dict(d.split("=", 1) for d in args.dir)
    site, stats, pool = make_site(args.kind, dirs, reactor, args.probe_interval)
    port = reactor.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")
    if pool is not None:
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    stats.start()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    print(f"READY {port.getHost().port} {type(reactor).__name__}", flush=True)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(args.profile)
    else:
        reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
