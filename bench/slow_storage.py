"""Slow storage: how long the reactor stalls while files load from it.

    python bench/slow_storage.py [--files 20] [--size 1048576] [--delay 0.05]

A real FUSE file system (asyncfile.testing.slowfs) whose every read sleeps
``--delay`` seconds stands in for a slow disk or NFS.  All files are asked
for at once; "worst stall" is how late a 1 ms LoopingCall ran meanwhile.
The naive FileReader is the classic pattern: a FileDescriptor on
``reactor.addReader`` calling ``os.read`` in ``doRead``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

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


async def run(reactor, mount: str, names: list[str], results: list) -> None:
    from twisted.internet import defer, threads

    from asyncfile import FileLoader

    paths = [os.path.join(mount, n) for n in names]
    from asyncfile.engines import _uring

    nowait = FileLoader(reactor, engine="nowait")
    pooled = FileLoader(reactor, engine="threads")
    uring = FileLoader(reactor, engine="io_uring") if _uring.probe() is None else None
    sem = defer.DeferredSemaphore(64)
    approaches = {
        "asyncfile (nowait engine)": nowait.load,
        "asyncfile (threads engine)": pooled.load,
        **({"asyncfile (io_uring engine)": uring.load} if uring is not None else {}),
        "deferToThread + DeferredSemaphore": lambda p: sem.run(threads.deferToThread, read, p),
        "naive FileReader (os.read in doRead)": lambda p: naive_reader_load(reactor, p),
        "blocking read in the reactor": lambda p: defer.succeed(read(p)),
    }
    for name, load in approaches.items():
        with StallProbe(reactor) as probe:
            started = time.perf_counter()
            data = await defer.gatherResults([load(p) for p in paths])
            elapsed = time.perf_counter() - started
        assert all(len(d) == os.path.getsize(p) for d, p in zip(data, paths))
        results.append([name, f"{elapsed:.2f} s", f"{probe.worst * 1000:.1f} ms"])
    for loader in (nowait, pooled, uring):
        if loader is not None:
            loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()

    from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason:
        raise SystemExit(f"FUSE unavailable: {reason}")
    source = tempfile.mkdtemp(prefix="asyncfile-bench-slow-")
    names = [os.path.basename(p) for p in make_files(source, args.files, args.size)]
    results: list = []
    with SlowFS(source, read_delay=args.delay) as mount:
        from twisted.internet import defer, task

        def go(reactor):
            return defer.ensureDeferred(run(reactor, mount, names, results))

        try:
            task.react(go)
        except SystemExit:
            pass
    print(f"{args.files} files of {args.size:,} bytes on a FUSE mount where every read sleeps "
          f"{args.delay * 1000:.0f} ms, all asked for at once\n")
    print(table(["approach", "time", "worst stall"], results))


if __name__ == "__main__":
    main()
