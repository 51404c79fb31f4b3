"""The result store: transformed images kept on this machine's disk.

Why: processing an image takes a worker hundreds of milliseconds, and the
in-memory cache is lost on every restart and is not shared by the processes
of one machine.  The store keeps every result as one file, written once and
read by any process of the machine, so a restart or a sibling process
answers from disk instead of processing again.

Layout: ``DIR/v1/<2 hex>/<32 hex>.img``, named by ``ResultKey.local_digest()``
(the source's device, inode, size, mtime and the transform).  Each file is a
self-checking record (:mod:`imgserver.record`): it names its key, its body's
length and checksum, so whatever is not a whole record for the key asked for
-- a file cut by a crash or a full disk, another key's record, garbage, a
directory -- is a miss, and is removed.  That is why writes skip ``fsync``:
a crash can leave a cut or empty file, never a wrong answer.

Nothing here blocks the reactor thread: opens and reads go through the
service's :class:`asyncfile.FileLoader` (beneath a confined ``Root``); the
rest (``mkdir``, ``unlink``, ``utime``, scanning, eviction) runs on a small
thread pool the store owns and stops in :meth:`ResultStore.close`.

The size bound is kept by eviction, least recently used first: a hit moves
the entry's mtime to now (at most once per :data:`REFRESH_AFTER` seconds),
and when the size passes ``max_bytes`` the oldest entries go until 90% of it
is left.  The processes of one machine share the directory; a ``flock`` on
``DIR/v1/.evict.lock`` (tried without blocking the reactor: in a thread, for
at most :data:`LOCK_PATIENCE` seconds) makes one of them evict at a time, and
each measures the real size under it (the others write too).  Between two
scans a process counts only its own writes, and it scans again once it has
written 10% of ``max_bytes`` (or after :data:`RESCAN_AFTER` seconds), so the
directory may pass ``max_bytes`` by about 10% of it per process writing at the
same time, not more.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from asyncfile import confine
from asyncfile.errors import LoaderClosed, NotRegularFile, Overloaded

from . import record
from .processing import Result
from .record import CorruptRecord, ResultKey
from .tiers import IResultTier

__all__ = ["ResultStore", "LAYOUT", "REFRESH_AFTER", "RESCAN_AFTER", "EVICT_TO"]

#: The layout's directory under the store's root: a new layout gets a new name.
LAYOUT = "v1"
#: A hit refreshes its entry's mtime (its place in the eviction order) at most this often, in seconds.
REFRESH_AFTER = 60.0
#: A process that writes rescans the real size at least this often (other processes write too).
RESCAN_AFTER = 30.0
#: Eviction goes down to this fraction of ``max_bytes``.
EVICT_TO = 0.9
#: A scan waits at most this long (in its thread) for another process's eviction to end.
LOCK_PATIENCE = 2.0
#: A process that could not get the eviction lock tries again after this long.
EVICT_RETRY = 0.5
#: Temporary files of interrupted writes (a killed process) older than this are removed by scans.
STALE_TEMP = 3600.0
#: After a write failed because the store is read-only (EROFS, EACCES, EPERM), puts are declined this
#: long; after a refresh failed so (a read-only store, or entries another user wrote: moving their mtime
#: needs ownership), hits refresh nothing this long.
WRITE_BACKOFF = 30.0
#: Records with bodies at least this large are encoded and checked in the store's threads.
_HASH_OFF_THREAD = 256 * 1024

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_HEX = frozenset("0123456789abcdef")
_ENTRY_NAME_LENGTH = 32 + len(".img")


def _rel(digest: bytes) -> str:
    name = digest.hex()
    return f"{LAYOUT}/{name[:2]}/{name}.img"


# -- blocking steps (the store's threads) ---------------------------------------------

def _open_dir(root: Any, rel: str) -> int:
    """A directory beneath the store's root, never outside it."""
    return confine.open_beneath(root.fd, rel, _DIR_FLAGS, no_symlinks=root.no_symlinks, method=root.method)


def _make_layout(directory: str) -> None:
    os.makedirs(os.path.join(directory, LAYOUT), exist_ok=True)


def _make_fanout(root: Any, sub: str) -> None:
    try:
        dfd = _open_dir(root, LAYOUT)
    except FileNotFoundError:  # someone removed it: make it again
        try:
            os.mkdir(LAYOUT, dir_fd=root.fd)
        except FileExistsError:
            pass
        dfd = _open_dir(root, LAYOUT)
    try:
        os.mkdir(sub, dir_fd=dfd)
    except FileExistsError:
        pass
    finally:
        os.close(dfd)


def _remove(root: Any, rel: str, identity: tuple[int, int] | None) -> int:
    """Remove the entry ``rel`` (a file, a directory, a link, anything) unless it
    is no longer the one found corrupt (``identity``: (dev, inode)), i.e. another
    process replaced it meanwhile.  Returns the bytes of a regular file removed."""
    parent, _, name = rel.rpartition("/")
    try:
        pfd = _open_dir(root, parent)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            return 0
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=pfd)
            return 0
        os.unlink(name, dir_fd=pfd)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    except FileNotFoundError:
        return 0
    finally:
        os.close(pfd)


def _refresh(root: Any, rel: str, now_ns: int) -> None:
    parent, _, name = rel.rpartition("/")
    pfd = _open_dir(root, parent)
    try:
        os.utime(name, ns=(now_ns, now_ns), dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


@dataclass
class _Scan:
    """What a scan (and maybe an eviction) of the store found."""

    busy: bool      # another process held the eviction lock: nothing was evicted
    total: int      # bytes of entries left
    entries: int    # entries left
    evicted: int    # entries removed to keep the bound
    evicted_bytes: int
    temps_removed: int


def _lock(fd: int, stop: threading.Event) -> bool:
    """Blocking: take the eviction lock, waiting at most ``LOCK_PATIENCE`` for
    another process to finish its eviction (then this scan sees its result)."""
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if stop.is_set() or time.monotonic() >= deadline:
                return False
            stop.wait(0.01)


def _scan_and_evict(root: Any, max_bytes: int, target: int, stop: threading.Event, now: float) -> _Scan:
    """Blocking: measure the store; when over ``max_bytes`` and no other
    process is evicting, remove the least recently used entries down to
    ``target``.  Stops early (keeping what is left) when ``stop`` is set."""
    v1 = _open_dir(root, LAYOUT)
    lock = -1
    try:
        try:
            lock = os.open(".evict.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=v1)
        except OSError as e:
            if e.errno not in _READ_ONLY_ERRNOS:
                raise
            busy = True  # a read-only store: nothing to evict, measure only
        else:
            busy = not _lock(lock, stop)  # still busy: another process evicts; measure only
        found: list[tuple[int, int, str, str]] = []  # mtime_ns, size, fan-out dir, name
        temps = 0
        with os.scandir(v1) as it:
            subs = [e.name for e in it
                    if len(e.name) == 2 and set(e.name) <= _HEX and e.is_dir(follow_symlinks=False)]
        for sub in subs:
            if stop.is_set():
                break
            try:
                sfd = os.open(sub, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=v1)
            except OSError:
                continue
            try:
                with os.scandir(sfd) as it:
                    for e in it:
                        name = e.name
                        try:
                            if name.endswith(".img") and len(name) == _ENTRY_NAME_LENGTH:
                                st = e.stat(follow_symlinks=False)
                                if stat.S_ISREG(st.st_mode):
                                    found.append((st.st_mtime_ns, st.st_size, sub, name))
                            elif name.startswith(".") and name.endswith(".tmp") and not busy:
                                st = e.stat(follow_symlinks=False)
                                if now - st.st_mtime > STALE_TEMP:
                                    os.unlink(name, dir_fd=sfd)
                                    temps += 1
                        except FileNotFoundError:
                            continue
            finally:
                os.close(sfd)
        total = sum(size for _, size, _, _ in found)
        entries = len(found)
        evicted = evicted_bytes = 0
        if not busy and total > max_bytes:
            found.sort()
            for _, size, sub, name in found:
                if total <= target or stop.is_set():
                    break
                try:
                    os.unlink(f"{sub}/{name}", dir_fd=v1)
                except FileNotFoundError:  # gone meanwhile (a corrupt entry removed, say)
                    pass
                else:
                    evicted += 1
                    evicted_bytes += size
                total -= size
                entries -= 1
        return _Scan(busy, total, entries, evicted, evicted_bytes, temps)
    finally:
        if lock >= 0:
            os.close(lock)  # releases the flock
        os.close(v1)


def _when_fired(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A Deferred firing None once ``d`` has fired (``d``'s result untouched)."""
    after: defer.Deferred[None] = defer.Deferred()

    def fire(result: Any) -> Any:
        after.callback(None)
        return result

    d.addBoth(fire)
    return after


def _decode(data: bytes, digest: bytes) -> Result:
    return record.decode(data, digest)


@implementer(IResultTier)
class ResultStore:
    """Transformed images in files under ``directory``, bounded to about ``max_bytes``.

    :param reactor: the reactor.
    :param loader: the ``FileLoader`` opens and reads go through (the service's:
        its limits cover the store's descriptors too).
    :param directory: the store's directory (made if missing); the processes of
        one machine may share it.
    :param max_bytes: the size the store is kept under (approximately: see the module).
    :param timeout: seconds a ``get``/``has`` may take before it is a miss (a
        slow or hung disk must not hold a request longer than processing would).
    :param put_timeout: seconds a ``put`` may take (default ``max(5, 5 * timeout)``).
    :param clock: wall-clock seconds (``time.time``), for mtimes and intervals.
    :param threads: the store's own threads (for ``mkdir``, ``unlink``, ``utime``, scans).

    Call :meth:`start` first (a ``get``/``put`` made before the root is open
    waits for it, within its deadline); :meth:`close` at the end.  A store that cannot be
    opened (missing and not creatable, say) logs why and then only misses and
    declines: it is an optimisation, never a reason for a request to fail.
    """

    name = "store"
    log = Logger()

    def __init__(self, reactor: Any, loader: Any, directory: str, max_bytes: int, *, timeout: float = 1.0,
                 put_timeout: float | None = None, clock: Callable[[], float] | None = None,
                 threads: int = 2) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.reactor = reactor
        self.loader = loader
        self.directory = os.path.abspath(os.fsdecode(directory))
        self.max_bytes = int(max_bytes)
        #: A record larger than this is declined: it would push out a quarter of the store.
        self.max_entry_bytes = max(1, self.max_bytes // 4)
        self.timeout = timeout
        self.put_timeout = put_timeout if put_timeout is not None else max(5.0, 5 * timeout)
        self._clock = clock if clock is not None else time.time
        self._pool = ThreadPool(0, threads, name="imgserver-store")
        self._stop_flag = threading.Event()
        self._root: Any = None
        self._starting: defer.Deferred[None] | None = None
        self._start_waiters: list[defer.Deferred[None]] = []
        self._ready = False  # the root is open, or start() failed
        self._trigger: Any = None
        self._closing: defer.Deferred[None] | None = None
        self._ops: dict[defer.Deferred[Any], defer.Deferred[Any]] = {}  # get/has/put running -> their caller's
        self._background: set[defer.Deferred[Any]] = set()  # thread jobs; removals, refreshes, scans
        self._writing: set[bytes] = set()
        self._refreshing: set[bytes] = set()
        self._dirs: set[str] = set()  # fan-out directories known to exist
        self._scanning: defer.Deferred[Any] | None = None
        self._scanned_at = float("-inf")
        self._evict_not_before = float("-inf")
        self._retry: Any = None  # the delayed call of a scan put off while another process evicted
        self._dirty = False  # written since the last scan
        self._written_since_scan = 0
        self._writes_off_until = float("-inf")
        self._refresh_off_until = float("-inf")
        self._logged_at = float("-inf")
        self.available = False
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.errors = 0
        self.timeouts = 0
        self.stored = 0
        self.declined = 0
        self.bytes = 0
        self.entries = 0
        self.evicted = 0
        self.evictions = 0

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> defer.Deferred[None]:
        """Make the directories (off the reactor thread), open the confined root,
        measure the size in a thread (evicting if over); fires once measured, while
        lookups and writes may begin as soon as the root is open.  Never fails: a
        store that cannot be opened is logged and stays unavailable (misses,
        declines).  Idempotent."""
        if self._closing is not None:  # closed (before or after starting): stays closed
            return defer.succeed(None)
        if self._starting is None:
            self._pool.start()
            add_trigger = getattr(self.reactor, "addSystemEventTrigger", None)  # a Clock has none
            if add_trigger is not None:  # the threads must not outlive the reactor
                self._trigger = add_trigger("before", "shutdown", self._at_shutdown)
            self._starting = defer.Deferred.fromCoroutine(self._start())
            self._starting.addErrback(self._start_failed)
            self._starting.addBoth(self._ready_now)
        return _when_fired(self._starting)

    async def _start(self) -> None:
        try:
            await self._in_thread(_make_layout, self.directory)
        except OSError as e:  # read-only and existing is fine; the root's open says the rest
            if e.errno != errno.EEXIST:
                self.log.info("result store {dir}: cannot create {layout}: {e}", dir=self.directory,
                              layout=LAYOUT, e=e)
        # No symlinks beneath it: the store makes none, and a link in place of an
        # entry (even to another entry) is then refused at the open and removed.
        root = await self.loader.open_root(self.directory, no_symlinks=True)
        if self._closing is not None:
            root.close()
            return
        self._root = root
        self.available = True
        self._ready_now()  # lookups and writes need the root only; the first scan may take long
        try:
            await self._scan()
        except OSError as e:  # e.g. no v1 in a read-only directory: every get misses
            self.log.info("result store {dir}: cannot measure it: {e}", dir=self.directory, e=e)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):  # closed while starting
            return
        self.log.warn("result store {dir} unavailable (every lookup misses): {e}", dir=self.directory,
                      e=failure.getErrorMessage())

    def _ready_now(self, _: Any = None) -> None:
        """The root is open (or could not be): lookups and writes waiting for it go on."""
        self._ready = True
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(None)

    def _when_started(self) -> defer.Deferred[None]:
        if self._ready:
            return defer.succeed(None)

        def cancel(d: defer.Deferred[None]) -> None:
            if d in self._start_waiters:
                self._start_waiters.remove(d)

        d: defer.Deferred[None] = defer.Deferred(cancel)
        self._start_waiters.append(d)
        return d

    def close(self) -> defer.Deferred[None]:
        """Stop: lookups miss, writes are aborted (their temporary files removed),
        a scan or eviction stops early, the threads end, the root is closed.
        Fires once all of that is done.  Idempotent."""
        if self._closing is None:
            trigger, self._trigger = self._trigger, None
            if trigger is not None:
                try:
                    self.reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError, TypeError):
                    pass  # running it: the reactor is shutting down
            self._closing = defer.Deferred.fromCoroutine(self._close())
        return _when_fired(self._closing)

    def _at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: not to be removed
        return self.close()

    async def _close(self) -> None:
        self.available = False
        self._stop_flag.set()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for outer in list(self._ops.values()):
            outer.cancel()  # the caller gets its miss / False now; the work ends below
        while self._ops or self._background:  # each ends soon: cancelled, or told to stop
            await defer.DeferredList([*self._ops, *self._background], consumeErrors=True)
        if self._pool.started:
            await self._stop_pool()
        root, self._root = self._root, None
        if root is not None:
            # A cancelled open may still run in the loader's pool, using the
            # root's descriptor: wait (bounded) until the loader is done with it.
            await self._loader_released(root, 5.0)
            root.close()

    def _stop_pool(self) -> defer.Deferred[None]:
        """Join the threads in a thread of its own (joining blocks)."""
        done: defer.Deferred[None] = defer.Deferred()

        def stop() -> None:
            try:
                self._pool.stop()
            finally:
                self.reactor.callFromThread(done.callback, None)

        threading.Thread(target=stop, name="imgserver-store-stop", daemon=True).start()
        return done

    async def _loader_released(self, root: Any, limit: float) -> None:
        # Monotonic time: the store's clock may be a test's frozen one.
        uses_root = getattr(self.loader, "uses_root", None)  # (a loader without it: nothing to wait for)
        deadline = time.monotonic() + limit
        while uses_root is not None and time.monotonic() < deadline:
            if not uses_root(root):
                return
            d: defer.Deferred[None] = defer.Deferred()
            self.reactor.callLater(0.01, d.callback, None)
            await d

    # -- the tier ----------------------------------------------------------------------
    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        """The stored result for ``key``, or None (a miss, a corrupt entry -- then
        removed --, an error, or nothing within ``timeout``).  Never fails."""
        if self._closing is not None or self._starting is None:
            self.misses += 1
            return defer.succeed(None)
        return self._bounded(self._lookup(key, whole=True), self.timeout, None, timeout_is_miss=True)

    def has(self, key: ResultKey) -> defer.Deferred[bool]:
        """Whether an entry for ``key`` is stored: its header and length are checked,
        not its body's checksum (``imgserver warm`` skips what is there; a get
        still checks everything).  Never fails; counts no hit or miss."""
        if self._closing is not None or self._starting is None:
            return defer.succeed(False)
        return self._bounded(self._lookup(key, whole=False), self.timeout, False)

    def put(self, key: ResultKey, result: Result) -> defer.Deferred[bool]:
        """Store ``result`` for ``key``; fires with whether it was stored.  Never
        fails; declines at once when closed, unavailable, read-only, already
        writing this key or when the record (with the largest header) is over
        ``max_entry_bytes``.  Written atomically (temporary file, rename) but
        without fsync: a crash may leave a cut or empty entry, and a record
        checks itself, so that is a miss (and removed), never a wrong answer."""
        if (self._closing is not None or self._starting is None
                or self._clock() < self._writes_off_until
                or len(result.body) + record.FIXED_HEADER + record.MAX_META > self.max_entry_bytes):
            self.declined += 1
            return defer.succeed(False)
        digest = key.local_digest()
        if digest in self._writing:
            self.declined += 1
            return defer.succeed(False)
        self._writing.add(digest)
        d = self._bounded(self._write(digest, result), self.put_timeout, False)
        d.addBoth(lambda r: (self._writing.discard(digest), r)[1])
        return d

    def stats(self) -> dict[str, Any]:
        """Counters for /stats and /metrics; ``bytes``/``entries`` are the size as
        of the last scan plus this process's writes since."""
        return {
            "available": self.available,
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "stored": self.stored,
            "declined": self.declined,
            "bytes": self.bytes,
            "entries": self.entries,
            "max_bytes": self.max_bytes,
            "evicted": self.evicted,
            "evictions": self.evictions,
        }

    # -- running operations ------------------------------------------------------------
    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` in the store's threads.  Cancelling the result gives up
        waiting at once; the job itself runs to its end, tracked until then
        (close() and idleness wait for it: it may hold a descriptor)."""
        job = threads.deferToThreadPool(self.reactor, self._pool, f, *args)
        self._background.add(job)
        result: defer.Deferred[Any] = defer.Deferred()

        def done(outcome: Any) -> None:
            self._background.discard(job)
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            # else: cancelled; its outcome (even a failure) is dropped

        job.addBoth(done)
        return result

    def _bounded(self, coro: Coroutine[Any, Any, Any], timeout: float, default: Any, *,
                 timeout_is_miss: bool = False) -> defer.Deferred[Any]:
        """Run ``coro`` at most ``timeout`` seconds: then (or when the caller cancels)
        the caller gets ``default`` at once and ``coro`` is cancelled, releasing
        what it holds (close() waits for that)."""
        inner = defer.Deferred.fromCoroutine(coro)
        if inner.called:  # finished in this turn
            got: list[Any] = []
            inner.addBoth(got.append)
            return defer.succeed(self._outcome(got[0], default))
        def cancel(_: Any) -> None:
            if timer.active():
                timer.cancel()
            inner.cancel()
            if not outer.called:
                outer.callback(default)

        outer: defer.Deferred[Any] = defer.Deferred(cancel)
        self._ops[inner] = outer

        def timed_out() -> None:
            if outer.called:
                return
            self.timeouts += 1
            if timeout_is_miss:
                self.misses += 1
            outer.callback(default)
            inner.cancel()

        timer = self.reactor.callLater(timeout, timed_out)

        def done(outcome: Any) -> None:
            self._ops.pop(inner, None)
            if timer.active():
                timer.cancel()
            value = self._outcome(outcome, default)
            if not outer.called:
                outer.callback(value)

        inner.addBoth(done)
        return outer

    def _outcome(self, outcome: Any, default: Any) -> Any:
        if isinstance(outcome, Failure):
            if not outcome.check(defer.CancelledError):
                self._error(outcome, "unexpected")
            return default
        return outcome

    def _error(self, failure: Failure | BaseException, what: str) -> None:
        self.errors += 1
        now = self._clock()
        if now - self._logged_at >= 10.0:  # a failing disk must not flood the log
            self._logged_at = now
            if isinstance(failure, Failure):
                self.log.failure("result store {dir}: {what} error", failure, dir=self.directory, what=what)
            else:
                self.log.warn("result store {dir}: {what} error: {e}", dir=self.directory, what=what, e=failure)

    def _background_task(self, d: defer.Deferred[Any], what: str) -> None:
        """Track a fire-and-forget step (close() waits for it); count its failure."""
        self._background.add(d)

        def done(outcome: Any) -> None:
            self._background.discard(d)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                self._error(outcome.value, what)

        d.addBoth(done)

    # -- lookups -----------------------------------------------------------------------
    async def _lookup(self, key: ResultKey, whole: bool) -> Any:
        """get (``whole``) or has: open through the root, fstat, read, check."""
        await self._when_started()
        root = self._root
        if root is None or self._closing is not None:
            return self._missed(whole)
        digest = key.local_digest()
        rel = _rel(digest)
        try:
            handle = await self.loader.open(rel, root=root)
        except FileNotFoundError:
            return self._missed(whole)
        except (IsADirectoryError, NotRegularFile, confine.OutsideRoot):
            # A directory, a FIFO or device, a link leading out: not ours to
            # serve; remove it (the link, not its target).
            self._corrupt(rel, None)
            return self._missed(whole)
        except NotADirectoryError:  # the fan-out "directory" is a file
            self._corrupt(rel.rpartition("/")[0], None)
            self._dirs.discard(rel.split("/")[1])
            return self._missed(whole)
        except (Overloaded, LoaderClosed):
            return self._missed(whole)
        except OSError as e:
            self._error(e, "open")
            return self._missed(whole)
        try:
            size, identity, mtime_ns = handle.size, (handle.dev, handle.ino), handle.mtime_ns
            if size < record.FIXED_HEADER or size > max(self.max_bytes, record.FIXED_HEADER + record.MAX_META):
                raise CorruptRecord(f"{size} bytes cannot be a record here")
            if whole:
                data = await self.loader.load(handle, 0, size)
                if len(data) >= _HASH_OFF_THREAD:
                    found: Any = await self._in_thread(_decode, data, digest)
                else:
                    found = record.decode(data, digest)
            else:
                head = await self.loader.load(handle, 0, record.FIXED_HEADER + record.MAX_META)
                record.parse_header(head, digest, size)
                found = True
        except CorruptRecord:
            self._corrupt(rel, identity)
            return self._missed(whole)
        except (Overloaded, LoaderClosed):
            return self._missed(whole)
        except OSError as e:
            self._error(e, "read")
            return self._missed(whole)
        finally:
            handle.close()
        if whole:
            self.hits += 1
        if self._clock() - mtime_ns / 1e9 >= REFRESH_AFTER:
            self._refresh(digest, rel)
        return found

    def _missed(self, whole: bool) -> Any:
        if whole:
            self.misses += 1
            return None
        return False

    def _corrupt(self, rel: str, identity: tuple[int, int] | None) -> None:
        """Count a corrupt entry and remove it (off the reactor thread)."""
        self.corrupt += 1
        if self._closing is not None or self._root is None:
            return
        d = self._in_thread(_remove, self._root, rel, identity)

        def removed(freed: int) -> None:
            if freed:
                self.bytes = max(0, self.bytes - freed)
                self.entries = max(0, self.entries - 1)

        d.addCallback(removed)
        self._background_task(d, "remove")

    def _refresh(self, digest: bytes, rel: str) -> None:
        """Move a hit's entry to the young end of the eviction order."""
        if (digest in self._refreshing or self._closing is not None or self._root is None
                or self._clock() < max(self._writes_off_until, self._refresh_off_until)):  # cannot be kept
            return
        self._refreshing.add(digest)
        d = self._in_thread(_refresh, self._root, rel, int(self._clock() * 1e9))

        def failed(f: Failure) -> Failure | None:
            if f.check(FileNotFoundError):  # evicted meanwhile
                return None
            if f.check(OSError) and f.value.errno in _READ_ONLY_ERRNOS:  # read-only, or not ours: expected
                self._refresh_off_until = self._clock() + WRITE_BACKOFF
                return None
            return f

        d.addErrback(failed)
        d.addBoth(lambda r: (self._refreshing.discard(digest), r)[1])
        self._background_task(d, "refresh")

    # -- writes --------------------------------------------------------------------------
    async def _write(self, digest: bytes, result: Result) -> bool:
        await self._when_started()
        root = self._root
        if root is None or self._closing is not None:
            self.declined += 1
            return False
        if len(result.body) >= _HASH_OFF_THREAD:
            data: bytes = await self._in_thread(record.encode, digest, result)
        else:
            data = record.encode(digest, result)
        rel = _rel(digest)
        sub = rel.split("/")[1]
        for attempt in (0, 1):
            try:
                if sub not in self._dirs:
                    await self._in_thread(_make_fanout, root, sub)
                    self._dirs.add(sub)
                written = await self._write_file(rel, data, root)
                break
            except FileNotFoundError:  # the fan-out directory went away: make it again, once
                self._dirs.discard(sub)
                if attempt:
                    self._error(FileNotFoundError(errno.ENOENT, "fan-out directory vanished", rel), "write")
                    return False
            except (Overloaded, LoaderClosed):
                self.declined += 1
                return False
            except OSError as e:
                if e.errno in _READ_ONLY_ERRNOS:
                    self._writes_off_until = self._clock() + WRITE_BACKOFF
                    self.declined += 1
                    self.log.info("result store {dir} is not writable ({e}): not storing for {s:.0f} s",
                                  dir=self.directory, e=e, s=WRITE_BACKOFF)
                    return False
                if e.errno == errno.ENOSPC:
                    self._evict_not_before = float("-inf")
                    self.bytes = max(self.bytes, self.max_bytes + 1)  # evict now, rescan
                    self._maybe_evict()
                self._error(e, "write")
                return False
        self.stored += 1
        self.bytes += written
        self._written_since_scan += written
        self.entries += 1
        self._dirty = True
        self._maybe_evict()
        return True

    async def _write_file(self, rel: str, data: bytes, root: Any) -> int:
        """An atomic write (temporary file, rename) without fsync: see the module.
        Uses the loader's ``file_consumer`` (what ``loader.write`` uses) so that a
        cancelled write can wait until its temporary file is gone."""
        consumer = self.loader.file_consumer(rel, root=root, atomic=True, fsync=False)
        consumer.write(data)
        try:
            written: int = await consumer.finish()
        except defer.CancelledError:
            await consumer.abort()
            raise
        return written

    # -- size ------------------------------------------------------------------------------
    def _maybe_evict(self) -> None:
        """Scan (and evict when over the bound) in a thread, if due and none runs."""
        if self._scanning is not None or self._closing is not None or self._root is None:
            return
        now = self._clock()
        over = self.bytes > self.max_bytes and now >= self._evict_not_before
        # Others write too: look at the real size after writing 10% of the bound, or every RESCAN_AFTER.
        due = self._written_since_scan > self.max_bytes * (1 - EVICT_TO)
        stale = self._dirty and now - self._scanned_at >= RESCAN_AFTER
        if over or due or stale:
            d = defer.Deferred.fromCoroutine(self._scan())
            self._background_task(d, "scan")

    async def _scan(self) -> None:
        root = self._root
        self._dirty = False
        self._written_since_scan = 0
        now = self._clock()
        target = int(self.max_bytes * EVICT_TO)
        self._scanning = d = self._in_thread(_scan_and_evict, root, self.max_bytes, target, self._stop_flag, now)
        try:
            found: _Scan = await d
        finally:
            self._scanning = None
        self._scanned_at = now
        # What this process wrote while the scan ran may not be in its total.
        self.bytes, self.entries = found.total + self._written_since_scan, found.entries
        if found.evicted:
            self.evicted += found.evicted
            self.evictions += 1
        if found.busy and found.total > self.max_bytes:
            # Another process evicts: look again later, even if nothing is written meanwhile
            # (a store left over its bound after a burst would otherwise stay so until the next put).
            self._evict_not_before = now + EVICT_RETRY
            if self._retry is None or not self._retry.active():
                self._retry = self.reactor.callLater(EVICT_RETRY, self._maybe_evict)
        elif self._written_since_scan:
            self._maybe_evict()  # written while it scanned: over the bound again?
