"""Linux: page-cache reads inline with ``preadv(RWF_NOWAIT)``, the rest in the pool."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..mounts import MountTable, shared_mount_table
from .. import _buffers
from .base import OPEN_FLAGS, IFileEngine, IOPool, OpenedFile, check_regular, open_regular
from .threads import ThreadsEngine

__all__ = ["NowaitEngine", "nowait_supported"]

RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)

# When opens on a mount average (EWMA) more than this, open there in the
# pool; when they average less than a quarter of it again, open inline.  An
# average, not one sample: a single GC pause or scheduler hiccup must not
# send a local disk's opens to threads.
SLOW_OPEN_SECONDS = 0.001
_EWMA_WEIGHT = 0.1


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
        self._open_cost: dict[str, float] = {}
        self._by_dir: dict[str, tuple[bool, str | None]] = {}
        self._by_dev: dict[int, tuple[bool, bool]] = {}
        self._generation = self.mounts.generation
        self.nowait_fallbacks = 0

    def _opens_slowly(self, path: str) -> tuple[bool, str | None]:
        # Cached per directory: this runs for every load, so it must cost
        # less than the open itself.
        mounts = self.mounts
        if time.monotonic() >= mounts.next_check:
            mounts.refresh()
            if mounts.generation != self._generation:
                self._forget()
        policy = self._by_dir.get(path.rpartition("/")[0])
        if policy is None:
            directory = path.rpartition("/")[0]
            m = mounts.for_path(path)
            policy = (False, None) if m is None else (m.slow_open or m.mount_point in self._slow_points,
                                                      m.mount_point)
            if directory.startswith("/") and (m is None or m.mount_point != path) and len(self._by_dir) < 4096:
                self._by_dir[directory] = policy
        return policy

    def _forget(self) -> None:
        """Drop cached policies (the mount table or what we learned changed)."""
        self._generation = self.mounts.generation
        self._by_dir.clear()
        self._by_dev.clear()

    def _classify(self, f: OpenedFile) -> OpenedFile:
        flags = self._by_dev.get(f.dev)
        if flags is None:
            m = self.mounts.for_dev(f.dev)
            if m is not None and m.memory_backed:
                flags = (True, False)
            elif (m is not None and m.slow_open) or f.dev in self._refusing_devs:
                flags = (False, False)
            else:
                flags = (True, True)
            self._by_dev[f.dev] = flags
        f.inline, f.nowait = flags
        return f

    def _timed_open(self, path: str) -> tuple[OpenedFile, float]:
        started = time.perf_counter()
        return open_regular(path), time.perf_counter() - started

    def _record_open(self, point: str | None, seconds: float) -> None:
        if point is None:
            return
        cost = self._open_cost.get(point, 0.0) * (1 - _EWMA_WEIGHT) + seconds * _EWMA_WEIGHT
        self._open_cost[point] = cost
        if point in self._slow_points:
            if cost < SLOW_OPEN_SECONDS / 4:
                self._slow_points.discard(point)
                self._forget()
                self.log.info("open() on {mount} is fast again: opening inline", mount=point)
        elif cost > SLOW_OPEN_SECONDS:
            self._slow_points.add(point)
            self._forget()
            self.log.info("open() on {mount} averages {ms:.1f} ms: opening there in the I/O pool",
                          mount=point, ms=cost * 1000)

    def read_small(self, path: str, offset: int, length: int | None, max_size: int,
                   probe: memoryview) -> bytes | OpenedFile | None:
        """The whole cached-small-file load in one call: open, fstat, one
        ``RWF_NOWAIT`` read of the range, a read confirming EOF, close.

        This is the hot path of a file server; it is written flat, on
        purpose, so that it costs little more than a blocking read.  Returns
        the bytes; or the open file when it is not small, cached and
        inline-readable (the caller reads it the general way); or None when
        its mount opens slowly (the caller uses ``open``).  Raises the
        ``OSError`` of the open.  ``probe`` is a 1-byte scratch view.
        """
        slow, point = self._opens_slowly(path)
        if slow:
            return None
        self.inline_opens += 1
        started = time.perf_counter()
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return open_regular(path)  # raises the socket/device error
            raise
        st = os.fstat(fd)
        self._record_open(point, time.perf_counter() - started)
        mode = st.st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            check_regular(mode, path)
        dev = st.st_dev
        flags = self._by_dev.get(dev)
        size = st.st_size
        expected = size - offset if size > offset else 0
        if length is not None and length < expected:
            expected = length
        if flags is None or not flags[1] or expected > max_size:
            return self._classify(OpenedFile(fd, size, dev, path))
        obj, view = _buffers.allocate(expected)
        try:
            n = os.preadv(fd, [view], offset, RWF_NOWAIT) if expected else 0
            if n != expected or (expected != length and os.preadv(fd, [probe], offset + n, RWF_NOWAIT)):
                # a short read, or the file grew: the general path
                return self._classify(OpenedFile(fd, size, dev, path))
        except OSError:  # not all cached, or refused: the general path handles it
            return self._classify(OpenedFile(fd, size, dev, path))
        os.close(fd)
        self.inline_reads += 2
        return _buffers.finish(obj, view, n)

    def open(self, path: str) -> defer.Deferred[OpenedFile] | OpenedFile:
        slow, point = self._opens_slowly(path)
        if slow:
            return self._open_slowly(path)
        self.inline_opens += 1
        started = time.perf_counter()
        try:
            f = open_regular(path)
        finally:
            self._record_open(point, time.perf_counter() - started)
        return self._classify(f)

    def _open_slowly(self, path: str) -> defer.Deferred[OpenedFile]:
        """Open where ``open()`` may block (network, FUSE, measured slow): in the I/O pool."""
        self.pool_opens += 1
        point = self._opens_slowly(path)[1]

        def opened(result: tuple[OpenedFile, float]) -> OpenedFile:
            f, seconds = result
            self._record_open(point, seconds)
            return self._classify(f)

        return self.pool.run(self._timed_open, path, on_orphan=lambda r: os.close(r[0].fd)).addCallback(opened)

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
            self._by_dev[f.dev] = (False, False)
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
