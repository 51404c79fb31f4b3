"""``MemoryLoader``: a file loader over a dict, for testing code that uses one.

Like ``treq.testing``: your code takes an ``IFileLoader``; your tests hand it
a ``MemoryLoader`` with the files they need, and a ``twisted.internet.task.Clock``
to make loads take (fake) time, so timeouts, queueing and cancellation are
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
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from ..errors import ConsumerStopped
from ..interfaces import IFileLoader
from ..limiter import Limiter

__all__ = ["MemoryLoader"]


def _not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


@implementer(IFileLoader)
class MemoryLoader:
    """Serves ``files`` (path → bytes; an ``OSError`` instance to fail with it)
    with ``FileLoader``'s API, limits and errors.

    :param reactor: schedules the ``latency``; a ``Clock`` in tests.  With
        ``latency=0`` loads fire synchronously and no reactor is needed.
    :param latency: seconds each load (or each streamed chunk) takes.
    """

    def __init__(self, files: Mapping[str, bytes | OSError] | None = None, reactor: Any = None,
                 latency: float = 0.0, max_open: int = 64, max_waiting: int | None = 1024,
                 chunk_size: int = 256 * 1024) -> None:
        self.files: dict[str, bytes | OSError] = dict(files or {})
        self.reactor = reactor
        self.latency = latency
        self.chunk_size = chunk_size
        self._limiter = Limiter(max_open, max_waiting)
        self.loaded = 0
        self.bytes = 0
        self.errors = 0
        self.cancelled = 0

    def _lookup(self, path: Any) -> bytes:
        path = os.fsdecode(os.fspath(path))
        entry = self.files.get(path)
        if entry is None:
            if any(name.startswith(path.rstrip("/") + "/") for name in self.files):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            raise _not_found(path)
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def _after_latency(self, value: Any) -> defer.Deferred[Any]:
        if not self.latency:
            return defer.succeed(value)
        if self.reactor is None:
            raise ValueError("a latency needs a reactor (e.g. twisted.internet.task.Clock)")
        return _delayed(self.reactor, self.latency, value)

    def load(self, path: Any, offset: int = 0, length: int | None = None) -> defer.Deferred[bytes]:
        if offset < 0 or (length is not None and length < 0):
            return defer.fail(ValueError("offset and length must not be negative"))

        def work() -> defer.Deferred[bytes]:
            data = self._lookup(path)
            end = None if length is None else offset + length
            chunk = data[offset:end]

            def done(result: bytes) -> bytes:
                self.loaded += 1
                self.bytes += len(result)
                return result

            return self._after_latency(chunk).addCallback(done)

        def failed(failure: Any) -> Any:
            if failure.check(OSError):
                self.errors += 1
            elif failure.check(defer.CancelledError):
                self.cancelled += 1
            return failure

        return self._limiter.run(work).addErrback(failed)

    def stream(self, path: Any, consumer: IConsumer, offset: int = 0,
               length: int | None = None) -> defer.Deferred[int]:
        def work() -> defer.Deferred[int]:
            data = self._lookup(path)
            end = None if length is None else offset + length
            producer = _MemoryProducer(self, data[offset:end], consumer)
            return producer.start()

        return self._limiter.run(work)

    def stats(self) -> dict[str, Any]:
        limiter = self._limiter
        return {
            "engine": "memory",
            "open": limiter.active,
            **limiter.loader_stats(),
            "loaded": self.loaded,
            "bytes": self.bytes,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "inline_reads": 0,
            "pool_reads": 0,
        }

    def close(self) -> None:
        pass


def _delayed(reactor: Any, seconds: float, value: Any) -> defer.Deferred[Any]:
    """``deferLater`` whose cancellation also cancels the timer."""
    call = None
    d: defer.Deferred[Any] = defer.Deferred(lambda _: call.cancel() if call.active() else None)
    call = reactor.callLater(seconds, d.callback, value)
    return d


@implementer(IPushProducer)
class _MemoryProducer:
    def __init__(self, loader: MemoryLoader, data: bytes, consumer: IConsumer) -> None:
        self.loader = loader
        self.data = data
        self.consumer = consumer
        self.sent = 0
        self.paused = False
        self.pending: defer.Deferred[Any] | None = None
        self.done: defer.Deferred[int] = defer.Deferred(lambda _: self._abort())

    def start(self) -> defer.Deferred[int]:
        self.consumer.registerProducer(self, True)
        self._next()
        return self.done

    def _next(self) -> None:
        while not self.paused and not self.done.called:
            if self.sent >= len(self.data):
                self.consumer.unregisterProducer()
                self.loader.loaded += 1
                self.loader.bytes += self.sent
                self.done.callback(self.sent)
                return
            chunk = self.data[self.sent:self.sent + self.loader.chunk_size]
            if self.loader.latency:
                self.pending = _delayed(self.loader.reactor, self.loader.latency, chunk)
                self.pending.addCallback(self._write)
                return
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        self.pending = None
        if self.done.called:
            return
        self.sent += len(chunk)
        self.consumer.write(chunk)
        if self.loader.latency:
            self._next()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if self.pending is None:
                self._next()

    def stopProducing(self) -> None:
        if not self.done.called:
            self._abort()
            self.done.errback(ConsumerStopped(self.sent))

    def _abort(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        try:
            self.consumer.unregisterProducer()
        except Exception:
            pass
