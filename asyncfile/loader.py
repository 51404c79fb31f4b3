"""``FileLoader``: whole files, byte ranges and streams, under limits."""

from __future__ import annotations

import os
from collections import deque
from time import perf_counter
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer

from .engines import IOPool, make_engine
from .engines.base import IFileEngine, OpenedFile
from .interfaces import IFileLoader
from .limiter import Limiter, Slot
from .reader import BufferSink, ConsumerSink, FileReader

__all__ = ["FileLoader", "read_file", "default_loader"]



class _Operation:
    """One load or stream, through its stages: waiting → opening → reading.

    Cancelling at any stage frees the limiter place and the descriptor; the
    place is given back only once the descriptor is really closed, so at
    most ``max_open`` are ever open.
    """

    def __init__(self, loader: "FileLoader", path: str, offset: int, length: int | None,
                 consumer: IConsumer | None) -> None:
        self.loader = loader
        self.path = path
        self.offset = offset
        self.length = length
        self.consumer = consumer
        self.slot: Slot | None = None
        self.reader: FileReader | None = None
        self.stage: defer.Deferred[Any] | None = None
        self.cancelled = False
        self.result: defer.Deferred[Any] = defer.Deferred(self._cancel)

    def begin(self) -> defer.Deferred[Any]:
        loader = self.loader
        slot = loader._limiter.try_acquire()
        if slot is not None:
            loader._start(self, slot)
        else:
            self.stage = loader._limiter.acquire()
            self.stage.addCallbacks(self._granted_later, self._fail)
        return self.result

    def _granted_later(self, slot: Slot) -> None:
        self.loader._start(self, slot)

    def _cancel(self, _: defer.Deferred[Any]) -> None:
        self.cancelled = True
        self.loader.cancelled += 1
        if self.reader is not None:
            self.reader.deferred.cancel()
        elif self.stage is not None:
            self.stage.cancel()

    def _fail(self, failure: Failure) -> None:
        if not self.result.called:
            self.result.errback(failure)

    def _granted(self, slot: Slot, opened: Any = False) -> None:
        self.slot = slot
        if self.cancelled:
            self._release()
            return
        loader = self.loader
        started = perf_counter()
        try:
            if opened is None:  # the fast path found that this file opens slowly
                opened = loader.engine.open(self.path)
            elif self.consumer is None and loader._read_small is not None:
                opened = loader._read_cached(self.path, self.offset, self.length)
                if opened is None:
                    opened = loader.engine.open(self.path)
                elif isinstance(opened, bytes):
                    loader._charge(perf_counter() - started)
                    self._release()
                    self.result.callback(opened)
                    return
                else:
                    loader.open_files -= 1  # _opened counts it again
            else:
                opened = loader.engine.open(self.path)
        except Exception:
            loader._charge(perf_counter() - started)
            self._release()
            loader.errors += 1
            self._fail(Failure())
            return
        if isinstance(opened, defer.Deferred):
            loader._charge(perf_counter() - started)
            self.stage = opened
            opened.addCallbacks(self._opened, self._open_failed)
        else:
            self._opened(opened)
            loader._charge(perf_counter() - started)

    def _open_failed(self, failure: Failure) -> None:
        self._release()
        self._fail(failure)

    def _opened(self, opened: OpenedFile) -> None:
        loader = self.loader
        loader.open_files += 1
        if self.cancelled:  # the open completed synchronously after all
            FileReader(opened, loader.engine, BufferSink(0, 0, 1), reactor=loader.reactor,
                       on_closed=self._closed)._finish(None)
            return
        expected = _expected(opened.size, self.offset, self.length)
        if self.consumer is None:
            sink: BufferSink | ConsumerSink = BufferSink(expected, self.length, loader.chunk_size)
        else:
            sink = ConsumerSink(self.consumer, expected, self.length, loader.chunk_size)
        reader = FileReader(opened, loader.engine, sink, self.offset, reactor=loader.reactor,
                            on_closed=self._closed)
        self.reader = reader
        if self.consumer is not None:
            self.consumer.registerProducer(reader, True)
        reader.deferred.addBoth(self._read_done)
        reader.start()

    def _read_done(self, outcome: Any) -> None:
        loader = self.loader
        if self.consumer is not None:
            try:
                self.consumer.unregisterProducer()
            except Exception:
                pass
        if isinstance(outcome, Failure):
            if not outcome.check(defer.CancelledError):
                loader.errors += 1
            self._fail(outcome)
            return
        loader.loaded += 1
        loader.bytes += self.reader.sink.filled
        if not self.result.called:
            self.result.callback(outcome)

    def _closed(self) -> None:
        self.loader.open_files -= 1
        self._release()

    def _release(self) -> None:
        if self.slot is not None:
            slot, self.slot = self.slot, None
            slot.release()


class _QuickLoad:
    """A load waiting for the next reactor turn, expected to be small and
    cached: far cheaper than an ``_Operation`` when it is."""

    __slots__ = ("loader", "path", "offset", "length", "result", "op")

    def __init__(self, loader: "FileLoader", path: str, offset: int, length: int | None) -> None:
        self.loader = loader
        self.path = path
        self.offset = offset
        self.length = length
        self.result: defer.Deferred[bytes] = defer.Deferred(self._cancel)
        self.op: _Operation | None = None

    def _cancel(self, _: defer.Deferred[bytes]) -> None:
        if self.op is not None:
            self.op.result.cancel()  # handed over: cancel the general path's work
        else:
            self.loader.cancelled += 1  # its place is given back when its turn comes

    def _granted(self, slot: Slot) -> None:
        result = self.result
        if result.called:  # cancelled while it waited
            slot.release()
            return
        loader = self.loader
        try:
            got = loader._read_small(self.path, self.offset, self.length, loader.chunk_size, loader._eof_probe)
        except OSError:
            slot.release()
            loader.errors += 1
            result.errback()
            return
        if type(got) is bytes:
            slot.release()
            loader.loaded += 1
            loader.bytes += len(got)
            result.callback(got)
            return
        # Not small and cached after all: the general path takes over.
        op = _Operation(loader, self.path, self.offset, self.length, None)
        op.slot = slot
        self.op = op
        op.result.chainDeferred(result)
        if got is None:
            op._granted(slot, opened=None)
        else:
            op._opened(got)


def _expected(size: int, offset: int, length: int | None) -> int:
    """Bytes a range should yield if the file keeps the size ``fstat`` saw."""
    expected = max(0, size - offset)
    return expected if length is None else min(expected, length)


def _check_range(offset: int, length: int | None) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, not {offset!r}")
    if length is not None and (not isinstance(length, int) or length < 0):
        raise ValueError(f"length must be None or a non-negative int, not {length!r}")


@implementer(IFileLoader)
class FileLoader:
    """Loads files without blocking the reactor, with bounded descriptors and waiters.

    :param reactor: the reactor (default: the global one).
    :param max_open: descriptors open at once; further loads wait, FIFO.
    :param max_waiting: loads allowed to wait; beyond that ``load`` fails at
        once with ``Overloaded``.
    :param chunk_size: bytes read per reactor iteration (and per pool call).
    :param engine: ``"auto"``, ``"io_uring"``, ``"nowait"`` or ``"threads"``;
        or an engine object (``IFileEngine``, e.g. ``UringEngine(reactor,
        IOPool(reactor), entries=32)``), which the loader then owns and stops.
    :param io_threads: size of the dedicated I/O thread pool.
    :param turn_budget: seconds of inline work (page-cache copies, local
        opens) one reactor turn may do for new loads before the rest start in
        the next turn: a burst of thousands of cached loads must not stall
        the reactor either.
    """

    def __init__(self, reactor: Any = None, max_open: int = 64, max_waiting: int = 1024,
                 chunk_size: int = 256 * 1024, engine: Any = "auto", io_threads: int = 16,
                 turn_budget: float = 0.001) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.reactor = reactor
        self.chunk_size = chunk_size
        self._limiter = Limiter(max_open, max_waiting)
        if isinstance(engine, str):
            self.pool = IOPool(reactor, io_threads)
            self.engine: IFileEngine = make_engine(engine, reactor, self.pool)
        elif IFileEngine.providedBy(engine):
            self.engine = engine
            self.pool = getattr(engine, "pool", None) or IOPool(reactor, io_threads)
        else:
            raise TypeError(f"engine must be a name or an IFileEngine, not {engine!r}")
        self._read_small = getattr(self.engine, "read_small", None)
        self._eof_probe = memoryview(bytearray(1))  # used in the reactor thread only
        self.turn_budget = turn_budget
        self._spent = 0.0
        self._turn_pending = False
        self._ready: deque[tuple[Any, Slot]] = deque()  # (op with _granted(slot), its place)
        self.open_files = 0
        self.loaded = 0
        self.bytes = 0
        self.errors = 0
        self.cancelled = 0

    def _start(self, op: _Operation, slot: Slot) -> None:
        """Start ``op`` now, or in a later turn once this one's inline budget is spent."""
        if self._spent < self.turn_budget and not self._ready:
            op._granted(slot)
        else:
            self._ready.append((op, slot))
            self._schedule_turn()

    def _charge(self, seconds: float) -> None:
        """Count inline work against this reactor turn's budget."""
        self._spent += seconds
        self._schedule_turn()

    def _schedule_turn(self) -> None:
        if not self._turn_pending:
            self._turn_pending = True
            self.reactor.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn_pending = False
        self._spent = 0.0
        ready = self._ready
        # Wall time, not just what _granted charges: the callbacks that the
        # results run (the caller's code) count against the turn too.
        started = perf_counter()
        while ready:
            op, slot = ready.popleft()
            op._granted(slot)
            if perf_counter() - started >= self.turn_budget:
                break
        self._spent = max(self._spent, perf_counter() - started)
        if ready:
            self._schedule_turn()

    def load(self, path: Any, offset: int = 0, length: int | None = None) -> defer.Deferred[bytes]:
        """The file's bytes from ``offset``, at most ``length`` of them (all when None).

        Like ``pread``: a range past the end gives fewer bytes or none.  Fails
        with the original ``OSError`` (``FileNotFoundError``, ...) or
        ``Overloaded``; cancel it to give up.
        """
        if type(path) is not str or type(offset) is not int or offset < 0 or (
                length is not None and (type(length) is not int or length < 0)):
            try:
                _check_range(offset, length)
                path = os.fsdecode(os.fspath(path))
            except (TypeError, ValueError):
                return defer.fail()
        if self._read_small is not None:
            if not self._ready and self._spent < self.turn_budget:
                done = self._load_now(path, offset, length)
                if done is not None:
                    return done
            else:
                slot = self._limiter.try_acquire()
                if slot is not None:  # a place, but this turn's budget is spent
                    quick = _QuickLoad(self, path, offset, length)
                    self._ready.append((quick, slot))
                    self._schedule_turn()
                    return quick.result
        return _Operation(self, path, offset, length, None).begin()

    def _load_now(self, path: str, offset: int, length: int | None) -> defer.Deferred[bytes] | None:
        """``load`` without queueing, Deferred chains or a reader, where a
        place is free and the file is small and cached; None otherwise."""
        limiter = self._limiter
        if limiter.active >= limiter.limit or limiter.waiting:
            return None
        started = perf_counter()
        try:
            got = self._read_small(path, offset, length, self.chunk_size, self._eof_probe)
        except OSError:
            self.errors += 1
            return defer.fail()
        finally:
            self._charge(perf_counter() - started)
        if got is None:
            return None
        if type(got) is bytes:
            limiter.started += 1  # it held its place only within this call
            self.loaded += 1
            self.bytes += len(got)
            return defer.succeed(got)
        op = _Operation(self, path, offset, length, None)
        op.slot = limiter.try_acquire()
        op._opened(got)
        return op.result

    def _read_cached(self, path: str, offset: int, length: int | None) -> bytes | OpenedFile | None:
        """A small cached file in this reactor turn, with no reader and no
        thread (the engine's ``read_small``); see there for the results."""
        got = self._read_small(path, offset, length, self.chunk_size, self._eof_probe)
        if isinstance(got, bytes):
            self.loaded += 1
            self.bytes += len(got)
        elif got is not None:
            self.open_files += 1
        return got

    def stream(self, path: Any, consumer: IConsumer, offset: int = 0,
               length: int | None = None) -> defer.Deferred[int]:
        """Write the file (or a range) into ``consumer`` as a push producer.

        Honours ``pauseProducing``/``resumeProducing``; fires with the number
        of bytes written, or fails with ``ConsumerStopped`` if the consumer
        stopped the producer (a client disconnected).  The consumer is not
        finished: the caller decides what comes after.
        """
        try:
            _check_range(offset, length)
            path = os.fsdecode(os.fspath(path))
        except (TypeError, ValueError):
            return defer.fail()
        return _Operation(self, path, offset, length, consumer).begin()

    def reader(self, path: Any, offset: int = 0, length: int | None = None,
               inline_steps: int = 0) -> defer.Deferred[FileReader]:
        """A ``FileReader`` for ``path``, opened under this loader's limits but
        not started: attach processing callbacks to its ``deferred``, then
        call ``start()`` (it registers with the reactor and reads one chunk
        per ``doRead``).  Its place and descriptor are given back when its
        ``deferred`` has fired; cancel that Deferred to give up unstarted.

        ``inline_steps`` chunks are read at once on ``start()`` when cached
        (0: every chunk goes through ``doRead``).
        """
        try:
            _check_range(offset, length)
            path = os.fsdecode(os.fspath(path))
        except (TypeError, ValueError):
            return defer.fail()

        async def go() -> FileReader:
            slot = await self._limiter.acquire()
            try:
                opened = await defer.maybeDeferred(self.engine.open, path)
            except BaseException:
                slot.release()
                raise
            self.open_files += 1

            def closed() -> None:
                self.open_files -= 1
                slot.release()

            expected = _expected(opened.size, offset, length)
            return FileReader(opened, self.engine, BufferSink(expected, length, self.chunk_size), offset,
                              reactor=self.reactor, on_closed=closed, inline_steps=inline_steps)

        return defer.Deferred.fromCoroutine(go())

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "open": self.open_files,
            **self._limiter.loader_stats(),
            "loaded": self.loaded,
            "bytes": self.bytes,
            "errors": self.errors,
            "cancelled": self.cancelled,
            **self.engine.stats(),
        }

    def close(self) -> None:
        """Stop the engine's threads (loads in flight finish first)."""
        self.engine.stop()


_default: FileLoader | None = None


def default_loader() -> FileLoader:
    """The module-level loader behind ``read_file`` (created on first use)."""
    global _default
    if _default is None:
        _default = FileLoader()
    return _default


def read_file(path: Any, offset: int = 0, length: int | None = None) -> defer.Deferred[bytes]:
    """``default_loader().load(path, offset, length)``."""
    return default_loader().load(path, offset, length)
