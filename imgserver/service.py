"""The image pipeline, with admission control: what HTTP and PB both call.

    locate (path checks, realpath, stat: in the I/O pool; remembered briefly)
      → result cache            (a hit is answered here, in the reactor thread)
      → heavy lane              (at most ``workers`` in processing, ``max_queue`` waiting,
                                 beyond that Overloaded at once)
          → asyncfile load      (bounded descriptors, never blocks the reactor)
          → decode/transform/encode in ``workers`` threads
      → cache → caller

Identical requests that arrive while one is in the heavy lane share it (one
decode serves them all).  A caller that gives up (client gone, timeout)
cancels its wait: queued work leaves the queue, a load in progress is
cancelled; work already in a thread finishes (it cannot be interrupted) and
keeps its place until then, so memory stays bounded by ``workers`` images.

Transport-agnostic: it knows nothing of HTTP or PB.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from asyncfile import FileLoader, IFileLoader, Limiter
from asyncfile import Overloaded as QueueFull
from asyncfile.pool import IOPool

from . import paths, processing
from .cache import ResultCache
from .errors import NotFound, Overloaded, TooLarge, UnsupportedImage
from .params import TransformSpec
from .settings import Settings

__all__ = ["ImageService", "Located", "sniff_content_type"]

#: How long a located path (realpath + stat) is trusted before it is looked up again.
LOCATE_TTL = 1.0
#: Bytes read from an original to tell its type before serving it.
SNIFF_BYTES = 16

_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def sniff_content_type(head: bytes) -> str | None:
    """The Content-Type of an image we serve, from its first bytes; None otherwise."""
    kind = processing._sniff(head)
    return _CONTENT_TYPES.get(kind or "")


@dataclass(frozen=True)
class Located:
    """A file under the root: its real path and what ``stat`` said."""

    url_path: str
    real_path: str
    size: int
    mtime_ns: int
    inode: int

    @property
    def etag(self) -> str:
        return f'"{self.inode:x}-{self.size:x}-{self.mtime_ns:x}"'

    @property
    def version(self) -> tuple[str, int, int]:
        return (self.real_path, self.size, self.mtime_ns)


def _locate_blocking(root: str, url_path: str) -> Located:
    """realpath + confinement + stat: may block, so it runs in the I/O pool."""
    real = paths.confine(root, url_path)
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound("no such image") from None
    except PermissionError:
        raise NotFound("no such image") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFound("no such image")
    return Located(url_path, real, st.st_size, st.st_mtime_ns, st.st_ino)


#: Nice value of the worker threads (Linux sets it per thread): decodes yield
#: the CPU to the reactor thread, so light requests (cache hits, 503s) stay
#: fast while every core decodes.
WORKER_NICE = 10

_lowered = threading.local()


def _in_worker(run: Callable[[bytes], Any], data: bytes) -> Any:
    if not getattr(_lowered, "done", False):
        _lowered.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
        except (AttributeError, OSError):
            pass  # not Linux, or not allowed: run at normal priority
    return run(data)


class _Flight:
    """One piece of heavy work and the callers waiting for it."""

    def __init__(self) -> None:
        self.waiters: list[defer.Deferred[Any]] = []
        self.work: defer.Deferred[Any] | None = None
        self.in_thread = False


class ImageService:
    """Runs image requests with bounded work, bounded waiting and a result cache."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any = None, loader: IFileLoader | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.settings = settings
        self.reactor = reactor
        self.root = settings.image_root
        self.loader = loader if loader is not None else FileLoader(
            reactor, max_open=64, max_waiting=max(1024, 4 * settings.max_queue))
        self.heavy = Limiter(settings.workers, settings.max_queue)
        self.cache = ResultCache(settings.cache_bytes)
        self.meta_pool = IOPool(reactor, max_threads=8, name="imgserver-meta")
        self.pool = ThreadPool(settings.workers, settings.workers, name="imgserver-work")
        self._clock = clock
        self._located: dict[str, tuple[float, Located]] = {}
        self._flights: dict[Any, _Flight] = {}
        self.in_processing = 0
        self.served = 0
        self.coalesced = 0
        self.rejected_early = 0
        self.processing_seconds: list[float] = []  # recent samples, for tests and stats
        self._observers: list[Callable[[str, float], None]] = []
        self._started = False
        self._trigger: Any = None

    # -- life cycle -----------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self.pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self._started:
            self._started = False
            if self._trigger is not None:
                # Stopped before the reactor: the reactor must not keep the
                # service (and its result cache) alive until it shuts down.
                try:
                    self.reactor.removeSystemEventTrigger(self._trigger)
                except (ValueError, KeyError, TypeError):
                    pass  # already running it: the reactor is shutting down
                self._trigger = None
            self.pool.stop()
            self.meta_pool.stop()
            self.loader.close()

    def busy(self) -> int:
        """Requests in the heavy lane (waiting or in processing)."""
        return self.heavy.active + self.heavy.waiting

    def observe(self, f: Callable[[str, float], None]) -> None:
        """Call ``f(kind, seconds)`` after each processing (for metrics)."""
        self._observers.append(f)

    # -- locating ---------------------------------------------------------
    def locate(self, url_path: str | bytes) -> defer.Deferred[Located]:
        """Where ``url_path`` is, checked: NotFound, Forbidden or BadRequest otherwise.

        Name checks are pure and immediate; realpath and stat run in the I/O
        pool (they block on slow file systems) and are remembered for
        ``LOCATE_TTL`` seconds so that cache hits need no thread.
        """
        try:
            segments = paths.split_url_path(url_path)
        except Exception:
            return defer.fail()
        key = "/".join(segments)
        now = self._clock()
        known = self._located.get(key)
        if known is not None and known[0] > now:
            return defer.succeed(known[1])

        def remember(located: Located) -> Located:
            if len(self._located) > 10000:
                self._located.clear()
            self._located[key] = (self._clock() + LOCATE_TTL, located)
            return located

        return self.meta_pool.run(_locate_blocking, self.root, key).addCallback(remember)

    # -- requests ---------------------------------------------------------
    def transform(self, url_path: str | bytes, spec: TransformSpec) -> defer.Deferred[processing.Result]:
        """The image at ``url_path`` transformed by ``spec``."""
        max_pixels = self.settings.max_pixels

        def run(data: bytes) -> processing.Result:
            return processing.transform(data, spec, max_pixels)

        return self._cached(url_path, spec.cache_key(), run)

    def info(self, url_path: str | bytes) -> defer.Deferred[dict[str, Any]]:
        """Width, height, format, mode and bytes of the image at ``url_path``."""
        max_pixels = self.settings.max_pixels

        def run(data: bytes) -> dict[str, Any]:
            processing.probe(data, max_pixels)  # refuses non-images and bombs
            return processing.info(data)

        return self._cached(url_path, "info", run)

    def original(self, url_path: str | bytes) -> defer.Deferred[tuple[Located, str]]:
        """The file to send as it is, and its Content-Type (from its first bytes)."""
        async def go() -> tuple[Located, str]:
            located = await self.locate(url_path)
            self._check_size(located)
            head = await self.loader.load(located.real_path, 0, SNIFF_BYTES)
            content_type = sniff_content_type(head)
            if content_type is None:
                raise UnsupportedImage("not an image this server serves")
            return located, content_type

        return defer.Deferred.fromCoroutine(go())

    def _heavy_full(self) -> bool:
        heavy = self.heavy
        return heavy.active >= heavy.limit and heavy.max_waiting is not None and heavy.waiting >= heavy.max_waiting

    def _recently_located(self, url_path: str | bytes) -> bool:
        try:
            key = "/".join(paths.split_url_path(url_path))
        except Exception:
            return False
        known = self._located.get(key)
        return known is not None and known[0] > self._clock()

    def _check_size(self, located: Located) -> None:
        if located.size > self.settings.max_file_bytes:
            raise TooLarge(f"the image is over {self.settings.max_file_mb} MB")

    def _cached(self, url_path: str | bytes, variant: str,
                run: Callable[[bytes], Any]) -> defer.Deferred[Any]:
        if self._heavy_full() and not self._recently_located(url_path):
            # Busy, and no cached answer can be known without a lookup in the
            # I/O pool: say so at once (the cheapest answer during a burst).
            self.rejected_early += 1
            return defer.fail(Overloaded("too many images in processing; try again shortly",
                                         retry_after=1))

        async def go() -> Any:
            located = await self.locate(url_path)
            key = (located.version, variant)
            hit = self.cache.get(key)
            if hit is not None:
                return hit
            self._check_size(located)
            return await self._join(key, located, run)

        return defer.Deferred.fromCoroutine(go())

    def _join(self, key: Any, located: Located, run: Callable[[bytes], Any]) -> defer.Deferred[Any]:
        """Wait for the heavy work for ``key``, starting it if no one has."""
        flight = self._flights.get(key)
        start = flight is None
        if start:
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
            flight.work = defer.Deferred.fromCoroutine(self._heavy_work(flight, located, run))
            flight.work.addBoth(self._land, key, flight)
        return waiter

    def _land(self, outcome: Any, key: Any, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not isinstance(outcome, Failure) and self.settings.cache_bytes:
            self.cache.put(key, outcome)
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    async def _heavy_work(self, flight: _Flight, located: Located, run: Callable[[bytes], Any]) -> Any:
        try:
            slot = await self.heavy.acquire()
        except QueueFull:
            raise Overloaded("too many images in processing; try again shortly",
                             retry_after=1) from None
        try:
            data = await self.loader.load(located.real_path)
            if len(data) > self.settings.max_file_bytes:
                raise TooLarge(f"the image is over {self.settings.max_file_mb} MB")
            flight.in_thread = True
            self.in_processing += 1
            started = time.perf_counter()
            try:
                result = await threads.deferToThreadPool(self.reactor, self.pool, _in_worker, run, data)
            finally:
                self.in_processing -= 1
                flight.in_thread = False
            elapsed = time.perf_counter() - started
            self.served += 1
            for observe in self._observers:
                observe("transform", elapsed)
            return result
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                raise NotFound("no such image") from None
            raise
        finally:
            slot.release()

    def stats(self) -> dict[str, Any]:
        heavy = self.heavy.stats()
        return {
            "workers": self.settings.workers,
            "in_processing": self.in_processing,
            "heavy_active": heavy["active"],
            "queued": heavy["waiting"],
            "max_queue": heavy["max_waiting"],
            "rejected": heavy["rejected"] + self.rejected_early,
            "processed": self.served,
            "coalesced": self.coalesced,
            "cache": self.cache.stats(),
            "files": self.loader.stats(),
        }
