"""``FileReader``: a ``FileDescriptor`` that reads one open regular file, chunk by chunk.

Registered with ``reactor.addReader`` (``startReading``), it reads one chunk
per ``doRead`` so the reactor runs other work between chunks.  A regular
file is always "readable", so the reactor calls ``doRead`` every iteration;
a chunk that is not in the page cache is read by the engine off the reactor
thread while the reader is unregistered, then reading resumes.

End of file is a read that returns 0: never the ``fstat`` size (files grow
and shrink; /proc files claim size 0) and never a short read.

The reader never closes the descriptor: whoever owns it (a ``FileHandle``)
does, once the reader has ended and no read on the descriptor is running.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from twisted.internet import abstract, defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _buffers
from .engines.base import IFileEngine, Op, OpenedFile
from .errors import ConsumerStopped

__all__ = ["FileReader", "BufferSink", "ConsumerSink", "ReaderState"]

# Reads past the expected end: one byte tells EOF (0) from growth (1); a
# file that did grow is then read in whole chunks.
PROBE_SIZE = 1

#: The largest file offset (off_t); reads never reach past it.
MAX_OFFSET = 2**63 - 1


def _release(view: memoryview | None) -> None:
    """Revoke a view: nobody can write into the buffer through it any more."""
    if view is not None:
        try:
            view.release()
        except BufferError:  # still exported (an abandoned io_uring read)
            pass


class BufferSink:
    """Collects the file into one buffer preallocated from the expected size.

    ``result()`` returns the buffer as ``bytes`` (without a copy when the
    size was right) and revokes every view of it, so nobody can change the
    result afterwards.
    """

    def __init__(self, expected: int, limit: int | None, chunk_size: int) -> None:
        self.obj: bytes | bytearray | None  # None once discarded
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
        return self._probe[:]

    def wrote(self, view: memoryview, n: int) -> None:
        if self._probe is not None and view.obj is self._probe.obj and self.filled >= len(self.buf):
            # The file grew beyond fstat's size (or is a /proc file claiming 0):
            # grow the buffer (rare, so a copy is fine).
            grown = bytearray(self.filled + n + max(self.chunk_size, self.filled // 2))
            grown[:self.filled] = self.buf[:self.filled]
            grown[self.filled:self.filled + n] = view[:n]
            _release(self.buf)
            self.obj, self.buf = grown, memoryview(grown)
        self.filled += n

    def result(self) -> bytes:
        data = _buffers.finish(self.obj, self.buf, self.filled)
        self.discard()
        return data

    def discard(self) -> None:
        """Drop the buffer (revoking its views): nothing of it may change later."""
        _release(self.buf)
        _release(self._probe)
        self.obj = None


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
        data = _buffers.finish(obj, view, n)
        _release(view)
        self.consumer.write(data)

    def result(self) -> int:
        return self.filled

    def discard(self) -> None:
        self._obj = None


class ReaderState(enum.Enum):
    __hash__ = object.__hash__  # identity, in C (Enum's hash is Python code)

    IDLE = "idle"              # built, not started
    READY = "ready"            # registered with the reactor: the next chunk in doRead
    IN_FLIGHT = "in_flight"    # a chunk is being read off the reactor thread
    PAUSED = "paused"          # the consumer paused it; nothing running
    PAUSED_IN_FLIGHT = "paused_in_flight"  # paused while a chunk was being read
    ENDING = "ending"          # ended while a chunk was being read: waits for it
    DONE = "done"              # nothing running on the descriptor any more


_S = ReaderState


@implementer(IPushProducer)
class FileReader(abstract.FileDescriptor):
    """Reads an opened file into a sink, one chunk per reactor iteration.

    ``deferred`` fires with the sink's result (``bytes`` for ``BufferSink``,
    the byte count for ``ConsumerSink``) or fails with the error of the read
    (whatever its type).  With an ``owner`` callback, the reader calls
    ``owner(outcome)`` instead once nothing runs on the descriptor any more,
    and the owner fires ``deferred`` when it has closed the descriptor.
    Cancelling ``deferred`` stops the reader.
    """

    def __init__(
        self,
        opened: OpenedFile,
        engine: IFileEngine,
        sink: BufferSink | ConsumerSink,
        offset: int = 0,
        reactor: Any = None,
        owner: Callable[[Any], None] | None = None,
        inline_steps: int = 2,
    ) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self.connected = 1  # FileDescriptor.resumeProducing requires it
        self.file = opened
        self.engine = engine
        self.sink = sink
        self.start_offset = offset
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._owner = owner
        self.inline_steps = inline_steps
        self.state = _S.IDLE
        self._op: Op | None = None
        self._outcome: Any = None
        self._registered = False
        self._issuing = False  # inside _step, handing a read to the engine
        self._completed_now = False  # that read completed at once
        self.chunks = 0

    # -- IReadDescriptor ------------------------------------------------
    def fileno(self) -> int:
        return self.file.fd if self.state is not _S.DONE else -1

    def doRead(self) -> None:
        if self.state is _S.READY:
            self._step()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor disconnects every reader at shutdown.
        self.end(reason)

    def logPrefix(self) -> str:
        return "FileReader"

    def _register(self) -> None:
        if not self._registered:
            self._registered = True
            self.startReading()  # type: ignore[no-untyped-call]  # Twisted's, unannotated

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.stopReading()  # type: ignore[no-untyped-call]

    # -- driving --------------------------------------------------------
    def start(self, inline_steps: int | None = None) -> defer.Deferred[Any]:
        """Begin reading.  Up to ``inline_steps`` (default: the constructor's)
        chunks are read right away when cached: a small cached file completes
        here, never registering with the reactor."""
        if self.state is not _S.IDLE:
            return self.deferred
        self.state = _S.READY
        steps = self.inline_steps if inline_steps is None else inline_steps
        if self.file.inline:
            for _ in range(steps):
                if self.state is not _S.READY:
                    return self.deferred
                self._step()
        if self.state is _S.READY:
            self._continue()
        return self.deferred

    def _continue(self) -> None:
        """READY: the next chunk in doRead when it may be read inline, else now off-thread."""
        if self.file.inline:
            self._register()
        else:
            self._step()

    def _step(self) -> None:
        while True:
            try:
                view = self.sink.next_view()
            except Exception:
                self.end(Failure())
                return
            if view is None:
                self.end(None)
                return
            offset = self.start_offset + self.sink.filled
            if offset + len(view) > MAX_OFFSET:  # the end of off_t: nothing lies beyond
                view = view[:max(0, MAX_OFFSET - offset)]
                if not len(view):
                    _release(view)
                    self.end(None)
                    return
            if self.file.inline:
                try:
                    n = self.engine.read_inline(self.file, view, offset)
                except BlockingIOError:
                    pass  # not cached (or not inline-readable): read it off the reactor thread
                except Exception:
                    _release(view)
                    self.end(Failure())
                    return
                else:
                    self._got(view, n)
                    return
            self._unregister()
            self.state = _S.IN_FLIGHT
            try:
                op = self.engine.read(self.file, view, offset)
            except Exception:
                op = Op.failed()
            self._op = op
            self._issuing, self._completed_now = True, False
            op.deferred.addCallbacks(self._read_done, self._read_failed, callbackArgs=(view,),
                                     errbackArgs=(view,))
            self._issuing = False
            # A read that completed at once (an in-memory engine) continues
            # here, not by recursion: a long file must not exhaust the stack.
            if not self._completed_now or self.state is not _S.READY or self.file.inline:
                if self._completed_now and self.state is _S.READY:
                    self._continue()
                return

    def _got(self, view: memoryview, n: int) -> None:
        self.chunks += 1
        if n == 0:
            _release(view)
            self.end(None)
            return
        try:
            self.sink.wrote(view, n)
        except Exception:
            self.end(Failure())
        finally:
            _release(view)

    def _read_done(self, n: int, view: memoryview) -> None:
        self._op = None
        state = self.state
        if state is _S.ENDING:
            _release(view)
            self._done()
            return
        self.state = _S.PAUSED if state is _S.PAUSED_IN_FLIGHT else _S.READY
        self._got(view, n)
        if self._issuing:
            self._completed_now = True  # _step goes on
            return
        # After a read off the thread the next chunk is often at hand
        # (readahead): try it inline at once, else off-thread again.
        if self.state is _S.READY and self.file.inline:
            self._step()
        if self.state is _S.READY:
            self._continue()

    def _read_failed(self, failure: Failure, view: memoryview) -> None:
        self._op = None
        _release(view)
        if self.state is _S.ENDING:
            self._done()
            return
        self.state = _S.READY
        self.end(failure)

    # -- IPushProducer --------------------------------------------------
    def pauseProducing(self) -> None:
        if self.state in (_S.READY, _S.IDLE):
            self._unregister()
            self.state = _S.PAUSED
        elif self.state is _S.IN_FLIGHT:
            self.state = _S.PAUSED_IN_FLIGHT

    def resumeProducing(self) -> None:
        if self.state is _S.PAUSED:
            self.state = _S.READY
            self._continue()
        elif self.state is _S.PAUSED_IN_FLIGHT:
            self.state = _S.IN_FLIGHT

    def stopProducing(self) -> None:
        self.end(Failure(ConsumerStopped(self.sink.filled)))

    # -- ending ---------------------------------------------------------
    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.end(Failure(defer.CancelledError()))

    def end(self, outcome: Failure | None) -> None:
        """Stop reading with ``outcome`` (None: the sink's result).  The first
        outcome wins; a read in flight is cancelled and waited for."""
        state = self.state
        if state in (_S.ENDING, _S.DONE):
            return
        self._unregister()
        self.disconnected = 1
        self.connected = 0
        if outcome is None:
            try:
                outcome = self.sink.result()  # type: ignore[assignment]  # the result, not a Failure
            except Exception:
                outcome = Failure()
        else:
            self.sink.discard()
        self._outcome = outcome
        if state in (_S.IN_FLIGHT, _S.PAUSED_IN_FLIGHT):
            self.state = _S.ENDING
            op = self._op
            if op is not None:
                op.cancel()
            return
        self._done()

    def _done(self) -> None:
        self.state = _S.DONE
        if self._owner is not None:
            owner, self._owner = self._owner, None
            owner(self._outcome)
        else:
            self.fire()

    def fire(self) -> None:
        """Fire ``deferred`` with the outcome (the owner calls this once the
        descriptor is closed); a no-op if it was cancelled."""
        if not self.deferred.called:
            outcome = self._outcome
            if isinstance(outcome, Failure):
                self.deferred.errback(outcome)
            else:
                self.deferred.callback(outcome)
        self._outcome = None
