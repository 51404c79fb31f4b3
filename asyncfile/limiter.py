"""Bounded concurrency with a bounded, cancellable FIFO of waiters."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from .errors import Overloaded

__all__ = ["Limiter", "Slot"]

T = TypeVar("T")


class Slot:
    """One of a ``Limiter``'s places, held until ``release()`` (idempotent)."""

    __slots__ = ("_limiter", "_released")

    def __init__(self, limiter: "Limiter") -> None:
        self._limiter = limiter
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release()


class Limiter:
    """At most ``limit`` operations at once; at most ``max_waiting`` waiting, FIFO.

    Unlike ``DeferredSemaphore``, a full queue refuses at once with
    ``Overloaded``, and cancelling a waiter takes it out of the queue.
    ``max_waiting=None`` means an unbounded queue; ``0`` means never wait.
    """

    def __init__(self, limit: int, max_waiting: int | None = 1024) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError("max_waiting must be >= 0 or None")
        self.limit = limit
        self.max_waiting = max_waiting
        self.active = 0
        self._waiters: deque[defer.Deferred[Slot]] = deque()
        self._draining = False
        self.started = 0
        self.rejected = 0
        self.cancelled = 0
        self.peak_active = 0
        self.peak_waiting = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> Slot | None:
        """A place now, or None: the synchronous fast path of ``acquire``."""
        if self.active < self.limit and not self._waiters:
            return self._grant()
        return None

    def acquire(self) -> defer.Deferred[Slot]:
        """A Deferred firing with a ``Slot`` (release it when done).

        Fails at once with ``Overloaded`` when the queue is full; cancelling it
        while it waits removes it from the queue.
        """
        if self.active < self.limit and not self._waiters:
            return defer.succeed(self._grant())
        if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
            self.rejected += 1
            return defer.fail(Overloaded(self.limit, len(self._waiters)))
        d: defer.Deferred[Slot] = defer.Deferred(self._cancel_waiter)
        self._waiters.append(d)
        self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        return d

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Call ``f(*args, **kwargs)`` when a place is free; fire with its result.

        Cancelling the returned Deferred while waiting frees the place in the
        queue; while running it cancels ``f``'s Deferred.  The place is given
        back when ``f``'s result is known.
        """
        inner: list[defer.Deferred[Any]] = []

        def cancel(_: defer.Deferred[Any]) -> None:
            if inner:
                inner[0].cancel()
            else:
                acquiring.cancel()

        outer: defer.Deferred[Any] = defer.Deferred(cancel)

        def granted(slot: Slot) -> None:
            d = defer.maybeDeferred(f, *args, **kwargs)
            inner.append(d)

            def done(result: Any) -> Any:
                slot.release()
                return result

            d.addBoth(done).chainDeferred(outer)

        def refused(failure: Failure) -> None:
            if not outer.called:
                outer.errback(failure)

        acquiring = self.acquire()
        acquiring.addCallbacks(granted, refused)
        return outer

    def stats(self) -> dict[str, int | None]:
        return {
            "limit": self.limit,
            "active": self.active,
            "waiting": len(self._waiters),
            "max_waiting": self.max_waiting,
            "started": self.started,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "peak_active": self.peak_active,
            "peak_waiting": self.peak_waiting,
        }

    def loader_stats(self) -> dict[str, int | None]:
        """The keys a file loader's ``stats()`` reports from its limiter
        (shared by ``FileLoader`` and ``MemoryLoader``)."""
        return {
            "active": self.active,
            "waiting": len(self._waiters),
            "max_open": self.limit,
            "max_waiting": self.max_waiting,
            "rejected": self.rejected,
            "peak_open": self.peak_active,
            "peak_waiting": self.peak_waiting,
        }

    def _grant(self) -> Slot:
        self.active += 1
        self.started += 1
        self.peak_active = max(self.peak_active, self.active)
        return Slot(self)

    def _cancel_waiter(self, d: defer.Deferred[Slot]) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            return
        self.cancelled += 1

    def _release(self) -> None:
        self.active -= 1
        # A trampoline, not recursion: work that finishes synchronously releases
        # its place inside callback(); the outer loop hands out the next one.
        if self._draining:
            return
        self._draining = True
        try:
            while self._waiters and self.active < self.limit:
                self._waiters.popleft().callback(self._grant())
        finally:
            self._draining = False
