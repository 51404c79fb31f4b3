"""Shared pieces of the benchmarks: a reactor-stall probe and result tables."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StallProbe:
    """A 1 ms LoopingCall: ``worst`` is how late the reactor ran it, at most.

    It also keeps the time series: ``times[i]`` (seconds since the probe
    started) and ``lateness[i]`` (seconds) for every tick after the first,
    plus one last sample at exit.
    """

    def __init__(self, reactor: Any, interval: float = 0.001) -> None:
        from twisted.internet import task

        self.reactor = reactor
        self.interval = interval
        self.worst = 0.0
        self.times: list[float] = []
        self.lateness: list[float] = []
        self._started = 0.0
        self._last: float | None = None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def _record(self, now: float) -> None:
        late = now - self._last - self.interval
        self.worst = max(self.worst, late)
        self.times.append(now - self._started)
        self.lateness.append(late)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._record(now)
        self._last = now

    def __enter__(self) -> "StallProbe":
        self._started = time.perf_counter()
        self._loop.start(self.interval)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.stop()
        # A blocking run never let the probe tick: count its whole length.
        if self._last is not None:
            self._record(time.perf_counter())


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (it pastes into the README as it is)."""
    rows = [[f"{c:,.1f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c) for c in r]
            for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def make_files(directory: str, count: int, size: int) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(directory, f"f{i:05d}")
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            with open(path, "wb") as f:
                f.write(os.urandom(size))
        paths.append(path)
    return paths


def warm(paths: Iterable[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            total += len(f.read())
    return total
