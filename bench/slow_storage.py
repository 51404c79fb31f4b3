"""Slow storage: how long the reactor stalls while files load from it.

    python bench/slow_storage.py [--files 20] [--size 1048576] [--delay 0.05] [--plot FILE]

A real FUSE file system (asyncfile.testing.slowfs) whose every read sleeps
``--delay`` seconds stands in for a slow disk or NFS.  All files are asked
for at once; "worst stall" is how late a 1 ms LoopingCall ran meanwhile.
The naive FileReader is the classic pattern: a FileDescriptor on
``reactor.addReader`` calling ``os.read`` in ``doRead``.

``--plot FILE`` also draws how late each tick ran over time, one panel per
approach, as a PNG (needs matplotlib: the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import NamedTuple, Sequence

import _common  # noqa: F401
from _common import StallProbe, make_files, table


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def naive_reader_load(reactor, path: str):
    """What people write first: blocking reads in doRead."""
    from twisted.internet import abstract, defer

    class NaiveFileReader(abstract.FileDescriptor):
        def __init__(self, fd):
            abstract.FileDescriptor.__init__(self, reactor)
            self.fd, self.chunks, self.d = fd, [], defer.Deferred()
            self.connected = 1

        def fileno(self):
            return self.fd

        def doRead(self):
            data = os.read(self.fd, 64 * 1024)  # blocks the reactor on slow storage
            if data:
                self.chunks.append(data)
                return None
            self.stopReading()
            os.close(self.fd)
            self.d.callback(b"".join(self.chunks))

    reader = NaiveFileReader(os.open(path, os.O_RDONLY))
    reader.startReading()
    return reader.d


class Series(NamedTuple):
    """One approach's run: the probe's ticks, in seconds."""

    name: str
    elapsed: float
    worst: float
    times: Sequence[float]  # since the approach started
    lateness: Sequence[float]  # how late each of those ticks ran


async def run(reactor, mount: str, names: list[str], results: list, series: list | None = None) -> None:
    from twisted.internet import defer, threads

    from asyncfile import FileLoader

    paths = [os.path.join(mount, n) for n in names]
    loaders = {}
    for engine in ("nowait", "threads", "io_uring"):
        try:
            loaders[engine] = FileLoader(reactor, engine=engine)
        except ValueError:  # not supported here (io_uring: kernel, seccomp)
            pass
    sem = defer.DeferredSemaphore(64)
    approaches = {
        **{f"asyncfile ({engine} engine)": loader.load for engine, loader in loaders.items()},
        "deferToThread + DeferredSemaphore": lambda p: sem.run(threads.deferToThread, read, p),
        "naive FileReader (os.read in doRead)": lambda p: naive_reader_load(reactor, p),
        "blocking read in the reactor": lambda p: defer.succeed(read(p)),
    }
    try:
        for name, load in approaches.items():
            with StallProbe(reactor) as probe:
                started = time.perf_counter()
                data = await defer.gatherResults([load(p) for p in paths])
                elapsed = time.perf_counter() - started
            assert all(len(d) == os.path.getsize(p) for d, p in zip(data, paths))
            results.append([name, f"{elapsed:.2f} s", f"{probe.worst * 1000:.1f} ms"])
            if series is not None:
                series.append(Series(name, elapsed, probe.worst, probe.times, probe.lateness))
    finally:
        # close() may return a Deferred (or None): wait for either.
        await defer.gatherResults([defer.maybeDeferred(loader.close) for loader in loaders.values()])


# The figure's panels: the baselines on top, asyncfile's engines below.
FIGURE_ORDER = (
    "naive FileReader (os.read in doRead)",
    "blocking read in the reactor",
    "deferToThread + DeferredSemaphore",
    "asyncfile (nowait engine)",
    "asyncfile (threads engine)",
    "asyncfile (io_uring engine)",
)


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def plot_lateness(series: Sequence[Series], path: str, title: str, interval: float = 0.001) -> None:
    """Small multiples of the stall probe's lateness over time, written as a PNG.

    One panel per approach (in *series*' order, three to a row), all on one
    log-scale y axis in ms: a dot per tick at the time it ran, as high as it
    was late (on-time and early ticks sit on the 0.01 ms floor); ticks more
    than 1 ms late get a stem and a shaded band over the time the reactor
    was stuck before them.  1200x800 px at 100 dpi.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    floor = 0.01  # ms: the bottom of the log axis; earlier (or on-time) ticks sit on it
    peak = max([floor * 10, *(max(s.lateness, default=0) * 1000 for s in series)])
    top = 10 ** math.ceil(math.log10(peak * 1.5))
    ncols = min(3, max(1, len(series)))
    nrows = max(1, math.ceil(len(series) / ncols))
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()

    def tick_label(value: float, _pos: int) -> str:
        if value >= 1000:
            return f"{value / 1000:g} s"
        return f"{value:g} ms"

    for ax, s in zip(axes, series):
        color = ("tab:green" if s.name.startswith("asyncfile")
                 else "tab:blue" if "Thread" in s.name else "tab:red")
        times = list(s.times)
        late_ms = [max(floor, late * 1000) for late in s.lateness]
        for t, late in zip(times, late_ms):  # the stretch the reactor was stuck
            if late > 1:
                ax.axvspan(max(0.0, t - late / 1000), t, ymax=math.log(late / floor) / math.log(top / floor),
                           color=color, alpha=0.15, linewidth=0)
        stalls = [(t, late) for t, late in zip(times, late_ms) if late > 1]
        ax.vlines([t for t, _ in stalls], floor, [late for _, late in stalls], color=color, linewidth=1)
        ax.plot(times, late_ms, "o", color=color, markersize=2.5)
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.set_xlim(0, max([s.elapsed, *times]) * 1.04 or 1)
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(FuncFormatter(tick_label))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", axis="y", color="0.85", linewidth=0.6)
        ax.set_title(f"{s.name}\n{s.elapsed:.2f} s total, worst stall {_ms(s.worst)}",
                     fontsize=10.5, color="darkred" if s.worst >= 0.1 else "black")
        expected = max(1, round(s.elapsed / interval))
        ax.text(0.98, 0.96, f"{len(times):,} tick{'s' * (len(times) != 1)} ran (~{expected:,} if never late)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8.5, color="0.35")
        ax.tick_params(labelsize=9)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    fig.supxlabel("seconds since the approach started", fontsize=10.5)
    fig.supylabel(f"how late the {interval * 1000:g} ms LoopingCall ran (log scale)", fontsize=10.5)
    fig.savefig(path, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--plot", metavar="FILE", help="also draw the reactor's lateness over time as a PNG")
    args = parser.parse_args()

    from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason:
        raise SystemExit(f"FUSE unavailable: {reason}")
    source = tempfile.mkdtemp(prefix="asyncfile-bench-slow-")
    names = [os.path.basename(p) for p in make_files(source, args.files, args.size)]
    results: list = []
    series: list[Series] = []
    with SlowFS(source, read_delay=args.delay) as mount:
        from twisted.internet import defer, task

        def go(reactor):
            return defer.ensureDeferred(run(reactor, mount, names, results, series))

        try:
            task.react(go)
        except SystemExit:
            pass
    print(f"{args.files} files of {args.size:,} bytes on a FUSE mount where every read sleeps "
          f"{args.delay * 1000:.0f} ms, all asked for at once\n")
    print(table(["approach", "time", "worst stall"], results))
    if args.plot:
        rank = {name: i for i, name in enumerate(FIGURE_ORDER)}
        ordered = sorted(series, key=lambda s: rank.get(s.name, len(rank)))
        size = (f"{args.size / 2**20:g} MiB" if args.size >= 2**20
                else f"{args.size / 2**10:g} KiB" if args.size >= 2**10 else f"{args.size} B")
        plot_lateness(ordered, args.plot,
                      f"Reactor lateness while {args.files} × {size} files load at once from a FUSE mount, "
                      f"{args.delay * 1000:g} ms per read")
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
