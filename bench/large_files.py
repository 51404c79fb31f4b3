"""Large cached files from a real corpus: asyncfile's throughput vs a plain ``os.readv`` loop.

    python bench/large_files.py CORPUS_DIR [--rounds 5] [--in-flight 4]

CORPUS_DIR: e.g. made by ``../shared/tools/fetch-corpus DIR`` (photographs
and wallpapers, up to 5120x2880).  Files are read once first so they are
cached.  The baseline allocates a buffer per file from ``fstat`` and fills
it with ``os.readv`` in a loop, in one thread, blocking: the fastest a
single thread can copy from the page cache.  "worst stall" is how late a
1 ms LoopingCall ran during the asyncfile runs.
"""

from __future__ import annotations

import argparse
import os
import time

import _common  # noqa: F401
from _common import StallProbe, table, warm

READ_CHUNK = 1024 * 1024


def readv_loop(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.readv(fd, [view[got:got + READ_CHUNK]])
            if n == 0:
                break
            got += n
        return got
    finally:
        os.close(fd)


def corpus(directory: str) -> list[str]:
    paths = [os.path.join(directory, name) for name in sorted(os.listdir(directory))
             if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))]
    return [p for p in paths if os.path.getsize(p) >= 64 * 1024]


async def run(reactor, paths: list[str], rounds: int, in_flight: int) -> None:
    from twisted.internet import defer

    from asyncfile import FileLoader

    total = sum(os.path.getsize(p) for p in paths)
    loaders = {
        f"asyncfile nowait, chunk {size // 1024} KiB": FileLoader(reactor, max_open=in_flight, chunk_size=size,
                                                                  engine="nowait")
        for size in (256 * 1024, 1024 * 1024, 4 * 1024 * 1024)
    }
    loaders["asyncfile threads, chunk 1024 KiB"] = FileLoader(reactor, max_open=in_flight, chunk_size=1024 * 1024,
                                                              engine="threads")
    best: dict[str, list[float]] = {}
    for _ in range(rounds):
        started = time.perf_counter()
        for p in paths:
            readv_loop(p)
        elapsed = time.perf_counter() - started
        row = best.setdefault("os.readv loop (blocking, baseline)", [elapsed, float("nan")])
        row[0] = min(row[0], elapsed)
        for name, loader in loaders.items():
            with StallProbe(reactor) as probe:
                started = time.perf_counter()
                results = await defer.gatherResults([loader.load(p) for p in paths])
                elapsed = time.perf_counter() - started
            assert sum(map(len, results)) == total
            del results
            row = best.setdefault(name, [elapsed, probe.worst])
            row[0] = min(row[0], elapsed)
            row[1] = max(row[1], probe.worst)
    await defer.gatherResults([loader.close() for loader in loaders.values()])
    base = total / best["os.readv loop (blocking, baseline)"][0]
    rows = []
    for name, (elapsed, stall) in best.items():
        rate = total / elapsed
        rows.append([name, f"{rate / 1e9:.2f}", f"{rate / base * 100:.0f}%",
                     "-" if stall != stall else f"{stall * 1000:.1f} ms"])
    print(f"{len(paths)} cached files, {total / 1e6:.0f} MB in all, {in_flight} in flight, best of {rounds} rounds\n")
    print(table(["approach", "GB/s", "vs os.readv loop", "worst stall"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    paths = corpus(args.corpus)
    if not paths:
        parser.error(f"no files of 64 KiB or more in {args.corpus}")
    warm(paths)

    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, paths, args.rounds, args.in_flight)))


if __name__ == "__main__":
    main()
