"""The engine contract, and what every engine shares: opening and the I/O pool."""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
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


class _Workers:
    """Threads pulling jobs from one queue, started by each other.

    ``threading.Thread.start()`` waits until the new thread runs, which under
    GIL contention takes up to a switch interval (5 ms): starting 16 threads
    from the reactor thread stalled it 13 ms here.  So the reactor thread
    starts only the first worker; a worker that takes a job while more wait
    and no one is idle starts the next one.
    """

    _STOP = object()

    def __init__(self, max_threads: int, name: str) -> None:
        self.max_threads = max_threads
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.idle = 0
        self.busy = 0
        self._stopping = False

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)
        with self._lock:
            first = not self._threads and not self._stopping
            if first:
                thread = self._new_thread()
        if first:
            thread.start()

    def _new_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"{self.name}-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        return thread

    def _run(self) -> None:
        while True:
            with self._lock:
                self.idle += 1
            job = self._queue.get()
            spawn = None
            with self._lock:
                self.idle -= 1
                if job is self._STOP:
                    return
                self.busy += 1
                if (not self._stopping and self.idle == 0 and not self._queue.empty()
                        and len(self._threads) < self.max_threads):
                    spawn = self._new_thread()
            if spawn is not None:
                spawn.start()
            try:
                job()
            finally:
                with self._lock:
                    self.busy -= 1

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        """Let queued jobs finish, end the threads (waiting at most ``timeout``:
        a read stuck on a dead network mount must not hang shutdown)."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(self._STOP)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class IOPool:
    """A dedicated, bounded pool of threads for blocking file calls.

    Not the reactor's default pool: that one also serves DNS lookups, and a
    burst of slow reads must not starve them.  Threads start on first use and
    end at reactor shutdown.
    """

    def __init__(self, reactor: Any, max_threads: int = 16, name: str = "asyncfile-io") -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.reactor = reactor
        self.max_threads = max_threads
        self._name = name
        self._workers: _Workers | None = None
        self._trigger: Any = None
        self.calls = 0

    def _ensure(self) -> _Workers:
        if self._workers is None:
            self._workers = _Workers(self.max_threads, self._name)
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._workers

    def run(self, f: Callable[..., Any], *args: Any, on_orphan: Callable[[Any], None] | None = None) -> defer.Deferred[Any]:
        """``f(*args)`` in the pool.  Cancelling cannot stop a running system call,
        so a result that arrives after cancellation goes to ``on_orphan``
        (which closes a descriptor, say) instead of being lost."""
        workers = self._ensure()
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

        workers.submit(work)
        return result

    def stats(self) -> dict[str, int]:
        workers = self._workers
        return {
            "io_threads": self.max_threads,
            "io_threads_busy": workers.busy if workers is not None else 0,
            "io_queue": workers.pending() if workers is not None else 0,
        }

    def stop(self) -> None:
        if self._workers is not None:
            workers, self._workers = self._workers, None
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass
            workers.stop()


class IFileEngine(Interface):
    """How an engine opens, reads and closes files without blocking the reactor."""

    name = Attribute("The engine's name, as in FileLoader(engine=...) and stats()")

    def open(path: str) -> "defer.Deferred[OpenedFile] | OpenedFile":
        """Open a regular file for reading.

        Where opening cannot block (a local file system) the engine may open
        inline and return the ``OpenedFile`` itself, or raise its ``OSError``;
        otherwise a Deferred.  ``OpenedFile.inline`` says whether
        ``read_inline`` may be used for it."""

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
