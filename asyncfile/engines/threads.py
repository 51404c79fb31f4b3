"""The portable engine: every blocking call in the I/O pool."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from .base import IFileEngine, IOPool, OpenedFile, open_regular

__all__ = ["ThreadsEngine"]


def _close_quietly(f: OpenedFile) -> None:
    os.close(f.fd)


@implementer(IFileEngine)
class ThreadsEngine:
    """Opens, reads and closes in a bounded pool of threads.

    Works on every platform and file system; each call costs a thread hop
    (about 50 µs here), which is why ``nowait`` is preferred on Linux.
    """

    name = "threads"

    def __init__(self, reactor: Any, pool: IOPool) -> None:
        self.reactor = reactor
        self.pool = pool
        self.inline_reads = 0
        self.pool_reads = 0
        self.inline_opens = 0
        self.pool_opens = 0

    def open(self, path: str) -> defer.Deferred[OpenedFile]:
        self.pool_opens += 1
        return self.pool.run(open_regular, path, on_orphan=_close_quietly)

    def read_inline(self, f: OpenedFile, view: memoryview, offset: int) -> int:
        raise BlockingIOError("the threads engine never reads in the reactor thread")

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> defer.Deferred[int]:
        self.pool_reads += 1
        return self.pool.run(os.preadv, f.fd, [view], offset)

    def close(self, f: OpenedFile) -> defer.Deferred[None] | None:
        # close() can wait for the server on network file systems (NFS, FUSE flush).
        return self.pool.run(os.close, f.fd)

    def stats(self) -> dict[str, Any]:
        return {
            "inline_reads": self.inline_reads,
            "pool_reads": self.pool_reads,
            "inline_opens": self.inline_opens,
            "pool_opens": self.pool_opens,
            **self.pool.stats(),
        }

    def stop(self) -> None:
        self.pool.stop()
