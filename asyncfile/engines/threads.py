"""The pool backend: blocking file calls in asyncfile's own I/O threads."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from .base import IBackend, Op, OpenedFile, Root, open_regular, open_root, pread_into

__all__ = ["PoolBackend"]

_QUEUED, _RUNNING, _WITHDRAWN = 0, 1, 2


class _Withdrawn(Exception):
    """A job withdrawn before it started (the pool reached it anyway)."""


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
        lock = threading.Lock()
        state = [_QUEUED]

        def job() -> Any:
            with lock:
                if state[0] == _WITHDRAWN:
                    raise _Withdrawn()
                state[0] = _RUNNING
            return fn(*args)

        def withdraw() -> None:
            with lock:
                if state[0] != _QUEUED:
                    return  # running: its real outcome follows
                state[0] = _WITHDRAWN
            queued.cancel()  # the pool drops it (or the job sees _WITHDRAWN)
            op.deferred.errback(Failure(defer.CancelledError()))

        def deliver(outcome: Any) -> None:
            if state[0] == _WITHDRAWN:
                return
            if isinstance(outcome, Failure):
                op.deferred.errback(outcome)
            else:
                op.deferred.callback(outcome)

        op = Op(withdraw)
        queued = self.pool.run(job)
        queued.addBoth(deliver)
        return op

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
    f = open_regular(path, root)
    f.via = "pool"
    return f
