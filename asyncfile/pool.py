"""A dedicated, bounded pool of threads for blocking file calls.

Opens on slow mounts, reads after a page-cache miss and closes block for as
long as the storage takes; they run here rather than in the reactor's own
pool, which also serves DNS lookups.  What the pool guarantees:

* A thread starts whenever a job arrives and no thread is idle (up to
  ``max_threads``), so one read stuck on a hung NFS server never holds up
  the quick jobs behind it.  Idle threads are counted exactly: each job
  claims one idle thread under the lock, so two submits never count the same
  one.  Threads idle for ``idle_timeout`` seconds exit.
* Starting a thread never blocks the reactor: ``threading.Thread.start()``
  waits until the new thread runs, up to a GIL switch interval (5 ms) under
  contention; ``_thread.start_new_thread`` does not wait.
* Cancelling a job that has not started means it never runs; a running
  system call cannot be stopped, so its value then goes to ``on_orphan``.
* ``stop()`` never blocks the reactor and is bounded by its timeout.
* After ``os.fork()`` the child's pool starts afresh; jobs the parent had
  queued or running fail in the child with ``PoolForked``.

Call ``run``, ``stop`` and ``stats`` from the reactor thread.
"""

from __future__ import annotations

import _thread
import os
import threading
import weakref
from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["IOPool", "PoolForked"]

_log = Logger()


class PoolForked(RuntimeError):
    """A job was queued or running in the parent process when it forked.

    Threads do not survive ``fork()``: the parent still runs the job, but the
    child never gets its result, so the child's Deferred fails with this.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"I/O pool {name!r}: job lost at fork(): it was queued or running in a "
            "thread of the parent process, and threads do not survive fork() "
            "(the parent still runs it; this process will never see its result)")


class _Job:
    """One call, and where it is: queued, taken by a thread, started."""

    __slots__ = ("f", "args", "on_orphan", "deferred", "queued", "started", "cancelled")

    def __init__(self, f: Callable[..., Any], args: tuple[Any, ...],
                 on_orphan: Callable[[Any], object] | None) -> None:
        self.f: Callable[..., Any] | None = f
        self.args: tuple[Any, ...] | None = args
        self.on_orphan = on_orphan
        self.deferred: defer.Deferred[Any] | None = None
        self.queued = False  # in IOPool._queue and counted in IOPool._queued
        self.started = False  # f has been (or is about to be) called
        self.cancelled = False  # cancelled before it started: never call f


class _Worker:
    """A pool thread's mailbox: a job handed to it directly, and its wake-up."""

    __slots__ = ("n", "job", "wake", "retired", "generation")

    def __init__(self, n: int, job: _Job, wake: Any, retired: bool,
                 generation: int) -> None:
        self.n = n
        self.job: _Job | None = job
        self.wake = wake
        self.retired = retired  # exit when no job is queued, instead of idling
        self.generation = generation  # the pool's state it belongs to (see fork)


class IOPool:
    """Runs blocking calls in threads and delivers their results in the reactor.

    ``IOPool(reactor, max_threads=16, name="asyncfile-io")``; keyword-only
    ``idle_timeout`` (seconds an idle thread waits for work before exiting;
    None: never) and ``shutdown_timeout`` (how long reactor shutdown waits for
    the pool).  Threads are daemon threads named ``f"{name}-{n}"``.

    After ``stop()`` the pool still works: ``run()`` starts threads again on
    demand (and registers the shutdown trigger again).
    """

    def __init__(self, reactor: Any, max_threads: int = 16, name: str = "asyncfile-io", *,
                 idle_timeout: float | None = 30.0, shutdown_timeout: float = 5.0) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.reactor = reactor
        self.max_threads = max_threads
        self.name = name
        self.idle_timeout = idle_timeout
        self.shutdown_timeout = shutdown_timeout
        self.calls = 0
        self._trigger: Any = None
        self._generation = 0
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        """A pool with no threads and no jobs (at creation and in a forked child)."""
        self._generation += 1
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()  # may hold cancelled jobs, skipped when reached
        self._queued = 0  # jobs in _queue that are not cancelled
        self._idle: list[_Worker] = []  # waiting for a job; the last one is woken first
        self._workers: set[_Worker] = set()  # every live thread
        self._active: set[_Job] = set()  # jobs handed to a thread and not yet delivered
        self._stopping = False  # stop() is waiting for the threads to end
        self._stop_waiters: list[tuple[defer.Deferred[None], Any]] = []
        self._started = 0
        self._cancelled_unstarted = 0
        self._orphans = 0

    # --- submitting -------------------------------------------------------

    def run(self, f: Callable[..., Any], *args: Any,
            on_orphan: Callable[[Any], object] | None = None) -> defer.Deferred[Any]:
        """``f(*args)`` in a pool thread; its result or exception in the reactor.

        Cancelling the Deferred before a thread starts ``f`` means ``f`` never
        runs.  Once started, the call cannot be stopped: the Deferred fails with
        ``CancelledError`` at once and, when ``f`` returns, its value goes to
        ``on_orphan`` (to close a descriptor an open produced, say); an
        exception it raises then is dropped.  Any exception from ``f`` fails
        the Deferred, ``KeyboardInterrupt`` and ``SystemExit`` included: in a
        worker thread they can only come from ``f`` itself, and the thread
        stays in the pool rather than dying with them.
        """
        job = _Job(f, args, on_orphan)
        d: defer.Deferred[Any] = defer.Deferred(lambda _: self._cancel(job))
        self._enqueue(job, d)
        return d

    def submit(self, f: Callable[..., Any], *args: Any) -> tuple[defer.Deferred[Any], "_Job"]:
        """``f(*args)`` in a pool thread, for an owner that must know when the
        call has ended (a descriptor's owner before closing it).

        The Deferred has no canceller and fires with ``f``'s outcome; to give
        up, ``withdraw(job)``: it takes the job back if ``f`` has not started
        (the Deferred then fails with ``CancelledError``), else it changes
        nothing and the real outcome follows.
        """
        job = _Job(f, args, None)
        d: defer.Deferred[Any] = defer.Deferred()
        self._enqueue(job, d)
        return d, job

    def withdraw(self, job: "_Job") -> bool:
        """Take back a job from ``submit`` that has not started; True if done."""
        if job.deferred is None or job.deferred.called:
            return False
        self._cancel(job)
        if not job.cancelled:
            return False  # running: its outcome follows
        job.deferred.errback(Failure(defer.CancelledError()))
        return True

    def _enqueue(self, job: "_Job", d: defer.Deferred[Any]) -> None:
        if self._trigger is None:
            # "before": Twisted waits for Deferreds from before-phase triggers
            # only; "during"/"after" results are ignored.
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown",
                                                               self._on_shutdown)
        job.deferred = d
        self.calls += 1
        self._submit(job)

    def _submit(self, job: _Job) -> None:
        with self._lock:
            worker = self._dispatch(job)
        if worker is None:
            return
        try:
            _thread.start_new_thread(self._work, (worker,))
        except BaseException:  # RuntimeError: can't start new thread
            failure = Failure()
            with self._lock:
                self._workers.discard(worker)
                self._active.discard(job)
                self._started -= 1
                retry = bool(self._idle or self._workers)
                if retry:  # a live thread will take it
                    self._dispatch(job, spawn=False)
            if not retry:
                _log.failure("I/O pool {name!r}: cannot start a thread", failure, name=self.name)
                assert job.deferred is not None
                job.deferred.errback(failure)

    def _dispatch(self, job: _Job, spawn: bool = True) -> _Worker | None:
        """Hand ``job`` to an idle thread, or to a new one (returned, for the
        caller to start outside the lock), or queue it.  Lock held."""
        if self._idle:
            worker = self._idle.pop()
            worker.job = job
            self._active.add(job)
            worker.wake.release()
            return None
        if spawn and len(self._workers) < self.max_threads:
            wake = _thread.allocate_lock()  # held: released to wake the idle thread
            wake.acquire()
            worker = _Worker(self._started, job, wake,
                             self._stopping, self._generation)
            self._started += 1
            self._workers.add(worker)
            self._active.add(job)
            return worker
        job.queued = True
        self._queue.append(job)
        self._queued += 1
        return None

    def _cancel(self, job: _Job) -> None:
        """The Deferred's canceller: withdraw the job if ``f`` has not started."""
        with self._lock:
            if job.started:
                return  # the result will go to on_orphan
            job.cancelled = True
            job.f = job.args = None
            self._cancelled_unstarted += 1
            if job.queued:
                job.queued = False
                self._queued -= 1

    # --- the threads ------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        """A pool thread: run jobs until none is left and it is idle too long
        or retired by ``stop()``.

        A result is handed to the reactor under the lock, just before this
        thread takes its next job or goes idle: when the reactor sees the
        result, the thread is already idle (or busy with the next job), so a
        job submitted right after reuses it instead of starting another."""
        me = threading.current_thread()  # a _DummyThread: started with _thread
        me.name = f"{self.name}-{worker.n}"
        job: _Job | None = None
        outcome: tuple[bool, Any] | None = None
        notify = False
        forked = False
        try:
            while True:
                with self._lock:
                    if worker.generation != self._generation:
                        forked = True  # f forked in this thread: the child's pool is new
                        return
                    if job is not None:
                        assert outcome is not None
                        self.reactor.callFromThread(self._deliver, job, *outcome)
                        self._active.discard(job)  # after: see _after_fork_in_child
                        job = outcome = None
                    job = self._take(worker)
                    if job is None:
                        self._workers.discard(worker)
                        notify = self._stopping and not self._workers
                        break
                    job.started = True
                outcome = self._call(job)
        except BaseException:  # a bug here: keep the books right, and say so
            _log.failure("I/O pool {name!r}: worker {thread} failed", name=self.name, thread=me.name)
            with self._lock:
                if worker.generation == self._generation:
                    if job is not None:
                        self.reactor.callFromThread(self._deliver, job, False, Failure())
                        self._active.discard(job)
                    if worker in self._idle:
                        self._idle.remove(worker)
                    self._workers.discard(worker)
                    notify = self._stopping and not self._workers
        finally:
            if not forked:  # in a child, this thread is now its main thread
                _forget_thread(me)
        if notify:
            self.reactor.callFromThread(self._check_stopped)

    def _take(self, worker: _Worker) -> _Job | None:
        """The next job for ``worker``, waiting idle for one; None: exit.  Lock held."""
        while True:
            job = worker.job
            if job is not None:
                worker.job = None
            elif self._queued:
                job = self._queue.popleft()
                if not job.queued:
                    continue  # cancelled while queued
                job.queued = False
                self._queued -= 1
                self._active.add(job)
            else:
                self._queue.clear()  # only cancelled jobs can be left in it
                if worker.retired:
                    return None
                self._idle.append(worker)
                # A raw lock as a binary semaphore: C-level, cheaper than a
                # Condition (which allocates a lock per wait).
                self._lock.release()
                try:
                    woken = worker.wake.acquire(True, -1 if self.idle_timeout is None else self.idle_timeout)
                finally:
                    self._lock.acquire()
                if worker.job is not None:
                    continue  # handed a job (it took this worker out of _idle)
                if worker in self._idle:
                    self._idle.remove(worker)
                    if not woken:
                        return None  # idle too long
                continue  # retired by stop(): drain the queue, then exit
            if job.cancelled:
                self._active.discard(job)
                continue
            return job

    @staticmethod
    def _call(job: _Job) -> tuple[bool, Any]:
        f, args = job.f, job.args
        job.f = job.args = None
        assert f is not None and args is not None
        try:
            return True, f(*args)
        except BaseException:  # KeyboardInterrupt, SystemExit too: see run()
            return False, Failure()

    def _deliver(self, job: _Job, ok: bool, value: Any) -> None:
        """In the reactor: fire the Deferred, or hand an orphan to on_orphan."""
        d = job.deferred
        assert d is not None
        if not d.called:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
            return
        # Cancelled while running, or failed with PoolForked in a forked child.
        if ok and job.on_orphan is not None:
            self._orphans += 1
            try:
                job.on_orphan(value)
            except BaseException:
                _log.failure("I/O pool {name!r}: on_orphan {on_orphan!r} failed on {value!r}",
                             name=self.name, on_orphan=job.on_orphan, value=value)

    # --- stopping ---------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """End the threads without blocking the reactor.

        Jobs already queued still run (they may be closes that must happen);
        then the threads exit.  The Deferred fires once they all have, or after
        ``timeout`` seconds (a thread stuck on a dead NFS mount must not hang
        shutdown; threads left behind are daemon threads and exit after their
        call).  It never fails.  The pool stays usable: ``run()`` afterwards
        starts threads again.
        """
        self._remove_trigger()
        with self._lock:
            if not self._workers:
                return defer.succeed(None)
            self._stopping = True
            for worker in self._workers:
                worker.retired = True
            for worker in self._idle:
                worker.wake.release()
            self._idle.clear()
        d: defer.Deferred[None] = defer.Deferred()
        call = self.reactor.callLater(timeout, self._stop_timed_out, d, timeout)
        self._stop_waiters.append((d, call))
        return d

    def _check_stopped(self) -> None:
        """In the reactor, after the last thread exited while stopping."""
        with self._lock:
            if self._workers or not self._stopping:
                return
            self._stopping = False
        waiters, self._stop_waiters = self._stop_waiters, []
        for d, call in waiters:
            if call.active():
                call.cancel()
            if not d.called:  # the caller may have cancelled it
                d.callback(None)

    def _stop_timed_out(self, d: defer.Deferred[None], timeout: float) -> None:
        self._stop_waiters = [(w, c) for w, c in self._stop_waiters if w is not d]
        with self._lock:
            busy = len(self._workers)
            if not self._stop_waiters:
                self._stopping = False  # new threads are ordinary ones again
        _log.warn("I/O pool {name!r}: {busy} thread(s) still busy after {timeout} s; "
                  "not waiting for them", name=self.name, busy=busy, timeout=timeout)
        if not d.called:
            d.callback(None)

    def _on_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None
        return self.stop(self.shutdown_timeout)

    def _remove_trigger(self) -> None:
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError, TypeError):
                pass  # already run or removed

    # --- fork -------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """A fresh pool in the child; the parent's jobs fail there soon after.

        Runs inside ``os.fork()``: only bookkeeping here, and the Deferreds
        fire from the child's reactor (``callLater(0)``)."""
        lost = [job for job in self._queue if job.queued]
        lost += [job for job in self._active if not job.cancelled]
        waiters = self._stop_waiters
        self._reset()
        if lost or waiters:
            self.reactor.callLater(0, self._fail_lost, lost, waiters)

    def _fail_lost(self, lost: list[_Job], waiters: list[tuple[defer.Deferred[None], Any]]) -> None:
        for job in lost:
            d = job.deferred
            if d is not None and not d.called:  # its result may have been on its way
                d.errback(Failure(PoolForked(self.name)))
        for d, call in waiters:  # no thread of this pool is left in the child
            if call.active():
                call.cancel()
            if not d.called:
                d.callback(None)

    # --- counters ---------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """``io_threads`` (the limit), ``io_threads_busy``, ``io_queue``, and
        ``io_threads_alive``, ``io_threads_idle``, ``io_threads_started``,
        ``io_calls``, ``io_cancelled_unstarted``, ``io_orphans``."""
        with self._lock:
            return {
                "io_threads": self.max_threads,
                "io_threads_busy": len(self._active),
                "io_queue": self._queued,
                "io_threads_alive": len(self._workers),
                "io_threads_idle": len(self._idle),
                "io_threads_started": self._started,
                "io_calls": self.calls,
                "io_cancelled_unstarted": self._cancelled_unstarted,
                "io_orphans": self._orphans,
            }


def _forget_thread(thread: threading.Thread) -> None:
    """Drop the ``_DummyThread`` that ``current_thread()`` registered for a pool
    thread: Python 3.11 keeps it forever, and a later thread reusing the same
    ident would be reported under this one's name.  Uses ``threading``'s
    private registry, so anything unexpected there is left alone."""
    active = getattr(threading, "_active", None)
    lock = getattr(threading, "_active_limbo_lock", None)
    if not isinstance(active, dict) or lock is None:
        return
    ident = _thread.get_ident()
    with lock:
        if active.get(ident) is thread:
            del active[ident]


_pools: weakref.WeakSet[IOPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        try:
            pool._after_fork_in_child()
        except Exception:  # a hook must not break the child's fork()
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
