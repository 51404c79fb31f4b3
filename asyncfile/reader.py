"""``FileReader``: a ``FileDescriptor`` that reads one regular file, chunk by chunk.

Registered with ``reactor.addReader`` (``startReading``), it reads one chunk
per ``doRead`` so the reactor runs other work between chunks.  A regular
file is always "readable", so the reactor calls ``doRead`` every iteration;
a chunk that is not in the page cache is read by the engine off the reactor
thread while the reader is unregistered, then reading resumes.

End of file is a read that returns 0: never the ``fstat`` size (files grow
and shrink; /proc files claim size 0) and never a short read.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import abstract, defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _buffers
from .engines.base import IFileEngine, OpenedFile
from .errors import ConsumerStopped

__all__ = ["FileReader", "BufferSink", "ConsumerSink"]

# Reads past the expected end: one byte tells EOF (0) from growth (1); a
# file that did grow is then read in whole chunks.
PROBE_SIZE = 1


class BufferSink:
    """Collects the file into one buffer preallocated from the expected size."""

    def __init__(self, expected: int, limit: int | None, chunk_size: int) -> None:
        self.obj, self.buf = _buffers.allocate(expected)
        self.limit = limit
        self.chunk_size = chunk_size
        self.filled = 0
        self._probe: memoryview | None = None

    def next_view(self) -> memoryview | None:
        """Where the next chunk goes; None when the byte range is complete."""
        room = self.chunk_size
        if self.limit is not None:
            room = min(room, self.limit - self.filled)
            if room <= 0:
                return None
        if self.filled < len(self.buf):
            return self.buf[self.filled:self.filled + room]
        # The buffer is full: look past the expected end for EOF or growth.
        if self._probe is None:
            self._probe = memoryview(bytearray(PROBE_SIZE))
        return self._probe

    def wrote(self, view: memoryview, n: int) -> None:
        if self._probe is not None and view.obj is self._probe.obj and self.filled >= len(self.buf):
            # The file grew beyond fstat's size (or is a /proc file claiming 0):
            # grow the buffer (rare, so a copy is fine).
            grown = bytearray(self.filled + n + max(self.chunk_size, self.filled // 2))
            grown[:self.filled] = self.buf[:self.filled]
            grown[self.filled:self.filled + n] = view[:n]
            self.obj, self.buf = grown, memoryview(grown)
        self.filled += n

    def result(self) -> bytes:
        return _buffers.finish(self.obj, self.buf, self.filled)

    def at_end(self) -> None:
        pass


class ConsumerSink:
    """Hands each chunk to an ``IConsumer`` as it arrives."""

    def __init__(self, consumer: IConsumer, size: int, limit: int | None, chunk_size: int) -> None:
        self.consumer = consumer
        self.remaining_expected = size
        self.limit = limit
        self.chunk_size = chunk_size
        self.filled = 0
        self._obj: Any = None

    def next_view(self) -> memoryview | None:
        room = self.chunk_size
        if self.limit is not None:
            room = min(room, self.limit - self.filled)
            if room <= 0:
                return None
        if self.remaining_expected > 0:
            room = min(room, self.remaining_expected)
        else:
            room = min(room, 4096)  # past the expected end: EOF, or a growing or /proc file
        self._obj, view = _buffers.allocate(room)
        return view

    def wrote(self, view: memoryview, n: int) -> None:
        self.filled += n
        self.remaining_expected = max(0, self.remaining_expected - n)
        obj, self._obj = self._obj, None
        self.consumer.write(_buffers.finish(obj, view, n))

    def result(self) -> int:
        return self.filled


@implementer(IPushProducer)
class FileReader(abstract.FileDescriptor):
    """Reads an opened file into a sink, one chunk per reactor iteration.

    ``deferred`` fires with the sink's result (``bytes`` for ``BufferSink``,
    the byte count for ``ConsumerSink``) or fails with the ``OSError`` of the
    read.  The descriptor is closed exactly once, and only when no read on it
    is running in another thread; ``on_closed`` is then called (the loader
    gives its limiter place back there).
    """

    def __init__(
        self,
        opened: OpenedFile,
        engine: IFileEngine,
        sink: BufferSink | ConsumerSink,
        offset: int = 0,
        reactor: Any = None,
        on_closed: Callable[[], None] | None = None,
        inline_steps: int = 2,
    ) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self.connected = 1  # FileDescriptor.resumeProducing requires it
        self.file = opened
        self.engine = engine
        self.sink = sink
        self.start_offset = offset
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._on_closed = on_closed
        self.inline_steps = inline_steps
        self._in_flight = False  # a read runs in another thread (or ring)
        self._paused = False
        self._finished = False
        self._fd_open = True
        self._reading = False
        self._outcome: Any = None
        self.chunks = 0

    # -- IReadDescriptor ------------------------------------------------
    def fileno(self) -> int:
        return self.file.fd if self._fd_open else -1

    def doRead(self) -> None:
        self._step(inline=True)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor disconnects every reader at shutdown.
        self._finish(reason)

    def startReading(self) -> None:
        self._reading = True
        abstract.FileDescriptor.startReading(self)

    def stopReading(self) -> None:
        if self._reading:
            self._reading = False
            abstract.FileDescriptor.stopReading(self)

    def logPrefix(self) -> str:
        return "FileReader"

    # -- driving --------------------------------------------------------
    def start(self, inline_steps: int | None = None) -> defer.Deferred[Any]:
        """Begin reading.  Up to ``inline_steps`` (default: the constructor's)
        chunks are read right away when cached: a small cached file completes
        here, never registering with the reactor."""
        if inline_steps is None:
            inline_steps = self.inline_steps
        if self.file.inline:
            for _ in range(inline_steps):
                if self._finished or self._in_flight or self._paused:
                    break
                self._step(inline=True)
            if not (self._finished or self._in_flight or self._paused):
                self.startReading()
        else:
            self._step(inline=False)
        return self.deferred

    def _step(self, inline: bool) -> None:
        if self._finished or self._in_flight or self._paused:
            return
        view = self.sink.next_view()
        if view is None:
            self._finish(None)
            return
        offset = self.start_offset + self.sink.filled
        if inline:
            try:
                n = self.engine.read_inline(self.file, view, offset)
            except BlockingIOError:
                pass  # not cached (or not inline-readable): read it off the reactor thread
            except OSError:
                self._finish(Failure())
                return
            else:
                self._got(view, n)
                return
        self.stopReading()
        self._in_flight = True
        self.engine.read(self.file, view, offset).addCallbacks(
            self._got_async, self._failed_async, callbackArgs=(view,)
        )

    def _got(self, view: memoryview, n: int) -> None:
        self.chunks += 1
        if n == 0:
            self._finish(None)
            return
        try:
            self.sink.wrote(view, n)
        except Exception:
            self._finish(Failure())

    def _got_async(self, n: int, view: memoryview) -> None:
        self._in_flight = False
        if self._finished:
            self._close()  # cancelled or aborted while the read ran
            return
        self._got(view, n)
        self._continue()

    def _failed_async(self, failure: Failure) -> None:
        self._in_flight = False
        self._finish(failure)

    def _continue(self) -> None:
        if self._finished or self._paused or self._in_flight:
            return
        if self.file.inline:
            self.startReading()
        else:
            self._step(inline=False)

    # -- IPushProducer --------------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True
        self.stopReading()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._continue()

    def stopProducing(self) -> None:
        self._finish(Failure(ConsumerStopped(self.sink.filled)))

    # -- ending ---------------------------------------------------------
    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self._finish(Failure(defer.CancelledError()))

    def _finish(self, outcome: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._reading:
            self.stopReading()
        self.disconnected = 1
        self.connected = 0
        if outcome is None:
            try:
                outcome = self.sink.result()
            except Exception:
                outcome = Failure()
        self._outcome = outcome
        if isinstance(outcome, Failure) and outcome.check(defer.CancelledError):
            self._fire()  # cancel() fires at once; the descriptor follows
        if not self._in_flight:
            self._close()

    def _fire(self) -> None:
        if not self.deferred.called:
            outcome = self._outcome
            if isinstance(outcome, Failure):
                self.deferred.errback(outcome)
            else:
                self.deferred.callback(outcome)

    def _close(self) -> None:
        if not self._fd_open:
            return
        self._fd_open = False
        try:
            pending = self.engine.close(self.file)
        except OSError:
            pending = None
        if pending is not None:
            pending.addErrback(lambda _: None).addBoth(lambda _: self._closed())
        else:
            self._closed()

    def _closed(self) -> None:
        # Results fire only once the descriptor is closed: when load() has
        # fired, nothing of it is left open.
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed()
        self._fire()
