"""``imgserver``: run the image server (HTTP and Perspective Broker).

    imgserver [--root DIR] [--http ENDPOINT] [--pb ENDPOINT] [--workers N] [--max-queue N]
              [--cache-mb N] [--secret KEY] [--max-pixels N] [--max-file-mb N] [--timeout SECONDS]
              [--grace SECONDS] [--gallery] [--demo [--serve]]

Endpoints are Twisted endpoint strings (``tcp:8080``, ``tcp:8080:interface=127.0.0.1``,
``unix:/run/img.sock``).  With no ``--root`` it serves the built-in samples.
SIGTERM or SIGINT: stop accepting, let work in flight finish (at most
``--grace`` seconds), exit 0.  ``--demo`` starts on free local ports, asks
itself for a few images over HTTP and PB, prints what happened and exits;
``--demo --serve`` then keeps serving (with the gallery) and prints its URL.
``--gallery``: an HTML gallery of every image under the root at ``/``
(:mod:`imgserver.gallery`; it lists every name, with a secret it hands out
signed URLs: off unless asked).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any, Sequence

from twisted.internet import defer, endpoints, task
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgserver", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = Settings.help()
    defaults = Settings()
    for field in fields(Settings):
        option, kind = _OPTION_FOR[field.name]
        default = getattr(defaults, field.name) if field.name != "secret" else None
        repeated = {"action": "append", "default": None} if field.name == "presets" else {"default": default}
        parser.add_argument(option, dest=field.name, type=kind, help=helps.get(field.name, ""), **repeated)
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
    parser.add_argument("--switch-interval", type=float, default=0.001,
                        help="Python's GIL switch interval in seconds: how long the reactor thread may "
                             "wait for a busy worker thread to let go (Python's default is 0.005)")
    return parser


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

    async def listen(self, http: str | None, pb: str | None) -> None:
        self.service.start()
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
        self.site.drain()
        deadline = self.reactor.seconds() + grace

        def busy() -> int:
            return self.service.busy() + len(self.site.requests)

        while busy() and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, 0.02, lambda: None)
        if busy():
            log.warn("{n} requests still in flight after {grace} s: stopping anyway", n=busy(), grace=grace)
        self.site.close_connections()
        while self.site.channels and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, 0.02, lambda: None)
        self.site.close_connections(abort=True)
        self.service.stop()


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


def _not_access_log(event: dict[str, Any]) -> PredicateResult:
    if event.get("log_namespace") == "imgserver.access":
        return PredicateResult.no
    return PredicateResult.maybe


def main(argv: Sequence[str] | None = None) -> None:
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
    sys.setswitchinterval(args.switch_interval)
    if args.demo:
        from .demo import run_demo

        task.react(lambda reactor: defer.Deferred.fromCoroutine(run_demo(reactor, settings, args)))
        return
    observer: Any = textFileLogObserver(sys.stdout)
    if args.quiet:  # everything but the access log: start-up, warnings and errors still show
        observer = FilteringLogObserver(observer, [_not_access_log])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_serve(reactor, args, settings)))


if __name__ == "__main__":
    main()
