"""The ring backend: opens, reads and closes run in the kernel; an eventfd says when.

Why: a thread pool pays a thread hop per call and caps concurrency at its
size; io_uring lets the reactor thread hand the kernel a batch of
operations in one system call and learn of their completions through an
eventfd, which (unlike a regular file) the reactor can really wait on.
No thread of ours blocks and the reactor never polls.

Cached files still take the inline path (``preadv(RWF_NOWAIT)`` and
``open()`` in the reactor thread on local file systems): a ring round trip
costs a reactor turn and ~20 µs of Python per operation, an inline
page-cache copy ~2 µs.  Everything that could block goes through the ring:
opens on slow mounts (FUSE, NFS), reads that miss the page cache or that
the file system cannot do with RWF_NOWAIT, and closes of such files.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections import deque
from typing import Any, Callable

from twisted.internet import abstract, defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ForkedError
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
from .base import OPEN_FLAGS, IBackend, Op, OpenedFile, Root, check_regular
from .threads import PoolBackend

__all__ = ["RingBackend", "RingDriver", "uring_unavailable_reason"]

Handler = Callable[[Any], None]
Prep = Callable[..., None]

_CANCEL_ALL_UD = 0  # user_data of stop()'s cancel-everything op; start() never uses 0
_FORKED = object()  # the "result" handlers get for ops lost at fork()
_DRIVERS: "weakref.WeakSet[RingDriver]" = weakref.WeakSet()


def uring_unavailable_reason() -> str | None:
    """None when the io_uring engine can run here, else why not."""
    return _uring.probe()


def _ignore(res: Any) -> None:
    pass


def _close_quietly(fd: int) -> None:
    """close() without the ring.  Its error (ENOTCONN from a dead FUSE
    daemon, say) is moot: the descriptor is released anyway."""
    try:
        os.close(fd)
    except OSError:
        pass


def _after_fork_in_child() -> None:
    for driver in list(_DRIVERS):
        driver._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _prep_open(ring: Ring, path: str, force_async: bool, ud: int) -> None:
    ring.prep_openat(path, OPEN_FLAGS, 0, ud, force_async=force_async)


def _prep_open_beneath(ring: Ring, dirfd: int, path: str, resolve: int, force_async: bool, ud: int) -> None:
    ring.prep_openat2(dirfd, path, OPEN_FLAGS, 0, resolve, ud, force_async=force_async)


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
    reactor: Any  # FileDescriptor's IReactorFDSet, also an IReactorTime (callLater)

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
        self._stop_d: defer.Deferred[None] | None = None
        self._stop_timer: Any = None
        self._lost_at_fork = False
        _DRIVERS.add(self)

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
        self.startReading()  # type: ignore[no-untyped-call]  # Twisted's, unannotated
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
        ring = self.ring
        if ring is None or ring.closed:
            return
        self._reap()
        if ring.pending:
            self._flush()
        if self._stopped:
            self._teardown_when_idle()

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
            if self._lost_at_fork:
                raise ForkedError("io_uring ring")
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
            n = self.ring.submit()  # type: ignore[union-attr]  # only called with a ring
        except OSError:
            self.log.failure("io_uring_enter failed; retrying on the next turn")
            return 0
        self.submits += 1
        self.submitted_ops += n
        in_flight = self.ring.in_flight  # type: ignore[union-attr]
        if in_flight > self.peak_in_flight:
            self.peak_in_flight = in_flight
        return n

    def _flush(self) -> None:
        """Submit what was prepared, then reap what completed meanwhile."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        ring = self.ring
        if ring is None or ring.closed:
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
        results = self.ring.reap()  # type: ignore[union-attr]  # only called with a ring
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
            elif ud == _CANCEL_ALL_UD and res == -errno.EINVAL and self._stopped:
                self._cancel_one_by_one()  # IORING_ASYNC_CANCEL_ANY is Linux 5.19+

    def _pump(self) -> None:
        """Move waiting requests into the ring, FIFO, as room allows."""
        ring: Ring = self.ring  # type: ignore[assignment]  # only called with a ring
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
    def stop(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """Stop without blocking the reactor.

        New operations are refused, waiting ones dropped, the kernel is asked
        to cancel the rest, and the ring is closed once every operation has
        completed: handlers run as usual, so an open's descriptor is closed
        and a read's owner learns its buffer is free.  Operations the kernel
        still holds after ``timeout`` seconds (a read on a hung NFS server)
        are abandoned: their handlers get -ECANCELED and their buffers stay
        referenced for good.  The Deferred fires when the ring is closed.
        """
        if self._stop_d is None:
            self._stop_d = defer.Deferred()
            self._stopped = True
            self._stop_now(timeout)
        done: defer.Deferred[None] = defer.Deferred()
        if self._stop_d.called:
            done.callback(None)
        else:
            self._stop_d.addBoth(lambda r: (done.callback(None), r)[1])  # type: ignore[call-overload, func-returns-value]
        return done

    def _stop_now(self, timeout: float) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        for ud, _, _ in list(self._waiting):
            if ud in self._waiting_ids:
                self._waiting_ids.discard(ud)
                self._call(self._handlers.pop(ud), -errno.ECANCELED)
        self._waiting.clear()
        ring = self.ring
        if ring is None or ring.closed:
            self._teardown()
            return
        try:
            ring.submit()
        except OSError:
            pass
        backlog, self._backlog = list(self._backlog), deque()
        self._dispatch(backlog)
        if self._handlers and ring.sq_space() > 0:
            ring.prep_cancel(0, _CANCEL_ALL_UD, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY)
            try:
                ring.submit()
            except OSError:
                pass
        self._dispatch(ring.reap())
        if self._handlers:
            self._stop_timer = self.reactor.callLater(timeout, self._abandon)
        self._teardown_when_idle()

    def _teardown_when_idle(self) -> None:
        if self._handlers or self._backlog:
            return
        self._teardown()

    def _abandon(self) -> None:
        """The kernel kept operations past the stop timeout: give up on them."""
        self._stop_timer = None
        left, self._handlers = self._handlers, {}
        self._backlog.clear()
        for handler in left.values():
            self._call(handler, -errno.ECANCELED)
        self._teardown()

    def _teardown(self) -> None:
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        ring, efd = self.ring, self._efd
        if ring is not None and not ring.closed:
            self.stopReading()  # type: ignore[no-untyped-call]
            self.connected = 0
            ring.close(timeout=0)  # references of what is still in flight are kept
        if efd >= 0:
            self._efd = -1
            _close_quietly(efd)
        d = self._stop_d
        if d is not None and not d.called:
            d.callback(None)

    def _call(self, handler: Handler, res: Any) -> None:
        try:
            handler(res)
        except Exception:
            self.log.failure("io_uring completion handler failed")

    def _cancel_one_by_one(self) -> None:
        ring: Ring = self.ring  # type: ignore[assignment]  # only called with a ring
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

    def _forked(self) -> None:
        """In a forked child: the ring and its operations are the parent's.

        Nothing of them is touched (the rings are shared memory); operations
        in flight fail with ``ForkedError`` when the child's reactor runs,
        and new ones are refused with it: a child builds its own loader.
        """
        left, self._handlers = self._handlers, {}
        self._waiting.clear()
        self._waiting_ids.clear()
        self._backlog.clear()
        self._flush_call = None
        self._stop_timer = None
        if self.ring is not None:
            self.ring._abandon()
        if self._efd >= 0:
            _close_quietly(self._efd)
            self._efd = -1
        self._stopped = True
        self._lost_at_fork = True
        if self._stop_d is None:
            self._stop_d = defer.succeed(None)
        for handler in left.values():
            try:
                self.reactor.callLater(0, self._call, handler, _FORKED)
            except Exception:
                pass


def _error(res: Any, path: Any = None) -> BaseException:
    if res is _FORKED:
        return ForkedError("io_uring operation")
    if res == -errno.ECANCELED:
        return defer.CancelledError()
    return result_error(res, path)


class _RingOpen:
    """openat (or openat2 beneath a root) → statx(fd) → ``check_regular``, in the ring.

    ``op`` fires exactly once: with the ``OpenedFile``; or with the error
    once a descriptor opened for a refused file (directory, FIFO, device)
    is closed again.  Cancelled after the kernel opened the file, it still
    delivers the ``OpenedFile`` (unchecked): its owner closes it.
    """

    __slots__ = ("backend", "path", "op", "ud", "fd", "cancelled")

    def __init__(self, backend: "RingBackend", path: str, root: Root | None, force_async: bool) -> None:
        self.backend = backend
        self.path = path
        self.fd = -1
        self.ud = 0
        self.cancelled = False
        self.op = Op(self._cancel)
        if "\0" in path:  # refused here, not after waiting for room in the ring
            raise ValueError("embedded null byte")
        if root is not None:
            from ..confine import check_relative

            check_relative(path)  # the same name rules as every other engine
        if root is None:
            self._start(_prep_open, (path, force_async), self._opened)
        else:
            from ..confine import resolve_flags

            self._start(_prep_open_beneath, (root.fd, path, resolve_flags(root.no_symlinks), force_async),
                        self._opened)

    def _start(self, prep: Prep, args: tuple[Any, ...], handler: Handler) -> None:
        try:
            self.ud = self.backend.driver.start(prep, args, handler)
        except Exception as e:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                _close_quietly(fd)
            self._fail(e)

    def _cancel(self) -> None:
        self.cancelled = True
        self.backend.driver.cancel(self.ud)

    def _fail(self, error: BaseException) -> None:
        if not self.op.deferred.called:
            self.op.deferred.errback(Failure(error))

    def _opened(self, res: Any) -> None:
        if res is _FORKED or res < 0:
            error = _error(res, self.path)
            if res == -errno.ENXIO:  # a socket, or a device with no driver
                from ..errors import NotRegularFile

                error = NotRegularFile("socket or device", self.path)
            elif isinstance(error, OSError) and self.backend.root_escape(error):
                from ..confine import escape_error

                error = escape_error(error, self.path)
            self._fail(error)
            return
        self.fd = res
        if self.cancelled:
            self._deliver(OpenedFile(res, 0, 0, self.path))
        else:
            self._start(Ring.prep_statx, (res,), self._stat_of_fd)

    def _stat_of_fd(self, res: Any) -> None:
        if not isinstance(res, StatxResult):
            self._close_then(_error(res, self.path))
            return
        try:
            check_regular(res.mode, self.path)
        except OSError as e:
            self._close_then(e)
            return
        self._deliver(OpenedFile(self.fd, res.size, res.dev, self.path, res.ino, res.mtime_ns))

    def _deliver(self, f: OpenedFile) -> None:
        f.via = "ring"
        self.fd = -1
        self.op.deferred.callback(f)

    def _close_then(self, error: BaseException) -> None:
        fd, self.fd = self.fd, -1
        try:
            self.backend.driver.start(Ring.prep_close, (fd,), lambda _: self._fail(error))
        except Exception:
            _close_quietly(fd)
            self._fail(error)


@implementer(IBackend)
class RingBackend:
    """Blocking calls through io_uring; the pool only for what the ring
    cannot do here (confined opens where ``openat2`` is missing, closes
    after the ring stopped).

    :param entries: SQ size (the CQ is twice that; at most that many ops are
        in flight, more wait in a FIFO).
    :param io_workers: how many blocking ops (reads of FUSE/NFS files) the
        kernel runs at once in io-wq workers; they are kernel threads, so a
        high limit costs no GIL contention.
    :param max_dispatch: completions handled per reactor turn (bounds stalls).
    """

    name = "ring"

    def __init__(self, reactor: Any, pool: Any, slow_mount: Callable[[str], bool], *,
                 slow_dev: Callable[[int], bool], entries: int = 256, io_workers: int = 64,
                 max_dispatch: int = 32) -> None:
        reason = uring_unavailable_reason()
        if reason is not None:
            raise UringUnavailable(reason)
        self.reactor = reactor
        self.driver = RingDriver(reactor, entries, io_workers, max_dispatch)
        self.pool = PoolBackend(pool)
        self._slow_mount = slow_mount
        self._slow_dev = slow_dev
        self._worker_devs: dict[int, bool] = {}
        self.ring_reads = 0
        self.ring_opens = 0
        self.ring_closes = 0
        self._trigger: Any = reactor.addSystemEventTrigger("before", "shutdown", self._at_shutdown)
        self._stopping: defer.Deferred[None] | None = None

    def root_escape(self, error: OSError) -> bool:
        return error.errno in (errno.EXDEV, errno.ELOOP)

    def open(self, path: str, root: Root | None, slow: bool) -> Op:
        if root is not None and root.method != "openat2" or self.driver.stopped and not self.driver._lost_at_fork:
            return self.pool.open(path, root, slow)
        self.ring_opens += 1
        # Where open() may wait for a server (FUSE, NFS), IOSQE_ASYNC keeps it
        # out of io_uring_enter: with the name cached the kernel would
        # otherwise try it inline, in the reactor thread.
        force_async = slow or self._slow_mount(root.join(path) if root is not None else path)
        return _RingOpen(self, path, root, force_async).op

    def open_root(self, path: str, no_symlinks: bool) -> Op:
        return self.pool.open_root(path, no_symlinks)

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> Op:
        self.ring_reads += 1
        driver = self.driver
        ud = 0

        def done(res: Any) -> None:
            if op.deferred.called:
                return
            if res is not _FORKED and res >= 0:
                op.deferred.callback(res)
            else:
                op.deferred.errback(Failure(_error(res, f.path)))

        op = Op(lambda: driver.cancel(ud))
        prep = _prep_read_async if self._needs_worker(f.dev) else Ring.prep_read
        try:
            ud = driver.start(prep, (f.fd, view, offset), done)
        except Exception:
            return Op.failed()
        return op

    def _needs_worker(self, dev: int) -> bool:
        """Whether reads on this device must skip the kernel's inline attempt
        (IOSQE_ASYNC): on FUSE it can wait for a free background slot inside
        io_uring_enter, i.e. in the reactor thread.  Local disks and tmpfs
        honour the non-blocking attempt and are cheaper without a worker."""
        force = self._worker_devs.get(dev)
        if force is None:
            force = self._worker_devs[dev] = self._slow_dev(dev)
        return force

    def close(self, f: OpenedFile) -> Op:
        if f.via != "ring" or self.driver.stopped:
            return self.pool.close(f)
        self.ring_closes += 1
        op = Op()

        def done(res: Any) -> None:
            if res is not _FORKED and res >= 0:
                op.deferred.callback(None)
            else:
                op.deferred.errback(Failure(_error(res, f.path)))

        try:
            self.driver.start(Ring.prep_close, (f.fd,), done)
        except Exception:
            return self.pool.close(f)
        return op

    def owned_fds(self) -> set[int]:
        """The ring's and the eventfd's descriptors (none before first use)."""
        return self.driver.owned_fds()

    def stats(self) -> dict[str, Any]:
        driver = self.driver
        return {
            **self.pool.stats(),
            "ring_reads": self.ring_reads,
            "ring_opens": self.ring_opens,
            "ring_closes": self.ring_closes,
            "ring_submits": driver.submits,
            "ring_ops": driver.submitted_ops,
            "ring_in_flight": driver.in_flight,
            "ring_peak_in_flight": driver.peak_in_flight,
            "ring_queued": driver.queued,
            "ring_waited": driver.waited,
            "ring_dropped": driver.dropped,
        }

    def _at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: not to be removed
        return self.stop()

    def stop(self) -> defer.Deferred[None]:
        """Stop the ring (see ``RingDriver.stop``), then the pool; never blocks."""
        if self._stopping is None:
            trigger, self._trigger = self._trigger, None
            if trigger is not None:
                self.reactor.removeSystemEventTrigger(trigger)
            self._stopping = self.driver.stop()
            self._stopping.addCallback(lambda _: self.pool.stop())
        done: defer.Deferred[None] = defer.Deferred()
        self._stopping.addBoth(lambda r: (done.called or done.callback(None), r)[1])  # type: ignore[call-overload, func-returns-value]
        return done
