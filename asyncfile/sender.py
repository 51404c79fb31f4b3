"""``FileSender``: ``twisted.protocols.basic.FileSender`` reading through asyncfile.

    from asyncfile.sender import FileSender
    d = FileSender().beginFileTransfer(open("big.iso", "rb"), self.transport)

Twisted's ``FileSender`` reads 16 KiB with a blocking ``file.read()`` in the
reactor thread whenever its consumer asks for more: a slow disk or network
file system stalls every connection of the process.  This one has the same
interface and results, and reads through a ``FileLoader`` (cached pages in
the reactor thread with ``RWF_NOWAIT``, everything else off it), or sends
with zero copy (``asyncfile.sendfile``) when the consumer is a plain TCP or
UNIX transport and there is no ``transform``.

What is the same as Twisted's:

* ``beginFileTransfer(file, consumer, transform=None) -> Deferred`` firing,
  after ``consumer.unregisterProducer()``, with the last byte written to the
  consumer: ``chunk[-1:]`` of the last chunk *after* ``transform`` (so
  ``b""`` if the transform returned ``b""`` for it).  For an empty file
  (nothing read from the current position) it fires with ``""`` -- the
  ``str``, Twisted's class attribute ``lastSent`` -- exactly as Twisted does.
* ``transform`` is called on the same chunks as Twisted's: consecutive
  ``CHUNK_SIZE`` (16 KiB) pieces of the file from the current position, the
  last one shorter (reads are larger; they are cut for the transform).
* A file object is read from its *current position* (``file.tell()``), and
  left positioned after the last byte read (Twisted's ``file.read()`` moves
  it; here ``file.seek()`` does, before the Deferred fires).  Its buffered,
  unflushed writes are flushed first.  A descriptor likewise: from its
  offset (``lseek(fd, 0, SEEK_CUR)``), and its offset is moved at the end.
* When the consumer calls ``stopProducing`` the Deferred fails with
  ``FileSenderStopped`` -- an ``Exception`` with Twisted's message, "Consumer
  asked us to stop producing" (a subclass of ``asyncfile.ConsumerStopped``,
  with ``written``); the producer is not unregistered, as in Twisted.
* File objects without a descriptor (``io.BytesIO``) are handed to
  Twisted's own ``FileSender`` (memory: nothing to block on).

Differences (documented, intended):

* Push producer (``registerProducer(self, True)``), not pull: it reads
  ahead one chunk and honours ``pauseProducing``/``resumeProducing``.
  ``registerProducer`` is still called inside ``beginFileTransfer``.
* It also takes a path, a descriptor (``int``) or an asyncfile
  ``FileHandle`` (read from 0, not closed); a file object or descriptor is
  duplicated (``os.dup``) and read with ``pread`` at explicit offsets, so
  the caller may close its own meanwhile; the duplicate (or the file opened
  from a path) is closed on every way out, before the Deferred fires.
* Only regular files: a pipe, socket or device fails with
  ``NotRegularFile`` (Twisted's would block the reactor on it); a text-mode
  file raises ``TypeError`` (Twisted's would write ``str``).
* A ``transform`` that returns ``b""`` for a chunk: Twisted's, a pull
  producer, then stalls on a transport (a transport resumes a pull producer
  only after a write reached the socket, and ``write(b"")`` writes nothing);
  this one goes on.  The result is the same (``b""`` if it was the last).
* Errors: a read error (``EIO``...) or an exception from ``transform`` fails
  the Deferred with that error (and the producer is unregistered) instead
  of escaping from the consumer's ``doWrite``.  Cancelling the Deferred
  stops the transfer (Twisted's would later raise ``AlreadyCalledError``).
* Counts bytes (``written``) and tells which route it took (``route``:
  ``"sendfile"``, ``"read"`` or ``"memory"``).
"""

from __future__ import annotations

import enum
import io
import os
from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import ConsumerStopped
from .handle import FileHandle
from .sendfile import SendfileTransfer, adopt, file_refusal, zero_copy_refusal

__all__ = ["FileSender", "FileSenderStopped"]

_STOP_MESSAGE = "Consumer asked us to stop producing"


class FileSenderStopped(ConsumerStopped):
    """The consumer stopped the transfer: Twisted's ``Exception("Consumer asked
    us to stop producing")``, plus ``written`` (bytes written before)."""

    def __init__(self, written: int) -> None:
        Exception.__init__(self, _STOP_MESSAGE)
        self.written = written


class _State(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"    # waiting for a place / the open / the fstat
    READING = "reading"    # loader.stream into the relay
    SENDING = "sending"    # SendfileTransfer
    MEMORY = "memory"      # Twisted's FileSender on a file without a descriptor
    FINISHING = "finishing"  # last byte, closing, positioning
    DONE = "done"


@implementer(IConsumer)
class _Relay:
    """The consumer ``loader.stream`` writes into: cuts chunks for ``transform``,
    records the last byte, passes the producer's controls through."""

    def __init__(self, sender: "FileSender") -> None:
        self.sender = sender
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.sender._paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.sender._deliver(data)


@implementer(IPushProducer)
class FileSender:
    """A producer that sends a file to a consumer without blocking the reactor.

    :param loader: the ``FileLoader`` to read through (default:
        ``asyncfile.default_loader()``, looked up when a transfer begins).
    :param zero_copy: send with ``os.sendfile`` where the consumer is a plain
        TCP/UNIX transport, there is no transform and the file is local.
    """

    CHUNK_SIZE = 2**14

    lastSent: Any = ""
    deferred: defer.Deferred[Any] | None = None
    file: Any = None
    consumer: Any = None
    transform: Callable[[bytes], bytes] | None = None

    def __init__(self, loader: Any = None, *, zero_copy: bool = True) -> None:
        self.loader = loader
        self.zero_copy = zero_copy
        self.route: str | None = None
        self.written = 0
        self._state = _State.IDLE
        self._paused = False
        self._loader: Any = None
        self._handle: FileHandle | None = None
        self._own_handle = False
        self._start = 0
        self._restore: Callable[[int], None] | None = None
        self._opening: defer.Deferred[Any] | None = None
        self._relay: _Relay | None = None
        self._transfer: SendfileTransfer | None = None
        self._inner: basic.FileSender | None = None
        self._carry = b""
        self._pending: deque[bytes] = deque()
        self._stream_done: int | None = None
        self._stream: defer.Deferred[int] | None = None
        self._read_error: Failure | None = None
        self._stopped = False
        self._cancelled = False
        self._registered = False

    # -- the interface ------------------------------------------------------------
    def beginFileTransfer(self, file: Any, consumer: Any,
                          transform: Callable[[bytes], bytes] | None = None) -> defer.Deferred[Any]:
        """Send ``file`` (a binary file object, a descriptor, a path or a
        ``FileHandle``) into ``consumer``; the Deferred fires with the last
        byte written (see the module docstring)."""
        if self._state not in (_State.IDLE, _State.DONE):
            raise RuntimeError("this FileSender is already sending a file")
        if isinstance(file, io.TextIOBase):
            raise TypeError("FileSender needs a binary file, not a text-mode file")
        self._restore = None
        source, fd = self._source(file)
        self.file = file
        self.consumer = consumer
        self.transform = transform
        self.lastSent = FileSender.lastSent
        self.route = None
        self.written = 0
        self._paused = False
        self._stopped = False
        self._cancelled = False
        self._registered = False
        self._carry = b""
        self._pending = deque()
        self._stream_done = None
        self._read_error = None
        self._handle = None
        deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.deferred = deferred
        if source == "memory":
            return self._memory(file, consumer, transform)
        self._loader = self.loader
        if self._loader is None:
            from .loader import default_loader

            self._loader = default_loader()
        self._state = _State.OPENING
        self._registered = True
        try:
            consumer.registerProducer(self, True)
        except BaseException:
            self._registered = False
            self._state = _State.DONE
            self.deferred = None
            if fd is not None:
                os.close(fd)
            raise
        if self._stopped:  # the consumer was already gone
            if fd is not None:
                os.close(fd)
            return deferred
        loader = self._loader
        if source == "handle":
            self._own_handle = False
            opening: defer.Deferred[Any] = defer.succeed(file)
        elif source == "path":
            self._own_handle = True
            opening = loader.open(file)
        else:
            assert fd is not None
            self._own_handle = True
            opening = adopt(loader, fd)
        self._opening = opening
        opening.addCallbacks(self._opened, self._open_failed)
        return deferred

    def pauseProducing(self) -> None:
        self._paused = True
        if self._state is _State.READING and self._relay is not None and self._relay.producer is not None:
            self._relay.producer.pauseProducing()
        elif self._state is _State.SENDING and self._transfer is not None:
            self._transfer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._state is _State.READING:
            try:
                self._drain()  # pieces cut for the transform go first
            except Exception:
                self._read_failed_here(Failure())
                return
            if self._paused or self._pending:
                return
            if self._stream_done is not None:
                self._read_all(self._stream_done)
            elif self._relay is not None and self._relay.producer is not None:
                self._relay.producer.resumeProducing()
        elif self._state is _State.SENDING and self._transfer is not None:
            self._transfer.resumeProducing()
        elif self._state is _State.MEMORY and self._inner is not None:
            self._inner.resumeProducing()

    def stopProducing(self) -> None:
        if self._stopped or self._state in (_State.IDLE, _State.DONE, _State.FINISHING):
            return
        self._stopped = True
        state = self._state
        if state is _State.OPENING:
            opening, self._opening = self._opening, None
            if opening is not None:
                opening.cancel()  # the open (and any descriptor) is given up
            else:
                self._end(Failure(FileSenderStopped(0)), by_consumer=True)
        elif state is _State.READING:
            self._stop_reading()
        elif state is _State.SENDING and self._transfer is not None:
            self._transfer.stopProducing()
        elif state is _State.MEMORY and self._inner is not None:
            self._inner.stopProducing()

    # -- where the bytes come from ---------------------------------------------------
    def _source(self, file: Any) -> tuple[str, int | None]:
        """("handle"|"path"|"fd"|"memory", our duplicate descriptor)."""
        if isinstance(file, FileHandle):
            self._start = 0
            return "handle", None
        if isinstance(file, (str, bytes, os.PathLike)):
            self._start = 0
            return "path", None
        if isinstance(file, int) and not isinstance(file, bool):
            fd = file
            try:
                self._start = os.lseek(fd, 0, os.SEEK_CUR)
            except OSError:  # a pipe or socket: refused as not regular after the fstat
                self._start = 0
            dup = os.dup(fd)
            self._restore = self._seek_descriptor
            return "fd", dup
        fileno = getattr(file, "fileno", None)
        if fileno is None:
            return "memory", None
        try:
            fd = fileno()
        except io.UnsupportedOperation:  # BytesIO and friends
            return "memory", None
        writable = getattr(file, "writable", None)
        if writable is not None and writable():
            file.flush()  # what Twisted's read() would see
        try:
            self._start = file.tell()
        except OSError:
            self._start = 0
        dup = os.dup(fd)
        self._restore = self._seek_file
        return "fd", dup

    def _seek_file(self, consumed: int) -> None:
        try:
            self.file.seek(self._start + consumed)
        except (OSError, ValueError):  # closed or unseekable meanwhile
            pass

    def _seek_descriptor(self, consumed: int) -> None:
        # Through our duplicate (same open file description), before it is
        # closed: the caller's number may already name another file.
        handle = self._handle
        if handle is not None and handle.file is not None and not handle.closed:
            try:
                os.lseek(handle.file.fd, self._start + consumed, os.SEEK_SET)
            except OSError:
                pass

    # -- opened: choose the route -------------------------------------------------
    def _opened(self, handle: FileHandle) -> None:
        self._opening = None
        self._handle = handle
        if self._stopped:
            self._end(Failure(FileSenderStopped(0)), by_consumer=True)
            return
        loader = self._loader
        consumer = self.consumer
        if (self.zero_copy and self.transform is None and zero_copy_refusal(consumer) is None
                and file_refusal(handle) is None):
            self.route = "sendfile"
            self._state = _State.SENDING
            # The transfer registers its own hook (a pull producer that waits
            # for the buffer to drain), so a pause the transport gave us
            # because its buffer was full does not carry over.
            self._registered = False
            self._paused = False
            consumer.unregisterProducer()
            transfer = SendfileTransfer(loader, handle, consumer, self._start)
            self._transfer = transfer
            transfer.start().addCallbacks(self._sent, self._failed)
            return
        self.route = "read"
        self._state = _State.READING
        self._relay = _Relay(self)
        self._stream = loader.stream(handle, self._relay, self._start)
        self._stream.addCallbacks(self._stream_ended, self._failed)

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if failure.check(defer.CancelledError) and self._stopped:
            self._end(Failure(FileSenderStopped(0)), by_consumer=True)
            return
        self._end(failure)

    # -- the read route -------------------------------------------------------------
    def _deliver(self, data: bytes) -> None:
        """A chunk from the FileReader: cut it into ``CHUNK_SIZE`` pieces for the
        transform (Twisted's boundaries) and write what the consumer takes."""
        if self.transform is None:
            self._pending.append(data)
        else:
            size = self.CHUNK_SIZE
            if self._carry:
                data = self._carry + data
            view = memoryview(data)
            end = len(data) - len(data) % size
            if end == len(data) == size:
                self._pending.append(data)
            else:
                self._pending.extend(bytes(view[i:i + size]) for i in range(0, end, size))
            self._carry = bytes(view[end:])
        self._drain()

    def _drain(self) -> None:
        """Write pending pieces until the consumer pauses us (it may, in write)."""
        pending, transform = self._pending, self.transform
        while pending and not self._paused:
            piece = pending.popleft()
            self._write(transform(piece) if transform is not None else piece)

    def _write(self, chunk: bytes) -> None:
        self.consumer.write(chunk)
        self.lastSent = chunk[-1:]
        self.written += len(chunk)

    def _stream_ended(self, consumed: int) -> None:
        self._stream = None
        self._stream_done = consumed
        if not self._pending and not self._paused:
            self._read_all(consumed)
        # else: resumeProducing writes the rest, then finishes

    def _read_all(self, consumed: int) -> None:
        if self._carry:
            carry, self._carry = self._carry, b""
            try:
                self._write(self.transform(carry))  # type: ignore[misc]
            except Exception:
                self._end(Failure(), consumed=consumed)
                return
        self._end(None, consumed=consumed)

    def _stop_reading(self) -> None:
        producer = self._relay.producer if self._relay is not None else None
        if producer is not None:
            producer.stopProducing()  # the stream fails with ConsumerStopped -> _failed
        elif self._stream_done is not None:  # all read; pieces were waiting for a resume
            self._pending.clear()
            self._end(Failure(FileSenderStopped(self.written)), by_consumer=True, consumed=self._stream_done)

    def _read_failed_here(self, failure: Failure) -> None:
        """The transform failed outside the FileReader (in resumeProducing)."""
        if self._stream_done is not None:
            self._end(failure, consumed=self._stream_done)
            return
        self._read_error = failure
        stream = self._stream
        if stream is not None:
            stream.cancel()  # -> _failed, which reports _read_error

    # -- the sendfile route ---------------------------------------------------------
    def _sent(self, n: int) -> None:
        self.written = n
        if n == 0:
            self._end(None, consumed=0)
            return
        self._state = _State.FINISHING
        # The last byte sent, for the result: just sent from the page cache.
        d = self._loader.load(self._handle, self._start + n - 1, 1)

        def got(last: bytes) -> None:
            self.lastSent = last
            self._end(None, consumed=n)

        d.addCallbacks(got, lambda f: self._end(f, consumed=n))

    def _failed(self, failure: Failure) -> None:
        self._stream = None
        if self._read_error is not None:
            failure, self._read_error = self._read_error, None
        if isinstance(failure.value, ConsumerStopped):
            consumed = failure.value.written
            if self.route == "sendfile":
                self.written = consumed
            self._end(Failure(FileSenderStopped(self.written)), by_consumer=True, consumed=consumed)
            return
        self._end(failure)

    # -- the memory route ------------------------------------------------------------
    def _memory(self, file: Any, consumer: Any,
                transform: Callable[[bytes], bytes] | None) -> defer.Deferred[Any]:
        self.route = "memory"
        self._state = _State.MEMORY
        inner = basic.FileSender()
        inner.CHUNK_SIZE = self.CHUNK_SIZE
        self._inner = inner
        try:
            start = file.tell()
        except (OSError, AttributeError):
            start = None

        def done(last: Any) -> None:
            self.lastSent = last
            self._memory_end(None)

        def failed(failure: Failure) -> None:
            if str(failure.value) == _STOP_MESSAGE and type(failure.value) is Exception:
                read = 0
                if start is not None:
                    try:
                        read = file.tell() - start
                    except (OSError, ValueError):
                        pass
                failure = Failure(FileSenderStopped(read))
            self._memory_end(failure)

        inner.beginFileTransfer(file, consumer, transform).addCallbacks(done, failed)
        return self.deferred  # type: ignore[return-value]

    def _memory_end(self, outcome: Failure | None) -> None:
        self._inner = None
        self._state = _State.DONE
        self.file = None
        self._fire(outcome)

    # -- ending -------------------------------------------------------------------
    def _cancel(self, _: Any) -> None:
        if self._state is _State.MEMORY and self._inner is not None:
            inner, self._inner = self._inner, None
            inner.file = None  # Twisted's unregisters at its next resumeProducing
            inner.deferred = None
            self._state = _State.DONE
            return
        self._stopped = True
        self._cancelled = True
        state = self._state
        if state is _State.OPENING and self._opening is not None:
            self._opening.cancel()
        elif state is _State.READING:
            self._stop_reading()
        elif state is _State.SENDING and self._transfer is not None:
            self._transfer.deferred.cancel()

    def _end(self, outcome: Failure | None, by_consumer: bool = False, consumed: int | None = None) -> None:
        """Unregister (unless the consumer stopped us: Twisted leaves that to
        the consumer), position the caller's file, close what we opened, fire."""
        if self._state is _State.DONE:
            return
        self._state = _State.FINISHING
        if self._registered and (not by_consumer or self._cancelled):
            self._registered = False
            try:
                self.consumer.unregisterProducer()
            except Exception:
                pass
        if consumed is not None and self._restore is not None:
            self._restore(consumed)
        handle, self._handle = self._handle, None
        self._relay = None
        self._transfer = None

        def fire(_: Any = None) -> None:
            self._state = _State.DONE
            self.file = None
            self._fire(outcome)

        if handle is not None and self._own_handle:
            handle.close().addBoth(fire)
        else:
            fire()

    def _fire(self, outcome: Failure | None) -> None:
        d = self.deferred
        if d is None or d.called:
            self.deferred = None
            return
        if self._cancelled:
            outcome = Failure(defer.CancelledError())
        if outcome is None:
            d.callback(self.lastSent)
        else:
            d.errback(outcome)
        self.deferred = None
