"""Micro-measurement (not a test): cached small-file loads through the io_uring
binding vs a plain blocking loop.

Why: the binding is pure Python, so its per-operation cost (struct packing,
ctypes calls, dict bookkeeping) decides whether io_uring beats a thread pool;
this measures files/s for openat+read+close pipelines with N files in flight.

    python bench/uring_ring.py [--files 2000] [--size 16384] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncfile.engines._uring import Ring, check, probe  # noqa: E402
from _common import warm as builtin_open_loop  # noqa: E402  (an open().read() loop; returns the bytes read)

READ_SIZE = 65536
OPEN, READ, CLOSE = 0, 1, 2


def make_files(root: Path, count: int, size: int) -> list[bytes]:
    paths = []
    for i in range(count):
        path = root / f"f{i:05d}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(os.fsencode(path))
    return paths


def plain_loop(paths: list[bytes]) -> int:
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            total += len(os.read(fd, READ_SIZE))
        finally:
            os.close(fd)
    return total


def ring_pipeline(ring: Ring, paths: list[bytes], window: int,
                  wait: Callable[[], list[tuple[int, object]]]) -> int:
    """openat -> read -> close per file, ``window`` files in flight.

    user_data = file index * 4 + stage. Every round prepares what it can,
    submits once, then waits for completions.
    """
    pool = [bytearray(READ_SIZE) for _ in range(window)]
    free = list(range(window))
    slot_of: dict[int, int] = {}
    fd_of: dict[int, int] = {}
    total = 0
    nxt = 0
    done = 0
    queue: list[tuple[int, int]] = []  # (index, stage) waiting for SQ space
    count = len(paths)
    while done < count:
        while nxt < count and free and len(queue) < window:
            slot_of[nxt] = free.pop()
            queue.append((nxt, OPEN))
            nxt += 1
        while queue and ring.sq_space():
            i, stage = queue.pop()
            if stage == OPEN:
                ring.prep_openat(paths[i], os.O_RDONLY, 0, i * 4)
            elif stage == READ:
                ring.prep_read(fd_of[i], pool[slot_of[i]], 0, i * 4 + 1)
            else:
                ring.prep_close(fd_of.pop(i), i * 4 + 2)
        ring.submit()
        for user_data, res in wait():
            i, stage = divmod(user_data, 4)
            if stage == OPEN:
                fd_of[i] = check(res, paths[i])
                queue.append((i, READ))
            elif stage == READ:
                n = check(res)
                total += len(bytes(pool[slot_of[i]][:n]))  # hand a copy on
                queue.append((i, CLOSE))
            else:
                check(res)
                free.append(slot_of.pop(i))
                done += 1
    return total


def nop_throughput(ring: Ring, ops: int, batch: int) -> int:
    for start in range(0, ops, batch):
        for ud in range(start, min(ops, start + batch)):
            ring.prep_nop(ud)
        ring.submit()
        got = 0
        want = min(ops, start + batch) - start
        while got < want:
            got += len(ring.wait(want - got, timeout=5.0))
    return ops


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None,
                        help="where to create the files (default: a temp dir)")
    args = parser.parse_args()
    reason = probe()
    if reason:
        sys.exit(f"io_uring unusable: {reason}")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = make_files(Path(tmp), args.files, args.size)
        expected = args.files * args.size
        assert plain_loop(paths) == expected  # also warms the page cache
        rows = []

        def row(name: str, fn: Callable[[], int]) -> None:
            assert fn() == expected, name
            best, median = best_of(args.repeat, fn)
            rows.append((name, args.files / best, args.files / median))

        row("blocking os.open/os.read/os.close loop", lambda: plain_loop(paths))
        row("blocking open().read() loop", lambda: builtin_open_loop(paths))
        for entries, window in ((256, 64), (256, 128), (512, 256)):
            with Ring(entries) as ring:
                row(f"ring, {window} in flight, Ring.wait",
                    lambda: ring_pipeline(
                        ring, paths, window,
                        lambda: ring.wait(1, timeout=5.0)))
            with Ring(entries) as ring:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                ring.register_eventfd(efd)
                poller = select.poll()
                poller.register(efd, select.POLLIN)

                def via_eventfd() -> list[tuple[int, object]]:
                    # What a reactor does: sleep on the eventfd, then reap.
                    while True:
                        done = ring.reap()
                        if done:
                            return done
                        if poller.poll(5000):
                            os.eventfd_read(efd)

                row(f"ring, {window} in flight, eventfd poll",
                    lambda: ring_pipeline(ring, paths, window, via_eventfd))
                ring.close()
                os.close(efd)

    print(f"{args.files} cached files of {args.size} bytes, "
          f"best / median of {args.repeat}")
    for name, best, median in rows:
        print(f"  {name:45s} {best:9,.0f} {median:9,.0f} files/s")

    with Ring(256) as ring:
        ops = 200_000
        best, median = best_of(args.repeat, lambda: nop_throughput(ring, ops, 256))
        print(f"  {'NOP, 256 per submit (per-op binding cost)':45s} "
              f"{ops / best:9,.0f} {ops / median:9,.0f} ops/s")


if __name__ == "__main__":
    main()
