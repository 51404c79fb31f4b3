"""A Perspective Broker client for imgserver's :mod:`imgserver.pb` server.

Why a wrapper rather than bare ``callRemote``:

* results of any size: :meth:`ImageClient.thumbnail` uses the server's paged
  ``thumbnail_begin``/``read`` methods, so a result over Banana's 640 KiB
  limit arrives whole instead of failing;
* the same exceptions as the server: a ``pb.RemoteError`` (or ``CopiedFailure``)
  naming an :mod:`imgserver.errors` class is turned back into that class with
  its message, so ``except NotFound`` works on both sides;
* every call is bounded: a connect or a call that gets no answer within its
  ``timeout`` fails with :class:`~imgserver.errors.Timeout` rather than waiting
  forever on a silent peer.

* logging in: :func:`connect` logs in through the server's ``twisted.cred``
  portal, with the credentials derived from the server's secret
  (:func:`imgserver.pb.derive_password`) by PB's challenge/response (the
  password never crosses the wire), or anonymously when given no secret (a
  server without a secret, listening on loopback only).  A refused login
  raises :class:`imgserver.pb.UnauthorizedLogin`, which is also
  ``twisted.cred.error.UnauthorizedLogin``.

Lost connections surface as ``pb.PBConnectionLost`` or ``pb.DeadReferenceError``.
A connection is not encrypted: across a network, use a ``tls:`` endpoint.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.cred import credentials
from twisted.internet import defer, endpoints
from twisted.python.failure import Failure
from twisted.spread import pb

from . import errors
from .errors import ImageServerError, InternalError, Overloaded, Timeout
from .pb import DEFAULT_PAGE_SIZE, USERNAME, UnauthorizedLogin, derive_password

__all__ = ["connect", "ImageClient", "DEFAULT_TIMEOUT", "CONNECT_TIMEOUT", "remote_error"]

#: Seconds a call may wait for its answer unless told otherwise.
DEFAULT_TIMEOUT = 60.0
#: Seconds :func:`connect` may take unless told otherwise.
CONNECT_TIMEOUT = 30.0

_UNSET: Any = object()

#: Remote type name -> local class, for the errors the server sends.
_ERRORS: dict[str, type[Exception]] = {
    f"{errors.__name__}.{cls.__name__}": cls
    for cls in (getattr(errors, name) for name in errors.__all__)
    if isinstance(cls, type) and issubclass(cls, ImageServerError)
}
_ERRORS[f"{UnauthorizedLogin.__module__}.{UnauthorizedLogin.__name__}"] = UnauthorizedLogin


def remote_error(failure: Failure) -> Failure:
    """``failure`` with a remote imgserver error turned back into its local class.

    Other remote errors become ``pb.RemoteError`` (never a ``CopiedFailure``,
    whose ``value`` is a string and cannot be raised); local failures pass.
    """
    if isinstance(failure, pb.CopiedFailure):
        remote_type, message = failure.type, failure.value
        traceback = getattr(failure, "traceback", None)
    elif failure.check(pb.RemoteError):
        remote_type = failure.value.remoteType
        message = failure.value.args[0] if failure.value.args else ""
        traceback = failure.value.remoteTraceback
    else:
        return failure
    if isinstance(remote_type, bytes):
        remote_type = remote_type.decode("utf-8", "replace")
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    cls = _ERRORS.get(remote_type)
    if cls is not None:
        if issubclass(cls, Overloaded):
            # The server puts retry_after on the failure it sends (PB copies it).
            retry_after = getattr(failure, "retry_after", None)
            if isinstance(retry_after, bool) or not isinstance(retry_after, int):
                retry_after = 1
            return Failure(cls(str(message), retry_after=retry_after))
        try:
            return Failure(cls(str(message)))
        except Exception:  # noqa: BLE001 - a class built otherwise: keep the remote error
            pass
    return Failure(pb.RemoteError(remote_type, message, traceback))


def _bounded(d: defer.Deferred[Any], timeout: float | None, reactor: Any,
             what: str) -> defer.Deferred[Any]:
    """``d``, cancelled and failed with Timeout after ``timeout`` seconds (None: unbounded)."""
    if timeout is None:
        return d

    def timed_out(result: Any, seconds: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise Timeout(f"{what}: no answer within {seconds:g} s")
        return result

    return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


def connect(reactor: Any, endpoint_description: str, secret: bytes | str | None = None, *,
            timeout: float | None = CONNECT_TIMEOUT,
            call_timeout: float | None = DEFAULT_TIMEOUT,
            page_size: int = DEFAULT_PAGE_SIZE) -> defer.Deferred[ImageClient]:
    """Connect to an imgserver PB endpoint such as ``"tcp:127.0.0.1:8789"`` and log in.

    ``secret`` is the server's secret (``--secret-file`` / ``IMGSERVER_SECRET``):
    the login's password is derived from it as the server derives it.  Without
    it the login is anonymous, which only a server without a secret accepts.
    A refused login fails with :class:`imgserver.pb.UnauthorizedLogin` and
    closes the connection.

    ``timeout`` bounds the connection, the PB handshake and the login;
    ``call_timeout`` becomes the client's default for each call.
    """
    endpoint = endpoints.clientFromString(reactor, endpoint_description)
    factory = pb.PBClientFactory()
    if secret is None:
        creds: Any = credentials.Anonymous()
    else:
        creds = credentials.UsernamePassword(USERNAME, derive_password(secret))

    async def go() -> ImageClient:
        broker = await endpoint.connect(factory)
        try:
            root = factory.getRootObject()
            # PBClientFactory hears of no disconnect from an endpoint: fail it ourselves.
            broker.notifyOnDisconnect(
                lambda: root.called or root.errback(pb.PBConnectionLost("connection lost"))
            )
            await root
            perspective = await factory.login(creds).addErrback(remote_error)
        except BaseException:
            broker.transport.loseConnection()
            raise
        return ImageClient(perspective, reactor, timeout=call_timeout, page_size=page_size)

    return _bounded(defer.Deferred.fromCoroutine(go()), timeout, reactor, "connect")


class ImageClient:
    """Calls on one logged-in connection to an imgserver PB server; see :func:`connect`.

    ``root`` is the remote reference to this login's perspective (avatar).
    """

    def __init__(self, root: pb.RemoteReference, reactor: Any, *,
                 timeout: float | None = DEFAULT_TIMEOUT,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.root = root
        self.broker: pb.Broker = root.broker
        self.reactor = reactor
        self.timeout = timeout
        self.page_size = page_size
        self._lost: list[defer.Deferred[None]] = []
        self.broker.notifyOnDisconnect(self._disconnected)

    @property
    def connected(self) -> bool:
        return not self.broker.disconnected

    def thumbnail(self, path: str, width: int | None = None, height: int | None = None,
                  fit: str = "clip", fmt: str | None = "jpeg", quality: int | None = 85, *,
                  timeout: float | None = _UNSET) -> defer.Deferred[bytes]:
        """The image at ``path`` transformed: its encoded bytes, whatever their size.

        ``width`` or ``height`` may be None (that side follows the aspect
        ratio); both None re-encodes at full size.  ``fmt`` None keeps the
        source's format.  ``timeout`` bounds the whole transfer.
        """

        async def go() -> bytes:
            head = await self._remote(
                "thumbnail_begin", path, width, height, fit, fmt, quality, self.page_size
            )
            token, size, data = head["token"], head["size"], head["data"]
            if token is None:
                return data
            parts, got = [data], len(data)
            try:
                while got < size:
                    chunk = await self._remote("read", token, got, self.page_size)
                    if not chunk:
                        raise InternalError("the server's result ended early")
                    parts.append(chunk)
                    got += len(chunk)
            except BaseException:
                self._release(token)
                raise
            return b"".join(parts)

        return self._run(go, timeout, "thumbnail")

    def info(self, path: str, *, timeout: float | None = _UNSET) -> defer.Deferred[dict]:
        """Width, height, format, mode, bytes and orientation of the image at ``path``."""
        return self._run(lambda: self._remote("info", path), timeout, "info")

    def stats(self, *, timeout: float | None = _UNSET) -> defer.Deferred[dict]:
        """The server's counters (service and PB front end)."""
        return self._run(lambda: self._remote("stats"), timeout, "stats")

    #: Seconds ``disconnect`` waits for a clean close before aborting the connection.
    CLOSE_TIMEOUT = 5.0

    def disconnect(self) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed.

        A clean close waits for what is buffered to be sent; a peer that does
        not read could make that wait forever, so after ``CLOSE_TIMEOUT``
        seconds the connection is aborted instead (bounded waiting).
        """
        if not self.connected:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._lost.append(d)
        transport = self.broker.transport
        transport.loseConnection()
        abort = self.reactor.callLater(self.CLOSE_TIMEOUT, transport.abortConnection)
        d.addBoth(lambda result: (abort.active() and abort.cancel(), result)[1])
        return d

    # -- plumbing ---------------------------------------------------------
    def _disconnected(self) -> None:
        waiting, self._lost = self._lost, []
        for d in waiting:
            d.callback(None)

    def _remote(self, method: str, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.root.callRemote, method, *args).addErrback(remote_error)

    def _release(self, token: str) -> None:
        """Tell the server to forget a result we stop reading (best effort)."""
        if self.connected:
            self._remote("release", token).addErrback(lambda _: None)

    def _run(self, call: Callable[[], Any], timeout: float | None,
             what: str) -> defer.Deferred[Any]:
        if timeout is _UNSET:
            timeout = self.timeout
        result = call()
        if not isinstance(result, defer.Deferred):  # a coroutine
            result = defer.Deferred.fromCoroutine(result)
        return _bounded(result, timeout, self.reactor, what)
