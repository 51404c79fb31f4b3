"""The image pipeline, with admission control: what HTTP and PB both call.

    open_image        one confined open beneath the root (asyncfile ``Root``:
                      openat2 RESOLVE_BENEATH, or an O_NOFOLLOW walk) and the
                      fstat of that descriptor → a ``Located``; everything
                      about the answer (ETag, Last-Modified, Content-Length,
                      content sniffing, loading, streaming) uses that one
                      descriptor and that one fstat
      original      → stream_original: from the descriptor, in the streams
                      lane (``max_streams``; beyond it Overloaded at once)
      transform/info→ result cache, keyed by (dev, inode, size, mtime_ns) and
                      the canonical variant (a hit is answered here)
                    → result tiers (transforms only): the machine's result
                      store, then memcached, each within its deadline; a hit
                      is answered without a place in the heavy lane (a stored
                      result never waits behind processing nor gets a 503)
                    → heavy lane (``workers`` at once, ``max_queue`` waiting,
                      beyond that Overloaded at once)
                    → load from the descriptor, at most max_file_bytes + 1
                      bytes; the descriptor is closed right after
                    → header (Pillow, no decoding) in a worker thread
                    → memory budget (``max_memory_mb``): the header's estimate
                      waits until it fits; one that can never fit is TooLarge
                    → decode/transform/encode in a worker thread
                    → cache → callers; the result is offered to every tier
                      in the background (never awaited by a request)

Only misses are remembered (``MISS_TTL``, at most ``MAX_MISSES`` names): a
flood of requests for missing files does not reach the file system every
time, and nothing that names an existing file outlives its replacement.

Identical requests that arrive while one is in the heavy lane share it (one
decode serves them all).  A caller that gives up (client gone, timeout)
leaves; when no caller is left, queued work leaves the queue, a load in
progress or a wait for memory is cancelled; work already in a thread
finishes (it cannot be interrupted) and keeps its place in the heavy lane
and its memory until then, so ``stats()``/``health()`` count it and memory
stays bounded by what was admitted.

Errors are :mod:`imgserver.errors` types: a missing, non-regular or
unreadable file is NotFound (404; an unreadable file is not told apart from
a missing one), a path leading out of the root Forbidden (403), any full
queue Overloaded (503 with ``retry_after()``), and anything unexpected an
InternalError that says nothing about paths (logged here).

A tier is an optimisation, never a dependency: whatever a tier does (fails,
raises a bug, hangs past its own deadline) the service treats as a miss,
bounded by its own guard deadline, and counts it (``stats()["tier_failures"]``).

Transport-agnostic: it knows nothing of HTTP or PB (``BodyProducer`` writes a
body into any Twisted ``IConsumer``).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Sequence

from twisted.internet import defer, threads
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from asyncfile import ConsumerStopped, FileLoader, IFileLoader, Limiter, LoaderClosed, NotRegularFile, OutsideRoot
from asyncfile import Overloaded as QueueFull

from . import formats, paths, processing
from .cache import ResultCache
from .errors import (
    BadRequest,
    Forbidden,
    ImageServerError,
    InternalError,
    NotFound,
    Overloaded,
    TooLarge,
)
from .params import TransformSpec
from .record import ResultKey
from .settings import Settings
from .tiers import IResultTier

__all__ = ["ImageService", "Located", "BodyProducer", "MemoryBudget", "sniff_content_type"]

#: Bytes read from a file (through its descriptor) to tell its type
#: (AVIF and HEIF are told apart by the brands in their ftyp box).
SNIFF_BYTES = 64
#: How long a miss (ENOENT) is remembered, and how many at most.
MISS_TTL = 1.0
MAX_MISSES = 10_000
#: Originals up to this many bytes are sent without a place in the streams
#: lane: they are handed to the transport in one write, so they hold neither
#: a descriptor nor a place while a slow client reads them.
SMALL_ORIGINAL = 64 * 1024
#: Bodies are written in slices of this size, as the transport drains.
BODY_CHUNK = 64 * 1024
#: Processing times remembered for ``retry_after``, and the guess before any.
RECENT_SAMPLES = 64
DEFAULT_PROCESSING_SECONDS = 0.25
#: ``retry_after`` bounds, in seconds.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60
#: The service's own bound on a tier's answer when the tier says nothing of
#: its deadline (``timeout`` attribute): a tier is trusted to answer within
#: its deadline, and this guard catches one that does not.
DEFAULT_TIER_DEADLINE = 1.0
#: A guard is the tier's own ``timeout`` times this, plus ``TIER_MARGIN`` s.
TIER_SLACK = 2.0
TIER_MARGIN = 0.05
#: Puts to the tiers in the background at once, at most: beyond it a result
#: is not offered (counted ``tier_puts_skipped``), so slow tiers cannot
#: pile up work.
MAX_PENDING_PUTS = 256
#: ... and bodies of at most this many bytes in all (a body offered to two
#: tiers counts twice), so a slow tier cannot pin results in memory either.
MAX_PENDING_PUT_BYTES = 64 * 2**20
#: Seconds ``stop()`` waits, by default, for puts in progress before it
#: cancels them and closes the tiers.
STOP_PUTS_GRACE = 1.0
#: Seconds ``stop()`` waits for each tier's ``close()`` (then for the store's loader).
TIER_CLOSE_DEADLINE = 2.0
#: Seconds ``start()`` waits for the tiers to start.
TIER_START_DEADLINE = 10.0
#: A misbehaving tier is logged at most once per this many seconds (always counted).
TIER_LOG_INTERVAL = 10.0
#: The service's guard on a put (tiers bound their own puts well below it).
TIER_PUT_DEADLINE = 5.0
#: The result store's own file loader (apart from the images' one, so that
#: store traffic never takes an image request's place): descriptors and
#: waiters at once, and I/O threads.
STORE_MAX_OPEN = 32
STORE_MAX_WAITING = 512
STORE_IO_THREADS = 4

def sniff_content_type(head: bytes) -> str | None:
    """The Content-Type of an image we serve, from its first bytes; None otherwise."""
    kind = formats.sniff(head)
    if kind == "heif" and not formats.heif_available():
        return None
    return formats.CONTENT_TYPES.get(kind or "")


# ---------------------------------------------------------------------------
# One open file, shared by whoever needs its descriptor


class _Shared:
    """A FileHandle and the number of ``Located`` views still using it."""

    __slots__ = ("handle", "refs", "closed")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.refs = 1
        self.closed: defer.Deferred[None] | None = None

    def release(self) -> defer.Deferred[None]:
        self.refs -= 1
        if self.refs > 0:
            return defer.succeed(None)
        if self.closed is None:
            self.closed = defer.Deferred()
            self.handle.close().addBoth(lambda _: self.closed.callback(None))
        done: defer.Deferred[None] = defer.Deferred()
        self.closed.addBoth(lambda r: (done.callback(None), r)[1])
        return done


class Located:
    """An image file open beneath the root: one descriptor and what its fstat said.

    ``path`` is the decoded relative path; ``handle`` the asyncfile
    ``FileHandle``; ``size``, ``mtime_ns``, ``inode``, ``dev`` come from the
    fstat of that descriptor, so headers built from them describe exactly the
    bytes loaded or streamed from it, however the path changes meanwhile.
    ``content_type`` is sniffed from the first bytes through the same
    descriptor (None: not an image we serve, or not sniffed).

    Whoever gets a ``Located`` closes it (``close()``, idempotent) on every
    path; ``share()`` hands out another view of the same descriptor, closed
    independently (the descriptor closes with the last view).
    """

    __slots__ = ("path", "content_type", "size", "mtime_ns", "inode", "dev", "_shared", "_closed")

    def __init__(self, path: str, shared: _Shared, content_type: str | None = None) -> None:
        handle = shared.handle
        self.path = path
        self.content_type = content_type
        self.size: int = handle.size
        self.mtime_ns: int = handle.mtime_ns
        self.inode: int = handle.ino
        self.dev: int = handle.dev
        self._shared = shared
        self._closed = False

    @property
    def handle(self) -> Any:
        if self._closed:
            raise ValueError("the Located is closed")
        return self._shared.handle

    @property
    def version(self) -> tuple[int, int, int, int]:
        """(dev, inode, size, mtime_ns): what result-cache keys and ETags are made of."""
        return (self.dev, self.inode, self.size, self.mtime_ns)

    def result_key(self, spec: TransformSpec) -> ResultKey:
        """What names ``spec`` applied to this version of the file (result tiers, ETags)."""
        return ResultKey(self.dev, self.inode, self.size, self.mtime_ns, self.path, spec.cache_key())

    @property
    def etag(self) -> str:
        """A strong entity tag of the file's bytes, from its fstat."""
        return f'"{self.dev:x}-{self.inode:x}-{self.size:x}-{self.mtime_ns:x}"'

    @property
    def mtime(self) -> float:
        """Modification time in seconds (for Last-Modified)."""
        return self.mtime_ns / 1e9

    @property
    def closed(self) -> bool:
        return self._closed

    def share(self) -> "Located":
        """Another view of the same descriptor, to be closed on its own."""
        if self._closed:
            raise ValueError("the Located is closed")
        self._shared.refs += 1
        return Located(self.path, self._shared, self.content_type)

    def close(self) -> defer.Deferred[None]:
        """Let go of the descriptor (closed with the last view); idempotent.

        Fires once this view is released (and the descriptor closed, if this
        was the last view)."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        return self._shared.release()

    def __repr__(self) -> str:
        return f"<Located {self.path!r} {self.etag}{' closed' if self._closed else ''}>"


# ---------------------------------------------------------------------------
# Memory admission


class _Grant:
    __slots__ = ("budget", "amount")

    def __init__(self, budget: "MemoryBudget", amount: int) -> None:
        self.budget = budget
        self.amount = amount

    def release(self) -> None:
        amount, self.amount = self.amount, 0
        if amount:
            self.budget._release(amount)


class MemoryBudget:
    """A byte-counting semaphore with a cancellable FIFO of waiters.

    ``acquire(n)`` fires with a grant (``release()`` it, idempotent) once
    ``n`` bytes fit under ``limit``; first come first served, so a large
    request is not starved by smaller ones behind it.  ``n > limit`` is a
    ValueError: the caller refuses such work itself (TooLarge).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, defer.Deferred[_Grant]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, amount: int) -> defer.Deferred[_Grant]:
        if amount > self.limit:
            raise ValueError(f"{amount} bytes can never fit in a budget of {self.limit}")
        amount = max(0, int(amount))
        if not self._waiters and self.in_use + amount <= self.limit:
            return defer.succeed(self._grant(amount))

        def cancel(d: defer.Deferred[_Grant]) -> None:
            try:
                self._waiters.remove((amount, d))
            except ValueError:
                return
            self._drain()  # the head may have left: those behind it may fit now

        d: defer.Deferred[_Grant] = defer.Deferred(cancel)
        self._waiters.append((amount, d))
        return d

    def _grant(self, amount: int) -> _Grant:
        self.in_use += amount
        self.peak = max(self.peak, self.in_use)
        return _Grant(self, amount)

    def _release(self, amount: int) -> None:
        self.in_use -= amount
        self._drain()

    def _drain(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.limit:
            amount, d = self._waiters.popleft()
            d.callback(self._grant(amount))


# ---------------------------------------------------------------------------
# Writing a (cached) body to a slow client without copying it


@implementer(IPushProducer)
class BodyProducer:
    """Writes ``body`` into ``consumer`` in ``chunk``-byte slices, only as fast
    as the consumer takes them (a push producer it can pause).

    A transport copies what it is given into its own buffer; written whole, a
    cached 5 MB body would be copied once per slow client.  In slices, each
    client holds at most about one slice beyond the transport's buffer, and
    the body itself is shared.  ``start()`` returns a Deferred firing with the
    byte count once everything was written, or failing with
    ``ConsumerStopped`` if the consumer stopped it (a client gone).  The
    consumer is not finished: the caller decides what comes after.
    """

    def __init__(self, consumer: IConsumer, body: bytes, chunk: int = BODY_CHUNK) -> None:
        self.consumer = consumer
        self._view: memoryview | None = memoryview(body)
        self._size = len(self._view)
        self.chunk = chunk
        self.sent = 0
        self._paused = False
        self._writing = False
        self.done: defer.Deferred[int] = defer.Deferred()

    def start(self) -> defer.Deferred[int]:
        self.consumer.registerProducer(self, True)
        self._write()
        return self.done

    def _write(self) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            while not self._paused and self._view is not None and self.sent < self._size:
                end = min(self.sent + self.chunk, self._size)
                data = bytes(self._view[self.sent:end])
                self.sent = end
                self.consumer.write(data)  # may pause us (or stop us) right here
        finally:
            self._writing = False
        if self._view is not None and self.sent >= self._size:
            self._end(None)

    def _end(self, failure: Failure | None) -> None:
        view, self._view = self._view, None
        if view is None:
            return
        view.release()
        try:
            self.consumer.unregisterProducer()
        except Exception:
            pass
        if failure is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._end(Failure(ConsumerStopped(self.sent)))


def write_body(consumer: IConsumer, body: bytes) -> defer.Deferred[int]:
    """Write ``body`` into ``consumer``: at once if small, else with a ``BodyProducer``."""
    if len(body) <= BODY_CHUNK:
        if body:
            consumer.write(body)
        return defer.succeed(len(body))
    return BodyProducer(consumer, body).start()


# ---------------------------------------------------------------------------
# Worker threads


#: Nice value of the worker threads (Linux sets it per thread): decodes yield
#: the CPU to the reactor thread, so light requests (cache hits, 503s) stay
#: fast while every core decodes.
WORKER_NICE = 10

_lowered = threading.local()


def _in_worker(run: Callable[..., Any], *args: Any) -> Any:
    if not getattr(_lowered, "done", False):
        _lowered.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: run at normal priority
    return run(*args)


class _Flight:
    """One piece of heavy work and the callers waiting for it."""

    def __init__(self) -> None:
        self.waiters: list[defer.Deferred[Any]] = []
        self.work: defer.Deferred[Any] | None = None
        self.in_thread = False
        self.cacheable = True


def _follow(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A new Deferred firing (with None) once ``d`` fired, leaving ``d``'s result alone."""
    follower: defer.Deferred[None] = defer.Deferred()
    d.addBoth(lambda r: (follower.callback(None), r)[1])
    return follower


def _at_most(reactor: Any, d: defer.Deferred[Any], seconds: float) -> defer.Deferred[None]:
    """A Deferred firing (with None) once ``d`` fired or ``seconds`` passed,
    whichever comes first; ``d`` itself is left alone (not cancelled)."""
    out: defer.Deferred[None] = defer.Deferred()

    def fire(_: Any = None) -> Any:
        if not out.called:
            out.callback(None)
        if timer.active():
            timer.cancel()
        return _

    timer = reactor.callLater(seconds, fire)
    d.addBoth(fire)
    return out


_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})


class ImageService:
    """Runs image requests with bounded work, bounded waiting, bounded memory and a result cache."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any = None, loader: IFileLoader | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 tiers: Sequence[IResultTier] | None = None) -> None:
        """``tiers``: the result tiers asked in order before processing (None:
        from the settings: a ``ResultStore`` with ``result_dir``, then a
        ``MemcachedTier`` with ``memcached``).  The service owns its tiers:
        ``start()`` starts them (those with a ``start()``), ``stop()`` closes them."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.settings = settings
        self.reactor = reactor
        self.root_path = settings.image_root
        # Places for every handle the service can hold at once without
        # waiting: one per request in the heavy lane (running or queued),
        # one per original being streamed, and room for short opens (cache
        # hits, 304s, sniffing) beside them.
        max_open = settings.workers + settings.max_queue + settings.max_streams + 64
        self.loader = loader if loader is not None else FileLoader(
            reactor, max_open=max_open, max_waiting=max(1024, 4 * max_open))
        self.heavy = Limiter(settings.workers, settings.max_queue)
        self.streams = Limiter(settings.max_streams, 0)
        self.memory = MemoryBudget(settings.max_memory_bytes)
        self.cache = ResultCache(settings.cache_bytes)
        self.pool = ThreadPool(settings.workers, settings.workers, name="imgserver-work")
        self._clock = clock
        self._root: Any = None
        self._root_opening: defer.Deferred[Any] | None = None
        self._root_waiters: list[defer.Deferred[Any]] = []
        self._root_failed_at: float | None = None
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._flights: dict[Any, _Flight] = {}
        self.in_processing = 0
        self.served = 0
        self.coalesced = 0
        self.streams_rejected = 0
        self.files_rejected = 0
        self.misses_answered = 0
        self.processing_seconds: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self._observers: list[Callable[[str, float], None]] = []
        self._started = False
        self._stopped = False
        self._trigger: Any = None
        self._store_loader: FileLoader | None = None
        self.tiers: list[Any] = list(self._default_tiers() if tiers is None else tiers)
        self.tier_names: list[str] = []
        for index, tier in enumerate(self.tiers):
            name = str(getattr(tier, "name", "") or f"tier{index}")
            self.tier_names.append(name if name not in self.tier_names else f"{name}{index}")
        #: Per tier: None while starting, then whether it is usable.
        self._tier_ready: list[bool | None] = [None if hasattr(t, "start") else True for t in self.tiers]
        self.tier_hits = dict.fromkeys(self.tier_names, 0)
        self.tier_failures = dict.fromkeys(self.tier_names, 0)
        self.tier_puts_skipped = 0
        self.in_tiers = 0  # flights asking the tiers now
        self._puts: set[defer.Deferred[Any]] = set()
        self._put_bytes = 0
        self._tier_logged: dict[str, float] = {}
        self._tiers_started: defer.Deferred[Any] = defer.succeed(None)
        self._tiers_closing: defer.Deferred[None] | None = None

    def _default_tiers(self) -> list[Any]:
        """The tiers the settings ask for (their modules imported only then)."""
        settings, tiers = self.settings, []
        if settings.result_dir is not None:
            from .store import ResultStore

            # Its own loader: store traffic never takes an image request's place.
            self._store_loader = FileLoader(self.reactor, max_open=STORE_MAX_OPEN,
                                            max_waiting=STORE_MAX_WAITING, io_threads=STORE_IO_THREADS)
            try:
                tiers.append(ResultStore(self.reactor, self._store_loader, settings.result_dir,
                                         settings.result_dir_max_bytes))
            except BaseException:
                self._store_loader.close()
                raise
        if settings.memcached_servers:
            from .memcached import MemcachedTier

            tiers.append(MemcachedTier(self.reactor, settings.memcached_servers, timeout=settings.memcached_timeout,
                                       max_item_bytes=settings.memcached_max_item_kb * 1024))
        return tiers

    # -- life cycle -----------------------------------------------------
    def start(self) -> defer.Deferred[None]:
        """Start the workers, configure Pillow's limits, open the image root, start the tiers.

        The returned Deferred fires once the root is open (or could not be:
        then a warning is logged, requests answer 404 and the root is tried
        again at most once per ``MISS_TTL``) and every tier started (or
        failed to: it is then left out, with a warning).  Requests that
        arrive before wait for the root, so callers need not wait; a tier
        still starting is passed over (a miss), never waited for.
        """
        if self._started:
            return self._ready()
        self._started = True
        processing.configure_pillow(self.settings.max_pixels)
        self.pool.start()
        self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        self._open_root()
        self._tiers_started = self._start_tiers()
        return self._ready()

    def _ready(self) -> defer.Deferred[None]:
        d = defer.gatherResults([self._root_ready(), _follow(self._tiers_started)], consumeErrors=True)
        d.addBoth(lambda _: None)
        return d

    def _start_tiers(self) -> defer.Deferred[None]:
        def started(outcome: Any, index: int) -> None:
            if isinstance(outcome, Failure):
                self._tier_ready[index] = False
                self.log.warn("the {tier} result tier did not start ({error}): left out",
                              tier=self.tier_names[index], error=outcome.getErrorMessage())
            elif self._tier_ready[index] is None:
                self._tier_ready[index] = True

        waits = []
        for index, tier in enumerate(self.tiers):
            if self._tier_ready[index] is not None:
                continue
            d = defer.maybeDeferred(tier.start).addBoth(started, index)
            waits.append(d)
        # A tier that never finishes starting stays passed over; start() does not wait for it forever.
        return _at_most(self.reactor, defer.DeferredList(waits), TIER_START_DEADLINE)

    def _open_root(self) -> None:
        self._root_failed_at = None
        d = self._root_opening = self.loader.open_root(self.root_path)

        def opened(root: Any) -> None:
            self._root_opening = None
            if self._stopped:
                root.close()
                return
            self._root = root
            self._wake_root_waiters(root)

        def failed(failure: Failure) -> None:
            self._root_opening = None
            self._root_failed_at = self._clock()
            self.log.warn("cannot open the image root {root}: {error}", root=self.root_path,
                          error=failure.getErrorMessage())
            self._wake_root_waiters(failure)

        d.addCallbacks(opened, failed)

    def _wake_root_waiters(self, outcome: Any) -> None:
        waiters, self._root_waiters = self._root_waiters, []
        for w in waiters:
            if not w.called:
                if isinstance(outcome, Failure):
                    w.errback(outcome)
                else:
                    w.callback(outcome)

    def _root_ready(self) -> defer.Deferred[None]:
        d = self._get_root()
        d.addCallbacks(lambda _: None, lambda _: None)
        return d

    def _get_root(self) -> defer.Deferred[Any]:
        """The open Root, waiting for it if it is being opened."""
        if self._root is not None:
            return defer.succeed(self._root)
        if self._stopped:
            return defer.fail(LoaderClosed())
        if not self._started:
            self.start()
            if self._root is not None:
                return defer.succeed(self._root)
        if self._root_opening is None:
            failed_at = self._root_failed_at
            if failed_at is not None and self._clock() - failed_at < MISS_TTL:
                return defer.fail(FileNotFoundError(errno.ENOENT, "the image root is not available"))
            self._open_root()
            if self._root is not None:
                return defer.succeed(self._root)
            if self._root_opening is None:  # failed at once
                return defer.fail(FileNotFoundError(errno.ENOENT, "the image root is not available"))
        waiter: defer.Deferred[Any] = defer.Deferred(lambda d: self._root_waiters.remove(d)
                                                     if d in self._root_waiters else None)
        self._root_waiters.append(waiter)
        return waiter

    def stop(self, grace: float = STOP_PUTS_GRACE) -> defer.Deferred[None]:
        """Stop the workers (waits for running work), close every file and the root, close the tiers.

        Puts to the tiers still in progress get ``grace`` seconds to end, then
        are cancelled (a tier leaves no partial entry), then every tier is
        closed.  The Deferred fires once the loader closed its descriptors and
        the tiers are closed."""
        if self._stopped:
            return defer.succeed(None)
        if not self._started:
            return _follow(self._close_tiers(0))
        self._stopped = True
        if self._trigger is not None:
            # Stopped before the reactor: the reactor must not keep the
            # service (and its result cache) alive until it shuts down.
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError, TypeError):
                pass  # already running it: the reactor is shutting down
            self._trigger = None
        self.pool.stop()
        closing = self.loader.close()
        if not isinstance(closing, defer.Deferred):
            closing = defer.succeed(None)

        def close_root(_: Any) -> None:
            # After the loader: an open still running off-thread uses the
            # root's descriptor until then.
            root, self._root = self._root, None
            if root is not None:
                root.close()

        closing.addBoth(close_root)
        if not self.tiers:
            return closing
        both = defer.gatherResults([closing, _follow(self._close_tiers(grace))], consumeErrors=True)
        both.addBoth(lambda _: None)
        return both

    def _close_tiers(self, grace: float) -> defer.Deferred[None]:
        if self._tiers_closing is None:
            self._tiers_closing = defer.Deferred.fromCoroutine(self._closing_tiers(grace))
        return self._tiers_closing

    async def _closing_tiers(self, grace: float) -> None:
        """Let puts end (at most ``grace`` s), cancel the rest, close each tier
        (at most ``TIER_CLOSE_DEADLINE`` s), then the store's loader.  Never fails."""
        if self._puts and grace > 0:
            await _at_most(self.reactor, defer.DeferredList(list(self._puts)), grace)
        for put in list(self._puts):
            put.cancel()
        closes = []
        for index, tier in enumerate(self.tiers):
            try:
                d = defer.maybeDeferred(tier.close)
            except Exception:  # maybeDeferred catches; this is for a tier with no close at all
                d = defer.fail()
            d.addErrback(self._tier_failed, index, "close")
            closes.append(_at_most(self.reactor, d, TIER_CLOSE_DEADLINE))
        await defer.DeferredList(closes)
        if self._store_loader is not None:
            await _at_most(self.reactor, self._store_loader.close(), TIER_CLOSE_DEADLINE)

    def wait_for_puts(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Fires once every put to the tiers in progress now has ended (each is
        bounded), or after ``timeout`` seconds: for ``imgserver warm`` and
        tests, which need results kept before they go on.  Never fails."""
        pending = defer.DeferredList(list(self._puts))
        return _follow(pending) if timeout is None else _at_most(self.reactor, pending, timeout)

    def busy(self) -> int:
        """Requests in the heavy lane (waiting or in processing) or asking the result tiers."""
        return self.heavy.active + self.heavy.waiting + self.in_tiers

    def observe(self, f: Callable[[str, float], None]) -> None:
        """Call ``f(kind, seconds)`` after each processing (for metrics)."""
        self._observers.append(f)

    # -- opening ------------------------------------------------------------
    @staticmethod
    def _relative(path: str | bytes) -> str:
        """The checked relative path (name policy of ``paths.split_decoded``; no decoding)."""
        if isinstance(path, (bytes, bytearray)):
            try:
                path = bytes(path).decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("path is not valid UTF-8") from None
        if not isinstance(path, str):
            raise BadRequest("path must be text")
        return "/".join(paths.split_decoded(path))

    def _file_error(self, failure: Failure, path: str) -> Failure:
        """The imgserver error for a failure of an open, a load or a stream."""
        e = failure.value
        if isinstance(e, (ImageServerError, defer.CancelledError, ConsumerStopped)):
            return failure
        if isinstance(e, QueueFull):
            self.files_rejected += 1
            return Failure(Overloaded("too many files open; try again shortly",
                                      retry_after=self.retry_after()))
        if isinstance(e, LoaderClosed):
            return Failure(Overloaded("the server is stopping", retry_after=self.retry_after()))
        if isinstance(e, OutsideRoot):
            return Failure(Forbidden("forbidden path: leads outside the image root"))
        if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, NotRegularFile)):
            return Failure(NotFound("no such image"))
        if isinstance(e, PermissionError):
            # Unreadable: told apart from a missing file by nobody.
            return Failure(NotFound("no such image"))
        if isinstance(e, OSError) and e.errno in _NOT_FOUND_ERRNOS:
            return Failure(NotFound("no such image"))
        errno_name = errno.errorcode.get(getattr(e, "errno", None) or 0, "")
        self.log.error("unexpected {kind} {errno} reading an image", kind=type(e).__name__, errno=errno_name)
        return Failure(InternalError("internal error"))

    def _remember_miss(self, rel: str) -> None:
        misses = self._misses
        misses.pop(rel, None)
        misses[rel] = self._clock() + MISS_TTL
        while len(misses) > MAX_MISSES:
            misses.popitem(last=False)

    def _known_missing(self, rel: str) -> bool:
        expiry = self._misses.get(rel)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        del self._misses[rel]
        return False

    def open_image(self, path: str | bytes, *, sniff: bool = True) -> defer.Deferred[Located]:
        """Open the image at ``path`` (decoded, relative to the root): a ``Located``.

        One descriptor, opened beneath the root (the kernel refuses escapes),
        its fstat, and (``sniff``) its content type from its first bytes
        through the same descriptor.  The caller closes the Located.  Fails
        with NotFound, Forbidden, BadRequest or Overloaded.
        """
        try:
            rel = self._relative(path)
        except Exception:
            return defer.fail()
        if self._known_missing(rel):
            self.misses_answered += 1
            return defer.fail(NotFound("no such image"))
        return defer.Deferred.fromCoroutine(self._open(rel, sniff))

    async def _open(self, rel: str, sniff: bool) -> Located:
        try:
            root = await self._get_root()
            handle = await self.loader.open(rel, root=root)
        except BaseException:
            failure = Failure()
            if failure.check(FileNotFoundError):
                self._remember_miss(rel)
            failure = self._file_error(failure, rel)
            failure.raiseException()
        located = Located(rel, _Shared(handle))
        if sniff:
            try:
                head = await self.loader.load(handle, 0, SNIFF_BYTES)
            except BaseException:
                failure = self._file_error(Failure(), rel)
                located.close()
                failure.raiseException()
            located.content_type = sniff_content_type(head)
        return located

    def check_size(self, located: Located) -> None:
        """TooLarge if the file (by its fstat) is over ``max_file_mb``."""
        if located.size > self.settings.max_file_bytes:
            raise TooLarge(f"the image is over {self.settings.max_file_mb:g} MB")

    # -- originals ------------------------------------------------------------
    def reserve_stream(self, length: int) -> Any:
        """A place in the streams lane for sending ``length`` bytes (None: a
        small answer needs none); Overloaded at once when the lane is full.
        Give it to ``stream_original`` (which releases it) or ``release()`` it."""
        if length <= SMALL_ORIGINAL:
            return None
        slot = self.streams.try_acquire()
        if slot is None:
            self.streams_rejected += 1
            raise Overloaded("too many originals are being sent; try again shortly",
                             retry_after=self.retry_after())
        return slot

    def stream_original(self, located: Located, consumer: IConsumer, offset: int, length: int,
                        place: Any = False) -> defer.Deferred[int]:
        """Stream ``length`` bytes from ``offset`` of the located file into ``consumer``.

        From the Located's descriptor, through asyncfile (a push producer that
        honours pauses); in the streams lane (``max_streams``, beyond it
        Overloaded at once) unless ``length <= SMALL_ORIGINAL`` or a
        ``place`` from ``reserve_stream`` is given.  Fires with the bytes
        written; fails with ``ConsumerStopped`` if the client went away.
        """
        if place is False:
            try:
                place = self.reserve_stream(length)
            except Overloaded:
                return defer.fail()
        try:
            d = self.loader.stream(located.handle, consumer, offset, length)
        except BaseException:
            d = defer.fail()

        def done(result: Any) -> Any:
            if place is not None:
                place.release()
            if isinstance(result, Failure):
                return self._file_error(result, located.path)
            return result

        return d.addBoth(done)

    # -- transforms and info ------------------------------------------------------
    def transform(self, path: str | bytes, spec: TransformSpec) -> defer.Deferred[processing.Result]:
        """The image at ``path`` (decoded) transformed by ``spec``."""
        return self._with_located(path, lambda located: self.transform_located(located, spec))

    def info(self, path: str | bytes) -> defer.Deferred[dict[str, Any]]:
        """Width, height, format, mode and bytes of the image at ``path`` (decoded)."""
        return self._with_located(path, self.info_located)

    def _with_located(self, path: str | bytes, then: Callable[[Located], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        async def go() -> Any:
            located = await self.open_image(path, sniff=False)
            try:
                pending = then(located)
            finally:
                located.close()  # the work holds its own view of the descriptor
            return await pending

        return defer.Deferred.fromCoroutine(go())

    def transform_located(self, located: Located, spec: TransformSpec) -> defer.Deferred[processing.Result]:
        """``spec`` applied to an open image (its descriptor, its version)."""
        return self._cached(located, ("transform", spec.cache_key()), spec)

    def info_located(self, located: Located) -> defer.Deferred[dict[str, Any]]:
        """The /info document of an open image (a copy: callers may change it)."""
        return self._cached(located, ("info",), None).addCallback(dict)

    def _cached(self, located: Located, variant: Any, spec: TransformSpec | None) -> defer.Deferred[Any]:
        key = (located.version, variant)
        hit = self.cache.get(key)
        if hit is not None:
            return defer.succeed(hit)
        try:
            self.check_size(located)
            return self._join(key, located, spec)
        except Exception:  # TooLarge; a closed Located (a caller's bug)
            return defer.fail()

    def _join(self, key: Any, located: Located, spec: TransformSpec | None) -> defer.Deferred[Any]:
        """Wait for the heavy work for ``key``, starting it if no one has."""
        flight = self._flights.get(key)
        start = flight is None
        if start:
            # The work's own view of the descriptor: a caller that leaves
            # closes its view, not the one the work loads from.
            own = located.share()
            flight = _Flight()
            self._flights[key] = flight
        else:
            self.coalesced += 1

        def leave(d: defer.Deferred[Any]) -> None:
            if d in flight.waiters:
                flight.waiters.remove(d)
            if not flight.waiters and not flight.in_thread and flight.work is not None:
                flight.work.cancel()  # no one waits: leave the queue, stop the load

        waiter: defer.Deferred[Any] = defer.Deferred(leave)
        flight.waiters.append(waiter)
        if start:  # after the waiter joined: the work may finish at once (Overloaded)
            flight.work = defer.Deferred.fromCoroutine(self._heavy_work(flight, own, spec))
            flight.work.addBoth(self._land, key, flight)
        return waiter

    def _land(self, outcome: Any, key: Any, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not isinstance(outcome, Failure) and flight.cacheable and self.settings.cache_bytes:
            self.cache.put(key, outcome)
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _in_thread(self, flight: _Flight, run: Callable[..., Any], *args: Any,
                         last_step: bool = False) -> Any:
        """``run(*args)`` in a worker thread.

        The caller's place stays taken while the thread runs, whether or not
        anyone still waits.  If no caller is left when it ends, the work stops
        there (CancelledError), unless this was the ``last_step``: its result
        is then still cached, so a client that timed out finds it on retry.
        """
        flight.in_thread = True
        self.in_processing += 1
        try:
            result = await threads.deferToThreadPool(self.reactor, self.pool, _in_worker, run, *args)
        finally:
            self.in_processing -= 1
            flight.in_thread = False
        if not flight.waiters and not last_step:
            raise defer.CancelledError("no caller is left")
        return result

    # -- result tiers ------------------------------------------------------------
    def _tier_deadline(self, tier: Any) -> float:
        """The service's guard on a tier's ``get``: past the tier's own deadline, with slack."""
        timeout = getattr(tier, "timeout", None)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            return timeout * TIER_SLACK + TIER_MARGIN
        return DEFAULT_TIER_DEADLINE

    def _tier_failed(self, failure: Failure, index: int, what: str, count: bool = True) -> None:
        """A tier broke its contract (failed, raised, or missed our guard deadline): counted (but a
        failure of its stats), a miss, and logged at most once per ``TIER_LOG_INTERVAL`` per tier (a
        hung tier under load would otherwise write a line per request)."""
        name = self.tier_names[index]
        if count:
            self.tier_failures[name] += 1
        now = self._clock()
        last = self._tier_logged.get(name)
        if last is not None and now - last < TIER_LOG_INTERVAL:
            return
        self._tier_logged[name] = now
        if failure.check(defer.TimeoutError):
            self.log.warn("the {tier} result tier did not answer a {what} in time", tier=name, what=what)
        else:
            self.log.failure("the {tier} result tier failed a {what}", failure, tier=name, what=what)

    async def _from_tiers(self, flight: _Flight, key: ResultKey) -> processing.Result | None:
        """The first tier's result for ``key`` (offered to the tiers before it
        that missed), or None.  Each tier within its deadline (and ours)."""
        missed: list[int] = []
        for index, tier in enumerate(self.tiers):
            if not self._tier_ready[index]:
                continue  # starting, or failed to start
            found = await self._tier_get(index, tier, key, flight)
            if found is not None:
                self.tier_hits[self.tier_names[index]] += 1
                if missed:
                    self._offer(key, found, missed)
                return found
            missed.append(index)
            if not flight.waiters:
                raise defer.CancelledError("no caller is left")
        return None

    async def _tier_get(self, index: int, tier: Any, key: ResultKey, flight: _Flight) -> processing.Result | None:
        try:
            d = defer.maybeDeferred(tier.get, key)
        except Exception:
            d = defer.fail()
        d.addTimeout(self._tier_deadline(tier), self.reactor)
        try:
            found = await d
        except defer.CancelledError:
            if not flight.waiters:
                raise  # the caller left (that is what cancels the work): so do we
            # Callers still wait: the tier cancelled something of its own, a failure of the tier.
            self._tier_failed(Failure(), index, "get")
            return None
        except Exception:
            self._tier_failed(Failure(), index, "get")
            return None
        if found is not None and not isinstance(found, processing.Result):
            self._tier_failed(Failure(TypeError(f"get answered a {type(found).__name__}")), index, "get")
            return None
        return found

    def _offer(self, key: ResultKey, result: processing.Result, indices: Sequence[int]) -> None:
        """Put ``result`` to the tiers at ``indices`` in the background: tracked
        (``stop()`` lets them end or cancels them), bounded in number and time,
        never awaited by a request and never failing it."""
        for index in indices:
            if self._stopped or not self._tier_ready[index]:
                continue
            size = len(result.body)
            if len(self._puts) >= MAX_PENDING_PUTS or self._put_bytes + size > MAX_PENDING_PUT_BYTES:
                self.tier_puts_skipped += 1
                continue
            tier = self.tiers[index]
            self._put_bytes += size
            try:
                d = defer.maybeDeferred(tier.put, key, result)
            except Exception:
                d = defer.fail()
            d.addTimeout(TIER_PUT_DEADLINE, self.reactor)

            def done(outcome: Any, d: defer.Deferred[Any] = d, index: int = index, size: int = size) -> None:
                self._puts.discard(d)
                self._put_bytes -= size
                if isinstance(outcome, Failure) and not (self._stopped and outcome.check(defer.CancelledError)):
                    self._tier_failed(outcome, index, "put")

            d.addBoth(done)
            if not d.called:
                self._puts.add(d)

    def _tier_stats(self) -> dict[str, Any]:
        out = {}
        for index, (name, tier) in enumerate(zip(self.tier_names, self.tiers)):
            try:
                out[name] = dict(tier.stats())
            except Exception:
                self._tier_failed(Failure(), index, "stats", count=False)
                out[name] = {}
        return out

    async def _heavy_work(self, flight: _Flight, located: Located, spec: TransformSpec | None) -> Any:
        settings = self.settings
        try:
            key = None
            if spec is not None and self.tiers:
                # Before a place in the heavy lane: a kept result never waits
                # behind processing, nor gets a 503 because processing is full.
                key = located.result_key(spec)
                # The source's descriptor stays open meanwhile (each tier is
                # bounded): after a miss the image is loaded from it, so what
                # is processed is the version the key names.  A hit or a
                # caller leaving closes it at once (below).
                self.in_tiers += 1
                try:
                    found = await self._from_tiers(flight, key)
                finally:
                    self.in_tiers -= 1
                if found is not None:
                    return found  # lands in the memory cache; ``processed`` does not count it
            try:
                slot = await self.heavy.acquire()
            except QueueFull:
                raise Overloaded("too many images in processing; try again shortly",
                                 retry_after=self.retry_after()) from None
            try:
                started = time.perf_counter()
                try:
                    data = await self.loader.load(located.handle, 0, settings.max_file_bytes + 1)
                except BaseException:
                    self._file_error(Failure(), located.path).raiseException()
                finally:
                    located.close()  # the bytes are in memory: the descriptor is not needed
                if len(data) > settings.max_file_bytes:
                    raise TooLarge(f"the image is over {settings.max_file_mb:g} MB")
                if len(data) != located.size:
                    flight.cacheable = False  # changed in place since its fstat: not its version's bytes
                if spec is None:
                    result = await self._in_thread(flight, _info, data, settings.max_pixels, last_step=True)
                else:
                    header = await self._in_thread(flight, processing.read_header, data, settings.max_pixels)
                    need = processing.estimate_bytes(header, spec, settings.max_output_pixels,
                                                     max_pixels=settings.max_pixels,
                                                     max_frames=settings.max_frames)
                    if need > self.memory.limit:
                        raise TooLarge(
                            f"the image needs about {math.ceil(need / 2**20)} MiB to process, over the "
                            f"server's memory budget of {self.memory.limit // 2**20} MiB")
                    grant = await self.memory.acquire(need)
                    try:
                        result = await self._in_thread(
                            flight, functools.partial(processing.transform, max_frames=settings.max_frames),
                            data, spec, settings.max_pixels, settings.max_output_pixels, last_step=True)
                    finally:
                        grant.release()
                elapsed = time.perf_counter() - started
                self.served += 1
                self.processing_seconds.append(elapsed)
                for observe in self._observers:
                    observe("info" if spec is None else "transform", elapsed)
                if key is not None and flight.cacheable:  # a changed file's bytes are not its version's
                    self._offer(key, result, range(len(self.tiers)))
                return result
            finally:
                slot.release()
        finally:
            located.close()

    # -- load -----------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds a refused client should wait: the heavy lane's depth times
        the recent mean processing time, over the workers; 1..60."""
        samples = self.processing_seconds
        mean = sum(samples) / len(samples) if samples else DEFAULT_PROCESSING_SECONDS
        depth = self.heavy.active + self.heavy.waiting
        seconds = depth * mean / self.settings.workers
        return max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, math.ceil(seconds)))

    def health(self) -> dict[str, Any]:
        """Whether every lane has room: "ok", or "degraded" with the reasons."""
        heavy, streams, memory = self.heavy, self.streams, self.memory
        reasons = []
        if heavy.active >= heavy.limit and heavy.max_waiting is not None and heavy.waiting >= heavy.max_waiting:
            reasons.append("processing lane full")
        if streams.active >= streams.limit:
            reasons.append("streams lane full")
        files = self.loader.stats()
        max_waiting = files.get("max_waiting")
        if files.get("active", 0) >= files.get("max_open", 1) and max_waiting is not None \
                and files.get("waiting", 0) >= max_waiting:
            reasons.append("file loader full")
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "in_processing": self.in_processing,
            "queued": heavy.waiting,
            "max_queue": heavy.max_waiting,
            "streams": streams.active,
            "max_streams": streams.limit,
            "memory_in_use": memory.in_use,
            "max_memory": memory.limit,
        }

    def stats(self) -> dict[str, Any]:
        heavy = self.heavy.stats()
        return {
            "workers": self.settings.workers,
            "in_processing": self.in_processing,
            "abandoned": self._abandoned_now(),
            "heavy_active": heavy["active"],
            "queued": heavy["waiting"],
            "max_queue": heavy["max_waiting"],
            "rejected": heavy["rejected"],
            "processed": self.served,
            "coalesced": self.coalesced,
            "streams": self.streams.active,
            "max_streams": self.streams.limit,
            "streams_rejected": self.streams_rejected,
            "files_rejected": self.files_rejected,
            "memory_in_use": self.memory.in_use,
            "memory_waiting": self.memory.waiting,
            "max_memory": self.memory.limit,
            "memory_peak": self.memory.peak,
            "misses_remembered": len(self._misses),
            "misses_answered": self.misses_answered,
            "retry_after": self.retry_after(),
            "cache": self.cache.stats(),
            "files": self.loader.stats(),
            "tiers": self._tier_stats(),
            "tier_hits": dict(self.tier_hits),
            "tier_failures": dict(self.tier_failures),
            "in_tiers": self.in_tiers,
            "tier_puts_pending": len(self._puts),
            "tier_puts_pending_bytes": self._put_bytes,
            "tier_puts_skipped": self.tier_puts_skipped,
        }

    def _abandoned_now(self) -> int:
        """Flights whose callers all left while their work runs in a thread."""
        return sum(1 for f in self._flights.values() if f.in_thread and not f.waiters)


def _info(data: bytes, max_pixels: int) -> dict[str, Any]:
    """The /info document (header only; refuses non-images and bombs over ``max_pixels``)."""
    return processing.info(data, max_pixels)
