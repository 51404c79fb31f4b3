"""``MemoryLoader``: the real ``FileLoader`` over files in a dict, for testing code that uses one.

Like ``treq.testing``, the fake sits *under* the real code: a
``MemoryLoader`` is a ``FileLoader`` whose engine serves a dict instead of
a disk, so limits, queueing, handles, cancellation, ranges and streams are
the real ones.  Reads take a (fake) ``latency`` on a
``twisted.internet.task.Clock``, so timeouts, queueing and cancellation are
tested deterministically, with no disk and no threads.

    clock = Clock()
    loader = MemoryLoader({"/img/a.jpg": b"..."}, reactor=clock, latency=0.5, max_open=2)
    d = loader.load("/img/a.jpg")
    clock.advance(0.5)   # now d has fired
"""

from __future__ import annotations

import errno
import os
from typing import Any, Mapping

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..confine import check_relative
from ..engines.base import IFileEngine, Op, OpenedFile, Root
from ..loader import FileLoader

__all__ = ["MemoryLoader", "MemoryEngine"]


def _not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


@implementer(IFileEngine)
class MemoryEngine:
    """An engine over ``files`` (path → bytes; an ``OSError`` instance to fail with it).

    Opens and closes are immediate; every read of data takes ``latency``
    seconds on ``reactor`` (a read that finds the end of a file is
    immediate), and cancelling a read cancels its timer.
    """

    name = "memory"

    def __init__(self, files: dict[str, bytes | OSError], reactor: Any, latency: float) -> None:
        self.files = files
        self.reactor = reactor
        self.latency = latency
        self._fds: dict[int, bytes] = {}
        self._next_fd = 1 << 20  # never a real descriptor number
        self.reads = 0
        self.opens = 0

    def _lookup(self, path: str) -> bytes:
        entry = self.files.get(path)
        if entry is None:
            if any(name.startswith(path.rstrip("/") + "/") for name in self.files):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            raise _not_found(path)
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def open(self, path: str, root: Root | None = None) -> OpenedFile:
        if "\0" in path:
            raise ValueError("embedded null byte")
        if root is not None:
            check_relative(path)
            path = root.join(path)
        data = self._lookup(path)
        self.opens += 1
        fd, self._next_fd = self._next_fd, self._next_fd + 1
        self._fds[fd] = data
        f = OpenedFile(fd, len(data), 0, path, ino=fd, mtime_ns=0)
        f.via = "memory"
        return f

    def open_root(self, path: str, no_symlinks: bool = False) -> Root:
        return Root(path.rstrip("/") or "/", -1, no_symlinks, "memory", 0)

    def read_inline(self, f: OpenedFile, view: memoryview, offset: int) -> int:
        raise BlockingIOError(errno.EAGAIN, "memory files are read with latency")

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> Op:
        data = self._fds[f.fd]
        chunk = data[offset:offset + len(view)]
        n = len(chunk)
        view[:n] = chunk
        if not n or not self.latency:
            return Op.done(n)
        if self.reactor is None:
            raise ValueError("a latency needs a reactor (e.g. twisted.internet.task.Clock)")
        self.reads += 1
        op = Op(lambda: (call.cancel(),
                         op.deferred.errback(Failure(defer.CancelledError()))))  # type: ignore[func-returns-value]
        call = self.reactor.callLater(self.latency, op.deferred.callback, n)
        return op

    def close(self, f: OpenedFile) -> None:
        del self._fds[f.fd]

    def stats(self) -> dict[str, Any]:
        return {"memory_opens": self.opens, "memory_reads": self.reads, "memory_open": len(self._fds)}

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class _NoReactor:
    """Stands in for a reactor where ``latency`` is 0: nothing is ever scheduled."""

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a latency needs a reactor (e.g. twisted.internet.task.Clock)")


class MemoryLoader(FileLoader):
    """A ``FileLoader`` over ``files`` (path → bytes; an ``OSError`` instance
    to fail with it): the same API, limits, handles and errors.

    :param reactor: schedules the ``latency``; a ``Clock`` in tests.  With
        ``latency=0`` loads fire synchronously and no reactor is needed.
    :param latency: seconds each read of data takes.
    """

    def __init__(self, files: Mapping[str, bytes | OSError] | None = None, reactor: Any = None,
                 latency: float = 0.0, max_open: int = 64, max_waiting: int | None = 1024,
                 chunk_size: int = 256 * 1024) -> None:
        self.files: dict[str, bytes | OSError] = dict(files or {})
        self.latency = latency
        engine = MemoryEngine(self.files, reactor, latency)
        super().__init__(reactor if reactor is not None else _NoReactor(), max_open=max_open,
                         max_waiting=max_waiting, chunk_size=chunk_size, engine=engine, turn_budget=None)
