"""``FileLoader``: whole files, byte ranges, streams and open handles, under limits.

One route for every load: a ``FileHandle`` (the one owner of the place and
the descriptor: see ``handle.py``) and a ``_Read`` of a range of it into a
sink.  A small cached file is the same route with every step done in the
calling reactor turn: open, one ``RWF_NOWAIT`` read, a read that confirms
end of file, close — no reader registered, no thread, no extra turn.
"""

from __future__ import annotations

import enum
import os
import weakref
from collections import deque
from time import perf_counter
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _buffers
from .engines import IOPool, make_engine
from .engines.base import IFileEngine, Op, Root
from .errors import ForkedError, LoaderClosed, Overloaded
from .handle import FileHandle, HandleState, _AdoptedHandle
from .interfaces import IFileLoader
from .limiter import Limiter
from .reader import BufferSink, ConsumerSink, FileReader, _release
from .writer import FileConsumer, WriteState

__all__ = ["FileLoader", "read_file", "default_loader"]

_LOADERS: "weakref.WeakSet[FileLoader]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loader in list(_LOADERS):
        loader._state = _LoaderState.FORKED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _LoaderState(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    FORKED = "forked"  # in the child of a fork(): everything is the parent's


class _Kind(enum.Enum):
    LOAD = "load"      # into bytes
    STREAM = "stream"  # into an IConsumer
    READER = "reader"  # hand out an unstarted FileReader


class _Read:
    """A range of a handle into a sink; closes the handle after if it opened it.

    ``result`` fires once: on success or error after the handle it owns is
    closed (its place given back); on cancellation at once (Twisted's
    contract), while the descriptor is closed as soon as nothing runs on it.
    """

    __slots__ = ("loader", "handle", "own", "offset", "length", "consumer", "kind", "result", "reader",
                 "registered")

    def __init__(self, loader: "FileLoader", offset: int, length: int | None,
                 consumer: IConsumer | None, kind: _Kind) -> None:
        self.loader = loader
        self.handle: FileHandle | None = None
        self.own = True
        self.offset = offset
        self.length = length
        self.consumer = consumer
        self.kind = kind
        self.reader: FileReader | None = None
        self.registered = False  # registered as the consumer's producer
        self.result: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def _cancel(self, _: defer.Deferred[Any]) -> None:
        self.loader.cancelled += 1
        reader, handle = self.reader, self.handle
        if reader is not None:
            reader.end(Failure(defer.CancelledError()))
        elif handle is not None and self.own:
            handle.abandon()

    # -- the handle is open (or failed to open) ---------------------------
    def opened(self, handle: Any) -> None:
        if isinstance(handle, Failure):
            self._fire(handle)
            return
        if self.result.called and self.kind is not _Kind.READER:  # cancelled meanwhile
            self._release_handle()
            return
        loader = self.loader
        f = handle.file
        try:
            size = f.size - self.offset if f.size > self.offset else 0
            expected = size if self.length is None or self.length > size else self.length
            if self.kind is _Kind.LOAD and f.inline and expected <= loader.chunk_size:
                data = self._read_small(f, expected)
                if data is not None:
                    self._done(data)
                    return
            if self.kind is _Kind.STREAM:
                sink: Any = ConsumerSink(self.consumer, expected, self.length,  # type: ignore[arg-type]
                                         loader.chunk_size)  # STREAM: there is a consumer
            else:
                sink = BufferSink(expected, self.length, loader.chunk_size)
            reader = FileReader(f, loader.engine, sink, self.offset, reactor=loader.reactor,
                                owner=self._reader_done, inline_steps=0 if self.kind is _Kind.READER else 2)
        except Exception:
            self._done(Failure())
            return
        self.reader = reader
        handle.add_reader(reader)
        if self.kind is _Kind.READER:
            self.result.callback(reader)
            return
        if self.kind is _Kind.STREAM:
            try:
                self.consumer.registerProducer(reader, True)  # type: ignore[union-attr]
            except Exception:  # e.g. twisted.web: a producer is registered already
                reader.end(Failure())
                return
            self.registered = True
        reader.start()

    def _read_small(self, f: Any, expected: int) -> bytes | None:
        """The whole range in this turn if it is in the page cache; else None.
        (Its time is charged to the turn by whoever called ``opened``.)"""
        loader = self.loader
        read = loader.engine.read_inline
        obj, view = _buffers.allocate(expected)
        try:
            n = read(f, view, self.offset) if expected else 0
            if n == expected and (expected == self.length or self.offset + n >= _MAX_OFFSET
                                  or read(f, loader._eof_probe, self.offset + n) == 0):
                return _buffers.finish(obj, view, n)
        except BlockingIOError:
            pass  # not cached: the FileReader reads it
        finally:
            _release(view)
        return None

    def _reader_done(self, outcome: Any) -> None:
        reader = self.reader
        if self.registered:  # never someone else's producer
            self.registered = False
            try:
                self.consumer.unregisterProducer()  # type: ignore[union-attr]
            except Exception:
                pass
        self.handle.remove_reader(reader)  # type: ignore[union-attr, arg-type]  # both set by opened()
        if reader is not None and self.kind is not _Kind.READER and not reader.deferred.called:
            # Nobody waits on it (``result`` is ours); fired, it drops its
            # canceller, a bound method of the reader: a reference cycle.
            reader.deferred.callback(None)
        self._done(outcome)

    def _done(self, outcome: Any) -> None:
        """The read is over: close the handle if it is ours, then fire."""
        if self.own:
            handle: FileHandle = self.handle  # type: ignore[assignment]  # set by opened()
            handle.abandon()
            if handle.state is HandleState.CLOSED:  # closed inline, at once
                self._fire(outcome)
            else:
                handle.when_closed(lambda: self._fire(outcome))
        else:
            self._fire(outcome)

    def _release_handle(self) -> None:
        if self.own and self.handle is not None:
            self.handle.abandon()

    def _fire(self, outcome: Any) -> None:
        loader = self.loader
        if isinstance(outcome, Failure):
            if not outcome.check(defer.CancelledError, Overloaded):
                loader.errors += 1
        elif self.kind is not _Kind.READER:
            loader.loaded += 1
            loader.bytes += outcome if type(outcome) is int else len(outcome)
        reader = self.reader
        if self.kind is _Kind.READER and reader is not None:
            if isinstance(outcome, Failure) and outcome.check(defer.CancelledError):
                loader.cancelled += 1  # its owner cancelled the reader's Deferred
            reader.fire()  # the reader's own Deferred, now that the descriptor is closed
            return
        if not self.result.called:
            if isinstance(outcome, Failure):
                self.result.errback(outcome)
            else:
                self.result.callback(outcome)


_MAX_OFFSET = 2**63 - 1  # off_t


def _check_range(offset: Any, length: Any) -> None:
    if type(offset) is not int or offset < 0:
        raise ValueError(f"offset must be a non-negative int, not {offset!r}")
    if offset > _MAX_OFFSET:
        raise OverflowError(f"offset {offset} does not fit in an off_t")
    if length is not None and (type(length) is not int or length < 0):
        raise ValueError(f"length must be None or a non-negative int, not {length!r}")


@implementer(IFileLoader)
class FileLoader:
    """Loads files without blocking the reactor, with bounded descriptors and waiters.

    :param reactor: the reactor (default: the global one).
    :param max_open: descriptors open at once (counting opens in progress);
        further loads wait, first come first served.
    :param max_waiting: loads allowed to wait; beyond that ``load`` fails at
        once with ``Overloaded`` (None: no bound).
    :param chunk_size: bytes read per reactor iteration (and per off-thread read).
    :param engine: ``"auto"``, ``"io_uring"``, ``"nowait"`` or ``"threads"``;
        or an ``IFileEngine`` (``make_engine(...)``), which the loader then
        owns and stops.
    :param io_threads: size of the dedicated I/O thread pool.
    :param turn_budget: seconds of inline work (page-cache copies, local
        opens) one reactor turn may do for new loads before the rest start in
        the next turn: a burst of thousands of cached loads must not stall
        the reactor either.
    """

    def __init__(self, reactor: Any = None, max_open: int = 64, max_waiting: int | None = 1024,
                 chunk_size: int = 256 * 1024, engine: Any = "auto", io_threads: int = 16,
                 turn_budget: float | None = 0.001) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.reactor = reactor
        self.chunk_size = chunk_size
        self._limiter = Limiter(max_open, max_waiting)
        if isinstance(engine, str):
            self.pool: IOPool | None = IOPool(reactor, io_threads)
            self.engine: IFileEngine = make_engine(engine, reactor, self.pool)
        elif IFileEngine.providedBy(engine):
            self.engine = engine
            self.pool = None
        else:
            raise TypeError(f"engine must be a name or an IFileEngine, not {engine!r}")
        self._eof_probe = memoryview(bytearray(1))  # used in the reactor thread only
        self.turn_budget = turn_budget
        self._spent = 0.0
        self._turn_pending = False
        self._ready: deque[FileHandle] = deque()  # with a place, waiting for a turn
        self._handles: set[FileHandle | FileConsumer] = set()  # not CLOSED: handles and writes
        self._state = _LoaderState.RUNNING
        self._closing: defer.Deferred[None] | None = None
        self.open_files = 0
        self.loaded = 0
        self.bytes = 0
        self.errors = 0
        self.cancelled = 0
        self.written = 0      # committed writes (write(), file_consumer())
        self.write_bytes = 0  # and their bytes
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)  # a Clock has none
        self._trigger: Any = (add_trigger("before", "shutdown", self._at_shutdown)
                              if add_trigger is not None else None)
        _LOADERS.add(self)

    # -- turns ----------------------------------------------------------------
    def _charge(self, seconds: float) -> None:
        """Count inline work against this reactor turn's budget (None: no budget)."""
        if self.turn_budget is not None:
            self._spent += seconds
            self._schedule_turn()

    def _schedule_turn(self) -> None:
        if not self._turn_pending:
            self._turn_pending = True
            self.reactor.callLater(0, self._next_turn)

    def _defer_to_next_turn(self, handle: FileHandle) -> None:
        self._ready.append(handle)
        self._schedule_turn()

    def _next_turn(self) -> None:
        self._turn_pending = False
        self._spent = 0.0
        ready = self._ready
        # Wall time, not just what the opens charge: the callbacks that the
        # results run (the caller's code) count against the turn too.
        started = perf_counter()
        while ready:
            handle = ready.popleft()
            if handle.state is HandleState.READY:  # not closed meanwhile
                handle._open_now()
                if self.turn_budget is not None and perf_counter() - started >= self.turn_budget:
                    break
        self._spent = max(self._spent, perf_counter() - started)
        if ready:
            self._schedule_turn()

    def _forget(self, handle: FileHandle | FileConsumer) -> None:
        self._handles.discard(handle)
        if self._state is _LoaderState.CLOSING and not self._handles:
            self._stop_engine()

    # -- the route --------------------------------------------------------------
    def _refusal(self) -> defer.Deferred[Any] | None:
        if self._state is _LoaderState.RUNNING:
            return None
        if self._state is _LoaderState.FORKED:
            return defer.fail(ForkedError())
        return defer.fail(LoaderClosed())

    def _begin(self, source: Any, root: Root | None, offset: Any, length: Any,
               consumer: IConsumer | None, kind: _Kind) -> defer.Deferred[Any]:
        refused = self._refusal()
        if refused is not None:
            return refused
        if isinstance(source, FileHandle):
            try:
                _check_range(offset, length)
                if source.loader is not self:
                    raise ValueError("the handle belongs to another FileLoader")
                if source.state is not HandleState.OPEN:
                    raise ValueError(f"I/O operation on a handle that is {source.state.value}")
            except (ValueError, OverflowError):
                return defer.fail()
            read = _Read(self, offset, length, consumer, kind)
            read.own = False
            read.handle = source
            started = perf_counter()
            read.opened(source)
            self._charge(perf_counter() - started)
            return read.result
        if type(source) is not str or type(offset) is not int or offset < 0 or offset > _MAX_OFFSET or (
                length is not None and (type(length) is not int or length < 0)):
            try:
                _check_range(offset, length)
                source = os.fsdecode(os.fspath(source))
            except (TypeError, ValueError, OverflowError):
                return defer.fail()
        read = _Read(self, offset, length, consumer, kind)
        handle = FileHandle(self, source, root, read.opened)
        read.handle = handle
        self._handles.add(handle)
        handle.start()
        return read.result

    def load(self, source: Any, offset: int = 0, length: int | None = None, *,
             root: Root | None = None) -> defer.Deferred[bytes]:
        """The file's bytes from ``offset``, at most ``length`` of them (all when None).

        ``source`` is a path (relative to ``root`` if given) or a
        ``FileHandle``.  Like ``pread``: a range past the end gives fewer bytes
        or none.  Fails with the original error (``FileNotFoundError``,
        ``OutsideRoot``, ...) or ``Overloaded``; cancel it to give up.
        """
        return self._begin(source, root, offset, length, None, _Kind.LOAD)

    def stream(self, source: Any, consumer: IConsumer, offset: int = 0, length: int | None = None, *,
               root: Root | None = None, zero_copy: bool = False) -> defer.Deferred[int]:
        """Write the file (or a range) into ``consumer`` as a push producer.

        Honours ``pauseProducing``/``resumeProducing``; fires with the number
        of bytes written, or fails with ``ConsumerStopped`` if the consumer
        stopped the producer (a client disconnected).  The consumer is not
        finished: the caller decides what comes after.

        With ``zero_copy=True`` and a plain TCP/UNIX transport of Twisted as
        ``consumer``, the bytes go with ``os.sendfile`` where the file allows
        it (``asyncfile.sendfile``); same result and errors.  Nothing else
        may write to the transport until the Deferred fires.
        """
        if zero_copy:
            from .sendfile import send_file, zero_copy_refusal

            if zero_copy_refusal(consumer) is None:
                return send_file(self, source, consumer, offset, length, root=root)
        return self._begin(source, root, offset, length, consumer, _Kind.STREAM)

    def reader(self, source: Any, offset: int = 0, length: int | None = None, *,
               root: Root | None = None) -> defer.Deferred[FileReader]:
        """A ``FileReader`` for ``source``, opened under this loader's limits
        but not started: attach processing callbacks to its ``deferred``, then
        call ``start()`` (it registers with the reactor and reads one chunk
        per ``doRead``).  Its ``deferred`` fires once the descriptor is closed
        and the place given back (when ``source`` is a path); cancel it to
        give up, started or not.
        """
        return self._begin(source, root, offset, length, None, _Kind.READER)

    def open(self, path: Any, *, root: Root | None = None) -> defer.Deferred[FileHandle]:
        """Open ``path`` (beneath ``root`` if given) as a ``FileHandle``.

        The handle holds a place and a descriptor until its ``close()``: the
        caller owns it.  Cancelling this Deferred gives up the open (an open
        already running off the reactor thread keeps its place until it
        ends; its descriptor is then closed).
        """
        refused = self._refusal()
        if refused is not None:
            return refused
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return defer.fail()
        return self._hand_out(lambda on_open: FileHandle(self, path, root, on_open))

    def _hand_out(self, make: Callable[[Callable[[Any], None]], FileHandle]) -> defer.Deferred[FileHandle]:
        """Start the handle ``make(on_open)`` builds and fire with it once open
        (``open`` and ``adopt``): the caller owns it from then on."""

        def on_open(got: Any) -> None:
            if result.called:
                if isinstance(got, FileHandle):
                    got.abandon()  # cancelled meanwhile
                return
            if isinstance(got, Failure):
                if not got.check(defer.CancelledError, Overloaded):
                    self.errors += 1
                result.errback(got)
            else:
                result.callback(got)

        def cancel(_: Any) -> None:
            self.cancelled += 1
            handle.abandon()

        result: defer.Deferred[FileHandle] = defer.Deferred(cancel)
        handle = make(on_open)
        self._handles.add(handle)
        handle.start()
        return result

    def adopt(self, fd: int, path: str | None = None) -> defer.Deferred[FileHandle]:
        """A ``FileHandle`` that takes over the open descriptor ``fd`` (pass
        ``os.dup(fd)`` to keep yours): it waits for a place under
        ``max_open``, ``fstat``s the descriptor (in the reactor thread on a
        local mount, else off it), refuses what is not a regular file
        (``NotRegularFile``, ``IsADirectoryError``) and classifies it like
        ``open``.  ``fd`` is closed by ``handle.close()``, or before the
        Deferred fails or when it is cancelled.  ``path`` only names the file
        in errors (default: what /proc/self/fd says).
        """
        refused = self._refusal()
        if refused is not None:
            os.close(fd)
            return refused
        return self._hand_out(lambda on_open: _AdoptedHandle(self, fd, path, on_open))

    def write(self, path: Any, data: Any, *, root: Root | None = None, atomic: bool = True,
              mode: int = 0o644, fsync: bool = True) -> defer.Deferred[int]:
        """Write ``data`` (bytes-like, copied) to ``path``; fires with its length.

        Every system call runs in the I/O pool (on every engine), under this
        loader's limits (a place under ``max_open``, or ``Overloaded``).
        ``atomic``: a temporary file in the same directory (beneath ``root``
        if given), written, fsync-ed, renamed over ``path``, then the
        directory fsync-ed — readers see the old or the new file, and a
        failed or cancelled write leaves no temporary file and the target as
        it was.  Not atomic: ``path`` is truncated and written in place.
        ``mode`` is the new file's mode; ``fsync=False`` skips both fsyncs.
        Errors keep their type and the path (``OSError`` ENOSPC,
        ``OutsideRoot``, ...).  See ``asyncfile.writer``.
        """
        from .writer import write

        return write(self, path, data, root=root, atomic=atomic, mode=mode, fsync=fsync)

    def file_consumer(self, path: Any, *, root: Root | None = None, atomic: bool = True,
                      mode: int = 0o644, fsync: bool = True, max_buffer: int = 1 << 20) -> FileConsumer:
        """An ``IConsumer`` (``asyncfile.writer.FileConsumer``) writing to
        ``path`` like ``write``: register a producer or call ``write()``,
        then ``finish()`` (fires with the bytes written) or ``abort()``.
        At most ``max_buffer`` bytes wait before a streaming producer is
        paused.  Raises ``Overloaded`` or ``LoaderClosed`` at once.
        """
        from .writer import file_consumer

        return file_consumer(self, path, root=root, atomic=atomic, mode=mode, fsync=fsync,
                             max_buffer=max_buffer)

    def open_root(self, path: Any, *, no_symlinks: bool = False) -> defer.Deferred[Root]:
        """A ``Root`` for confined opens beneath the directory ``path``.

        Opens resolve with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``
        relative to it (``| RESOLVE_NO_SYMLINKS`` with ``no_symlinks``), or
        with a per-component ``O_NOFOLLOW`` walk where openat2 is missing;
        ``..``, absolute paths and symlinks leading outside fail with
        ``OutsideRoot``.  The root's descriptor is outside ``max_open``;
        ``Root.close()`` releases it.
        """
        refused = self._refusal()
        if refused is not None:
            return refused
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return defer.fail()
        try:
            got = self.engine.open_root(path, no_symlinks)
        except Exception:
            return defer.fail()
        if not isinstance(got, Op):
            return defer.succeed(got)
        wanted = [True]

        def cancel(_: Any) -> None:
            wanted[0] = False
            got.cancel()

        def opened(root: Root) -> None:
            if wanted[0]:
                result.callback(root)
            else:
                root.close()  # cancelled while it was being opened

        def failed(failure: Failure) -> None:
            if wanted[0]:
                result.errback(failure)

        result: defer.Deferred[Root] = defer.Deferred(cancel)
        got.deferred.addCallbacks(opened, failed)
        return result

    def listdir(self, path: Any, *, root: Root | None = None) -> defer.Deferred[list[str]]:
        """The names in the directory ``path`` (beneath ``root`` if given; ``"."``
        is the root itself), sorted, without ``.`` and ``..``.

        Runs in the loader's I/O pool, never in the reactor thread: a listing
        blocks for as long as the storage takes (a FUSE or NFS server), even
        of a local directory that is large.  Its descriptor takes a place
        under ``max_open`` like an open (``Overloaded`` when the queue is
        full).  Confined like ``open`` (``OutsideRoot`` for ``..``, absolute
        paths, symlinks leading outside).  Errors keep their type
        (``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``).
        Cancelling it gives up: a listing not started yet never runs; one
        running ends in its thread and its result is dropped.  ``LoaderClosed``
        / ``ForkedError`` as for loads, also for a listing that was running
        when the loader closed.
        """
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return defer.fail()
        return self._off_thread(self._list_blocking, path, root)

    @staticmethod
    def _list_blocking(path: str, root: Root | None) -> list[str]:
        """Blocking (a pool thread): open the directory (confined beneath
        ``root``), list it through that descriptor, close it."""
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        if root is None:
            fd = os.open(path, flags)
        else:
            from .confine import open_beneath

            if root.closed:
                raise ValueError(f"{root!r} is closed")
            fd = open_beneath(root.fd, path, flags, no_symlinks=root.no_symlinks, method=root.method)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def _off_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` in the I/O pool, holding a place under ``max_open``."""
        refused = self._refusal()
        if refused is not None:
            return refused
        pool: Any = self.pool
        if pool is None:  # an engine given as an object: its backend's pool, if any
            pool = getattr(getattr(self.engine, "backend", None), "pool", None)
            pool = getattr(pool, "pool", pool)  # RingBackend.pool is a PoolBackend
        if pool is None or not hasattr(pool, "submit"):
            return defer.fail(NotImplementedError(f"{self.engine!r} has no I/O pool"))
        jobs: list[Any] = []

        def cancel(_: Any) -> None:
            self.cancelled += 1
            if jobs:
                pool.withdraw(jobs[0])  # a running call ends; its outcome is dropped
            else:
                acquiring.cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)

        def granted(slot: Any) -> None:
            if result.called:
                slot.release()
                return
            d, job = pool.submit(f, *args)
            jobs.append(job)

            def done(outcome: Any) -> None:
                slot.release()
                if result.called:
                    return
                if self._state is _LoaderState.FORKED:
                    outcome = Failure(ForkedError())
                elif self._state is not _LoaderState.RUNNING:
                    outcome = Failure(LoaderClosed())
                if isinstance(outcome, Failure):
                    if not outcome.check(defer.CancelledError):
                        self.errors += 1
                    result.errback(outcome)
                else:
                    result.callback(outcome)

            d.addBoth(done)

        def refused_place(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        acquiring = self._limiter.acquire()
        acquiring.addCallbacks(granted, refused_place)
        return result

    # -- the rest -----------------------------------------------------------------
    def uses_root(self, root: Root) -> bool:
        """Whether a handle or a write of this loader opened beneath ``root`` is
        not closed yet -- including an open or write cancelled while it runs off
        the reactor thread, which still uses the root's descriptor until it ends.
        Close a ``Root`` only once this is False (or the loader is closed).  (An
        ended handle or write tells its caller just before the loader forgets it:
        its state, not its presence, is what counts.)"""
        for held in self._handles:
            if isinstance(held, FileConsumer):
                if held.state not in (WriteState.DONE, WriteState.FAILED) and held._files.root is root:
                    return True
            elif held.state is not HandleState.CLOSED and held.root is root:
                return True
        return False

    def stats(self) -> dict[str, Any]:
        from .confine import confinement_method

        return {
            "engine": self.engine.name,
            "open": self.open_files,
            **self._limiter.loader_stats(),
            "loaded": self.loaded,
            "bytes": self.bytes,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "written": self.written,
            "write_bytes": self.write_bytes,
            "confinement": confinement_method(),
            **self.engine.stats(),
        }

    def _at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: not to be removed
        return self.close()

    def close(self) -> defer.Deferred[None]:
        """Stop: refuse new work, stop every load and handle (they fail with
        ``LoaderClosed``), close their descriptors, then stop the engine's
        threads and ring.  Never blocks the reactor; fires when all is done.
        Idempotent.  Called by reactor shutdown too.
        """
        if self._closing is None:
            self._closing = defer.Deferred()
            if self._state is _LoaderState.FORKED:  # the engine is the parent's
                self._closing.callback(None)
            elif self._state is _LoaderState.RUNNING:
                self._state = _LoaderState.CLOSING
                trigger, self._trigger = self._trigger, None
                if trigger is not None:
                    self.reactor.removeSystemEventTrigger(trigger)
                why = Failure(LoaderClosed())
                for handle in list(self._handles):
                    handle.abandon(why)
                if not self._handles:
                    self._stop_engine()
        done: defer.Deferred[None] = defer.Deferred()
        self._closing.addBoth(lambda r: (done.callback(None), r)[1])  # type: ignore[call-overload, func-returns-value]
        return done

    def _stop_engine(self) -> None:
        if self._state is not _LoaderState.CLOSING:
            return
        self._state = _LoaderState.CLOSED
        d = defer.maybeDeferred(self.engine.stop)
        if self.pool is not None:
            d.addBoth(lambda _: self.pool.stop())  # type: ignore[call-overload]  # not None
        d.addBoth(lambda _: self._closing.callback(None))  # type: ignore[call-overload, union-attr]


_default: FileLoader | None = None


def default_loader() -> FileLoader:
    """The module-level loader behind ``read_file`` (created on first use)."""
    global _default
    if _default is None or _default._state is not _LoaderState.RUNNING:
        _default = FileLoader()
    return _default


def read_file(path: Any, offset: int = 0, length: int | None = None) -> defer.Deferred[bytes]:
    """``default_loader().load(path, offset, length)``."""
    return default_loader().load(path, offset, length)
