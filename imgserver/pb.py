"""The Perspective Broker front end of :class:`~imgserver.service.ImageService`.

A thin layer: arguments are checked by the same :func:`~imgserver.params.parse_transform`
as HTTP's, the work is the service's, and every answer is plain data (bytes,
str, int, dict) because Banana cannot send arbitrary objects.  What PB itself
adds, and why each piece is here:

* **No call can leave its client waiting.**  Banana refuses strings over
  ``banana.SIZE_LIMIT`` (640 KiB); when a Deferred answer is over it, the
  broker logs the error and never answers, so the client would wait forever.
  ``thumbnail`` therefore measures its result against the module's live limit
  (minus :data:`HEADROOM`) and answers :class:`~imgserver.errors.TooLarge`
  instead.
* **Large results are paged by a pull protocol.**  ``thumbnail_begin`` runs the
  transform and answers its first page with the size and type; when more is
  left it keeps the result under a token for ``read(token, offset, length)``
  (and ``release(token)``).  Every page is an ordinary request with an
  ordinary answer, so errors, disconnects and timeouts reach the client the
  way they reach any call, the client sets the pace (its next ``read``), and
  a small result costs one round trip.  Results nobody reads expire after
  ``result_ttl`` seconds, and are dropped with their connection.
  ``twisted.spread.util.StringPager`` was not chosen: it pushes pages as
  one-way ``gotPage`` calls to a client-side collector, and its
  ``getAllPages`` ignores the failure of the call that starts it (a
  ``NotFound`` there would be a hang), so the client would need its own
  bookkeeping to notice errors and lost connections anyway.
* **A call is bounded in time**: after ``settings.timeout`` its service work
  is cancelled and the client gets :class:`~imgserver.errors.Timeout`.
* **A call dies with its connection**: each connection gets its own
  :class:`ImageRoot` bound to its broker (``rootObject``), which cancels that
  connection's pending service calls when the broker disconnects, so queued
  work leaves the service's queue instead of running for no one.
* **Errors**: expected ones are :class:`~imgserver.errors.ImageServerError`
  (``pb.Error``) subclasses, sent without traceback or log line; anything else
  is logged here once and sent as a bare :class:`~imgserver.errors.InternalError`.
"""

from __future__ import annotations

import copy
import secrets
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import banana, pb

from .errors import (
    BadRequest,
    ImageServerError,
    InternalError,
    NotFound,
    Overloaded,
    Timeout,
    TooLarge,
)
from .params import FITS, TransformSpec, parse_transform
from .processing import Result
from .service import ImageService

__all__ = [
    "ImageRoot",
    "make_pb_factory",
    "max_answer_bytes",
    "HEADROOM",
    "DEFAULT_PAGE_SIZE",
    "RESULT_TTL",
]

#: Bytes kept free under ``banana.SIZE_LIMIT`` in one answer's byte string.
HEADROOM = 4096
#: Page size of ``thumbnail_begin``/``read`` when the client names none.
DEFAULT_PAGE_SIZE = 256 * 1024
#: Seconds a paged result is kept after its last read.
RESULT_TTL = 30.0
#: Paged results one connection may hold unread at once.
MAX_HELD_PER_CONNECTION = 8
#: Bytes of paged results held for all connections together.
MAX_HELD_BYTES = 256 * 1024 * 1024


def max_answer_bytes() -> int:
    """The longest byte string one answer may carry, from Banana's live limit."""
    limit = banana.SIZE_LIMIT
    return max(1, limit - min(HEADROOM, limit // 2))


def _plain(value: Any) -> Any:
    """``value`` as types Banana/jelly send anywhere: dict, list, str, bytes, numbers, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive whole number")
    return value


def _raised_by_call(e: BaseException) -> bool:
    """Whether ``e`` came from calling the remote_ method (a bad signature), not from inside it."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is _DISPATCH_CODE


_DISPATCH_CODE = pb.Referenceable.remoteMessageReceived.__code__


class _ConnectionGone(pb.Error):
    """The answer to a call whose client disconnected: nobody receives it."""


class _Held:
    """A paged result waiting to be read, and its expiry timer."""

    __slots__ = ("body", "expiry")

    def __init__(self, body: bytes, expiry: IDelayedCall) -> None:
        self.body = body
        self.expiry = expiry


class _Connection:
    """What one broker has in progress: service calls to cancel, results held for it."""

    def __init__(self, hub: ImageRoot, broker: pb.Broker | None) -> None:
        self.hub = hub
        self.broker = broker
        self.pending: set[defer.Deferred[Any]] = set()
        self.held: dict[str, _Held] = {}
        self.closed = False
        hub.connections.add(self)
        if broker is not None:
            broker.notifyOnDisconnect(self.close)

    def close(self) -> None:
        """The broker is gone: cancel its calls, drop its results."""
        if self.closed:
            return
        self.closed = True
        self.hub.connections.discard(self)
        for work in list(self.pending):
            work.cancel()
        for token in list(self.held):
            self.drop(token)

    def drop(self, token: str) -> bool:
        held = self.held.pop(token, None)
        if held is None:
            return False
        if held.expiry.active():
            held.expiry.cancel()
        self.hub.held_bytes -= len(held.body)
        return True


class ImageRoot(pb.Root):
    """The PB root: ``thumbnail``, ``thumbnail_begin``/``read``/``release``, ``info``, ``stats``.

    The instance given to the factory is shared; ``rootObject`` hands each
    connection a copy bound to its broker (same service, same limits), so a
    call knows which connection to die with.  Called directly (not over PB),
    an unbound root works the same minus disconnect handling.
    """

    log = Logger()

    def __init__(
        self,
        service: ImageService,
        *,
        result_ttl: float = RESULT_TTL,
        max_held: int = MAX_HELD_PER_CONNECTION,
        max_held_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        self.service = service
        self.reactor = service.reactor
        self.result_ttl = result_ttl
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        # Shared by all connections (the copies point back here).
        self._hub = self
        self.connections: set[_Connection] = set()
        self.held_bytes = 0
        self.counts = {"calls": 0, "timeouts": 0, "cancelled": 0, "internal_errors": 0}
        self._conn = _Connection(self, None)

    def rootObject(self, broker: pb.Broker) -> ImageRoot:
        """This root bound to ``broker``: its calls are cancelled when it disconnects."""
        bound = copy.copy(self)
        bound._conn = _Connection(self._hub, broker)
        return bound

    def remoteMessageReceived(self, broker: pb.Broker, message: Any, args: Any, kw: Any) -> Any:
        """As ``pb.Root``'s, with no traceback for anything but our own bugs.

        A call with wrong arguments is a BadRequest; an unexpected exception in
        a method that answers at once is logged here and sent as InternalError.
        """
        try:
            return super().remoteMessageReceived(broker, message, args, kw)
        except pb.Error:
            raise
        except pb.NoSuchMethod as e:
            raise BadRequest(str(e)) from None
        except Exception as e:
            name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
            if isinstance(e, TypeError) and _raised_by_call(e):
                raise BadRequest(f"wrong arguments for {name}") from None
            self._hub.counts["internal_errors"] += 1
            self.log.failure("unexpected error in PB call {method}", Failure(), method=name)
            raise InternalError() from None

    # -- remote methods ---------------------------------------------------
    def remote_thumbnail(
        self,
        path: str | bytes,
        width: int | None = None,
        height: int | None = None,
        fit: str = "clip",
        fmt: str | None = "jpeg",
        quality: int | None = 85,
    ) -> defer.Deferred[bytes]:
        """The transformed image's bytes, in one answer; TooLarge when it cannot fit one."""

        def answer(result: Result) -> bytes:
            limit = max_answer_bytes()
            if len(result.body) > limit:
                raise TooLarge(
                    f"the result is {len(result.body)} bytes, over the {limit}-byte limit of "
                    "one PB answer; use thumbnail_begin and read (ImageClient.thumbnail)"
                )
            return result.body

        return self._call(
            "thumbnail", lambda: self._transform(path, width, height, fit, fmt, quality), answer
        )

    def remote_thumbnail_begin(
        self,
        path: str | bytes,
        width: int | None = None,
        height: int | None = None,
        fit: str = "clip",
        fmt: str | None = "jpeg",
        quality: int | None = 85,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> defer.Deferred[dict[str, Any]]:
        """Transform, answer the first page; the rest stays under ``token`` for ``read``.

        The answer: ``token`` (None when ``data`` is the whole result),
        ``size``, ``content_type``, ``width``, ``height``, ``format`` and
        ``data`` (the first up to ``page_size`` bytes).
        """
        conn = self._conn

        def start() -> defer.Deferred[Result]:
            _positive_int("page_size", page_size)
            if len(conn.held) >= self.max_held:
                raise Overloaded(
                    f"{len(conn.held)} results already wait to be read on this connection; "
                    "read or release them"
                )
            return self._transform(path, width, height, fit, fmt, quality)

        def answer(result: Result) -> dict[str, Any]:
            body = result.body
            first = min(page_size, max_answer_bytes())
            token = None
            if len(body) > first:
                token = self._hold(body)
            return {
                "token": token,
                "size": len(body),
                "content_type": result.content_type,
                "width": result.width,
                "height": result.height,
                "format": result.format,
                "data": body[:first],
            }

        return self._call("thumbnail_begin", start, answer)

    def remote_read(self, token: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a held result from ``offset``; empty at the end.

        Reading the last byte releases the result; each read restarts its expiry.
        """
        conn = self._conn
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BadRequest("offset must be a whole number >= 0")
        _positive_int("length", length)
        held = conn.held.get(token) if isinstance(token, str) else None
        if held is None:
            raise NotFound("no such result: expired, released or already read")
        size = len(held.body)
        if offset > size:
            raise BadRequest(f"offset {offset} is past the end ({size} bytes)")
        end = offset + min(length, max_answer_bytes())
        chunk = held.body[offset:end]
        if end >= size:
            conn.drop(token)
        else:
            held.expiry.reset(self.result_ttl)
        return chunk

    def remote_release(self, token: str) -> bool:
        """Forget a held result (a client that stops reading); False if it was not held."""
        return isinstance(token, str) and self._conn.drop(token)

    def remote_info(self, path: str | bytes) -> defer.Deferred[dict[str, Any]]:
        """Width, height (as displayed), format, mode, bytes and orientation of an image."""
        return self._call(
            "info", lambda: self.service.info(self._checked_path(path)), _plain
        )

    def remote_stats(self) -> dict[str, Any]:
        """The service's counters plus this PB front end's (connections, held results)."""
        stats = dict(self.service.stats())
        hub = self._hub
        stats["pb"] = {
            "connections": sum(1 for c in hub.connections if c.broker is not None),
            "pending_calls": sum(len(c.pending) for c in hub.connections),
            "held_results": sum(len(c.held) for c in hub.connections),
            "held_bytes": hub.held_bytes,
            **hub.counts,
        }
        return _plain(stats)

    # -- plumbing ---------------------------------------------------------
    @staticmethod
    def _checked_path(path: Any) -> str | bytes:
        if not isinstance(path, (str, bytes)):
            raise BadRequest("path must be text")
        return path

    def _transform(self, path: Any, width: Any, height: Any, fit: Any, fmt: Any,
                   quality: Any) -> defer.Deferred[Result]:
        path = self._checked_path(path)
        # One-element lists, parse_transform's canonical form: any other value
        # (a float, a list) then reaches its checks as a value, not as a sequence.
        args: dict[str, list[Any]] = {}
        if width is not None:
            args["w"] = [width]
        if height is not None:
            args["h"] = [height]
        # The default fit goes along only with a size: alone it would be "fit needs w or h".
        if fit is not None and (width is not None or height is not None or fit != FITS[0]):
            args["fit"] = [fit]
        if fmt is not None:
            args["fm"] = [fmt]
        if quality is not None:
            args["q"] = [quality]
        settings = self.service.settings
        spec = parse_transform(
            args, max_dimension=settings.max_dimension, default_quality=settings.default_quality
        )
        if spec is None:  # nothing asked: re-encode in the source's format
            spec = TransformSpec(quality=settings.default_quality)
        return self.service.transform(path, spec)

    def _hold(self, body: bytes) -> str:
        hub = self._hub
        conn = self._conn
        if len(conn.held) >= self.max_held:  # checked at the start too, but calls overlap
            raise Overloaded(
                f"{len(conn.held)} results already wait to be read on this connection; "
                "read or release them"
            )
        if hub.held_bytes + len(body) > self.max_held_bytes:
            raise Overloaded("too many paged results wait to be read; try again shortly")
        token = secrets.token_urlsafe(12)
        conn.held[token] = _Held(body, self.reactor.callLater(self.result_ttl, conn.drop, token))
        hub.held_bytes += len(body)
        return token

    def _call(self, name: str, start: Callable[[], defer.Deferred[Any]],
              answer: Callable[[Any], Any]) -> defer.Deferred[Any]:
        """Run ``start()`` bounded by the timeout and the connection; map its outcome."""
        conn = self._conn
        hub = self._hub
        hub.counts["calls"] += 1
        timeout = self.service.settings.timeout
        try:
            work = start()
        except Exception:
            work = defer.fail()

        def timed_out(result: Any, seconds: float) -> Any:
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                hub.counts["timeouts"] += 1
                raise Timeout(f"no result within {seconds:g} s")
            return result

        def settled(result: Any) -> Any:
            conn.pending.discard(work)
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(ImageServerError):
                return failure
            if conn.closed and failure.check(defer.CancelledError):
                hub.counts["cancelled"] += 1
                return Failure(_ConnectionGone("the client disconnected"))
            hub.counts["internal_errors"] += 1
            self.log.failure("unexpected error in PB call {method}", failure, method=name)
            return Failure(InternalError())

        if not work.called:
            conn.pending.add(work)
            work.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
            work.addBoth(settled)
        work.addCallback(answer)
        work.addErrback(failed)
        return work


def make_pb_factory(service: ImageService, **options: Any) -> pb.PBServerFactory:
    """A PB server factory for ``service`` (``options`` go to :class:`ImageRoot`)."""
    return pb.PBServerFactory(ImageRoot(service, **options))
