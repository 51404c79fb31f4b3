"""The inline path: what can be done in the reactor thread without blocking.

``preadv(RWF_NOWAIT)`` either copies from the page cache or fails with
EAGAIN at once; only then does a chunk go to the backend.  File systems that
refuse the flag (FUSE, NFS, /proc: EOPNOTSUPP) are remembered by device and
read by the backend; memory-backed ones (tmpfs) are read inline without it.
Opens happen inline only on local file systems whose opens are measured fast.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

from twisted.logger import Logger

from ..mounts import MountTable, shared_mount_table
from .base import OpenedFile, Root, open_regular

__all__ = ["InlineIO", "nowait_supported", "RWF_NOWAIT", "SLOW_OPEN_SECONDS"]

RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)

# Opens slower than this, ``OPEN_STREAK`` times in a row, send a mount's
# opens off the reactor thread (see ``InlineIO.record_open``).
SLOW_OPEN_SECONDS = 0.001
OPEN_STREAK = 8


def nowait_supported() -> bool:
    return RWF_NOWAIT is not None and hasattr(os, "preadv")


class InlineIO:
    """Mount policy (which opens and reads may run inline) and the inline calls."""

    log = Logger()

    def __init__(self, mounts: MountTable | None = None) -> None:
        if not nowait_supported():
            raise ValueError("the inline path needs Linux preadv with RWF_NOWAIT")
        self.mounts = mounts if mounts is not None else shared_mount_table()
        self._refusing_devs: set[int] = set()
        self._slow_points: set[str] = set()
        self._streak: dict[str, int] = {}  # mount point -> opens in a row against its policy
        self._by_dir: dict[str, tuple[bool, str | None]] = {}
        self._by_dev: dict[int, tuple[bool, bool]] = {}
        self._generation = self.mounts.generation
        self.inline_reads = 0
        self.inline_opens = 0
        self.nowait_fallbacks = 0

    # -- where opens may run ----------------------------------------------
    def policy(self, path: str, root: Root | None = None) -> tuple[bool, str | None]:
        """(opens slowly?, mount point) for ``path``; cached per directory:
        this runs for every load, so it must cost less than the open itself."""
        if root is not None:
            path = root.join(path)
        mounts = self.mounts
        if time.monotonic() >= mounts.next_check:
            mounts.refresh()
            if mounts.generation != self._generation:
                self._forget()
        directory = path.rpartition("/")[0]
        policy = self._by_dir.get(directory)
        if policy is None:
            m = mounts.for_path(path)
            policy = (False, None) if m is None else (m.slow_open or m.mount_point in self._slow_points,
                                                      m.mount_point)
            if directory.startswith("/") and (m is None or m.mount_point != path) and len(self._by_dir) < 4096:
                self._by_dir[directory] = policy
        return policy

    def opens_slowly(self, path: str, root: Root | None = None) -> bool:
        return self.policy(path, root)[0]

    def is_slow_mount(self, path: str) -> bool:
        """Whether ``path`` is on a mount where calls may wait for a server."""
        m = self.mounts.for_path(path)
        return m is None or m.slow_open or m.mount_point in self._slow_points

    def _forget(self) -> None:
        """Drop cached policies (the mount table or what we learned changed)."""
        self._generation = self.mounts.generation
        self._by_dir.clear()
        self._by_dev.clear()

    def classify(self, f: OpenedFile) -> OpenedFile:
        """Set whether ``f`` may be read inline, and with RWF_NOWAIT."""
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

    def open_fast(self, path: str, root: Root | None = None) -> OpenedFile | None:
        """``open`` + ``fstat`` in the reactor thread where the mount opens fast;
        None where it does not (the caller opens off the reactor thread)."""
        slow, point = self.policy(path, root)
        if slow:
            return None
        self.inline_opens += 1
        started = time.perf_counter()
        try:
            f = open_regular(path, root)
        finally:
            self.record_open(point, time.perf_counter() - started)
        return self.classify(f)

    def opened_off_thread(self, f: OpenedFile, path: str, root: Root | None = None) -> OpenedFile:
        """Learn from an open done off the reactor thread (so a mount measured
        slow once can be found fast again), then classify the file."""
        if f.open_seconds:
            self.record_open(self.policy(path, root)[1], f.open_seconds)
        return self.classify(f)

    def open(self, path: str, root: Root | None = None) -> OpenedFile:
        """``open`` + ``fstat`` in the reactor thread (local file systems only)."""
        point = self.policy(path, root)[1]
        self.inline_opens += 1
        started = time.perf_counter()
        try:
            f = open_regular(path, root)
        finally:
            self.record_open(point, time.perf_counter() - started)
        return self.classify(f)

    def record_open(self, point: str | None, seconds: float) -> None:
        """Learn how a mount opens: ``OPEN_STREAK`` opens in a row slower than
        ``SLOW_OPEN_SECONDS`` send its opens off the reactor thread; as many in
        a row faster than it bring them back.  A streak, not an average: one
        preemption of the reactor thread on a loaded machine (or a thread
        waiting for the GIL after its open) must not flip a local disk."""
        if point is None:
            return
        slow_now = point in self._slow_points
        if (seconds > SLOW_OPEN_SECONDS) != slow_now:
            streak = self._streak.get(point, 0) + 1
            if streak < OPEN_STREAK:
                self._streak[point] = streak
                return
            self._streak.pop(point, None)
            if slow_now:
                self._slow_points.discard(point)
                self.log.info("open() on {mount} is fast again: opening inline", mount=point)
            else:
                self._slow_points.add(point)
                self.log.info("open() on {mount} took over {ms:.1f} ms {n} times in a row: opening there "
                              "off the reactor thread", mount=point, ms=SLOW_OPEN_SECONDS * 1000, n=OPEN_STREAK)
            self._forget()
        elif point in self._streak:
            del self._streak[point]

    # -- reading ------------------------------------------------------------
    def read(self, f: OpenedFile, view: memoryview, offset: int) -> int:
        """A page-cache copy, or ``BlockingIOError``: never waits for storage."""
        try:
            if f.nowait:
                n = os.preadv(f.fd, [view], offset, RWF_NOWAIT)  # type: ignore[arg-type]  # f.nowait: it exists
            else:
                n = os.preadv(f.fd, [view], offset)
        except BlockingIOError:
            self.nowait_fallbacks += 1
            raise
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or not f.nowait:
                raise
            # This file system refuses RWF_NOWAIT: read its files off-thread.
            self._refusing_devs.add(f.dev)
            self._by_dev[f.dev] = (False, False)
            f.inline = f.nowait = False
            raise BlockingIOError(errno.EAGAIN, "RWF_NOWAIT not supported here") from None
        self.inline_reads += 1
        return n

    def stats(self) -> dict[str, Any]:
        return {"inline_reads": self.inline_reads, "inline_opens": self.inline_opens,
                "nowait_fallbacks": self.nowait_fallbacks}
