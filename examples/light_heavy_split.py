"""The light/heavy split: quick requests stay quick while a burst of disk loads runs.

What it shows
    A small ``twisted.web`` server on 127.0.0.1 (a free port) answers two
    kinds of request: ``/ping``, answered directly in the reactor thread, and
    ``/file/NAME``, which loads a whole file from disk.  A client in the same
    process fires a burst of heavy requests (200 loads of 16-256 KiB files,
    32 in flight) and meanwhile a steady stream of pings (one every 2 ms).
    The heavy handler runs twice:

    (a) the classic advice: blocking ``open()``/``read()`` sent to a
        second-level thread pool with ``deferToThreadPool``, a dedicated
        ``ThreadPool`` (not the reactor's own, which DNS lookups share),
        started before the burst;
    (b) asyncfile's ``FileLoader.load``: cached data is copied in the reactor
        thread with ``preadv(RWF_NOWAIT)`` (no thread hop), only reads that
        would wait for storage go to its I/O threads, and open files and
        waiting loads are bounded.

    For each it prints heavy requests/s, the pings' latency p50/p99/max, the
    worst reactor stall (a 1 ms ``LoopingCall`` measuring its own lateness)
    and where the reads happened (the thread pool's jobs; the loader's
    inline vs pool reads).  A baseline with pings only comes first.  With
    ``--slow`` both variants run again with the files behind ``SlowFS``, a
    FUSE mount whose every read sleeps 20 ms: there RWF_NOWAIT is refused
    and the loader reads (and opens) in its pool too, so both variants
    become thread pools and the difference left is the bound on open files.

    Every answer is checked against the file's CRC-32 after the run; the
    program exits 1 if any heavy answer is wrong or missing, a ping is lost,
    or a pool or the loader exceeded its bound.

Why
    One blocking read in the reactor thread delays every other connection,
    so "keep heavy work off the reactor" is the first rule of Twisted
    servers.  But reading a file that is in the page cache is a memory copy
    of tens of microseconds, less than the thread hop (``callFromThread``
    plus a wake-up, about 50 µs) that the pool pays for every request, and
    the reactor thread then shares the GIL with the pool's threads.  The
    reads that really block are those that must wait for storage;
    RWF_NOWAIT tells them apart at no cost.

    What to expect from the numbers (they are noisy, more so on a busy
    machine: compare within one run, and run it a few times): (b) usually
    serves more heavy requests per second, and its worst stall and ping p99
    are usually smaller (in our runs (a)'s worst stall varied from 10 to
    70 ms with 2 or 16 threads alike, (b)'s mostly stayed under 20 ms); the
    ping p50 is about the
    same in both, because it is set by the HTTP work of 32 responses in
    flight, which both variants (and the client, which shares the process)
    do in the reactor thread.  On SlowFS both variants are thread pools and
    perform alike; both need two reads per file (the data, then the read
    that returns 0 at end of file), so each request waits 2 x 20 ms.

When to choose it
    * A dedicated ``ThreadPool`` + ``deferToThreadPool``: the heavy work is
      not just file reads (a database driver, a C library), is rare, or must
      run on platforms without RWF_NOWAIT.  Size the pool, and bound what
      waits in front of it yourself: its queue has no limit.
    * ``FileLoader``: serving files at a high rate (images, static assets,
      byte ranges) where most reads hit the page cache, with bounded open
      files (``max_open``) and a bounded queue that refuses at once
      (``Overloaded``) when a burst is larger than you can take.

Run it:

    python examples/light_heavy_split.py [--files 300] [--heavy 200]
        [--in-flight 32] [--ping-ms 2] [--threads 16] [--max-open 64] [--slow]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, endpoints, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.internet.protocol import Protocol
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from asyncfile import FileLoader
from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

KIB = 1024
MIB = 1024 * 1024
SLOW_READ_DELAY = 0.02  # seconds each read sleeps on the SlowFS mount
BASELINE_PINGS = 100


# --- the server --------------------------------------------------------------


class Ping(resource.Resource):
    """Light: answered at once, in the reactor thread."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"pong"


class Files(resource.Resource):
    """Heavy: ``/file/NAME`` answers with the file's bytes, loaded by ``self.load``.

    ``load(path) -> Deferred[bytes]`` is swapped between the variants.
    """

    isLeaf = True

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names
        self.root = ""
        self.load: Callable[[str], defer.Deferred[bytes]] = lambda path: defer.fail(
            RuntimeError("no loader")
        )

    def render_GET(self, request: server.Request) -> bytes | int:
        name = request.postpath[0].decode() if len(request.postpath) == 1 else ""
        if name not in self.names:  # never let a request name a path
            request.setResponseCode(404)
            return b"no such file"
        gone = []
        d = self.load(f"{self.root}/{name}")
        # A client that goes away cancels its load (FileLoader frees the
        # descriptor and its place; a thread job cannot be stopped).
        request.notifyFinish().addErrback(lambda _: (gone.append(True), d.cancel()))

        def send(data: bytes) -> None:
            if not gone:
                request.setHeader(b"content-type", b"application/octet-stream")
                request.write(data)
                request.finish()

        def failed(reason) -> None:
            if not gone:
                request.setResponseCode(500)
                request.write(f"{reason.type.__name__}: {reason.value}".encode())
                request.finish()

        d.addCallbacks(send, failed)
        return server.NOT_DONE_YET


class QuietSite(server.Site):
    def log(self, request: server.Request) -> None:
        pass  # no access log: it would cost as much as a ping


# --- the client ---------------------------------------------------------------


class _Collect(Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response) -> defer.Deferred[bytes]:
    """``readBody`` without its spurious DeprecationWarning (Twisted issue 8227:
    the Agent's ``TransportProxyProducer`` has no ``abortConnection``)."""
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_Collect(done))
    return done


# --- measuring -----------------------------------------------------------------


class StallProbe:
    """A 1 ms ``LoopingCall`` that records how late each call was."""

    def __init__(self, reactor, interval: float = 0.001) -> None:
        self.interval = interval
        self.worst = 0.0
        self._last = 0.0
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last:
            self.worst = max(self.worst, now - self._last - self.interval)
        self._last = now

    def start(self) -> None:
        self.worst, self._last = 0.0, 0.0
        self._loop.start(self.interval)

    def stop(self) -> float:
        self._loop.stop()
        self._tick()  # the last interval counts too, even if nothing ran in it
        return self.worst


def percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]


@dataclass
class Phase:
    title: str
    heavy_sent: int = 0
    heavy_ok: int = 0
    heavy_wrong: int = 0
    heavy_failed: list[str] = field(default_factory=list)
    heavy_bytes: int = 0
    heavy_seconds: float = 0.0
    pings_sent: int = 0
    ping_latency: list[float] = field(default_factory=list)
    pings_wrong: int = 0
    worst_stall: float = 0.0
    seconds: float = 0.0
    ok: bool = True

    @property
    def heavy_rate(self) -> float:
        return self.heavy_ok / self.heavy_seconds if self.heavy_seconds else 0.0


class Pinger:
    """Sends a ``/ping`` every ``interval`` seconds without waiting for the last."""

    def __init__(self, reactor, agent: Agent, url: bytes, phase: Phase, interval: float) -> None:
        self.agent = agent
        self.url = url
        self.phase = phase
        self.outstanding: set[defer.Deferred] = set()
        self._loop = task.LoopingCall(self.ping)
        self._loop.clock = reactor
        self.interval = interval

    def ping(self) -> None:
        phase = self.phase
        phase.pings_sent += 1
        sent = time.perf_counter()

        def got(body: bytes) -> None:
            phase.ping_latency.append(time.perf_counter() - sent)
            if body != b"pong":
                phase.pings_wrong += 1

        d = self.agent.request(b"GET", self.url).addCallback(read_body).addCallback(got)
        d.addErrback(lambda f: setattr(phase, "pings_wrong", phase.pings_wrong + 1))
        self.outstanding.add(d)
        d.addBoth(lambda _: self.outstanding.discard(d))

    def start(self) -> None:
        self._loop.start(self.interval)

    async def stop(self) -> None:
        self._loop.stop()
        await defer.gatherResults(list(self.outstanding))


@dataclass
class Setup:
    reactor: object
    base_url: bytes
    files: Files
    heavy_agent: Agent
    light_agent: Agent
    order: list[str]  # names requested by the heavy client, in order
    crcs: dict[str, int]
    in_flight: int
    ping_interval: float


async def run_phase(s: Setup, phase: Phase, heavy: bool) -> Phase:
    """Pings all along; with ``heavy``, the burst of file loads as well."""
    reactor = s.reactor
    probe = StallProbe(reactor)
    pinger = Pinger(reactor, s.light_agent, s.base_url + b"/ping", phase, s.ping_interval)
    bodies: list[tuple[str, bytes]] = []
    started = time.perf_counter()
    probe.start()
    pinger.start()
    if heavy:
        names = iter(s.order)

        async def client_loop() -> None:
            for name in names:  # the loops share one iterator
                phase.heavy_sent += 1
                try:
                    response = await s.heavy_agent.request(
                        b"GET", s.base_url + b"/file/" + name.encode()
                    )
                    body = await read_body(response)
                except Exception as e:
                    phase.heavy_failed.append(f"{name}: {e!r}")
                    continue
                if response.code != 200:
                    phase.heavy_failed.append(f"{name}: HTTP {response.code} {body[:80]!r}")
                    continue
                bodies.append((name, body))

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(client_loop()) for _ in range(s.in_flight)]
        )
        phase.heavy_seconds = time.perf_counter() - started
    else:
        await task.deferLater(reactor, BASELINE_PINGS * s.ping_interval, lambda: None)
    await pinger.stop()
    phase.worst_stall = probe.stop()
    phase.seconds = time.perf_counter() - started
    # Check the answers only now, outside the measured period.
    for name, body in bodies:
        phase.heavy_bytes += len(body)
        if zlib.crc32(body) == s.crcs[name]:
            phase.heavy_ok += 1
        else:
            phase.heavy_wrong += 1
    return phase


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(phase: Phase, heavy_expected: int | None) -> None:
    if heavy_expected is not None:
        print(
            f"heavy: {phase.heavy_sent} requests, {phase.heavy_ok} OK, "
            f"{phase.heavy_wrong} wrong, {len(phase.heavy_failed)} failed; "
            f"{phase.heavy_bytes / MIB:.1f} MiB in {phase.heavy_seconds:.3f} s = "
            f"{phase.heavy_rate:.0f} requests/s"
        )
        for line in phase.heavy_failed[:5]:
            print(f"  failed: {line}")
        if phase.heavy_ok != heavy_expected or phase.heavy_sent != heavy_expected:
            print(f"MISMATCH: {heavy_expected} heavy requests expected to succeed")
            phase.ok = False
    lat = phase.ping_latency
    answered = len(lat)
    print(
        f"light: {phase.pings_sent} pings, {answered} answered, {phase.pings_wrong} wrong; "
        f"latency ms p50 {ms(percentile(lat, 50))} / p99 {ms(percentile(lat, 99))} / "
        f"max {ms(max(lat))}"
    )
    if answered != phase.pings_sent or phase.pings_wrong:
        print("MISMATCH: every ping must be answered with pong")
        phase.ok = False
    print(
        f"reactor stall: worst {ms(phase.worst_stall)} ms over {phase.seconds:.2f} s "
        f"(1 ms LoopingCall probe)"
    )


# --- the two ways of loading a file --------------------------------------------


async def with_thread_pool(s: Setup, title: str, threads: int) -> Phase:
    reactor = s.reactor
    pool = ThreadPool(minthreads=threads, maxthreads=threads, name="disk")
    pool.start()  # all threads now, not one by one inside the burst
    lock = threading.Lock()
    count = dict(submitted=0, started=0, busy=0, peak_busy=0, peak_queued=0)

    def read_whole(path: str) -> bytes:
        with lock:
            count["started"] += 1
            count["busy"] += 1
            count["peak_busy"] = max(count["peak_busy"], count["busy"])
        try:
            with open(path, "rb") as f:
                return f.read()
        finally:
            with lock:
                count["busy"] -= 1

    def load(path: str) -> defer.Deferred[bytes]:
        with lock:
            count["submitted"] += 1
            queued = count["submitted"] - count["started"]
            count["peak_queued"] = max(count["peak_queued"], queued)
        return deferToThreadPool(reactor, pool, read_whole, path)

    s.files.load = load
    try:
        phase = await run_phase(s, Phase(title), heavy=True)
    finally:
        pool.stop()
    report(phase, len(s.order))
    print(
        f"thread pool: {threads} threads, {count['started']} jobs, at most "
        f"{count['peak_busy']} busy and {count['peak_queued']} queued at once (its queue "
        f"has no bound); every open and read in the pool"
    )
    if count["peak_busy"] > threads:
        print("VIOLATED: more jobs ran at once than the pool has threads")
        phase.ok = False
    return phase


async def with_file_loader(s: Setup, title: str, max_open: int, threads: int) -> Phase:
    loader = FileLoader(s.reactor, max_open=max_open, io_threads=threads, engine="nowait")  # pool vs pool
    s.files.load = loader.load
    try:
        phase = await run_phase(s, Phase(title), heavy=True)
    finally:
        await loader.close()
    report(phase, len(s.order))
    st = loader.stats()
    print(
        f"loader: engine {st['engine']}, {st['loaded']} loaded, {st['errors']} errors; "
        f"reads {st['inline_reads']} inline / {st['pool_reads']} in the pool; "
        f"opens {st['inline_opens']} inline / {st['pool_opens']} in the pool; "
        f"{st.get('nowait_fallbacks', 0)} EAGAIN fallbacks; peak open {st['peak_open']} "
        f"(max_open {st['max_open']}), peak waiting {st['peak_waiting']} "
        f"(max_waiting {st['max_waiting']})"
    )
    if st["peak_open"] > st["max_open"] or st["errors"] or st["loaded"] != len(s.order):
        print("VIOLATED: the loader exceeded max_open, failed, or lost a load")
        phase.ok = False
    return phase


async def both_variants(
    s: Setup, args: argparse.Namespace, where: str = "", fs: SlowFS | None = None
) -> list[Phase]:
    variants = [
        (
            f"(a) deferToThreadPool, dedicated ThreadPool({args.threads}) doing open()+read()",
            lambda title: with_thread_pool(s, title, args.threads),
        ),
        (
            f"(b) FileLoader(max_open={args.max_open}, io_threads={args.threads}).load",
            lambda title: with_file_loader(s, title, args.max_open, args.threads),
        ),
    ]
    phases = []
    for title, run in variants:
        print(f"== {title}{where} ==")
        reads_before = fs.stats()["read"] if fs is not None else 0
        phases.append(await run(title + where))
        if fs is not None:
            reads = fs.stats()["read"] - reads_before
            print(
                f"SlowFS: {reads} read calls reached the daemon, "
                f"{reads / len(s.order):.1f} per request"
            )
        print()
    return phases


def summary(rows: list[tuple[str, Phase]]) -> None:
    print("== summary ==")
    print(f"{'variant':<24} {'heavy req/s':>11} {'ping p50':>9} {'p99':>7} {'max':>7} {'stall':>7}  (ms)")
    for name, p in rows:
        lat = p.ping_latency
        heavy = f"{p.heavy_rate:.0f}" if p.heavy_sent else "-"
        print(
            f"{name:<24} {heavy:>11} {ms(percentile(lat, 50)):>9} {ms(percentile(lat, 99)):>7} "
            f"{ms(max(lat)):>7} {ms(p.worst_stall):>7}"
        )


# --- setting up ----------------------------------------------------------------


def write_files(directory: Path, count: int, min_kib: int, max_kib: int) -> dict[str, int]:
    """``count`` files of random sizes and bytes; returns name -> CRC-32."""
    rng = random.Random(1)
    crcs = {}
    for i in range(count):
        data = rng.randbytes(rng.randint(min_kib, max_kib) * KIB)
        name = f"f{i:04d}.bin"
        (directory / name).write_bytes(data)
        crcs[name] = zlib.crc32(data)
    for name in crcs:  # read once: every file is in the page cache
        (directory / name).read_bytes()
    return crcs


async def main(reactor, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="light-heavy-"))
    port = None
    pools: list[HTTPConnectionPool] = []
    try:
        crcs = write_files(tmp, args.files, 16, 256)
        total = sum((tmp / n).stat().st_size for n in crcs)
        print(
            f"{len(crcs)} files of 16-256 KiB ({total / MIB:.1f} MiB) written to a temp dir "
            f"and read once (cached)"
        )
        files = Files(set(crcs))
        files.root = str(tmp)
        root = resource.Resource()
        root.putChild(b"ping", Ping())
        root.putChild(b"file", files)
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            QuietSite(root)
        )
        addr = port.getHost()
        print(
            f"server: twisted.web on 127.0.0.1 (free port); /ping answered in the reactor, "
            f"/file/NAME loaded from disk"
        )
        heavy_pool = HTTPConnectionPool(reactor, persistent=True)
        heavy_pool.maxPersistentPerHost = args.in_flight
        light_pool = HTTPConnectionPool(reactor, persistent=True)
        light_pool.maxPersistentPerHost = 8
        pools = [heavy_pool, light_pool]
        order = random.Random(2).sample(sorted(crcs), min(args.heavy, len(crcs)))
        order += random.Random(3).choices(sorted(crcs), k=args.heavy - len(order))
        s = Setup(
            reactor,
            f"http://127.0.0.1:{addr.port}".encode(),
            files,
            Agent(reactor, pool=heavy_pool),
            Agent(reactor, pool=light_pool),
            order,
            crcs,
            args.in_flight,
            args.ping_ms / 1000,
        )
        print(
            f"client, same process: {args.heavy} heavy requests, {args.in_flight} in flight; "
            f"a /ping every {args.ping_ms:g} ms meanwhile\n"
        )

        # Warm up, unmeasured: the first request through an Agent imports and
        # builds things (about 10 ms), and the first burst opens the
        # connections and grows the heap; whichever variant ran first would
        # look slower.  The warm-up burst loads with a blocking read.
        for agent in (s.heavy_agent, s.light_agent):
            await read_body(await agent.request(b"GET", s.base_url + b"/ping"))
        files.load = lambda path: defer.succeed(Path(path).read_bytes())
        await run_phase(s, Phase("warm-up"), heavy=True)

        print("== baseline: pings only, no heavy requests ==")
        baseline = await run_phase(s, Phase("baseline"), heavy=False)
        report(baseline, None)
        print()
        a, b = await both_variants(s, args)
        rows = [("baseline", baseline), ("(a) thread pool", a), ("(b) FileLoader", b)]

        if not args.slow:
            print(
                f"slow storage: not run (pass --slow to repeat (a) and (b) behind SlowFS, "
                f"{SLOW_READ_DELAY * 1000:g} ms per read)\n"
            )
        else:
            reason = fuse_unavailable_reason()
            if reason is not None:
                print(f"slow storage: SKIPPED, FUSE is not available here: {reason}\n")
            else:
                fs = SlowFS(tmp, read_delay=SLOW_READ_DELAY)
                with fs as mount:
                    print(
                        f"slow storage: the same files behind SlowFS (FUSE, "
                        f"{SLOW_READ_DELAY * 1000:g} ms per read, no page cache)\n"
                    )
                    files.root = mount
                    sa, sb = await both_variants(s, args, " on SlowFS", fs)
                    files.root = str(tmp)
                rows += [("(a) thread pool, SlowFS", sa), ("(b) FileLoader, SlowFS", sb)]

        summary(rows)
        if not all(p.ok for _, p in rows):
            print("FAILED: see the lines above")
            raise SystemExit(1)
    finally:
        for pool in pools:
            await pool.closeCachedConnections()
        if port is not None:
            await port.stopListening()
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=300, help="files written (16-256 KiB each)")
    p.add_argument("--heavy", type=int, default=200, help="heavy requests (file loads)")
    p.add_argument("--in-flight", type=int, default=32, help="heavy requests in flight")
    p.add_argument("--ping-ms", type=float, default=2.0, help="one /ping every this many ms")
    p.add_argument("--threads", type=int, default=16, help="threads in (a)'s pool and the loader's")
    p.add_argument("--max-open", type=int, default=64, help="(b): FileLoader's max_open")
    p.add_argument("--slow", action="store_true", help="also run both behind SlowFS (FUSE)")
    args = p.parse_args(argv)
    if min(args.files, args.heavy, args.in_flight, args.threads, args.max_open) < 1 or args.ping_ms <= 0:
        p.error("all numbers must be positive")
    return args


if __name__ == "__main__":
    task.react(main, (parse_args(sys.argv[1:]),))
