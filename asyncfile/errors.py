"""Errors raised by asyncfile besides the original ``OSError`` types."""

from __future__ import annotations

import errno


class Overloaded(Exception):
    """Refused at once: ``limit`` operations are running and ``max_waiting`` already wait.

    A bounded queue that says no is what keeps a burst of requests from
    exhausting a server (a ``DeferredSemaphore`` has no bound on its waiters).
    """

    def __init__(self, limit: int, waiting: int) -> None:
        super().__init__(f"overloaded: {limit} running and {waiting} waiting")
        self.limit = limit
        self.waiting = waiting


class NotRegularFile(OSError):
    """The path is a FIFO, device, or socket: reading it could block forever."""

    def __init__(self, kind: str, filename: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", filename)
        self.kind = kind


class ConsumerStopped(Exception):
    """``stream()`` ended early because the consumer called ``stopProducing``
    (for a transport or a twisted.web request: the client disconnected)."""

    def __init__(self, written: int) -> None:
        super().__init__(f"consumer stopped after {written} bytes")
        self.written = written


class LoaderClosed(RuntimeError):
    """The ``FileLoader`` was closed: it starts no new work."""

    def __init__(self) -> None:
        super().__init__("the file loader is closed")


class ForkedError(RuntimeError):
    """Work that belongs to the parent of a ``fork()``.

    A ``FileLoader`` created before ``fork()`` refuses work in the child
    (its reactor, threads and io_uring ring are the parent's): the child
    builds its own loader.  Operations in flight at the fork fail with it.
    """

    def __init__(self, what: str = "this FileLoader") -> None:
        super().__init__(f"{what} was created before fork(); create a new FileLoader in the child")
