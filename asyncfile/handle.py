"""``FileHandle``: the one owner of a load's limiter place and descriptor.

Every load, stream and ``FileLoader.open`` goes through a handle, and every
way out of it — success, an error of any type, cancellation in any state,
``FileLoader.close()``, reactor shutdown — ends in ``_closed()``, the one
place that closes the descriptor (exactly once) and gives the place back
(exactly once)::

    WAITING ──granted──▶ READY ──turn──▶ OPENING ──opened──▶ OPEN ──close──▶ CLOSING ──closed──▶ CLOSED
       │                   │    (inline:  │ opened at once)   │  (waits for its readers)  ▲
       │                   │              │ failed ───────────┼───────────────────────────┤
       │                   │              └─close─▶ CANCELLING ──open ended─▶ CLOSING / CLOSED
       └──close──▶ CLOSED  └──close──▶ CLOSED (place given back)

An open that runs off the reactor thread when the handle is closed keeps its
place until it ends (CANCELLING): at most ``max_open`` descriptors exist,
counting those being opened.
"""

from __future__ import annotations

import enum
import os
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from .engines.base import Op, OpenedFile, Root, check_regular
from .errors import LoaderClosed

if TYPE_CHECKING:
    from .loader import FileLoader
    from .reader import FileReader
    from .limiter import Slot

__all__ = ["FileHandle", "HandleState", "TRANSITIONS"]


class HandleState(enum.Enum):
    """States compare by identity; hashing them is the C one (Enum's is Python code)."""

    __hash__ = object.__hash__

    WAITING = "waiting"        # for a place in the loader's FIFO
    READY = "ready"            # has a place; waits for a reactor turn with inline budget left
    OPENING = "opening"        # has a place; the open runs off the reactor thread
    CANCELLING = "cancelling"  # has a place; an open nobody wants any more is still running
    OPEN = "open"              # has a place and a descriptor
    CLOSING = "closing"        # has both; closes once no reader uses the descriptor
    CLOSED = "closed"          # holds nothing


_H = HandleState

# Every legal move; ``_move`` refuses the rest (a bug, not a user error).
TRANSITIONS: frozenset[tuple[HandleState, HandleState]] = frozenset({
    (_H.WAITING, _H.READY), (_H.WAITING, _H.OPENING), (_H.WAITING, _H.OPEN), (_H.WAITING, _H.CLOSED),
    (_H.READY, _H.OPENING), (_H.READY, _H.OPEN), (_H.READY, _H.CLOSED),
    (_H.OPENING, _H.OPEN), (_H.OPENING, _H.CANCELLING), (_H.OPENING, _H.CLOSED),
    (_H.CANCELLING, _H.CLOSING), (_H.CANCELLING, _H.CLOSED),
    (_H.OPEN, _H.CLOSING),
    (_H.CLOSING, _H.CLOSED),
})


class FileHandle:
    """An open regular file under a loader's limits (``FileLoader.open``).

    Carries what ``fstat`` said when it was opened — ``size``, ``mtime_ns``,
    ``ino``, ``dev`` — so a server can decide its headers and then serve
    exactly those bytes from this one descriptor with ``load(handle)`` or
    ``stream(handle, consumer)``, however the path changes meanwhile.

    It holds one of the loader's ``max_open`` places until ``close()``, which
    whoever opened it must call (loads from it do not close it).  Loads that
    run when it is closed are stopped first; ``FileLoader.close()`` closes
    every handle still open.
    """

    __slots__ = ("loader", "path", "root", "state", "file", "_slot", "_op", "_on_open", "_readers",
                 "_on_closed", "_waiter", "_why", "__weakref__")

    def __init__(self, loader: "FileLoader", path: str, root: Root | None,
                 on_open: Callable[[Any], None]) -> None:
        self.loader = loader
        self.path = path
        self.root = root
        self.state = _H.WAITING
        self.file: OpenedFile | None = None
        self._slot: Slot | None = None
        self._op: Op | None = None
        self._waiter: defer.Deferred[Any] | None = None
        self._on_open: Callable[[Any], None] | None = on_open  # gets self or a Failure, once
        self._readers: set[FileReader] | None = None  # made on first use: most loads have none
        self._on_closed: list[Callable[[], None]] | None = None
        self._why: Failure | None = None  # why it was closed before it opened

    # -- what fstat said ------------------------------------------------
    @property
    def size(self) -> int:
        return self._stat().size

    @property
    def mtime_ns(self) -> int:
        return self._stat().mtime_ns

    @property
    def ino(self) -> int:
        return self._stat().ino

    @property
    def dev(self) -> int:
        return self._stat().dev

    @property
    def closed(self) -> bool:
        return self.state is _H.CLOSED

    def _stat(self) -> OpenedFile:
        if self.file is None:
            raise ValueError("the handle is not open")
        return self.file

    def __repr__(self) -> str:
        return f"<FileHandle {self.path!r} {self.state.value}>"

    # -- the one place that decides ---------------------------------------
    def _move(self, to: HandleState) -> None:
        if (self.state, to) not in TRANSITIONS:
            raise AssertionError(f"FileHandle: illegal move {self.state.value} -> {to.value}")
        self.state = to

    # -- events -------------------------------------------------------------
    def start(self) -> None:
        """Ask for a place, then open (called once, by the loader)."""
        loader = self.loader
        slot = loader._limiter.try_acquire()
        if slot is not None:
            self._granted(slot)
            return
        self._waiter = loader._limiter.acquire()
        self._waiter.addCallbacks(self._granted, self._refused)

    def _refused(self, failure: Failure) -> None:
        self._waiter = None
        if self.state is _H.WAITING:  # not cancelled by close()
            self._move(_H.CLOSED)
            self._finish_closed(failure)

    def _granted(self, slot: "Slot") -> None:
        self._waiter = None
        self._slot = slot
        loader = self.loader
        if loader._closing is not None:
            # A place given back while close() closes every handle: start
            # nothing (close() would have failed this one a moment later).
            self._move(_H.CLOSED)
            self._finish_closed(Failure(LoaderClosed()))
            return
        if loader.turn_budget is None or (loader._spent < loader.turn_budget and not loader._ready):
            self._open_now()
        else:
            self._move(_H.READY)
            loader._defer_to_next_turn(self)

    def _open_now(self) -> None:
        """WAITING/READY with a place: open inline or start the open off-thread."""
        loader = self.loader
        started = perf_counter()
        try:
            got = loader.engine.open(self.path, self.root)
        except Exception:
            loader._charge(perf_counter() - started)
            self._open_failed(Failure())
            return
        if isinstance(got, Op):
            loader._charge(perf_counter() - started)
            self._move(_H.OPENING)
            self._op = got
            got.deferred.addCallbacks(self._opened_async, self._open_failed)
            return
        self._opened(got)
        loader._charge(perf_counter() - started)

    def _opened_async(self, f: OpenedFile) -> None:
        self._op = None
        if self.state is _H.CANCELLING:
            self.file = f
            self.loader.open_files += 1
            self._move(_H.CLOSING)
            self._close_descriptor()
            return
        self._opened(f)

    def _opened(self, f: OpenedFile) -> None:
        self.file = f
        self.loader.open_files += 1
        self._move(_H.OPEN)
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open(self)

    def _open_failed(self, failure: Failure) -> None:
        self._op = None
        if self.state is _H.CANCELLING and self._why is not None:
            failure = self._why
        self._move(_H.CLOSED)
        self._finish_closed(failure)

    # -- readers ------------------------------------------------------------
    def add_reader(self, reader: "FileReader") -> None:
        """A reader uses the descriptor: closing waits until it has ended."""
        if self._readers is None:
            self._readers = set()
        self._readers.add(reader)

    def remove_reader(self, reader: "FileReader") -> None:
        readers = self._readers
        if readers is not None:
            readers.discard(reader)
        if self.state is _H.CLOSING and not readers:
            self._close_descriptor()

    # -- closing --------------------------------------------------------------
    def close(self, reason: Failure | None = None) -> defer.Deferred[None]:
        """Close the descriptor and give the place back; fires when both are done.

        Idempotent.  Readers still running are stopped with ``reason``
        (default ``CancelledError``) and waited for.
        """
        done: defer.Deferred[None] = defer.Deferred()
        self.when_closed(lambda: done.callback(None))
        self.abandon(reason)
        return done

    def when_closed(self, then: Callable[[], None]) -> None:
        if self.state is _H.CLOSED:
            then()
        elif self._on_closed is None:
            self._on_closed = [then]
        else:
            self._on_closed.append(then)

    def abandon(self, reason: Failure | None = None) -> None:
        """Close without a Deferred (the loader's own path)."""
        state = self.state
        if state is _H.WAITING:
            self._move(_H.CLOSED)
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                waiter.cancel()  # leaves the limiter's FIFO
            self._finish_closed(reason)
        elif state is _H.READY:
            self._move(_H.CLOSED)  # the loader skips it when its turn comes
            self._finish_closed(reason)
        elif state is _H.OPENING:
            self._why = reason
            self._move(_H.CANCELLING)
            op = self._op
            if op is not None:
                op.cancel()  # dropped if not started: _open_failed runs now
        elif state is _H.OPEN:
            self._move(_H.CLOSING)
            if self._readers:
                why = reason if reason is not None else Failure(defer.CancelledError())
                for reader in list(self._readers):
                    reader.end(why)
            else:
                self._close_descriptor()

    def _close_descriptor(self) -> None:
        """CLOSING with no reader left: close the descriptor (inline or off-thread)."""
        if self._readers or self._op is not None:
            return
        try:
            op = self.loader.engine.close(self.file)  # type: ignore[arg-type]  # OPEN: a file
        except Exception:  # EIO from a flush, say: the descriptor is released anyway
            op = None
        if op is None:
            self._closed()
        else:
            self._op = op
            op.deferred.addBoth(self._closed)

    def _closed(self, _: Any = None) -> None:
        self._op = None
        self.loader.open_files -= 1
        self._move(_H.CLOSED)
        self._finish_closed(self._why)  # set when closed while its open ran

    def _finish_closed(self, failure: Failure | None) -> None:
        """CLOSED: give the place back, tell the opener (if it never got the
        handle) and whoever waits for the close."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        on_open, self._on_open = self._on_open, None
        if on_open is not None:
            on_open(failure if failure is not None else Failure(defer.CancelledError()))
        callbacks, self._on_closed = self._on_closed, None
        if callbacks:
            for then in callbacks:
                then()
        self.loader._forget(self)  # last: close() fires only after the operations it stopped


# -- a descriptor someone gave us (FileLoader.adopt) ----------------------------------
def _stat_fd(fd: int, path: str) -> OpenedFile:
    st = os.fstat(fd)
    check_regular(st.st_mode, path)
    return OpenedFile(fd, st.st_size, st.st_dev, path, st.st_ino, st.st_mtime_ns)


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _opens_fast(engine: Any, target: str | None) -> bool:
    """Whether calls on this descriptor (fstat, close) may run in the reactor
    thread: a local mount per the engine's inline policy, or a kernel object
    (``pipe:[..]``, ``socket:[..]``: refused as not regular, closed at once).
    /proc readlink is answered by the kernel, without a round trip to the
    file system."""
    inline = getattr(engine, "inline", None)
    if inline is None or target is None:
        return False
    if not target.startswith("/"):
        return True
    return not inline.is_slow_mount(target)


def _io_pool(loader: Any) -> Any:
    pool = getattr(loader, "pool", None)
    if pool is not None:
        return pool
    backend = getattr(getattr(loader, "engine", None), "backend", None)
    pool = getattr(backend, "pool", None)
    return getattr(pool, "pool", pool)  # RingBackend.pool is a PoolBackend


def _run_off_thread(loader: Any, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    pool = _io_pool(loader)
    if pool is not None and hasattr(pool, "run"):
        d: defer.Deferred[Any] = pool.run(f, *args)
        return d
    from twisted.internet import threads

    return threads.deferToThreadPool(loader.reactor, loader.reactor.getThreadPool(), f, *args)


class _AdoptedHandle(FileHandle):
    """A ``FileHandle`` whose "open" is an ``fstat`` of a descriptor it was
    given (``FileLoader.adopt``).

    It takes a place under ``max_open`` like any handle (the descriptor
    counts), and owns the descriptor from the start: every way to CLOSED
    closes it exactly once (unclassified: here, inline or in the pool; once
    it became the handle's file: by the engine, as any other).  The
    ``fstat`` and that close run in the reactor thread only where the
    descriptor is a local file (or a kernel object) by /proc/self/fd.
    """

    __slots__ = ("_adopted", "_fast")

    def __init__(self, loader: "FileLoader", fd: int, path: str | None,
                 on_open: Callable[[Any], None]) -> None:
        target = _fd_target(fd)
        name = path if path is not None else (target or f"<fd {fd}>")
        super().__init__(loader, name, None, on_open)
        self._adopted = fd
        self._fast = _opens_fast(loader.engine, target)

    def _open_now(self) -> None:
        loader = self.loader
        fd = self._adopted
        if self._fast:
            started = perf_counter()
            try:
                f = _stat_fd(fd, self.path)
            except Exception:
                loader._charge(perf_counter() - started)
                self._open_failed(Failure())
                return
            loader._charge(perf_counter() - started)
            self._adopted = -1
            self._classified(f, "inline")
            self._opened(f)
            return
        self._move(HandleState.OPENING)
        op = Op()  # not cancellable: an fstat is short; a CANCELLING handle waits for it
        self._op = op
        _run_off_thread(loader, _stat_fd, fd, self.path).chainDeferred(op.deferred)
        op.deferred.addCallbacks(self._stat_done, self._open_failed)

    def _stat_done(self, f: OpenedFile) -> None:
        self._adopted = -1
        self._classified(f, "pool")
        self._opened_async(f)

    def _classified(self, f: OpenedFile, via: str) -> None:
        f.via = via
        inline = getattr(self.loader.engine, "inline", None)
        if inline is not None:
            inline.classify(f)

    def _finish_closed(self, failure: Failure | None) -> None:
        fd, self._adopted = self._adopted, -1
        if fd >= 0 and not self._fast:  # never became the handle's file; close may block
            # The place is given back and the opener told once it is closed.
            _run_off_thread(self.loader, os.close, fd).addBoth(
                lambda _: FileHandle._finish_closed(self, failure))
            return
        if fd >= 0:
            os.close(fd)
        super()._finish_closed(failure)
