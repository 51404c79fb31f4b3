"""Linux: page-cache reads inline with ``preadv(RWF_NOWAIT)``, the rest in the pool."""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..mounts import MountTable, shared_mount_table
from .base import IFileEngine, IOPool, OpenedFile, open_regular
from .threads import ThreadsEngine

__all__ = ["NowaitEngine", "nowait_supported"]

RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)

# An inline open slower than this marks its mount as one to open in the pool.
SLOW_OPEN_SECONDS = 0.002


def nowait_supported() -> bool:
    return RWF_NOWAIT is not None and hasattr(os, "preadv")


@implementer(IFileEngine)
class NowaitEngine(ThreadsEngine):
    """Copies cached data in the reactor thread with no thread hop.

    ``preadv(RWF_NOWAIT)`` either copies from the page cache or fails with
    EAGAIN at once; only then does the chunk go to the I/O pool.  File systems
    that refuse the flag (FUSE, NFS, /proc: EOPNOTSUPP) are remembered by
    device and read in the pool; memory-backed ones (tmpfs) are read inline
    without it.  Opens happen inline only on local file systems.
    """

    name = "nowait"
    log = Logger()
    # After a page-cache miss, read the rest of the file off the reactor
    # thread (the io_uring engine does; here the pool's reads are followed
    # by inline attempts again, as readahead often brought the rest in).
    demote_on_miss = False

    def __init__(self, reactor: Any, pool: IOPool, mounts: MountTable | None = None) -> None:
        super().__init__(reactor, pool)
        self.mounts = mounts if mounts is not None else shared_mount_table()
        self._refusing_devs: set[int] = set()
        self._slow_points: set[str] = set()
        self.nowait_fallbacks = 0

    def _opens_slowly(self, path: str) -> tuple[bool, str | None]:
        m = self.mounts.for_path(path)
        if m is None:
            return False, None
        return (m.slow_open or m.mount_point in self._slow_points), m.mount_point

    def _classify(self, f: OpenedFile) -> OpenedFile:
        m = self.mounts.for_dev(f.dev)
        if m is not None and m.memory_backed:
            f.inline, f.nowait = True, False
        elif (m is not None and m.slow_open) or f.dev in self._refusing_devs:
            f.inline = f.nowait = False
        else:
            f.inline = f.nowait = True
        return f

    def open(self, path: str) -> defer.Deferred[OpenedFile]:
        slow, point = self._opens_slowly(path)
        if slow:
            return self._open_slowly(path)
        self.inline_opens += 1
        started = time.perf_counter()
        try:
            f = open_regular(path)
        except OSError:
            return defer.fail()
        finally:
            elapsed = time.perf_counter() - started
            if elapsed > SLOW_OPEN_SECONDS and point is not None and point not in self._slow_points:
                self._slow_points.add(point)
                self.log.info("open() on {mount} took {ms:.1f} ms: opening there in the I/O pool from now on",
                              mount=point, ms=elapsed * 1000)
        return defer.succeed(self._classify(f))

    def _open_slowly(self, path: str) -> defer.Deferred[OpenedFile]:
        """Open where ``open()`` may block (network, FUSE): in the I/O pool."""
        self.pool_opens += 1
        return self.pool.run(open_regular, path, on_orphan=lambda f: os.close(f.fd)).addCallback(self._classify)

    def read_inline(self, f: OpenedFile, view: memoryview, offset: int) -> int:
        if not f.inline:
            raise BlockingIOError(errno.EAGAIN, "read in the pool")
        try:
            if f.nowait:
                n = os.preadv(f.fd, [view], offset, RWF_NOWAIT)
            else:
                n = os.preadv(f.fd, [view], offset)
        except BlockingIOError:
            self.nowait_fallbacks += 1
            if self.demote_on_miss:
                f.inline = False
            raise
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not f.nowait:
                raise
            # This file system refuses RWF_NOWAIT: read its files in the pool.
            self._refusing_devs.add(f.dev)
            f.inline = f.nowait = False
            raise BlockingIOError(errno.EAGAIN, "RWF_NOWAIT not supported here") from None
        self.inline_reads += 1
        return n

    def close(self, f: OpenedFile) -> defer.Deferred[None] | None:
        if f.inline:
            os.close(f.fd)
            return None
        return super().close(f)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "nowait_fallbacks": self.nowait_fallbacks}
