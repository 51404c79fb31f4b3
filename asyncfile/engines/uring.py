"""Linux io_uring: opens, reads and closes run in the kernel; an eventfd says when.

Why: a thread pool pays a thread hop per call and caps concurrency at its
size; io_uring lets the reactor thread hand the kernel a batch of
operations in one system call and learn of their completions through an
eventfd, which (unlike a regular file) the reactor can really wait on.
No thread of ours blocks and the reactor never polls.

Cached files still take the ``nowait`` fast path (``preadv(RWF_NOWAIT)``
and ``open()`` in the reactor thread on local file systems): a ring round
trip costs a reactor turn and ~20 µs of Python per operation, an inline
page-cache copy ~2 µs.  Everything that could block goes through the ring:
opens on slow mounts (FUSE, NFS), reads that miss the page cache or that
the file system cannot do with RWF_NOWAIT, and closes of such files.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from typing import Any, Callable

from twisted.internet import abstract, defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..mounts import MountTable
from . import _uring
from ._uring import (
    IORING_ASYNC_CANCEL_ALL,
    IORING_ASYNC_CANCEL_ANY,
    Ring,
    RingClosed,
    StatxResult,
    UringError,
    UringUnavailable,
    result_error,
)
from .base import OPEN_FLAGS, IFileEngine, IOPool, OpenedFile, check_regular
from .nowait import RWF_NOWAIT, NowaitEngine, nowait_supported

__all__ = ["UringEngine", "RingDriver", "uring_unavailable_reason"]

Handler = Callable[[Any], None]
Prep = Callable[..., None]

_CANCEL_ALL_UD = 0  # user_data of stop()'s cancel-everything op; start() never uses 0


def uring_unavailable_reason() -> str | None:
    """None when the io_uring engine can run here, else why not."""
    return _uring.probe()


def _ignore(res: Any) -> None:
    pass


def _close_quietly(fd: int) -> None:
    """close() without the ring (it is stopped).  Its error (ENOTCONN from a
    dead FUSE daemon, say) is moot: the descriptor is released anyway."""
    try:
        os.close(fd)
    except OSError:
        pass


def _prep_open(ring: Ring, path: str, force_async: bool, ud: int) -> None:
    ring.prep_openat(path, OPEN_FLAGS, 0, ud, force_async=force_async)


def _prep_read_async(ring: Ring, fd: int, view: memoryview, offset: int, ud: int) -> None:
    ring.prep_read(fd, view, offset, ud, force_async=True)


class RingDriver(abstract.FileDescriptor):
    """Runs one ring in the reactor thread.

    * ``start(prep, args, handler)`` prepares an SQE and returns its
      ``user_data``; ``handler(res)`` is called exactly once with the
      kernel's result (``-errno`` on failure, ``-ECANCELED`` if the op was
      dropped before the kernel saw it or cancelled).
    * Submission is batched: SQEs prepared during a reactor turn go to the
      kernel in one ``io_uring_enter`` at the next turn (``callLater(0)``),
      or at once when the SQ is full.
    * When the ring has no room (SQ full, or as many ops in flight as the CQ
      holds), requests wait in a FIFO and are admitted as completions free
      room: they never fail for lack of room.
    * The reactor watches an eventfd the kernel signals on completions: real
      readiness, no polling.  ``doRead`` drains it, then reaps.
    * At most ``max_dispatch`` completions are handled per reactor turn (the
      rest in the next turns): each costs tens of µs of Python, and a burst
      of 64 at once would stall the reactor for milliseconds.

    The ring is set up on first use, so building an engine costs nothing and
    a process may still fork (daemonize) before its first load.
    """

    log = Logger()

    def __init__(self, reactor: Any = None, entries: int = 256, io_workers: int = 64,
                 max_dispatch: int = 32) -> None:
        abstract.FileDescriptor.__init__(self, reactor)
        self.entries = entries
        self.io_workers = io_workers
        self.max_dispatch = max(1, max_dispatch)
        self._backlog: deque[tuple[int, Any]] = deque()  # reaped, not yet handled
        self.ring: Ring | None = None
        self._efd = -1
        self._handlers: dict[int, Handler] = {}
        self._waiting: deque[tuple[int, Prep, tuple[Any, ...]]] = deque()
        self._waiting_ids: set[int] = set()
        self._next_ud = 1
        self._flush_call: Any = None
        self._stopped = False
        self.submits = 0  # io_uring_enter calls that submitted
        self.submitted_ops = 0
        self.waited = 0  # requests that had to wait for room
        self.dropped = 0  # cancelled while waiting: never reached the kernel
        self.peak_in_flight = 0

    # -- set-up ---------------------------------------------------------
    def _setup(self) -> Ring:
        ring = Ring(self.entries)
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                ring.register_eventfd(efd)
                self._raise_worker_limit(ring)
            except BaseException:
                os.close(efd)
                raise
        except BaseException:
            ring.close()
            raise
        self.ring, self._efd = ring, efd
        self.connected = 1
        self.startReading()
        return ring

    def _raise_worker_limit(self, ring: Ring) -> None:
        """Let up to ``io_workers`` blocking ops (FUSE/NFS reads) run at once.

        io-wq's default is min(sq_entries, 4 * CPUs): 8 on a 2-CPU machine.
        The limit belongs to the submitting thread, so never lower it.
        """
        if not self.io_workers:
            return
        try:
            bounded, _ = ring.register_iowq_max_workers(0, 0)
            if bounded < self.io_workers:
                ring.register_iowq_max_workers(self.io_workers, 0)
        except OSError:  # before Linux 5.15: keep the kernel's limit
            pass

    # -- IReadDescriptor ------------------------------------------------
    def fileno(self) -> int:
        return self._efd

    def logPrefix(self) -> str:
        return "RingDriver"

    def doRead(self) -> None:
        self._drain()
        if self.ring is None or self._stopped:
            return
        self._reap()
        if self.ring.pending:
            self._flush()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor disconnects every reader at shutdown.
        abstract.FileDescriptor.connectionLost(self, reason)
        self.stop()

    # -- operations -----------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopped

    def owned_fds(self) -> set[int]:
        """The ring's and the eventfd's descriptors (none before first use)."""
        if self.ring is None or self._stopped:
            return set()
        return {self.ring.fd, self._efd}

    @property
    def in_flight(self) -> int:
        """Ops prepared or in the kernel, not yet reaped."""
        ring = self.ring
        return ring.in_flight if ring is not None and not ring.closed else 0

    @property
    def queued(self) -> int:
        """Requests waiting for room in the ring."""
        return len(self._waiting_ids)

    def start(self, prep: Prep, args: tuple[Any, ...], handler: Handler, urgent: bool = False) -> int:
        """Queue ``prep(ring, *args, user_data)`` (an unbound ``Ring.prep_*``)."""
        if self._stopped:
            raise RingClosed("the io_uring engine is stopped")
        ring = self.ring if self.ring is not None else self._setup()
        ud = self._next_ud
        self._next_ud = ud + 1
        if self._waiting or ring.sq_space() <= 0:
            if urgent:
                self._waiting.appendleft((ud, prep, args))
            else:
                self._waiting.append((ud, prep, args))
            self._waiting_ids.add(ud)
            self._handlers[ud] = handler
            self.waited += 1
            self._pump()
        else:
            prep(ring, *args, ud)  # bad arguments raise here, nothing queued
            self._handlers[ud] = handler
            if ring.pending >= ring.sq_entries:
                self._submit()
        if ring.pending and self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)
        return ud

    def cancel(self, ud: int) -> None:
        """Cancel op ``ud``: dropped at once if it is still waiting for room,
        else IORING_OP_ASYNC_CANCEL.  Its handler still runs exactly once."""
        if ud in self._waiting_ids:
            self._waiting_ids.discard(ud)
            self.dropped += 1
            handler = self._handlers.pop(ud)
            handler(-errno.ECANCELED)
            return
        if ud not in self._handlers or self._stopped:
            return
        self.start(Ring.prep_cancel, (ud,), _ignore, urgent=True)

    # -- submitting and reaping -----------------------------------------
    def _submit(self) -> int:
        try:
            n = self.ring.submit()
        except OSError:
            self.log.failure("io_uring_enter failed; retrying on the next turn")
            return 0
        self.submits += 1
        self.submitted_ops += n
        in_flight = self.ring.in_flight
        if in_flight > self.peak_in_flight:
            self.peak_in_flight = in_flight
        return n

    def _flush(self) -> None:
        """Submit what was prepared, then reap what completed meanwhile."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        ring = self.ring
        if ring is None or self._stopped:
            return
        accepted = 1
        if ring.pending:
            accepted = self._submit()
            # Completions during submit signalled the eventfd: they are
            # reaped now, so drain it first (a later one signals again).
            self._drain()
        self._reap()
        if ring.pending and self._flush_call is None:
            # Nothing accepted: the kernel is short of memory (EAGAIN/EBUSY).
            self._flush_call = self.reactor.callLater(0 if accepted else 0.001, self._flush)

    def _drain(self) -> None:
        try:
            os.read(self._efd, 8)
        except OSError:  # EAGAIN: nothing to drain
            pass

    def _reap(self) -> None:
        backlog = self._backlog
        results = self.ring.reap()
        if not backlog and len(results) <= self.max_dispatch:
            if results:
                self._dispatch(results)
        else:
            backlog.extend(results)
            popleft = backlog.popleft
            self._dispatch([popleft() for _ in range(min(self.max_dispatch, len(backlog)))])
            if backlog and self._flush_call is None:
                self._flush_call = self.reactor.callLater(0, self._flush)
        if self._waiting:
            self._pump()

    def _dispatch(self, results: list[tuple[int, Any]]) -> None:
        handlers = self._handlers
        for ud, res in results:
            handler = handlers.pop(ud, None)
            if handler is not None:
                try:
                    handler(res)
                except Exception:
                    self.log.failure("io_uring completion handler failed")

    def _pump(self) -> None:
        """Move waiting requests into the ring, FIFO, as room allows."""
        ring = self.ring
        waiting = self._waiting
        ids = self._waiting_ids
        while waiting:
            if ring.sq_space() <= 0:
                if ring.pending >= ring.sq_entries:  # the SQ is full (not the CQ)
                    if self._submit():
                        continue
                break
            ud, prep, args = waiting.popleft()
            if ud not in ids:
                continue  # cancelled while waiting
            ids.discard(ud)
            try:
                prep(ring, *args, ud)
            except (ValueError, TypeError):
                self._handlers.pop(ud)(-errno.EINVAL)
        if ring.pending and self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    # -- teardown -------------------------------------------------------
    def stop(self, timeout: float = 2.0) -> None:
        """Cancel everything, wait (at most ``timeout``) for the kernel to
        let go of it, close the ring and the eventfd.  Handlers of ops still
        in flight get -ECANCELED; the kernel's late writes go to buffers the
        ring keeps referenced forever."""
        if self._stopped:
            return
        self._stopped = True
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        for ud, _, _ in list(self._waiting):
            if ud in self._waiting_ids:
                self._waiting_ids.discard(ud)
                self._handlers.pop(ud)(-errno.ECANCELED)
        self._waiting.clear()
        ring = self.ring
        if ring is None:
            return
        self.stopReading()
        self.connected = 0
        backlog, self._backlog = list(self._backlog), deque()
        self._dispatch(backlog)  # real completions: an open's fd must be closed
        try:
            self._cancel_in_flight(ring, timeout)
        finally:
            ring.close(timeout=0)
            os.close(self._efd)
            self._efd = -1
            left, self._handlers = self._handlers, {}
            for handler in left.values():
                try:
                    handler(-errno.ECANCELED)
                except Exception:
                    self.log.failure("io_uring completion handler failed")

    def _cancel_in_flight(self, ring: Ring, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            ring.submit()
        except OSError:
            return
        self._dispatch(ring.reap())
        sent = False
        while self._handlers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not sent and ring.sq_space() > 0:
                ring.prep_cancel(0, _CANCEL_ALL_UD, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY)
                ring.submit()
                sent = True
            try:
                results = ring.wait(1, min(remaining, 0.1))
            except OSError:
                return
            for ud, res in results:
                if ud == _CANCEL_ALL_UD and res == -errno.EINVAL:
                    self._cancel_one_by_one(ring)  # CANCEL_ANY is Linux 5.19+
            self._dispatch(results)

    def _cancel_one_by_one(self, ring: Ring) -> None:
        for target in list(self._handlers):
            if ring.sq_space() <= 0:
                break
            ud = self._next_ud
            self._next_ud = ud + 1
            ring.prep_cancel(target, ud)
        try:
            ring.submit()
        except OSError:
            pass


class _RingOpen:
    """openat → statx(fd) → ``check_regular``, all in the ring.

    A cancelled open still runs to its end in the kernel: whatever
    descriptor it produced is closed then.  The Deferred fails only once a
    descriptor opened for a refused file (directory, FIFO, device) is
    closed, so a failed open leaves nothing open behind it.
    """

    __slots__ = ("engine", "path", "deferred", "ud", "fd", "cancelled", "closing")

    def __init__(self, engine: "UringEngine", path: str, force_async: bool) -> None:
        self.engine = engine
        self.path = path
        self.fd = -1
        self.ud = 0
        self.cancelled = False
        self.closing = False
        self.deferred: defer.Deferred[OpenedFile] = defer.Deferred(self._cancel)
        self._start(_prep_open, (path, force_async), self._opened)

    def _start(self, prep: Prep, args: tuple[Any, ...], handler: Handler) -> None:
        try:
            self.ud = self.engine.driver.start(prep, args, handler)
        except (UringError, ValueError, TypeError, OSError) as e:
            if self.fd >= 0:
                _close_quietly(self.fd)
                self.fd = -1
            self._fail(e)

    def _cancel(self, _: defer.Deferred[OpenedFile]) -> None:
        self.cancelled = True
        if not self.closing:
            self.engine.driver.cancel(self.ud)

    def _fail(self, error: BaseException) -> None:
        if not self.deferred.called:
            self.deferred.errback(Failure(error))

    def _opened(self, res: int) -> None:
        if res < 0:
            if self.cancelled:
                return
            if res == -errno.ENXIO:  # a socket, or a device with no driver: say which
                self._start(Ring.prep_statx, (self.path,), self._stat_of_path)
            else:
                self._fail(result_error(res, self.path))
            return
        self.fd = res
        if self.cancelled:
            self._close_then(None)
        else:
            self._start(Ring.prep_statx, (res,), self._stat_of_fd)

    def _stat_of_path(self, res: Any) -> None:
        if self.cancelled:
            return
        if isinstance(res, StatxResult):
            try:
                check_regular(res.mode, self.path)
            except OSError as e:
                self._fail(e)
                return
        self._fail(result_error(-errno.ENXIO, self.path))

    def _stat_of_fd(self, res: Any) -> None:
        if self.cancelled:
            self._close_then(None)
            return
        if not isinstance(res, StatxResult):
            self._close_then(result_error(res, self.path))
            return
        try:
            check_regular(res.mode, self.path)
        except OSError as e:
            self._close_then(e)
            return
        engine = self.engine
        engine._ring_fds.add(self.fd)
        self.deferred.callback(engine._classify(OpenedFile(self.fd, res.size, res.dev, self.path)))

    def _close_then(self, error: BaseException | None) -> None:
        fd, self.fd = self.fd, -1
        self.closing = True

        def closed(_: Any) -> None:
            if error is not None:
                self._fail(error)

        try:
            self.engine.driver.start(Ring.prep_close, (fd,), closed)
        except RingClosed:
            _close_quietly(fd)
            closed(0)


class _RingRead:
    """One read in the ring.  Its Deferred may be cancelled (Twisted then
    fails it at once), but the engine keeps the descriptor open until the
    kernel has completed the read: see ``UringEngine.close``."""

    __slots__ = ("engine", "fd", "nowait", "deferred", "ud", "cancelled")

    def __init__(self, engine: "UringEngine", f: OpenedFile, view: memoryview, offset: int) -> None:
        self.engine = engine
        self.fd = f.fd
        self.nowait = f.nowait and engine.inline
        self.cancelled = False
        self.deferred: defer.Deferred[int] = defer.Deferred(self._cancel)
        busy = engine._busy
        busy[self.fd] = busy.get(self.fd, 0) + 1
        prep = _prep_read_async if engine._needs_worker(f.dev) else Ring.prep_read
        try:
            self.ud = engine.driver.start(prep, (f.fd, view, offset), self._done)
        except BaseException:
            engine._read_finished(self.fd)
            raise

    def _cancel(self, _: defer.Deferred[int]) -> None:
        self.cancelled = True
        self.engine.driver.cancel(self.ud)

    def _done(self, res: int) -> None:
        engine = self.engine
        engine._read_finished(self.fd)
        if res > 0 and self.nowait:
            engine._retry_inline.add(self.fd)
        d = self.deferred
        if d.called:
            return
        if res >= 0:
            d.callback(res)
        elif self.cancelled:
            d.errback(defer.CancelledError())
        else:
            d.errback(result_error(res))


@implementer(IFileEngine)
class UringEngine(NowaitEngine):
    """io_uring for whatever could block; ``nowait``'s inline path for the rest.

    :param entries: SQ size (the CQ is twice that; at most that many ops are
        in flight, more wait in a FIFO).
    :param io_workers: how many blocking ops (reads of FUSE/NFS files) the
        kernel runs at once in io-wq workers; they are kernel threads, so a
        high limit costs no GIL contention.
    :param max_dispatch: completions handled per reactor turn (bounds stalls).
    :param inline: use the inline fast path (``open()`` on local file
        systems, ``preadv(RWF_NOWAIT)`` for cached data).  With False every
        open, read and close goes through the ring (for tests and comparisons).
    """

    name = "io_uring"

    def __init__(self, reactor: Any, pool: IOPool, mounts: MountTable | None = None, *,
                 entries: int = 256, io_workers: int = 64, max_dispatch: int = 32,
                 inline: bool = True) -> None:
        reason = uring_unavailable_reason()
        if reason is not None:
            raise UringUnavailable(reason)
        super().__init__(reactor, pool, mounts)
        self.inline = inline and nowait_supported()
        self.driver = RingDriver(reactor, entries, io_workers, max_dispatch)
        self.ring_reads = 0
        self.ring_opens = 0
        self.ring_closes = 0
        self._ring_fds: set[int] = set()  # opened through the ring: closed through it
        self._busy: dict[int, int] = {}  # fd -> reads the kernel has not completed
        self._close_when_idle: dict[int, Callable[[], None]] = {}
        self._worker_devs: dict[int, bool] = {}
        self._retry_inline: set[int] = set()  # fds whose last read was a ring read
        self._stopped = False
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        if not self.inline:  # every open, read and close through the ring
            self.open = self._open_slowly  # type: ignore[method-assign]
            self._classify = self._classify_for_ring  # type: ignore[method-assign]
            self.read_small = None  # type: ignore[assignment]  # no inline fast path either

    # -- opening --------------------------------------------------------
    # open() is nowait's: inline on local file systems, _open_slowly (the
    # ring) where open() may block.  Ring-only mode swaps in the two below.

    def _open_slowly(self, path: str) -> defer.Deferred[OpenedFile]:
        self.ring_opens += 1
        # Where open() may wait for a server (FUSE, NFS), IOSQE_ASYNC keeps it
        # out of io_uring_enter: with the name cached the kernel would
        # otherwise try it inline, in the reactor thread.
        m = self.mounts.for_path(path)
        force_async = m is None or m.slow_open or m.mount_point in self._slow_points
        return _RingOpen(self, path, force_async).deferred

    @staticmethod
    def _classify_for_ring(f: OpenedFile) -> OpenedFile:
        f.inline = f.nowait = False
        return f

    # -- reading --------------------------------------------------------
    # read_inline is nowait's; after a miss (or EOPNOTSUPP) the file is no
    # longer "inline": FileReader then reads it through read() -- the ring,
    # or one inline attempt after each ring read -- and never registers the
    # file with the reactor (which would poll it).
    demote_on_miss = True

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> defer.Deferred[int]:
        fd = f.fd
        if fd in self._retry_inline:
            # The last read went through the ring; its readahead (or end of
            # file) is likely at hand now.  Only right after a ring read, so
            # a reader takes at most one inline chunk per completion.
            self._retry_inline.discard(fd)
            try:
                n = os.preadv(fd, [view], offset, RWF_NOWAIT)
            except BlockingIOError:
                self.nowait_fallbacks += 1
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    return defer.fail()
                f.nowait = False  # this file system refuses RWF_NOWAIT after all
            else:
                self.inline_reads += 1
                return defer.succeed(n)
        self.ring_reads += 1
        try:
            return _RingRead(self, f, view, offset).deferred
        except (UringError, OSError, ValueError, TypeError):
            return defer.fail()

    def _needs_worker(self, dev: int) -> bool:
        """Whether reads on this device must skip the kernel's inline attempt
        (IOSQE_ASYNC): on FUSE it can wait for a free background slot inside
        io_uring_enter, i.e. in the reactor thread.  Local disks and tmpfs
        honour the non-blocking attempt and are cheaper without a worker."""
        force = self._worker_devs.get(dev)
        if force is None:
            m = self.mounts.for_dev(dev)
            force = m is None or m.slow_open or m.mount_point in self._slow_points
            self._worker_devs[dev] = force
        return force

    def _read_finished(self, fd: int) -> None:
        n = self._busy[fd] - 1
        if n:
            self._busy[fd] = n
            return
        del self._busy[fd]
        then = self._close_when_idle.pop(fd, None)
        if then is not None:
            then()

    # -- closing --------------------------------------------------------
    def close(self, f: OpenedFile) -> defer.Deferred[None] | None:
        fd = f.fd
        if fd not in self._ring_fds and fd not in self._busy:
            self._retry_inline.discard(fd)
            os.close(fd)  # opened inline on a local file system
            return None
        if fd in self._busy:
            # A cancelled read is still in the kernel: closing now could let
            # the descriptor number be reused under it.
            d: defer.Deferred[None] = defer.Deferred()

            def later() -> None:
                pending = self._close_now(f)
                if pending is None:
                    d.callback(None)
                else:
                    pending.chainDeferred(d)

            self._close_when_idle[fd] = later
            return d
        return self._close_now(f)

    def _close_now(self, f: OpenedFile) -> defer.Deferred[None] | None:
        fd = f.fd
        self._retry_inline.discard(fd)
        if fd not in self._ring_fds:
            os.close(fd)  # opened inline on a local file system
            return None
        self._ring_fds.discard(fd)
        self.ring_closes += 1
        d: defer.Deferred[None] = defer.Deferred()

        def done(res: int) -> None:
            if res >= 0:
                d.callback(None)
            else:
                d.errback(result_error(res, f.path))

        try:
            self.driver.start(Ring.prep_close, (fd,), done)
        except RingClosed:
            _close_quietly(fd)
            return None
        return d

    # -- the rest -------------------------------------------------------
    def owned_fds(self) -> set[int]:
        """Descriptors the engine itself holds open (the ring, its eventfd)."""
        return self.driver.owned_fds()

    def stats(self) -> dict[str, Any]:
        driver = self.driver
        return {
            "inline_reads": self.inline_reads,
            "ring_reads": self.ring_reads,
            "pool_reads": self.pool_reads,
            "inline_opens": self.inline_opens,
            "ring_opens": self.ring_opens,
            "pool_opens": self.pool_opens,
            "ring_closes": self.ring_closes,
            "nowait_fallbacks": self.nowait_fallbacks,
            "ring_submits": driver.submits,
            "ring_ops": driver.submitted_ops,
            "ops_per_submit": round(driver.submitted_ops / driver.submits, 2) if driver.submits else 0.0,
            "ring_in_flight": driver.in_flight,
            "ring_peak_in_flight": driver.peak_in_flight,
            "ring_queued": driver.queued,
            "ring_waited": driver.waited,
            "ring_dropped": driver.dropped,
        }

    def stop(self) -> None:
        """Cancel what is in flight, close the ring and its eventfd."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.reactor.removeSystemEventTrigger(self._trigger)
        except (ValueError, KeyError, TypeError):
            pass
        self.driver.stop()
        self.pool.stop()
