"""``imgserver warm``: fill the result tiers ahead of requests.

    imgserver warm [--root DIR] --result-dir DIR [--result-dir-max-mb N] [--memcached HOST:PORT,...]
                   (--preset NAME:QUERY ... | --transform QUERY ...) [--workers N] [--max-memory-mb N]
                   [--progress auto|bar|lines|none] [--quiet] [any other server option]

Walks the image root (in a thread), and for every image the server would
serve and every preset / transform makes sure the result is in the result
store (and in memcached when given): what ``ResultStore.has`` reports as
stored for the file's current version is skipped, so an interrupted run
resumes where it stopped and a second run processes nothing.  A missing
result is taken from memcached when it has it, otherwise processed by an
in-process :class:`~imgserver.service.ImageService` with the server's own
limits (``--workers`` at once, ``--max-memory-mb`` through its memory
budget), then written to every tier.

The service gets no tiers of its own: its writes are fire-and-forget, and a
warm run must know that each result was stored (a store that declines is a
failure) before it exits, so this module awaits every write itself.

Pass the same options as the server (``--preset``, ``--default-quality``,
``--max-dimension``, ``--max-pixels``, ...): they are part of what a result
is keyed by.  ``auto=format`` transforms are warmed in each format a browser
may negotiate (AVIF, WebP and the fallback).

Exit status: 0 if nothing failed, 1 if something did (the summary groups the
reasons), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Sequence, TextIO
from urllib.parse import parse_qs

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import paths
from .errors import ImageServerError
from .params import TransformSpec, parse_transform
from .settings import Settings

__all__ = ["main", "build_parser", "warm", "jobs_from", "walk", "Job", "Summary", "Progress", "ResultDirUnusable",
           "NEGOTIATED_ACCEPTS"]

log = Logger(namespace="imgserver.warm")

#: ``Accept`` headers whose negotiation gives every format an ``auto=format``
#: transform can be answered in (AVIF, WebP, the explicit/source format).
NEGOTIATED_ACCEPTS = ("image/avif,image/webp,*/*", "image/webp,*/*", "*/*")
#: Seconds between progress lines when the output is not a terminal.
LINE_INTERVAL = 5.0
#: Seconds between redraws of the progress bar.
BAR_INTERVAL = 0.2
#: Example paths kept per failure reason for the summary.
EXAMPLES = 3
#: Deadline of the result store's reads and writes here: a batch job can
#: wait longer than a request would.
STORE_TIMEOUT = 10.0
#: memcached lookups here wait at least this long (a miss only costs a processing).
MEMCACHED_TIMEOUT = 0.25

#: File name extensions of images (a file with one that does not sniff as an
#: image the server serves is reported as failed, others are ignored).
_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".avif", ".heic",
                               ".heif", ".bmp", ".tif", ".tiff", ".ico", ".apng"})


class ResultDirUnusable(OSError):
    """The result store could not start (not a directory, no permission, ...)."""


# ---------------------------------------------------------------------------
# What to warm


@dataclass(frozen=True)
class Job:
    """One transform to warm: ``label`` (for the summary) and the canonical
    specs it may be answered with (several for ``auto=format``)."""

    label: str
    specs: tuple[TransformSpec, ...]


def _variants(spec: TransformSpec) -> tuple[TransformSpec, ...]:
    """The specs a request may end up processing: ``auto=format`` is
    negotiated per ``Accept`` header, so each outcome is its own result."""
    if not spec.auto_format:
        return (spec,)
    seen: dict[str, TransformSpec] = {}
    for accept in NEGOTIATED_ACCEPTS:
        negotiated = spec.negotiate(accept)
        seen.setdefault(negotiated.cache_key(), negotiated)
    return tuple(seen.values())


def jobs_from(settings: Settings, presets: Iterable[str], transforms: Iterable[str]) -> list[Job]:
    """The jobs for ``--preset`` names and ``--transform`` queries; ValueError
    for a query the server would refuse or one that asks for the original."""
    jobs: list[Job] = []
    keys: set[str] = set()

    def add(label: str, args: dict[str, list[str]]) -> None:
        try:
            spec = parse_transform(args, max_dimension=settings.max_dimension,
                                   default_quality=settings.default_quality, presets=settings.preset_params)
        except ImageServerError as e:
            raise ValueError(f"{label}: {e}") from None
        if spec is None:
            raise ValueError(f"{label}: asks for the original file, which is served as it is")
        specs = tuple(s for s in _variants(spec) if s.cache_key() not in keys)
        keys.update(s.cache_key() for s in specs)
        if specs:
            jobs.append(Job(label, specs))

    for name in presets:
        add(f"preset {name}", {"preset": [name]})
    for query in transforms:
        query = query.lstrip("?")
        args = parse_qs(query, keep_blank_values=True)
        if not args:
            raise ValueError(f"transform {query!r}: no parameters (write e.g. w=200&fm=webp)")
        add(f"transform {query}", args)
    return jobs


# ---------------------------------------------------------------------------
# Walking the root (blocking: in a thread)


@dataclass
class Walk:
    """What a walk found: relative paths of candidate files, and what it left out."""

    files: list[str] = field(default_factory=list)
    ignored: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False  # stopped early (the run was interrupted): ``files`` is partial




def walk(root: str, cancelled: threading.Event | None = None) -> Walk:
    """Every regular file beneath ``root`` the server would open by its name.

    Blocking: run it in a thread.  Directories are opened beneath the root
    with asyncfile's confined open (as the server opens images); hidden names
    and names the server's path policy refuses are left out; a symlink is
    kept only if it leads to a file beneath the root (symlinked directories
    are not followed: no loops, no duplicates).  Sorted, so runs (and their
    progress) are repeatable.  ``cancelled`` set stops it at the next
    directory (an interrupted run does not wait for a whole tree).
    """
    from asyncfile import confine

    from .gallery import DIRECTORY_FLAGS, entry_kind

    found = Walk()
    root_fd = confine.open_root(root)
    try:
        pending = [""]
        while pending:
            if cancelled is not None and cancelled.is_set():
                found.cancelled = True
                break
            rel_dir = pending.pop()
            try:
                fd = confine.open_beneath(root_fd, rel_dir or ".", DIRECTORY_FLAGS)
            except OSError as e:
                found.unreadable.append((rel_dir or ".", f"directory not readable: {e.strerror or e}"))
                continue
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                        try:
                            paths.split_decoded(rel)
                            rel.encode("utf-8")
                        except (ImageServerError, UnicodeEncodeError):
                            found.ignored += 1  # hidden, or a name the server refuses
                            continue
                        # As the gallery lists it: a symlink resolved beneath the root (one that
                        # dangles or leads outside is "other"); symlinked directories not followed.
                        kind = entry_kind(entry, root_fd, rel)
                        if kind == "dir" and not entry.is_symlink():
                            pending.append(rel)
                        elif kind == "file":
                            found.files.append(rel)
                        else:
                            found.ignored += 1
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    found.files.sort()
    return found


# ---------------------------------------------------------------------------
# Progress and summary


@dataclass
class Summary:
    """What a run did; ``units`` are (image, transform) pairs."""

    images: int = 0
    not_images: int = 0
    units: int = 0
    processed: int = 0
    skipped: int = 0
    from_memcached: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    memcached_stored: int = 0
    memcached_declined: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.processed + self.skipped + self.from_memcached + self.failed

    def fail(self, path: str, reason: str, units: int = 1) -> None:
        self.failed += units
        self.reasons[reason] += units
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES and path not in examples:
            examples.append(path)

    def exit_status(self) -> int:
        return 1 if self.failed or self.interrupted else 0

    def lines(self) -> list[str]:
        out = [f"warmed {self.images} images x transforms = {self.units}: processed {self.processed}, "
               f"skipped {self.skipped} (already stored), from memcached {self.from_memcached}, "
               f"failed {self.failed}; {self.not_images} other files ignored; {self.seconds:.1f} s"]
        if self.interrupted:
            out.append("interrupted: run again to resume")
        for reason, count in self.reasons.most_common():
            out.append(f"  failed {count}: {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        if self.memcached_declined:
            out.append(f"  memcached declined {self.memcached_declined} results (too large or unavailable)")
        if self.store.get("evicted"):
            out.append(f"  warning: the result store evicted {self.store['evicted']} entries: it is smaller "
                       f"than what was warmed (raise --result-dir-max-mb)")
        return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Shows a Summary while it grows: a bar redrawn in place (``bar``), a
    line every ``LINE_INTERVAL`` s (``lines``) or nothing (``none``);
    ``auto`` is a bar on a terminal, lines otherwise."""

    def __init__(self, reactor: Any, summary: Summary, mode: str = "auto", out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out if out is not None else sys.stderr
        if mode == "auto":
            isatty = getattr(self.out, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, not {mode!r}")
        self.mode = mode
        self.summary = summary
        self.clock = clock
        self.started = clock()
        self._loop: task.LoopingCall | None = None
        self._reactor = reactor
        self._drawn = False

    def start(self) -> None:
        if self.mode == "none":
            return
        self._loop = task.LoopingCall(self.show)
        self._loop.clock = self._reactor
        self._loop.start(BAR_INTERVAL if self.mode == "bar" else LINE_INTERVAL, now=False)

    def text(self) -> str:
        s = self.summary
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = s.done / elapsed
        left = max(s.units - s.done, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        share = s.done / s.units if s.units else 0.0
        counts = f"{s.done}/{s.units} {share:4.0%} {rate:.1f}/s ETA {eta} (processed {s.processed}, " \
                 f"skipped {s.skipped}, failed {s.failed})"
        if self.mode == "bar":
            width = 24
            filled = int(width * share)
            return f"[{'#' * filled}{'.' * (width - filled)}] {counts}"
        return f"warm: {counts}"

    def show(self) -> None:
        try:
            if self.mode == "bar":
                self.out.write("\r\x1b[K" + self.text())
                self._drawn = True
            elif self.mode == "lines":
                self.out.write(self.text() + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed or broken output must not stop the work

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._drawn:
            self.show()
            try:
                self.out.write("\n")
                self.out.flush()
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------------------
# The run


class _Warmer:
    """One run: the service, the tiers and the bounded feed of images."""

    def __init__(self, reactor: Any, settings: Settings, jobs: Sequence[Job], summary: Summary,
                 store: Any, memcached: Any, service: Any) -> None:
        self.reactor = reactor
        self.settings = settings
        self.specs = [spec for job in jobs for spec in job.specs]
        self.summary = summary
        self.store = store
        self.memcached = memcached
        self.service = service
        #: Set when the run is interrupted: what is not done is left for the next run, not failed.
        self.stopped = False

    async def image(self, rel: str) -> None:
        """Warm every spec of one file (failures are counted, never raised)."""
        summary = self.summary
        units = len(self.specs)
        try:
            located = await self.service.open_image(rel, sniff=True)
        except ImageServerError as e:
            summary.fail(rel, _reason(e), units)
            return
        try:
            if located.content_type is None:
                if os.path.splitext(rel)[1].lower() in _IMAGE_EXTENSIONS:
                    summary.images += 1
                    summary.fail(rel, "not an image this server serves (unknown or unsupported content)", units)
                else:
                    summary.not_images += 1
                    summary.units -= units
                return
            summary.images += 1
            try:
                self.service.check_size(located)
            except ImageServerError as e:
                summary.fail(rel, _reason(e), units)
                return
            for spec in self.specs:
                if self.stopped:
                    return
                await self._one(located, spec)
        finally:
            located.close()

    def _fail(self, rel: str, reason: str) -> None:
        """A failure -- unless the run is being interrupted: then the service refusing (it is stopping)
        or a write cut short is not one; the next run does that unit."""
        if not self.stopped:
            self.summary.fail(rel, reason)

    async def _one(self, located: Any, spec: TransformSpec) -> None:
        summary = self.summary
        rel = located.path
        key = located.result_key(spec)
        if await self.store.has(key):
            summary.skipped += 1
            return
        if self.memcached is not None:
            result = await self.memcached.get(key)
            if result is not None:
                if await self.store.put(key, result):
                    summary.from_memcached += 1
                else:
                    self._fail(rel, "the result store declined it (full, read-only or too slow)")
                return
        try:
            result = await self.service.transform_located(located, spec)
        except ImageServerError as e:
            self._fail(rel, _reason(e))
            return
        # The result must be of the version it is stored under: a file
        # replaced or rewritten while it was processed is not stored (the
        # next run warms its new version).
        try:
            now = await self.service.open_image(rel, sniff=False)
        except ImageServerError:
            self._fail(rel, "changed while it was processed (run again)")
            return
        now.close()
        if now.version != located.version:
            self._fail(rel, "changed while it was processed (run again)")
            return
        puts = [self.store.put(key, result)]
        if self.memcached is not None:
            puts.append(self.memcached.put(key, result))
        outcomes = await defer.gatherResults(puts)
        if outcomes[0]:
            summary.processed += 1
        else:
            self._fail(rel, "the result store declined it (full, read-only or too slow)")
        if len(outcomes) > 1:
            if outcomes[1]:
                summary.memcached_stored += 1
            else:
                summary.memcached_declined += 1


def _reason(e: ImageServerError) -> str:
    return f"{type(e).__name__}: {e}"


def _make_store(reactor: Any, loader: Any, settings: Settings) -> Any:
    from .store import ResultStore

    assert settings.result_dir is not None
    return ResultStore(reactor, loader, settings.result_dir, settings.result_dir_max_bytes, timeout=STORE_TIMEOUT)


def _make_memcached(reactor: Any, settings: Settings) -> Any:
    from .memcached import MemcachedTier

    return MemcachedTier(reactor, settings.memcached_servers,
                         timeout=max(settings.memcached_timeout, MEMCACHED_TIMEOUT),
                         max_item_bytes=settings.memcached_max_item_kb * 1024)


async def warm(reactor: Any, settings: Settings, jobs: Sequence[Job], *, progress: str = "auto",
               out: TextIO | None = None, interrupted: defer.Deferred[None] | None = None,
               summary: Summary | None = None) -> Summary:
    """Warm every image under ``settings.image_root`` for every job; the Summary
    (``summary``, if given, is filled while the run goes: a caller can watch it).

    ``settings.result_dir`` is required; ``settings.memcached_servers`` is
    used when set.  At most ``2 * workers`` images are in flight (one spec at
    a time each) and the service's queue has room for ``workers``, so its
    heavy lane never refuses one.  Firing ``interrupted`` stops the run: work
    in flight is cancelled, everything is closed, and the Summary says it was
    interrupted (what was stored stays: the next run resumes).
    """
    from asyncfile import FileLoader

    from .service import ImageService

    if settings.result_dir is None:
        raise ValueError("warm needs a result directory (--result-dir)")
    summary = summary if summary is not None else Summary()
    started = time.monotonic()
    queue_room = settings.workers
    # The service processes only: the tiers are written (and awaited) here.
    # No result cache either: every result is written out and never asked again.
    service_settings = replace(settings, result_dir=None, memcached=None, max_queue=queue_room, cache_mb=0)
    service = ImageService(service_settings, reactor, tiers=())
    store_loader = FileLoader(reactor)
    store = _make_store(reactor, store_loader, settings)
    memcached = _make_memcached(reactor, settings) if settings.memcached_servers else None
    shown = Progress(reactor, summary, progress, out)
    running: set[defer.Deferred[None]] = set()
    stopped = False
    walk_cancelled = threading.Event()
    warmer: _Warmer | None = None

    def stop(_: Any = None) -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            walk_cancelled.set()
            if warmer is not None:
                warmer.stopped = True
            summary.interrupted = True
            for d in list(running):
                d.cancel()

    if interrupted is not None:
        interrupted.addCallback(stop)
    try:
        await service.start()
        await store.start()
        if store.stats().get("available") is False:  # the store logged why
            raise ResultDirUnusable(f"the result directory {settings.result_dir} cannot be used (see the log)")
        # Interrupted while they started: no walk (a large tree takes long to list; the walk's thread
        # would hold the reactor's shutdown until it is done).
        found = Walk() if stopped else await threads.deferToThread(walk, settings.image_root, walk_cancelled)
        if found.cancelled:
            found = Walk()
        for where, reason in found.unreadable:
            summary.fail(where, reason)  # one failure per directory: its images were not warmed
        summary.not_images += found.ignored
        warmer = _Warmer(reactor, settings, jobs, summary, store, memcached, service)
        warmer.stopped = stopped
        summary.units = len(found.files) * len(warmer.specs) + len(found.unreadable)
        shown.start()
        slots = defer.DeferredSemaphore(settings.workers + queue_room)
        for rel in found.files:
            if stopped:
                break
            try:
                await slots.acquire()
            except defer.CancelledError:
                break
            if stopped:
                slots.release()
                break
            d = defer.Deferred.fromCoroutine(warmer.image(rel))
            running.add(d)

            def done(outcome: Any, d: defer.Deferred[None] = d, rel: str = rel) -> None:
                running.discard(d)
                slots.release()
                if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                    log.failure("warming {path}", outcome, path=rel)
                    summary.fail(rel, f"internal error: {type(outcome.value).__name__}", len(warmer.specs))

            d.addBoth(done)
        while running:
            await defer.DeferredList(list(running), consumeErrors=True)
    finally:
        shown.stop()
        closing = [defer.maybeDeferred(store.close)]
        if memcached is not None:
            closing.append(defer.maybeDeferred(memcached.close))
        await defer.DeferredList(closing, consumeErrors=True)
        try:
            summary.store = dict(store.stats())
        except Exception:
            summary.store = {}
        await defer.DeferredList([defer.maybeDeferred(store_loader.close), defer.maybeDeferred(service.stop)],
                                 consumeErrors=True)
        summary.seconds = time.monotonic() - started
    return summary


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The server's own options (same names, same meaning) plus warm's."""
    from .cli import add_settings_options

    parser = argparse.ArgumentParser(prog="imgserver warm", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings_options(parser, presets_help="NAME:QUERY: a preset of the server, warmed (repeatable)")
    parser.add_argument("--transform", action="append", default=[], metavar="QUERY",
                        help="a query string to warm, e.g. 'w=400&fm=webp' or 'preset=thumb&dpr=2' (repeatable)")
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                        help="a bar on a terminal, a line every 5 s otherwise (auto), or nothing")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress and no summary unless something failed")
    return parser


def main(argv: Sequence[str] | None = None, *, standalone: bool = False) -> int:
    """``imgserver warm ARGS``: the exit status (0 all warmed, 1 failures, 2 bad arguments).

    ``standalone``: this process exits with the status (the command): once the run is over, more
    SIGINT/SIGTERM (an impatient Ctrl-C) are ignored while the summary is printed."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
        if settings.result_dir is None:
            raise ValueError("--result-dir is required: it is where the results are stored")
        presets = [p.partition(":")[0] for p in (args.presets or [])]
        jobs = jobs_from(settings, presets, args.transform)
        if not jobs:
            raise ValueError("nothing to warm: give --preset NAME:QUERY or --transform QUERY")
    except ValueError as e:
        print(f"imgserver warm: error: {e}", file=sys.stderr)
        return 2

    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, \
        textFileLogObserver

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])], redirectStandardIO=False)
    progress = "none" if args.quiet else args.progress
    interrupted: defer.Deferred[None] = defer.Deferred()
    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append(await warm(reactor, settings, jobs, progress=progress, interrupted=interrupted))
        except Exception:
            outcome.append(Failure())
        finally:
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # a signal is stopping it already

    def on_shutdown() -> defer.Deferred[None] | None:
        if outcome:
            return None
        # A signal: stop feeding, cancel, close everything, then let the reactor stop.
        if not interrupted.called:
            interrupted.callback(None)
        finished: defer.Deferred[None] = defer.Deferred()

        def wait() -> None:
            if outcome:
                finished.callback(None)
            else:
                reactor.callLater(0.02, wait)

        wait()
        return finished

    def interrupt() -> None:
        if not interrupted.called:
            interrupted.callback(None)  # run() ends (cancelling, closing) and stops the reactor

    def install_handlers() -> None:
        # SIGINT/SIGTERM interrupt the run once; more of them (an impatient Ctrl-C) change nothing --
        # Twisted's own handlers would try to stop the stopping reactor again (a traceback).
        import signal

        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda n, f: reactor.callFromThread(interrupt))

    reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    reactor.callWhenRunning(install_handlers)
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(run()))
    reactor.run()  # (it restored the handlers it found: a second Ctrl-C now would kill the summary)
    if standalone:
        import signal

        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    if not outcome:
        return 1
    result = outcome[0]
    if isinstance(result, Failure):
        print(f"imgserver warm: error: {result.getErrorMessage()}", file=sys.stderr)
        return 1
    summary: Summary = result
    if not args.quiet or summary.exit_status():
        for line in summary.lines():
            print(line)
    sys.stdout.flush()
    return summary.exit_status()
