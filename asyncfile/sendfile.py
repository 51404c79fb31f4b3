"""Zero-copy: send a file range to a plain Twisted TCP or UNIX transport with ``os.sendfile``.

    d = send_file(loader, handle, request.channel.transport, offset, length)

``send_file(loader, source, transport, offset=0, length=None)`` writes bytes
``[offset, offset + length)`` of ``source`` (a ``FileHandle`` of ``loader``,
a path, or a descriptor) into ``transport`` and fires with the number of
bytes sent.  Where the transport is a plain socket transport and the file a
local one, the kernel copies page cache to socket (``os.sendfile``) and the
bytes never enter Python; everywhere else it is ``loader.stream()``.

Which transports get it (``zero_copy_refusal``): exactly
``twisted.internet.tcp.Server``/``Client`` and ``twisted.internet.unix.Server``/
``Client`` (what ``listenTCP``/``connectTCP``/``listenUNIX``/``connectUNIX``
and their endpoints give a protocol, on the epoll, poll, select and asyncio
reactors), connected, without ``startTLS`` (``transport.TLS``), not
half-closed or aborting.  Not: TLS (``TLSMemoryBIOProtocol`` is a wrapper
and ``listenSSL`` sets ``TLS``), ``ProtocolWrapper`` and friends from
``twisted.protocols.policies`` (their ``write`` counts bytes, throttles or
resets timeouts: bypassing it would break them), subclasses (they may
override ``write``), process and stdio transports.  Which files: those the
engine reads inline (local disks and tmpfs; not FUSE, NFS and other slow
mounts where even a cached ``sendfile`` may wait for a server, not the
``threads`` engine, not pseudo file systems such as /proc), with a non-zero
``fstat`` size.  Linux only (residency is checked with ``mincore``).

twisted.web: write the status line and headers with ``request.write(b"")``
(with a ``Content-Length``: a chunked body cannot bypass the request), then
``send_file(loader, handle, request.channel.transport, ...)``, then
``request.finish()``.  The ``HTTPChannel`` holds the transport's producer
slot for the whole connection; the transfer borrows it while no request
producer is registered and gives it back (``TransportWritable.take_slot``).

How it works:

* **The transport's own writability, borrowed** (``TransportWritable``, the
  one class that relies on Twisted's transport internals).  A transport
  accepts one producer; we register a *pull* producer.  Twisted's
  ``FileDescriptor.doWrite`` calls a pull producer's ``resumeProducing``
  exactly when its write buffer has been flushed to the socket, and
  ``startWriting()`` with an empty buffer makes the reactor call ``doWrite``
  as soon as the socket is writable.  So "the buffer is empty and the socket
  can take more" arrives as ``resumeProducing`` on every reactor, through
  the transport's existing registration (a second registration of the same
  fd is impossible on epoll).  Bytes the protocol wrote before (HTTP
  headers) or during the transfer are flushed first: ``sendfile`` only runs
  when the transport's buffer is empty, so the socket sees them in order.
* **Never waiting for the disk in the reactor thread.**  Before each
  ``sendfile`` (at most ``MAX_CHUNK`` = 1 MiB) the range's residency is read
  with ``mincore`` on a read-only mapping of the file (a mapping touches no
  page; ``mincore`` reports only up-to-date pages, so pages still being read
  by readahead count as missing).  The resident prefix is sent; a missing
  page is read by the loader's engine off the reactor thread (pool or
  io_uring; the read also brings the following pages in by readahead), and
  those bytes are written to the transport normally.  Measured here per
  1 MiB (CPU): mapping + ``mincore`` 40-60 µs, a ``preadv2(RWF_NOWAIT)`` probe
  into a 1 MiB scratch buffer 640 µs (it copies: the cost zero-copy avoids;
  and on a miss it starts readahead, which would disturb what it measures),
  ``sendfile`` itself ~130-500 µs.  A page evicted between the check and
  the ``sendfile`` (microseconds) would still be read in the reactor thread:
  the residual risk.
* **Bounded turns.**  One reactor turn sends for at most ``TURN_BUDGET``
  seconds, then waits for writability again; a full socket (short
  ``sendfile``, EAGAIN) waits for writability.
* **Ends.**  ``connectionLost`` (the transport calls ``stopProducing``)
  fails the Deferred with ``ConsumerStopped(written)``; so does a socket
  error from ``sendfile`` (EPIPE, ECONNRESET), after which the transport is
  disconnected in the next turn the way the reactor does after a failed
  write (its protocol gets ``connectionLost(ConnectionLost)``).  Cancelling
  the Deferred stops the transfer.  ``sendfile`` refusing the file (EINVAL,
  ENOSYS, ...) or ``mmap`` failing switches the rest to ``loader.stream``.
  While the transfer runs, nothing else should write to the transport (as
  with any producer): such bytes are sent before the next chunk.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import os
import sys
from collections import Counter
from time import perf_counter
from typing import Any, Callable

from twisted.internet import defer, error as net_error, tcp
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _buffers
from .engines.base import Op
from .errors import ConsumerStopped
from .handle import FileHandle, HandleState

try:
    from twisted.internet import unix as _unix
except ImportError:  # pragma: no cover - no AF_UNIX
    _unix = None  # type: ignore[assignment]

__all__ = ["send_file", "SendfileTransfer", "TransportWritable", "zero_copy_refusal",
           "file_refusal", "stats", "MAX_CHUNK", "TURN_BUDGET"]

#: Bytes per ``sendfile`` call (and per residency check).
MAX_CHUNK = 1 << 20
#: Seconds one reactor turn may spend sending before it waits for writability again.
TURN_BUDGET = 0.001
#: Bytes mapped at once for residency checks.
_WINDOW = 64 << 20
_PAGE = mmap.PAGESIZE

PLAIN_TRANSPORTS: tuple[type, ...] = (tcp.Server, tcp.Client) + (
    (_unix.Server, _unix.Client) if _unix is not None else ())

# File systems whose files say nothing true in fstat or may not splice.
PSEUDO_FS = frozenset({"proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2",
                       "configfs", "pstore", "efivarfs", "bpf", "fusectl", "devpts", "mqueue",
                       "hugetlbfs", "autofs", "binfmt_misc", "rpc_pipefs", "nsfs"})

# errno values of sendfile() that mean the peer or the socket is gone.
_SOCKET_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED,
                          errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                          errno.EHOSTDOWN, errno.ESHUTDOWN})
# errno values that mean "this file (system) does not do sendfile": use the read path.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP,
                          errno.EOVERFLOW, errno.ESPIPE, errno.ENODEV})

#: Totals over every transfer in this process (see ``stats()``).
_TOTALS: Counter[str] = Counter()


def stats() -> dict[str, int]:
    """Totals over all transfers: ``transfers``, ``zero_copy``, ``fallbacks``,
    ``sendfile_calls``, ``sendfile_bytes``, ``residency_checks``,
    ``offthread_reads``, ``offthread_bytes``, ``writable_waits``,
    ``socket_full``, ``stream_bytes``, ``stopped``, ``failed``."""
    keys = ("transfers", "zero_copy", "fallbacks", "sendfile_calls", "sendfile_bytes",
            "residency_checks", "offthread_reads", "offthread_bytes", "writable_waits",
            "socket_full", "stream_bytes", "stopped", "failed")
    return {k: _TOTALS[k] for k in keys}


# -- residency: mmap + mincore through ctypes (Linux) ------------------------------
_MINCORE: Any = None
if sys.platform.startswith("linux") and hasattr(os, "sendfile"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _c_mmap = _libc.mmap
        _c_mmap.restype = ctypes.c_void_p
        _c_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            ctypes.c_long]
        _c_munmap = _libc.munmap
        _c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _MINCORE = _libc.mincore
        _MINCORE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):  # pragma: no cover
        _MINCORE = None
_MAP_FAILED = ctypes.c_void_p(-1).value
_BIT0 = bytes(i & 1 for i in range(256))  # mincore: only bit 0 of each byte is defined


class _Residency:
    """Which pages of a file range are in the page cache (``mincore``), without
    touching them: a read-only mapping of a window of the file, moved as the
    transfer advances (so growth and huge files need no special case)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.addr: int | None = None
        self.start = 0
        self.length = 0
        self.vec = ctypes.create_string_buffer(MAX_CHUNK // _PAGE + 2)

    def _map(self, start: int, length: int) -> None:
        self.close()
        addr = _c_mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, self.fd, start)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        self.addr, self.start, self.length = addr, start, length

    def resident(self, pos: int, n: int) -> int:
        """How many bytes from ``pos`` (at most ``n``) are in the page cache."""
        first = pos - pos % _PAGE
        last = pos + n
        if self.addr is None or first < self.start or last > self.start + self.length:
            self._map(first, max(_WINDOW, last - first))
        span = last - first
        pages = -(-span // _PAGE)
        if len(self.vec) < pages:
            self.vec = ctypes.create_string_buffer(pages)
        assert self.addr is not None
        if _MINCORE(self.addr + (first - self.start), span, self.vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        missing = ctypes.string_at(self.vec, pages).translate(_BIT0).find(0)
        if missing < 0:
            return n
        return max(0, min(n, first + missing * _PAGE - pos))

    def close(self) -> None:
        addr, self.addr = self.addr, None
        if addr is not None:
            _c_munmap(addr, self.length)


# -- what qualifies ------------------------------------------------------------------
def zero_copy_refusal(transport: Any) -> str | None:
    """None if ``sendfile`` may write into ``transport``, else why not."""
    if _MINCORE is None:
        return "no os.sendfile + mincore here (Linux only)"
    kind = type(transport)
    if kind not in PLAIN_TRANSPORTS:
        return f"{kind.__module__}.{kind.__qualname__} is not a plain TCP/UNIX transport"
    if getattr(transport, "TLS", False):
        return "TLS was started on the transport"
    if not transport.connected or transport.disconnected:
        return "the transport is not connected"
    if transport._writeDisconnecting or transport._writeDisconnected:
        return "the transport's write side is closed"
    if getattr(transport, "_aborting", False):
        return "the transport is aborting"
    if getattr(transport, "socket", None) is None:
        return "the transport has no socket"
    return None


def file_refusal(handle: FileHandle) -> str | None:
    """None if ``sendfile`` from this open file never waits for storage once
    its pages are resident, else why not."""
    f = handle.file
    if f is None:
        return "the handle is not open"
    if not f.inline:
        return "the engine does not read this file inline (slow mount, threads engine)"
    if f.size <= 0:
        return "fstat says size 0 (an empty or /proc-like file): read path"
    inline = getattr(handle.loader.engine, "inline", None)
    mounts = getattr(inline, "mounts", None)
    if mounts is not None:
        m = mounts.for_dev(f.dev)
        if m is not None and m.fstype in PSEUDO_FS:
            return f"{m.fstype} is a pseudo file system"
    return None


# -- the hook into the transport -----------------------------------------------------
@implementer(IPullProducer)
class TransportWritable:
    """Borrows a Twisted socket transport's writability (the whole hook).

    Public API: registered as a *pull* producer (``registerProducer(self,
    False)``), ``FileDescriptor.doWrite`` calls ``resumeProducing`` whenever
    it has flushed its buffer completely; ``startWriting()`` (a public
    method of ``FileDescriptor``) asks the reactor for ``doWrite`` when the
    socket is writable, which with an empty buffer sends nothing and calls
    ``resumeProducing``.  ``stopProducing`` comes from ``connectionLost``.

    Internals read: ``dataBuffer``/``offset``/``_tempDataLen`` (and a UNIX
    transport's ``_sendmsgQueue``) to know that nothing is buffered;
    ``socket`` for the descriptor.  ``lose()`` disconnects the transport
    after a failed ``sendfile`` exactly as the reactor does after a failed
    ``doWrite`` (``removeReader``, ``removeWriter``, ``connectionLost``).

    ``take_slot()``: a transport has one producer slot, and twisted.web's
    ``HTTPChannel`` occupies it for the whole connection (it relays the
    transport's pause/resume to the current request's producer).  While no
    request producer is registered with the channel it produces nothing
    itself, so a transfer may hold the slot and give it back (paused state
    included) when it ends.  Any other registered producer is left alone:
    ``registerProducer`` then fails with Twisted's ``RuntimeError``.
    """

    def __init__(self, transport: Any, on_writable: Callable[[], None],
                 on_stop: Callable[[], None]) -> None:
        self.transport = transport
        self.on_writable = on_writable
        self.on_stop = on_stop
        self.attached = False
        self.waits = 0

    def fileno(self) -> int:
        return int(self.transport.socket.fileno())

    def buffer_empty(self) -> bool:
        t = self.transport
        return (len(t.dataBuffer) == t.offset and not t._tempDataLen
                and not getattr(t, "_sendmsgQueue", None))

    def attach(self) -> None:
        """Register; ``on_writable`` may run now (a pull producer is resumed at once)."""
        self.attached = True
        self.transport.registerProducer(self, False)

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            if self.transport.producer is self:
                self.transport.unregisterProducer()

    @staticmethod
    def take_slot(transport: Any) -> Callable[[], None] | None:
        """Free the producer slot if an idle twisted.web ``HTTPChannel`` holds
        it; returns what gives it back (None: nothing was taken)."""
        producer = getattr(transport, "producer", None)
        if producer is None or not _idle_http_channel(producer):
            return None
        streaming, paused = transport.streamingProducer, transport.producerPaused
        transport.unregisterProducer()

        def give_back() -> None:
            if transport.connected and not transport.disconnected and transport.producer is None:
                transport.registerProducer(producer, streaming)
                if paused:  # let the transport resume it once its buffer is empty
                    transport.producerPaused = True
                    transport.startWriting()

        return give_back

    def want_writable(self) -> None:
        """Call ``on_writable`` once the buffer is flushed and the socket writable."""
        self.waits += 1
        self.transport.startWriting()

    def lose(self, reason: BaseException) -> None:
        t = self.transport
        if t.connected and not t.disconnected:
            t.reactor.removeReader(t)
            t.reactor.removeWriter(t)
            t.connectionLost(Failure(net_error.ConnectionLost(str(reason))))

    # IPullProducer, called by the transport
    def resumeProducing(self) -> None:
        if not self.attached:
            return
        if self.buffer_empty():
            self.on_writable()
        else:  # bytes written before us (or meanwhile) go first
            self.transport.startWriting()

    def stopProducing(self) -> None:
        if self.attached:
            self.attached = False
            self.on_stop()

    def pauseProducing(self) -> None:  # never called for a pull producer
        pass


def _idle_http_channel(producer: Any) -> bool:
    http = sys.modules.get("twisted.web.http")  # only if twisted.web is in use
    channel = getattr(http, "HTTPChannel", None)
    return (channel is not None and isinstance(producer, channel)
            and getattr(producer, "_requestProducer", True) is None)


# -- the transfer --------------------------------------------------------------------
class _State(enum.Enum):
    NEW = "new"
    SENDING = "sending"      # attached: sends when the transport says it is writable
    READING = "reading"      # a missing range is being read off the reactor thread
    PAUSED = "paused"        # pauseProducing() by the user
    STREAMING = "streaming"  # handed to loader.stream (fallback)
    ENDING = "ending"        # stopped while a read runs: waits for it
    DONE = "done"


class SendfileTransfer:
    """One transfer of a range of an open ``FileHandle`` into a transport.

    ``start()`` returns ``deferred`` (see ``send_file``).  ``route`` is
    ``"sendfile"`` or ``"read"`` (``reason`` says why); the counters say what
    happened: ``sendfile_calls``, ``sendfile_bytes``, ``residency_checks``,
    ``offthread_reads``/``offthread_bytes`` (missing pages read off the
    reactor thread), ``writable_waits`` (turn budget or full socket),
    ``socket_full`` (of those, the socket took less than offered: a short
    ``sendfile`` or ``EAGAIN``), ``stream_bytes`` (read path).
    ``pauseProducing``/``resumeProducing``/``stopProducing`` let an owner
    (``FileSender``) control it; the transport's backpressure needs none.

    It registers with the handle as a reader: ``handle.close()`` (or the
    loader's) stops it and waits for it; with ``own_handle`` it closes the
    handle itself before firing.
    """

    def __init__(self, loader: Any, handle: FileHandle, transport: Any, offset: int = 0,
                 length: int | None = None, *, own_handle: bool = False,
                 max_chunk: int = MAX_CHUNK, turn_budget: float = TURN_BUDGET) -> None:
        if type(offset) is not int or offset < 0:
            raise ValueError(f"offset must be a non-negative int, not {offset!r}")
        if length is not None and (type(length) is not int or length < 0):
            raise ValueError(f"length must be None or a non-negative int, not {length!r}")
        self.loader = loader
        self.handle = handle
        self.transport = transport
        self.offset = offset
        self.length = length
        self.own_handle = own_handle
        self.max_chunk = max(_PAGE, min(max_chunk, MAX_CHUNK))
        self.turn_budget = turn_budget
        self.pos = offset
        self.stop_at = None if length is None else offset + length
        self.state = _State.NEW
        self.route: str | None = None
        self.reason: str | None = None
        self.deferred: defer.Deferred[int] = defer.Deferred(self._cancel)
        self._outcome: Any = None
        self._hook: TransportWritable | None = None
        self._residency: _Residency | None = None
        self._op: Op | None = None
        self._stream: defer.Deferred[int] | None = None
        self._give_back: Callable[[], None] | None = None
        self._size = 0
        self._streamed = 0
        self._paused_while = False
        self.sendfile_calls = 0
        self.sendfile_bytes = 0
        self.residency_checks = 0
        self.offthread_reads = 0
        self.offthread_bytes = 0
        self.stream_bytes = 0
        self.socket_full = 0

    @property
    def written(self) -> int:
        """Bytes handed to the socket or the transport so far."""
        return self.pos - self.offset + self._streamed

    @property
    def writable_waits(self) -> int:
        return self._hook.waits if self._hook is not None else 0

    # -- starting ---------------------------------------------------------------
    def start(self) -> defer.Deferred[int]:
        if self.state is not _State.NEW:
            return self.deferred
        _TOTALS["transfers"] += 1
        handle = self.handle
        if handle.state is not HandleState.OPEN:
            self.state = _State.DONE
            self._fire(Failure(ValueError(f"I/O operation on a handle that is {handle.state.value}")))
            return self.deferred
        handle.add_reader(self)  # type: ignore[arg-type]  # handle.abandon() calls our end()
        try:
            self._give_back = TransportWritable.take_slot(self.transport)
        except Exception:  # pragma: no cover
            self._give_back = None
        reason = zero_copy_refusal(self.transport) or file_refusal(handle)
        if reason is None:
            assert handle.file is not None
            self._size = handle.file.size
            try:
                self._residency = _Residency(handle.file.fd)
            except Exception as e:  # pragma: no cover
                reason = f"residency check unavailable: {e}"
        if reason is not None:
            self._fallback(reason)
            return self.deferred
        self.route = "sendfile"
        _TOTALS["zero_copy"] += 1
        self.state = _State.PAUSED if self._paused_while else _State.SENDING
        self._hook = TransportWritable(self.transport, self._pump, self._consumer_stopped)
        try:
            self._hook.attach()  # may pump (and even finish) right here
        except Exception:
            self._hook.attached = False
            self.end(Failure())
        return self.deferred

    def _fallback(self, reason: str) -> None:
        """The rest of the range through ``loader.stream`` (a FileReader push producer)."""
        if self.route is None:
            self.route = "read"
            _TOTALS["fallbacks"] += 1
        self.reason = reason
        if self._hook is not None:
            self._hook.detach()
        self._close_residency()
        self.state = _State.STREAMING
        remaining = None if self.stop_at is None else self.stop_at - self.pos
        d = self.loader.stream(self.handle, self.transport, self.pos, remaining)
        self._stream = d
        d.addCallbacks(self._streamed_ok, self._streamed_failed)

    def _streamed_ok(self, n: int) -> None:
        self._stream = None
        self._streamed += n
        self.stream_bytes += n
        if self.state is _State.STREAMING:
            self._finish(None)

    def _streamed_failed(self, failure: Failure) -> None:
        self._stream = None
        if isinstance(failure.value, ConsumerStopped):
            n = failure.value.written
            self._streamed += n
            self.stream_bytes += n
            failure = Failure(ConsumerStopped(self.written))
        if self.state is _State.STREAMING:
            self._finish(failure)

    # -- sending ------------------------------------------------------------------
    def _pump(self) -> None:
        """The transport's buffer is empty and its socket writable: send."""
        if self.state is not _State.SENDING:
            return
        hook = self._hook
        residency = self._residency
        assert hook is not None and residency is not None and self.handle.file is not None
        fd = self.handle.file.fd
        sock = hook.fileno()
        deadline = perf_counter() + self.turn_budget
        while True:
            pos = self.pos
            n = self.max_chunk if self.stop_at is None else min(self.max_chunk, self.stop_at - pos)
            if n <= 0:
                self._finish(None)
                return
            if pos >= self._size:  # at fstat's end: did the file grow?
                try:
                    self._size = os.fstat(fd).st_size
                except OSError:
                    self.end(Failure())
                    return
                if pos >= self._size:
                    self._finish(None)  # end of file (a range past it is short, like pread)
                    return
            n = min(n, self._size - pos)
            self.residency_checks += 1
            try:
                resident = residency.resident(pos, n)
            except OSError as e:
                self._fallback(f"residency check failed: {e}")
                return
            if resident <= 0:
                self._read_missing(pos, n)
                return
            try:
                sent = os.sendfile(sock, fd, pos, resident)
            except (BlockingIOError, InterruptedError):
                self.socket_full += 1
                hook.want_writable()
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.socket_full += 1
                    hook.want_writable()
                elif e.errno in _SOCKET_GONE:
                    # The peer is gone.  End now, then disconnect the transport
                    # in the next turn (the reactor would after a failed write;
                    # never connectionLost inside the caller's send_file()).
                    self.end(Failure(ConsumerStopped(self.written)))
                    self.transport.reactor.callLater(0, hook.lose, e)
                elif e.errno in _UNSUPPORTED and self.sendfile_calls == 0:
                    self._fallback(f"sendfile refused this file: {e}")
                elif e.errno in _UNSUPPORTED:
                    self._fallback(f"sendfile failed mid-transfer: {e}")
                else:
                    self.end(Failure())
                return
            self.sendfile_calls += 1
            if sent == 0:
                # Resident, yet nothing to send: the file shrank (end of file).
                self._finish(None)
                return
            self.pos += sent
            self.sendfile_bytes += sent
            if self.pos == self.stop_at:
                # The last byte is on the socket: say so now, not a turn later
                # (a client that has its whole answer may close at once).
                self._finish(None)
                return
            if sent < resident:
                self.socket_full += 1
                hook.want_writable()  # the socket is full
                return
            if perf_counter() >= deadline:
                hook.want_writable()  # the turn is over
                return

    def _read_missing(self, pos: int, n: int) -> None:
        """``[pos, pos + n)`` starts with a page that is not cached: read a chunk off
        the reactor thread (engine: pool or io_uring) and write it normally."""
        size = min(n, self.loader.chunk_size)
        obj, view = _buffers.allocate(size)
        self.state = _State.READING
        self.offthread_reads += 1
        try:
            op = self.loader.engine.read(self.handle.file, view, pos)
        except Exception:
            op = Op.failed()
        self._op = op
        op.deferred.addCallbacks(self._read_done, self._read_failed, callbackArgs=(obj, view),
                                 errbackArgs=(view,))

    def _read_done(self, n: int, obj: Any, view: memoryview) -> None:
        self._op = None
        state = self.state
        if state is _State.ENDING:
            _release(view)
            self._done()
            return
        if n == 0:
            _release(view)
            self.state = _State.SENDING
            self._finish(None)  # end of file
            return
        data = _buffers.finish(obj, view, n)
        _release(view)
        self.pos += n
        self.offthread_bytes += n
        self.state = _State.PAUSED if self._paused_while else _State.SENDING
        # Written after everything before it; the transport resumes us
        # (pull producer) once these bytes are on the socket.
        self.transport.write(data)

    def _read_failed(self, failure: Failure, view: memoryview) -> None:
        self._op = None
        _release(view)
        if self.state is _State.ENDING:
            self._done()
            return
        self.state = _State.SENDING
        self.end(failure)

    # -- control --------------------------------------------------------------------
    def pauseProducing(self) -> None:
        self._paused_while = True
        if self.state is _State.SENDING:
            self.state = _State.PAUSED

    def resumeProducing(self) -> None:
        self._paused_while = False
        if self.state is _State.PAUSED:
            self.state = _State.SENDING
            assert self._hook is not None
            self._hook.want_writable()

    def stopProducing(self) -> None:
        self.end(Failure(ConsumerStopped(self.written)))

    def _consumer_stopped(self) -> None:
        """The transport lost its connection (it called the hook's stopProducing)."""
        if self._hook is not None:
            self._hook.attached = False  # the transport drops its producer itself
        self.end(Failure(ConsumerStopped(self.written)))

    def _cancel(self, _: Any) -> None:
        self.end(Failure(defer.CancelledError()))

    # -- ending ---------------------------------------------------------------------
    def end(self, outcome: Failure | None) -> None:
        """Stop with ``outcome`` (None: success).  Also what ``handle.close()`` calls."""
        state = self.state
        if state in (_State.ENDING, _State.DONE):
            return
        if state is _State.STREAMING:
            self._outcome = outcome
            self.state = _State.ENDING
            stream, self._stream = self._stream, None
            if stream is not None:
                stream.cancel()  # the FileReader stops; the handle waits for it
            self._done()
            return
        if state is _State.NEW:
            self.state = _State.DONE
            self._fire(outcome if outcome is not None else self.written)
            return
        self._outcome = outcome
        if self._hook is not None:
            self._hook.detach()
        if state is _State.READING:
            self.state = _State.ENDING
            op = self._op
            if op is not None:
                op.cancel()  # a read already running is waited for
            return
        self._done()

    def _finish(self, outcome: Failure | None) -> None:
        if self.state is _State.STREAMING:
            self.state = _State.ENDING
            self._outcome = outcome
            self._done()
            return
        self.end(outcome)

    def _done(self) -> None:
        self.state = _State.DONE
        self._close_residency()
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            try:
                give_back()
            except Exception:  # pragma: no cover - the connection is going away
                pass
        outcome = self._outcome if self._outcome is not None else self.written
        self._outcome = None
        self._count(outcome)
        hook = self._hook
        if hook is not None:  # its callbacks are our bound methods: a reference cycle
            hook.on_writable = hook.on_stop = _nothing
        handle = self.handle
        handle.remove_reader(self)  # type: ignore[arg-type]  # duck-typed: end(failure)
        if self.own_handle:
            handle.close().addBoth(lambda _: self._fire(outcome))
        else:
            self._fire(outcome)

    def _count(self, outcome: Any) -> None:
        for key in ("sendfile_calls", "sendfile_bytes", "residency_checks", "offthread_reads",
                    "offthread_bytes", "stream_bytes", "socket_full"):
            _TOTALS[key] += getattr(self, key)
        _TOTALS["writable_waits"] += self.writable_waits
        if isinstance(outcome, Failure):
            _TOTALS["stopped" if outcome.check(ConsumerStopped) else "failed"] += 1

    def _close_residency(self) -> None:
        residency, self._residency = self._residency, None
        if residency is not None:
            residency.close()

    def _fire(self, outcome: Any) -> None:
        if not self.deferred.called:
            if isinstance(outcome, Failure):
                self.deferred.errback(outcome)
            else:
                self.deferred.callback(outcome)


def _nothing() -> None:
    pass


def _release(view: memoryview | None) -> None:
    if view is not None:
        try:
            view.release()
        except BufferError:  # pragma: no cover - still exported by an abandoned ring read
            pass


# -- the entry point -----------------------------------------------------------------
def send_file(loader: Any, source: Any, transport: Any, offset: int = 0,
              length: int | None = None, *, root: Any = None) -> defer.Deferred[int]:
    """Send ``[offset, offset + length)`` of ``source`` (all from ``offset``
    when ``length`` is None; like ``pread``, a range past the end is short)
    into ``transport``; fires with the number of bytes written.

    ``source``: a ``FileHandle`` of ``loader`` (not closed here: the caller
    owns it; typical for a server that stats, sends headers, then the body),
    a path (opened under the loader's limits, beneath ``root`` if given,
    and closed before the Deferred fires), or a descriptor (duplicated, so the caller keeps and closes its
    own; its file position is not used or moved).

    Zero-copy where the transport and the file qualify (module docstring),
    ``loader.stream(...)`` otherwise.  Fails with ``ConsumerStopped(written)``
    when the connection is lost, with the file's error (``EIO``...), or with
    ``CancelledError`` when cancelled.  Nothing else should write to the
    transport until it fires.

    Why this signature: the loader, not a reactor, because it owns what a
    transfer needs besides the socket -- the engine's verdict on which
    files may be read in the reactor thread, the off-thread reads for pages
    that are not cached, the ``max_open`` limit, and the read path to fall
    back to; ``offset``/``length`` as in ``loader.stream``; a count as the
    result, as ``loader.stream``.
    """
    if type(offset) is not int or offset < 0 or (
            length is not None and (type(length) is not int or length < 0)):
        return defer.fail(ValueError(f"bad range: offset={offset!r}, length={length!r}"))
    if isinstance(source, FileHandle):
        return SendfileTransfer(loader, source, transport, offset, length).start()
    if isinstance(source, int) and not isinstance(source, bool):
        try:
            fd = os.dup(source)
        except OSError:
            return defer.fail()
        opening = loader.adopt(fd)
    else:
        opening = loader.open(source, root=root)
    result: defer.Deferred[int] = defer.Deferred(lambda _: current[0].cancel())
    current: list[defer.Deferred[Any]] = [opening]

    def opened(handle: FileHandle) -> None:
        transfer = SendfileTransfer(loader, handle, transport, offset, length, own_handle=True)
        current[0] = transfer.deferred
        transfer.start().chainDeferred(result)

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(failure)

    opening.addCallbacks(opened, failed)
    return result


# -- adopting a descriptor ----------------------------------------------------------------
def adopt(loader: Any, fd: int, path: str | None = None) -> defer.Deferred[FileHandle]:
    """``loader.adopt(fd, path)`` (this module's name for it predates the
    method; the handle is ``asyncfile.handle._AdoptedHandle``)."""
    d: defer.Deferred[FileHandle] = loader.adopt(fd, path)
    return d
