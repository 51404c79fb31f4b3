"""Small cached files: asyncfile vs the usual ways of reading files on an event loop.

    python bench/small_files.py [--files 2000] [--size 16384] [--in-flight 64] [--rounds 5]

Every approach reads the same cached files through the same driver: N
workers, each loading its next file as soon as the last one arrived, so N
loads are in flight.  Rounds alternate between approaches and the best round
of each is shown, so machine noise hits all of them alike.  "worst stall" is
how late a 1 ms LoopingCall ran while the files loaded (Twisted approaches
only; asyncio rows have no reactor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any, Awaitable, Callable

import _common  # noqa: F401  (puts the project on sys.path)
from _common import StallProbe, make_files, table, warm


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def asyncio_window(load: Callable[[str], Awaitable[Any]], paths: list[str], in_flight: int) -> None:
    it = iter(paths)

    async def worker() -> None:
        for p in it:
            await load(p)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


def asyncio_rate(name: str, paths: list[str], in_flight: int) -> float | None:
    if name == "aiofiles on asyncio":
        try:
            import aiofiles
        except ImportError:
            return None

        async def load(p: str) -> bytes:
            async with aiofiles.open(p, "rb") as f:
                return await f.read()
    else:
        async def load(p: str) -> bytes:
            return await asyncio.to_thread(read, p)

    started = time.perf_counter()
    asyncio.run(asyncio_window(load, paths, in_flight))
    return time.perf_counter() - started


async def twisted_window(load: Callable[[str], Any], paths: list[str], in_flight: int) -> None:
    from twisted.internet import defer

    it = iter(paths)

    async def worker() -> None:
        for p in it:
            await load(p)

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(in_flight)])


async def twisted_rounds(reactor: Any, paths: list[str], in_flight: int, rounds: int,
                         results: dict[str, tuple[float, float | None]]) -> None:
    from twisted.internet import defer, threads

    from asyncfile import FileLoader

    nowait = FileLoader(reactor, max_open=in_flight, engine="nowait")
    pooled = FileLoader(reactor, max_open=in_flight, engine="threads")
    sem = defer.DeferredSemaphore(in_flight)

    async def blocking(p: str) -> bytes:
        return read(p)

    approaches = {
        "asyncfile (nowait engine)": nowait.load,
        "asyncfile (threads engine)": pooled.load,
        "deferToThread + DeferredSemaphore": lambda p: sem.run(threads.deferToThread, read, p),
        "blocking read in the reactor": blocking,
    }
    for _ in range(rounds):
        for name, load in approaches.items():
            with StallProbe(reactor) as probe:
                started = time.perf_counter()
                await twisted_window(load, paths, in_flight)
                elapsed = time.perf_counter() - started
            best = results.get(name)
            worst = probe.worst if best is None else max(best[1], probe.worst)
            results[name] = (min(elapsed, best[0]) if best else elapsed, worst)
    await defer.gatherResults([nowait.close(), pooled.close()])
    print_table(len(paths), results)


def print_table(count: int, results: dict[str, tuple[float, float | None]]) -> None:
    rate = {name: count / elapsed for name, (elapsed, _) in results.items()}
    base_dtt = rate.get("deferToThread + DeferredSemaphore")
    base_aio = rate.get("aiofiles on asyncio")
    rows = []
    for name, (_, stall) in sorted(results.items(), key=lambda kv: kv[1][0]):
        rows.append([
            name,
            round(rate[name]),
            f"{rate[name] / base_dtt:.2f}x" if base_dtt else "-",
            f"{rate[name] / base_aio:.2f}x" if base_aio else "-",
            "-" if stall is None else f"{stall * 1000:.1f} ms",
        ])
    print(table(["approach", "files/s", "vs deferToThread", "vs aiofiles", "worst stall"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16 * 1024)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "asyncfile-bench-small"))
    args = parser.parse_args()

    paths = make_files(args.dir, args.files, args.size)
    warm(paths)
    print(f"{args.files} cached files of {args.size:,} bytes, {args.in_flight} in flight, "
          f"best of {args.rounds} rounds\n")
    results: dict[str, tuple[float, float | None]] = {}
    for _ in range(args.rounds):
        for name in ("aiofiles on asyncio", "asyncio.to_thread"):
            elapsed = asyncio_rate(name, paths, args.in_flight)
            if elapsed is not None and (name not in results or elapsed < results[name][0]):
                results[name] = (elapsed, None)

    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(
        twisted_rounds(reactor, paths, args.in_flight, args.rounds, results)))


if __name__ == "__main__":
    main()
