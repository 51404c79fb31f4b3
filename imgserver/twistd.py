"""imgserver as a twistd application: ``twistd -n imgserver --root DIR ...``.

One process only: ``--processes`` other than 1 is refused with a usage
error.  twistd owns the process (daemonizing, pid file, log files, its own
signal handling and reactor choice); a parent that re-executes itself as
``python -m imgserver`` workers would run outside what twistd set up (its
logger, ``--reactor``, ``--uid``/``--gid``, chroot), so under twistd run one
instance per core behind a balancer, or use ``imgserver --processes N``
(e.g. under systemd) for one port served by several processes.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .cli import DEFAULT_GRACE, DEFAULT_HTTP, DEFAULT_PB, _OPTION_FOR, Server
from .settings import Settings

__all__ = ["Options", "ImageServerService", "make_service"]

_log = Logger(namespace="imgserver")


class Options(usage.Options):
    """The same settings as the ``imgserver`` command."""

    optParameters: list[list[Any]] = [
        ["http", None, DEFAULT_HTTP, "HTTP endpoint ('none' to disable)"],
        ["pb", None, DEFAULT_PB, "Perspective Broker endpoint ('none' to disable); without a "
         "secret only loopback or a UNIX socket"],
        ["grace", None, DEFAULT_GRACE, "seconds work in flight may take to finish at shutdown", float],
        ["processes", None, "1", "worker processes: only 1 under twistd (use the imgserver command for more)"],
    ]
    _help = Settings.help()
    for _field in fields(Settings):
        _option, _kind = _OPTION_FOR[_field.name]
        optParameters.append([_option.lstrip("-"), None, None, _help.get(_field.name, ""), _kind])
    del _help, _field, _option, _kind

    def postOptions(self) -> None:
        if str(self["processes"]).strip() != "1":
            raise usage.UsageError(
                "--processes is not supported under twistd, which runs and owns one process (daemon, pid file, "
                "logging, --reactor, --uid): run `imgserver --processes N` for several worker processes on one "
                "port, or one twistd instance per core behind a load balancer")
        given = {f.name: self[_OPTION_FOR[f.name][0].lstrip("-")] for f in fields(Settings)}
        try:
            self["settings"] = Settings(**{k: v for k, v in given.items() if v is not None})
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["pb"] and self["pb"] != "none":
            from .pb import ExposedWithoutSecret, check_exposure

            try:
                check_exposure(self["pb"], self["settings"].secret)
            except ExposedWithoutSecret as e:
                raise usage.UsageError(str(e)) from None


class ImageServerService(service.Service):
    """Listens when started; on stop, stops accepting and lets work in flight finish."""

    def __init__(self, settings: Settings, http: str, pb: str, grace: float, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.server = Server(reactor, settings)
        self.http, self.pb, self.grace = http, pb, grace

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        d = defer.Deferred.fromCoroutine(self.server.listen(self.http, self.pb))
        return d.addErrback(self._could_not_listen)

    def _could_not_listen(self, failure: Failure) -> None:
        """twistd ignores startService's Deferred: say why and stop rather than half-serve."""
        from .pb import ExposedWithoutSecret

        if failure.check(ExposedWithoutSecret):
            _log.critical("{message}", message=str(failure.value))
        else:
            _log.failure("imgserver could not start listening", failure)
        reactor = self.server.reactor
        if reactor.running:
            reactor.stop()
        else:  # twistd starts services before it runs the reactor
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self.server.stop(self.grace))


def make_service(options: Options) -> ImageServerService:
    return ImageServerService(options["settings"], options["http"], options["pb"], options["grace"])
