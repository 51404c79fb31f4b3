"""Engines compared (a measurement, not a test): slow storage, cold page cache,
cached small files.  Prints one table per scenario.

    python bench/engines.py [--files N] [--in-flight 64] [--burst 16] [--repeat 3]
                            [--only slow,cold,cached] [--dir DIR]

(a) slow: a SlowFS FUSE mount whose every read sleeps 50 ms (200 x 64 KiB
    files by default: 1,000 would take ~30 s per nowait run), once with
    libfuse's default max_background (12) and once with 64.
(b) cold: 1,000 x 64 KiB files on a disk file system (not tmpfs), evicted
    with POSIX_FADV_DONTNEED before every run.
(c) cached: 2,000 x 16 KiB files in the page cache.

A driver keeps ``--in-flight`` loads running: each reactor turn it tops the
window up with at most ``--burst`` new loads (so an engine that completes
loads synchronously still yields between batches; starting a load has a cost
of its own in the reactor thread -- an inline open() and a cache probe --
which is the caller's burst, not the engine blocking).  A 1 ms LoopingCall
measures the reactor's worst lateness ("stall") and how much of that stretch
the reactor thread was on a CPU (the rest: waiting for a CPU that other
processes had, on a shared machine).  Runs of the
engines alternate; the table gives the median files/s and the median and
maximum worst stall over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402

from asyncfile import FileLoader  # noqa: E402
from asyncfile.engines import IOPool, make_engine  # noqa: E402
from asyncfile.engines.uring import uring_unavailable_reason  # noqa: E402
from asyncfile.mounts import shared_mount_table  # noqa: E402
from asyncfile.testing import pagecache  # noqa: E402

KiB = 1024


class LatenessProbe:
    """A 1 ms LoopingCall recording its worst lateness, and how much of that
    stretch the reactor thread spent on a CPU: on a shared machine the rest
    is the thread waiting to be scheduled (other processes), not our code."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.worst = 0.0
        self.worst_cpu = 0.0
        self._last: float | None = None
        self._last_cpu = 0.0
        self._loop = task.LoopingCall(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        cpu = time.thread_time()
        if self._last is not None:
            late = now - self._last - self.interval
            if late > self.worst:
                self.worst = late
                self.worst_cpu = (cpu - self._last_cpu) / (now - self._last)  # share of the gap
        self._last = now
        self._last_cpu = cpu

    def start(self) -> "LatenessProbe":
        self._loop.start(self.interval)
        return self

    def stop(self) -> None:
        self._loop.stop()


class Window:
    """Keeps ``width`` loads in flight until every path is loaded."""

    def __init__(self, loader: FileLoader, paths: list[str], sizes: dict[str, int], width: int,
                 burst: int) -> None:
        self.loader = loader
        self.paths = paths
        self.sizes = sizes
        self.width = width
        self.burst = burst
        self.next = 0
        self.active = 0
        self.scheduled = False
        self.errors: list[Any] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def run(self) -> defer.Deferred[None]:
        self._refill()
        return self.done

    def _refill(self) -> None:
        self.scheduled = False
        started = 0
        while self.active < self.width and started < self.burst and self.next < len(self.paths):
            path = self.paths[self.next]
            self.next += 1
            self.active += 1
            started += 1
            self.loader.load(path).addBoth(self._finished, path)
        if self.next < len(self.paths):
            self._schedule()
        elif self.active == 0 and not self.done.called:
            self.done.callback(None)

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            reactor.callLater(0, self._refill)

    def _finished(self, result: Any, path: str) -> None:
        self.active -= 1
        if not isinstance(result, bytes) or len(result) != self.sizes[path]:
            self.errors.append((path, result))
        if self.next < len(self.paths):
            self._schedule()
        elif self.active == 0 and not self.done.called:
            self.done.callback(None)


BURST = 16


async def timed_run(loader: FileLoader, paths: list[str], sizes: dict[str, int],
                    width: int) -> tuple[float, float, float]:
    probe = LatenessProbe().start()
    await task.deferLater(reactor, 0.005, lambda: None)  # the probe is ticking
    window = Window(loader, paths, sizes, width, BURST)
    started = time.perf_counter()
    await window.run()
    elapsed = time.perf_counter() - started
    probe.stop()
    if window.errors:
        raise RuntimeError(f"{len(window.errors)} loads failed, e.g. {window.errors[0]!r}")
    return len(paths) / elapsed, probe.worst, probe.worst_cpu


def make_files(root: Path, count: int, size: int) -> tuple[list[str], dict[str, int]]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"f{i:05d}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(str(path))
    return paths, {p: size for p in paths}


def evict(paths: list[str]) -> float:
    """Drop the files' pages from the page cache; the fraction still cached
    (by mincore: probing with RWF_NOWAIT would start readahead)."""
    for p in paths:
        pagecache.evict(p)
    return sum(pagecache.cached_fraction(p) for p in paths) / len(paths)


Variant = tuple[str, Callable[[], FileLoader]]


def variants(names: list[str], width: int) -> list[Variant]:
    def named(engine: str, **kw: Any) -> Callable[[], FileLoader]:
        return lambda: FileLoader(reactor, max_open=width, max_waiting=100_000, engine=engine, **kw)

    def ring_only() -> FileLoader:
        return FileLoader(reactor, max_open=width, max_waiting=100_000,
                          engine=make_engine("io_uring", reactor, IOPool(reactor), inline=False))

    table = {
        "nowait": named("nowait"),
        "nowait, 64 threads": named("nowait", io_threads=64),
        "threads": named("threads"),
        "io_uring": named("io_uring"),
        "io_uring, ring only": ring_only,
    }
    return [(name, table[name]) for name in names]


async def compare(title: str, chosen: list[Variant], paths: list[str], sizes: dict[str, int], width: int,
                  repeat: int, before_run: Callable[[], Any] | None = None,
                  extra: Callable[[], dict[str, Any]] | None = None,
                  warm: bool = True) -> None:
    loaders = [(name, make()) for name, make in chosen]
    rates: dict[str, list[float]] = {name: [] for name, _ in loaders}
    stalls: dict[str, list[float]] = {name: [] for name, _ in loaders}
    stall_cpu: dict[str, list[float]] = {name: [] for name, _ in loaders}
    extras: dict[str, Any] = {}
    try:
        if warm:  # start threads, set rings up, fill caches
            for name, loader in loaders:
                await timed_run(loader, paths[:width], sizes, width)
        for r in range(repeat):
            order = loaders if r % 2 == 0 else loaders[::-1]
            for name, loader in order:
                if before_run is not None:
                    before_run()
                before = extra() if extra is not None else None
                rate, stall, cpu = await timed_run(loader, paths, sizes, width)
                rates[name].append(rate)
                stalls[name].append(stall)
                stall_cpu[name].append(cpu)
                if extra is not None:
                    after = extra()
                    extras[name] = {k: (after[k] - before[k]) / len(paths) for k in after}
                if name.startswith("io_uring"):
                    extras.setdefault(name, {}).update(loader.stats())
    finally:
        await defer.gatherResults([loader.close() for _, loader in loaders])
    print(f"\n{title}")
    base = statistics.median(rates[loaders[0][0]])
    header = ("| engine | files/s | vs " + loaders[0][0] + " | worst stall ms (median / max) "
              "| reactor thread on CPU during it (median) | notes |")
    print(header)
    print("|---|---:|---:|---:|---:|---|")
    for name, _ in loaders:
        rate = statistics.median(rates[name])
        notes = []
        e = extras.get(name, {})
        if "read" in e:
            notes.append(f"daemon reads/file {e['read']:.2f}")
        if "ring_submits" in e and e["ring_submits"]:
            notes.append(f"ops/submit {round(e['ring_ops'] / e['ring_submits'], 2)}, inline reads {e['inline_reads']}, "
                         f"ring reads {e['ring_reads']}")
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | "
              f"{statistics.median(stalls[name]) * 1000:.1f} / {max(stalls[name]) * 1000:.1f} | "
              f"{statistics.median(stall_cpu[name]):.0%} | {'; '.join(notes)} |")


async def slow(args: argparse.Namespace, root: Path) -> None:
    from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason:
        print(f"\n(a) slow storage skipped: {reason}")
        return
    count = args.files or 200
    source = root / "slow-src"
    paths, _ = make_files(source, count, 64 * KiB)
    names = [n for n in ("nowait", "nowait, 64 threads", "io_uring") if n in args.engines]
    for max_background in (0, 64):
        with SlowFS(source, read_delay=0.05, max_background=max_background) as mount:
            fs = SlowFS.__new__(SlowFS)  # stats() of the running mount
            fs.mount = mount
            mounted = [os.path.join(mount, os.path.basename(p)) for p in paths]
            sizes = {p: 64 * KiB for p in mounted}
            label = f"max_background={max_background}" if max_background else "max_background=12 (libfuse default)"
            await compare(f"(a) slow storage: SlowFS read_delay=50 ms, {count} x 64 KiB, {args.in_flight} in flight, "
                          f"FUSE {label}", variants(names, args.in_flight), mounted, sizes, args.in_flight,
                          args.repeat, extra=lambda: {"read": fs.stats()["read"]}, warm=False)


async def cold(args: argparse.Namespace, root: Path) -> None:
    count = args.files or 1000
    m = shared_mount_table().for_path(str(root))
    if m is not None and m.memory_backed:
        print(f"\n(b) cold page cache skipped: {root} is on {m.fstype}; pass --dir on a disk")
        return
    paths, sizes = make_files(root / "cold", count, args.cold_size)
    left = evict(paths)
    if left > 0.01:
        print(f"\n(b) cold page cache skipped: {left:.0%} of the pages stay cached after POSIX_FADV_DONTNEED")
        return
    names = [n for n in ("nowait", "nowait, 64 threads", "io_uring", "threads") if n in args.engines]
    await compare(f"(b) cold page cache: {count} x {args.cold_size // KiB} KiB on {m.fstype if m else '?'} "
                  f"(evicted by POSIX_FADV_DONTNEED before each run, checked with mincore), {args.in_flight} in flight",
                  variants(names, args.in_flight), paths, sizes, args.in_flight, args.repeat,
                  before_run=lambda: evict(paths))


async def cached(args: argparse.Namespace, root: Path) -> None:
    count = args.files or 2000
    paths, sizes = make_files(root / "cached", count, 16 * KiB)
    for p in paths:  # read once: in the page cache now
        with open(p, "rb") as f:
            f.read()
    names = [n for n in ("nowait", "io_uring", "threads", "io_uring, ring only") if n in args.engines]
    await compare(f"(c) cached: {count} x 16 KiB in the page cache, {args.in_flight} in flight",
                  variants(names, args.in_flight), paths, sizes, args.in_flight, args.repeat)


async def main(args: argparse.Namespace) -> None:
    reason = uring_unavailable_reason()
    if reason:
        print(f"io_uring unusable here: {reason}")
        args.engines = [e for e in args.engines if not e.startswith("io_uring")]
    global BURST
    BURST = args.burst
    print(f"Python {sys.version.split()[0]}, Linux {os.uname().release}, {os.cpu_count()} CPUs; "
          f"repeat {args.repeat}; at most {args.burst} new loads per reactor turn")
    with tempfile.TemporaryDirectory(prefix="bench-engines-", dir=args.dir) as tmp:
        root = Path(tmp)
        for name in args.only:
            await {"slow": slow, "cold": cold, "cached": cached}[name](args, root)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=0,
                        help="files per scenario (default: slow 200, cold 1000, cached 2000)")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--burst", type=int, default=16,
                        help="most new loads started per reactor turn (default 16)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold-size", type=int, default=64 * KiB)
    parser.add_argument("--only", default="slow,cold,cached")
    parser.add_argument("--engines", default="nowait,nowait, 64 threads,io_uring,threads,io_uring, ring only",
                        help="comma-separated variants to run")
    parser.add_argument("--dir", default="/var/tmp",
                        help="where test files go (a disk file system, for the cold run)")
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    known = ["nowait, 64 threads", "io_uring, ring only", "nowait", "io_uring", "threads"]
    spec, args.engines = args.engines, []
    for name in known:  # longest names first: "nowait, 64 threads" contains "nowait"
        if name in spec:
            args.engines.append(name)
            spec = spec.replace(name, "")
    return args


if __name__ == "__main__":
    arguments = parse()
    task.react(lambda _: defer.ensureDeferred(main(arguments)))
