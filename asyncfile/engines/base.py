"""The engine contract, and what every engine shares: opening and the I/O pool."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface

from ..errors import NotRegularFile

__all__ = ["IFileEngine", "OpenedFile", "IOPool", "open_regular", "OPEN_FLAGS"]

# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused).
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class OpenedFile:
    """An open regular file: its descriptor, the size ``fstat`` saw, and how to read it."""

    __slots__ = ("fd", "size", "dev", "path", "inline", "nowait")

    def __init__(self, fd: int, size: int, dev: int, path: str) -> None:
        self.fd = fd
        self.size = size
        self.dev = dev
        self.path = path
        self.inline = False  # may be read in the reactor thread without blocking
        self.nowait = False  # needs RWF_NOWAIT for that (page cache) vs memory-backed


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


def check_regular(mode: int, path: str) -> None:
    """Raise the error a reader of a non-regular file should get."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    raise NotRegularFile(_kind(mode), path)


def open_regular(path: str) -> OpenedFile:
    """Blocking ``open`` + ``fstat``; the descriptor is closed again on any error."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a device with no driver
            check_regular(os.stat(path).st_mode, path)
        raise
    try:
        st = os.fstat(fd)
        check_regular(st.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, st.st_dev, path)


class IOPool:
    """A dedicated, bounded thread pool for blocking file calls.

    Not the reactor's default pool: that one also serves DNS lookups, and a
    burst of slow reads must not starve them.  Started on first use, stopped
    at reactor shutdown.
    """

    def __init__(self, reactor: Any, max_threads: int = 16, name: str = "asyncfile-io") -> None:
        self.reactor = reactor
        self.max_threads = max_threads
        self._pool: ThreadPool | None = None
        self._name = name
        self.calls = 0

    def _ensure(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(0, self.max_threads, name=self._name)
            self._pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._pool

    def run(self, f: Callable[..., Any], *args: Any, on_orphan: Callable[[Any], None] | None = None) -> defer.Deferred[Any]:
        """``f(*args)`` in the pool.  Cancelling cannot stop a running system call,
        so a result that arrives after cancellation goes to ``on_orphan``
        (which closes a descriptor, say) instead of being lost."""
        pool = self._ensure()
        self.calls += 1
        cancelled = []
        result: defer.Deferred[Any] = defer.Deferred(lambda d: cancelled.append(True))

        def deliver(ok: bool, value: Any) -> None:
            if cancelled:
                if ok and on_orphan is not None:
                    on_orphan(value)
                return
            if ok:
                result.callback(value)
            else:
                result.errback(value)

        def work() -> None:
            try:
                value = f(*args)
                ok = True
            except BaseException:
                value, ok = Failure(), False
            self.reactor.callFromThread(deliver, ok, value)

        pool.callInThread(work)
        return result

    def stats(self) -> dict[str, int]:
        pool = self._pool
        return {
            "io_threads": self.max_threads,
            "io_threads_busy": len(pool.working) if pool is not None else 0,
            "io_queue": pool._queue.qsize() if pool is not None else 0,
        }

    def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass
            pool.stop()


class IFileEngine(Interface):
    """How an engine opens, reads and closes files without blocking the reactor."""

    name = Attribute("The engine's name, as in FileLoader(engine=...) and stats()")

    def open(path: str) -> "defer.Deferred[OpenedFile]":
        """Open a regular file for reading.  May fire synchronously when
        opening cannot block (a local file system); ``OpenedFile.inline``
        says whether ``read_inline`` may be used for it."""

    def read_inline(f: OpenedFile, view: memoryview, offset: int) -> int:
        """Read into ``view`` at ``offset`` in the reactor thread, without
        blocking: raise ``BlockingIOError`` when the data is not at hand."""

    def read(f: OpenedFile, view: memoryview, offset: int) -> "defer.Deferred[int]":
        """Read into ``view`` at ``offset`` off the reactor thread.  The view
        stays referenced until the read has finished, even if cancelled."""

    def close(f: OpenedFile) -> None:
        """Close the file's descriptor (never while a read on it runs)."""

    def stats() -> dict:
        """Engine counters for FileLoader.stats()."""

    def stop() -> None:
        """Release threads and kernel resources."""
