"""The pool backend: blocking file calls in asyncfile's own I/O threads."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.internet import defer
from zope.interface import implementer

from .base import IBackend, Op, OpenedFile, Root, open_regular, open_root, pread_into

__all__ = ["PoolBackend"]


@implementer(IBackend)
class PoolBackend:
    """Opens, reads and closes in a bounded pool of threads (``IOPool``).

    Works on every platform and file system; each call costs a thread hop
    (about 50 µs here), which is why the inline path is preferred on Linux.
    A job cancelled before a thread took it never runs; one that runs is
    always waited for, so the owner of a descriptor knows when it is free.
    """

    name = "pool"

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.pool_reads = 0
        self.pool_opens = 0
        self.pool_closes = 0

    def _run(self, fn: Callable[..., Any], *args: Any) -> Op:
        pool = self.pool
        d, job = pool.submit(fn, *args)
        return Op(lambda: pool.withdraw(job), d)

    def open(self, path: str, root: Root | None, slow: bool) -> Op:
        self.pool_opens += 1
        op = self._run(_open_in_pool, path, root)
        return op

    def open_root(self, path: str, no_symlinks: bool) -> Op:
        return self._run(open_root, path, no_symlinks)

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> Op:
        self.pool_reads += 1
        return self._run(pread_into, f.fd, view, offset)

    def close(self, f: OpenedFile) -> Op:
        # close() can wait for the server on network file systems (NFS, FUSE flush).
        self.pool_closes += 1
        return self._run(os.close, f.fd)

    def stats(self) -> dict[str, Any]:
        return {"pool_reads": self.pool_reads, "pool_opens": self.pool_opens, **self.pool.stats()}

    def stop(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.pool.stop)


def _open_in_pool(path: str, root: Root | None) -> OpenedFile:
    started = time.perf_counter()
    f = open_regular(path, root)
    f.open_seconds = time.perf_counter() - started or 1e-9
    f.via = "pool"
    return f
