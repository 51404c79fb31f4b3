"""``imgserver``: run the image server (HTTP and Perspective Broker).

    imgserver [--root DIR] [--http ENDPOINT] [--pb ENDPOINT] [--workers N] [--max-queue N]
              [--cache-mb N] [--secret KEY] [--max-pixels N] [--max-file-mb N] [--timeout SECONDS]
              [--grace SECONDS] [--gallery] [--demo [--serve]]
              [--processes N|auto [--balance shared|reuseport]]

Endpoints are Twisted endpoint strings (``tcp:8080``, ``tcp:8080:interface=127.0.0.1``,
``unix:/run/img.sock``).  With no ``--root`` it serves the built-in samples.
SIGTERM or SIGINT: stop accepting, let work in flight finish (at most
``--grace`` seconds), exit 0.  ``--demo`` starts on free local ports, asks
itself for a few images over HTTP and PB, prints what happened and exits;
``--demo --serve`` then keeps serving (with the gallery) and prints its URL.
``--gallery``: an HTML gallery of every image under the root at ``/``
(:mod:`imgserver.gallery`; it lists every name, with a secret it hands out
signed URLs: off unless asked).
``--processes N`` (``auto``: one per core): a parent binds the endpoints
and runs N worker processes serving them, restarts a worker that dies,
drains them all on SIGTERM/SIGINT and restarts them one by one on SIGHUP
(:mod:`imgserver.processes`); ``/metrics`` and ``/healthz`` of any worker
cover every worker (:mod:`imgserver.cluster`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import fields
from typing import Any, Sequence

from twisted.internet import defer, endpoints, protocol, task
from twisted.logger import FilteringLogObserver, Logger, PredicateResult, globalLogBeginner, textFileLogObserver

from .metrics import Metrics
from .service import ImageService
from .settings import Settings
from .web import make_site

__all__ = ["main", "build_parser", "settings_from_args", "Server"]

log = Logger(namespace="imgserver")

DEFAULT_HTTP = "tcp:8080"
#: Loopback only: PB is reachable from elsewhere only when asked (and then needs a secret).
DEFAULT_PB = "tcp:8789:interface=127.0.0.1"
DEFAULT_GRACE = 10.0
#: Seconds a server waits for its image root and result tiers before it listens anyway.
START_WAIT = 10.0

_OPTION_FOR = {
    "root": ("--root", str),
    "workers": ("--workers", int),
    "max_queue": ("--max-queue", int),
    "cache_mb": ("--cache-mb", int),
    "secret": ("--secret", str),
    "max_pixels": ("--max-pixels", int),
    "max_file_mb": ("--max-file-mb", int),
    "timeout": ("--timeout", float),
    "max_dimension": ("--max-dimension", int),
    "default_quality": ("--default-quality", int),
    "secret_file": ("--secret-file", str),
    "max_memory_mb": ("--max-memory-mb", float),
    "max_output_pixels": ("--max-output-pixels", int),
    "cache_control": ("--cache-control", str),
    "max_connections": ("--max-connections", int),
    "header_timeout": ("--header-timeout", float),
    "idle_timeout": ("--idle-timeout", float),
    "send_timeout": ("--send-timeout", float),
    "max_streams": ("--max-streams", int),
    "max_frames": ("--max-frames", int),
    "presets": ("--preset", str),  # repeatable: NAME:QUERY
    "result_dir": ("--result-dir", str),
    "result_dir_max_mb": ("--result-dir-max-mb", float),
    "memcached": ("--memcached", str),
    "memcached_timeout": ("--memcached-timeout", float),
    "memcached_max_item_kb": ("--memcached-max-item-kb", int),
}


def add_settings_options(parser: argparse.ArgumentParser, presets_help: str | None = None) -> None:
    """One option per :class:`Settings` field (the server's and ``imgserver warm``'s)."""
    helps = Settings.help()
    if presets_help is not None:
        helps["presets"] = presets_help
    defaults = Settings()
    for field in fields(Settings):
        option, kind = _OPTION_FOR[field.name]
        default = getattr(defaults, field.name) if field.name != "secret" else None
        repeated = {"action": "append", "default": None} if field.name == "presets" else {"default": default}
        parser.add_argument(option, dest=field.name, type=kind, help=helps.get(field.name, ""), **repeated)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgserver", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_settings_options(parser)
    parser.add_argument("--http", default=DEFAULT_HTTP, help="HTTP endpoint ('none' to disable)")
    parser.add_argument("--pb", default=DEFAULT_PB,
                        help="Perspective Broker endpoint ('none' to disable); clients log in with "
                             "credentials derived from the secret; without a secret only a "
                             "loopback address or a UNIX socket is accepted")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="seconds work in flight may take to finish at shutdown")
    parser.add_argument("--demo", action="store_true",
                        help="serve on free local ports, fetch a few images from itself, print, exit")
    parser.add_argument("--serve", action="store_true",
                        help="with --demo: keep serving afterwards (gallery on) and print its URL")
    parser.add_argument("--gallery", action="store_true",
                        help="an HTML gallery of every image under the root at / (lists every name; with a "
                             "secret it hands out signed URLs for every image)")
    parser.add_argument("--quiet", action="store_true", help="no access log on stdout")
    parser.add_argument("--processes", type=_processes, default=1,
                        help="worker processes serving the same ports ('auto': one per core); 1: this process "
                             "serves, with no parent")
    parser.add_argument("--balance", choices=("shared", "reuseport"), default=None,
                        help="with --processes N>1: 'shared': the workers accept from one listening socket "
                             "(the default: balances by load, a draining worker leaves nothing queued); "
                             "'reuseport': a socket per worker with SO_REUSEPORT (spread by address hash)")
    parser.add_argument("--worker-sockets", default=None, help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--switch-interval", type=float, default=0.001,
                        help="Python's GIL switch interval in seconds: how long the reactor thread may "
                             "wait for a busy worker thread to let go (Python's default is 0.005)")
    return parser


def _processes(value: str) -> int:
    from .processes import processes_count

    try:
        return processes_count(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', not {value!r}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})


class Server:
    """The service and its listening ports, with a graceful stop."""

    def __init__(self, reactor: Any, settings: Settings, *, gallery: bool = False) -> None:
        self.reactor = reactor
        self.settings = settings
        self.service = ImageService(settings, reactor)
        self.metrics = Metrics(self.service)
        self.site = make_site(self.service, self.metrics, gallery=gallery)
        self.ports: list[Any] = []
        self.http_port: Any = None
        self.pb_port: Any = None
        self.cluster: Any = None  # a worker's view of every worker (imgserver.cluster)

    async def _start_service(self) -> None:
        """Start the service; wait (at most ``START_WAIT`` s) for its root and result
        tiers, so the first requests find stored results (a slow root or tier only
        delays listening by that much: requests that arrive before wait for the root)."""
        started = self.service.start()
        ready: defer.Deferred[None] = defer.Deferred()
        started.addBoth(lambda _: ready.called or ready.callback(None))
        timer = self.reactor.callLater(START_WAIT, lambda: ready.called or ready.callback(None))
        await ready
        if timer.active():
            timer.cancel()

    async def listen(self, http: str | None, pb: str | None) -> None:
        await self._start_service()
        if http and http != "none":
            self.http_port = await endpoints.serverFromString(self.reactor, http).listen(self.site)
            self.ports.append(self.http_port)
            log.info("HTTP on {address}", address=self.http_port.getHost())
        if pb and pb != "none":
            from .pb import listen_pb

            # Clients log in (twisted.cred); without a secret only on loopback
            # (ExposedWithoutSecret otherwise).
            self.pb_port = await listen_pb(self.reactor, pb, self.service)
            self.ports.append(self.pb_port)
            log.info("Perspective Broker on {address}", address=self.pb_port.getHost())

    async def adopt(self, sockets: dict[str, Any]) -> None:
        """Serve the listening sockets a ``--processes`` parent handed over
        (``{"http"|"pb": {"fd": N, ...}}``, see :mod:`imgserver.processes`)."""
        from .processes import adopt_listener

        await self._start_service()
        if "http" in sockets:
            self.http_port = adopt_listener(self.reactor, sockets["http"]["fd"], sockets["http"], self.site)
            self.ports.append(self.http_port)
            log.info("HTTP on {address} (worker)", address=self.http_port.getHost())
        if "pb" in sockets:
            from .pb import ExposedWithoutSecret, _exposed_message, is_local_address, make_pb_factory

            self.pb_port = adopt_listener(self.reactor, sockets["pb"]["fd"], sockets["pb"],
                                          make_pb_factory(self.service))
            self.ports.append(self.pb_port)
            if self.settings.secret is None and not is_local_address(self.pb_port.getHost()):
                raise ExposedWithoutSecret(_exposed_message(str(self.pb_port.getHost())))
            log.info("Perspective Broker on {address} (worker)", address=self.pb_port.getHost())

    def start_cluster(self) -> None:
        """In a worker of ``--processes N``: publish this worker's snapshots and answer
        ``/metrics`` and ``/healthz`` for every worker."""
        from .cluster import from_environment
        from .web import local_health

        self.cluster = from_environment(self.reactor, render=self.metrics.render,
                                        health=lambda: local_health(self.service, self.metrics, self.site))
        if self.cluster is not None:
            self.metrics.cluster = self.cluster
            self.cluster.start()

    async def stop(self, grace: float = DEFAULT_GRACE) -> None:
        """Stop accepting; wait (at most ``grace`` s) until the work in flight is
        done and every answer is sent; close the connections; stop the service.

        Idle kept-alive connections close at once and busy ones after their
        answer, so clients cannot keep the server busy past the grace period.
        An answer is only sent once it left the connection's send buffer, so
        connections are closed gracefully (after their buffers are flushed)
        rather than dropped with the reactor; whatever is left at the deadline
        is aborted.
        """
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        if self.cluster is not None:  # a draining worker stops speaking for itself: the others see it go
            await self.cluster.stop()
        self.site.drain()
        # The monotonic clock: the wall clock stepped forward must not cut the grace period short.
        now = time.monotonic
        deadline = now() + grace

        def busy() -> int:
            return self.service.busy() + len(self.site.requests)

        while busy() and now() < deadline:
            await task.deferLater(self.reactor, 0.02, lambda: None)
        if busy():
            log.warn("{n} requests still in flight after {grace} s: stopping anyway", n=busy(), grace=grace)
        self.site.close_connections()
        while self.site.channels and now() < deadline:
            await task.deferLater(self.reactor, 0.02, lambda: None)
        self.site.close_connections(abort=True)
        # What is left of the grace period (at least a moment) for the tiers' background writes; then
        # the service closes its tiers, loader and root: waited for, so the reactor stopping cuts nothing off.
        await self.service.stop(grace=max(0.1, deadline - now()))


async def _serve(reactor: Any, args: argparse.Namespace, settings: Settings) -> None:
    from .pb import ExposedWithoutSecret

    server = Server(reactor, settings, gallery=args.gallery)
    try:
        await server.listen(args.http, args.pb)
    except ExposedWithoutSecret as e:
        log.critical("{message}", message=str(e))
        await server.stop(0)
        raise SystemExit(2) from None

    async def graceful() -> None:
        log.info("shutting down: no new connections; finishing work in flight")
        await server.stop(args.grace)

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(graceful()))
    await defer.Deferred()  # until a signal stops the reactor


class _Control(protocol.Protocol):
    """A worker's pipes to its parent: says "ready"; the parent gone (EOF) means stop."""

    def __init__(self, on_lost: Any) -> None:
        self.on_lost = on_lost

    def connectionLost(self, reason: Any = None) -> None:
        self.on_lost()


async def _serve_worker(reactor: Any, args: argparse.Namespace, settings: Settings) -> None:
    """A worker of ``--processes N``: serve the parent's sockets until told to stop."""
    from twisted.internet import stdio

    from .pb import ExposedWithoutSecret
    from .processes import _READY_FD

    running: defer.Deferred[None] = defer.Deferred()
    reactor.callWhenRunning(running.callback, None)
    await running  # the reactor's signal handlers are in place: ours replace them below
    server = Server(reactor, settings, gallery=args.gallery)
    try:
        await server.adopt(json.loads(args.worker_sockets))
    except ExposedWithoutSecret as e:
        log.critical("{message}", message=str(e))
        await server.stop(0)
        raise SystemExit(2) from None
    server.start_cluster()
    stopping: list[defer.Deferred[None]] = []
    orphaned_: list[bool] = []

    def abandon(_: Any) -> Any:
        # Every worker removes its snapshot as it exits; with the parent gone -- before the drain or
        # during it (SIGTERM, then SIGKILL before it could clean up) -- the last worker out removes the
        # run directory too.  A few small file operations, in a thread.
        if server.cluster is not None:
            from twisted.internet import threads

            d = threads.deferToThread(server.cluster.abandon if orphaned_ else server.cluster.withdraw)
            return d.addErrback(lambda f: log.failure("cleaning up the run directory", f))
        return None

    def stop(orphaned: bool = False) -> None:
        """Once, whatever asks (SIGTERM, SIGINT, the parent gone)."""
        if orphaned:
            orphaned_.append(True)
        if not stopping:
            log.info("worker {id}: draining{why}", id=os.environ.get("IMGSERVER_WORKER_ID"),
                     why=" (the parent is gone)" if orphaned else "")
            stopping.append(defer.Deferred.fromCoroutine(server.stop(args.grace)))
            stopping[0].addBoth(abandon)
            stopping[0].addBoth(lambda _: reactor.stop())

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda n, f: reactor.callFromThread(stop))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent's business
    control = stdio.StandardIO(_Control(lambda: stop(orphaned=True)), stdin=0, stdout=_READY_FD, reactor=reactor)
    control.write(b"ready\n")
    await defer.Deferred()  # until stop() stops the reactor


async def _serve_parent(reactor: Any, args: argparse.Namespace, argv: Sequence[str]) -> None:
    from .processes import run_parent

    code = await run_parent(reactor, args, argv)
    if code:
        raise SystemExit(code)


def _not_access_log(event: dict[str, Any]) -> PredicateResult:
    if event.get("log_namespace") == "imgserver.access":
        return PredicateResult.no
    return PredicateResult.maybe


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["warm"]:  # ``imgserver warm ...``: fill the result tiers ahead of requests
        from .warm import main as warm

        raise SystemExit(warm(argv[1:], standalone=True))
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if not args.demo and args.pb and args.pb != "none":
            from .pb import check_exposure  # PB beyond loopback needs a secret

            check_exposure(args.pb, settings.secret)
    except ValueError as e:
        build_parser().error(str(e))
    if args.serve and not args.demo:
        build_parser().error("--serve goes with --demo")
    if args.processes > 1 and args.demo:
        build_parser().error("--demo runs in one process: leave out --processes")
    if args.balance is not None and args.processes == 1:
        build_parser().error("--balance goes with --processes N>1")
    if args.balance is None:
        from .processes import DEFAULT_BALANCE

        args.balance = DEFAULT_BALANCE
    sys.setswitchinterval(args.switch_interval)
    if args.demo:
        from .demo import run_demo

        task.react(lambda reactor: defer.Deferred.fromCoroutine(run_demo(reactor, settings, args)))
        return
    observer: Any = textFileLogObserver(sys.stdout)
    if args.quiet:  # everything but the access log: start-up, warnings and errors still show
        observer = FilteringLogObserver(observer, [_not_access_log])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    if args.worker_sockets is not None:  # started by a --processes parent
        task.react(lambda reactor: defer.Deferred.fromCoroutine(_serve_worker(reactor, args, settings)))
    elif args.processes > 1:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(_serve_parent(reactor, args, argv)))
    else:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(_serve(reactor, args, settings)))


if __name__ == "__main__":
    main()
