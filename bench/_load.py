"""A closed-loop HTTP/1.1 load generator (asyncio, one thread) with per-request timestamps.

``connections`` keep-alive connections each send their next request as soon
as the last answer arrived, cycling through ``paths``.  The load runs without
a pause through a warm-up and a measured window, then stops sending and lets
the requests in flight finish, so every request alive during the window has a
known start and end.

Why not just count answers in the window (as wrk does): a server that shares
its CPU among all requests in flight (thumbor: every request's steps go to one
thread pool) answers in waves: 64 connections, 64 answers at about the same
moment, then nothing for seconds.  Counting answers in a window of a few waves
is off by up to a whole wave.  ``rate`` here is Little's law over the window:
each request counts for the share of its lifetime that falls inside the
window, so work in progress at either edge is counted in part.  For a server
that answers steadily (imgserver's FIFO queue) it equals the plain count;
``answered_rate`` (the plain count) is reported as well.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

HOST = "127.0.0.1"


@dataclass
class LoadResult:
    window: float
    samples: list[tuple[float, float, str]] = field(repr=False)  # (sent, done, status) relative to window start
    cpu: float = 0.0  # the generator's CPU seconds over the whole run
    wall: float = 0.0

    def _in_window(self) -> list[tuple[float, float, str]]:
        return [s for s in self.samples if s[1] > 0 and s[0] < self.window]

    @property
    def rate(self) -> float:
        """200 answers per second over the window, Little's-law style (see module doc)."""
        total = 0.0
        for sent, done, status in self._in_window():
            if status == "200" and done > sent:
                total += (min(done, self.window) - max(sent, 0.0)) / (done - sent)
        return total / self.window

    @property
    def answered_rate(self) -> float:
        """200 answers that arrived within the window, per second."""
        return sum(1 for _, d, st in self.samples if st == "200" and 0 <= d <= self.window) / self.window

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, done, status in self.samples:
            if 0 <= done <= self.window:
                out[status] = out.get(status, 0) + 1
        return out

    def latencies(self) -> list[float]:
        return sorted(d - s for s, d, st in self.samples if 0 <= d <= self.window and st == "200")

    def percentile_ms(self, p: float) -> float:
        lat = self.latencies()
        if not lat:
            return float("nan")
        return 1000 * lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

    @property
    def failures(self) -> int:
        """Answers in the window other than 200, and errors."""
        return sum(n for st, n in self.statuses().items() if st != "200")


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """(status, keep the connection) after reading one whole response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)[1]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # until the server closes
        return status, False
    return status, headers.get("connection") != "close"


async def _run(port: int, paths: Sequence[str], connections: int, warmup: float, seconds: float,
               timeout: float, mark: Callable[[str], None] | None) -> tuple[float, list[tuple[float, float, str]]]:
    counter = itertools.count()
    start = time.monotonic()
    window_start = start + warmup
    stop_at = window_start + seconds
    samples: list[tuple[float, float, str]] = []
    if mark is not None:
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + warmup, mark, "start")
        loop.call_at(loop.time() + warmup + seconds, mark, "end")

    async def worker() -> None:
        reader = writer = None
        while time.monotonic() < stop_at:
            path = paths[next(counter) % len(paths)]
            sent = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
                status, keep = await asyncio.wait_for(_read_response(reader), timeout)
            except asyncio.TimeoutError:
                status, keep = "client timeout", False
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
                status, keep = f"error: {type(e).__name__}", False
            samples.append((sent - window_start, time.monotonic() - window_start, status))
            if not keep and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.monotonic() - start, samples


def closed_loop(port: int, paths: Sequence[str], *, connections: int, warmup: float, seconds: float,
                timeout: float = 120.0, mark: Callable[[str], None] | None = None) -> LoadResult:
    """Run the load on 127.0.0.1:``port``; the window is ``seconds`` after ``warmup``.

    ``mark("start")`` and ``mark("end")`` are called (in the event loop) when the
    window starts and ends, e.g. to read the server's CPU time."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall, samples = asyncio.run(_run(port, paths, connections, warmup, seconds, timeout, mark))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return LoadResult(window=seconds, samples=samples, cpu=cpu, wall=wall)
