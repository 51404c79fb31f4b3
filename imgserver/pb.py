"""The Perspective Broker front end of :class:`~imgserver.service.ImageService`.

A thin layer over the same service calls as HTTP: paths are checked by the
same name policy (:func:`imgserver.paths.split_decoded`: PB paths are text and
never percent-decoded), transform arguments by the same
:func:`~imgserver.params.parse_transform` (``max_dimension``), and the service
applies the same admission (workers, queue, memory budget) and limits
(``max_pixels``, ``max_file_mb``, ``max_output_pixels``) with the same error
classes.  Every answer is plain data (bytes, str, int, dict).

Authentication (``twisted.cred``)
---------------------------------
A connection starts with a root that offers nothing but logging in (any other
call is refused with :class:`UnauthorizedLogin`, "log in first").  Logging in
goes through a :class:`~twisted.cred.portal.Portal` whose realm,
:class:`ImageRealm`, gives each login its own avatar,
:class:`ImagePerspective`, carrying the remote methods ``thumbnail``,
``thumbnail_begin``/``read``/``release``, ``info`` and ``stats``.

* **With a secret** (``settings.secret``): one user, :data:`USERNAME`, whose
  password is :func:`derive_password` = hex HMAC-SHA256(secret,
  ``b"imgserver-pb"``): a key of its own (knowing it does not let anyone sign
  URLs) that anyone holding the server's secret can compute.  PB's
  challenge/response is used, so the password never crosses the wire: the
  server sends a fresh challenge (16 bytes from :mod:`secrets`, where Twisted's
  own ``pb.challenge`` uses :mod:`random`), the client answers
  MD5(MD5(password) + challenge) (Twisted's ``pb.respond``, what
  ``PBClientFactory.login`` sends), the server compares in constant time.  A
  challenge can be answered once.  MD5 is acceptable here because the password
  is 256 bits of HMAC output: an eavesdropper who records a challenge and its
  answer cannot search that space.  Anonymous logins are refused.
* **Without a secret**: only anonymous logins (``checkers.AllowAnonymousAccess``),
  and :func:`listen_pb` refuses to listen anywhere but a loopback address or a
  UNIX socket (:class:`ExposedWithoutSecret`).  A username/password login is
  refused too, so a client that believes the server is protected finds out.

Before login a client still reaches Banana's decoder and jelly (strings and
lists up to ``banana.SIZE_LIMIT``, jelly's default security options: plain
types only), and nothing else.

What PB does *not* give: confidentiality or integrity after login.  A TCP
connection is plain text, and whoever can inject into it can use the logged-in
session.  Across a network, use a TLS endpoint (``ssl:...`` on the server,
``tls:...`` in :func:`imgserver.client.connect`) or a tunnel.

Bounded cost per connection
---------------------------
* At most ``settings.max_connections`` PB connections (counted apart from
  HTTP's); beyond it a new one is closed at once.
* A connection must log in within ``settings.header_timeout`` seconds, may
  fail :data:`MAX_LOGIN_FAILURES` times and make
  :data:`MAX_CALLS_BEFORE_LOGIN` calls before it is logged in; then it is
  dropped.
* Answers wait for the client to read the previous ones: when more than the
  transport's buffer (64 KiB) waits to be sent, the connection stops reading
  further calls and the large answers already decided wait their turn, so a
  client that does not read holds at most about one answer of memory
  (:func:`max_answer_bytes`) beyond 64 KiB; if its unread answers stay over
  that buffer for ``settings.send_timeout`` seconds, it is dropped.
* At most :data:`MAX_CALLS_PER_CONNECTION` service calls in progress per
  connection, :data:`MAX_HELD_PER_CONNECTION` paged results held per
  connection and :data:`MAX_HELD_BYTES` for all of them; beyond: Overloaded.

Large results and the other PB specifics
----------------------------------------
* **No call can leave its client waiting.**  Banana refuses strings over
  ``banana.SIZE_LIMIT`` (640 KiB); when a Deferred answer is over it, the
  broker logs the error and never answers.  ``thumbnail`` therefore measures
  its result against the live limit (minus :data:`HEADROOM`) and answers
  :class:`~imgserver.errors.TooLarge` instead.
* **Large results are paged by a pull protocol.**  ``thumbnail_begin`` runs the
  transform and answers its first page with the size and type; when more is
  left it keeps the result under a token for ``read(token, offset, length)``
  (and ``release(token)``).  Tokens belong to the avatar (the login) that made
  them: another client gets NotFound for them, and they are dropped when their
  connection goes.  Results nobody reads expire after ``result_ttl`` seconds.
  ``twisted.spread.util.StringPager`` was not chosen: it pushes pages as
  one-way calls and its ``getAllPages`` ignores the failure of the call that
  starts it (a hang on NotFound).
* **A call is bounded in time** (``settings.timeout``: its service work is
  cancelled and the client gets Timeout) and **dies with its connection**
  (queued work leaves the service's queue).
* **Errors**: expected ones are :class:`~imgserver.errors.ImageServerError`
  (``pb.Error``) subclasses and :class:`UnauthorizedLogin`, sent without a
  traceback (a refused login is one info line); the client sees ``pb.RemoteError`` whose
  ``remoteType`` names the class.  An Overloaded failure also carries
  ``retry_after`` as an attribute of the copied failure
  (:func:`imgserver.client.remote_error` puts it back on the exception).
  Anything else is logged here once and sent as a bare InternalError.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
import re
import secrets
from collections import deque
from typing import Any, Callable

from twisted.cred import checkers, credentials, portal
from twisted.cred import error as cred_error
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import banana, jelly, pb
from zope.interface import implementer

from . import paths
from .errors import (
    BadRequest,
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
    "USERNAME",
    "derive_password",
    "UnauthorizedLogin",
    "ExposedWithoutSecret",
    "SecretChecker",
    "ImageRealm",
    "ImagePerspective",
    "PBFrontEnd",
    "ImagePBFactory",
    "make_pb_factory",
    "make_portal",
    "listen_pb",
    "check_exposure",
    "endpoint_is_local",
    "is_local_address",
    "max_answer_bytes",
    "HEADROOM",
    "DEFAULT_PAGE_SIZE",
    "RESULT_TTL",
    "MAX_LOGIN_FAILURES",
    "MAX_CALLS_BEFORE_LOGIN",
    "MAX_CALLS_PER_CONNECTION",
]

#: The one user name of a server with a secret.
USERNAME = b"imgserver"
#: What the PB password is an HMAC of: keeps it apart from URL signatures.
PASSWORD_LABEL = b"imgserver-pb"
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
#: Failed logins after which a connection is dropped.
MAX_LOGIN_FAILURES = 3
#: Calls a connection may make before it is logged in (a login takes two).
MAX_CALLS_BEFORE_LOGIN = 16
#: Service calls (thumbnail, thumbnail_begin, info) one connection may have in progress.
MAX_CALLS_PER_CONNECTION = 16


def derive_password(secret: bytes | str) -> bytes:
    """The PB password of a server whose secret is ``secret``: hex HMAC-SHA256."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hmac.new(bytes(secret), PASSWORD_LABEL, hashlib.sha256).hexdigest().encode("ascii")


class UnauthorizedLogin(pb.Error, cred_error.UnauthorizedLogin):
    """Login refused, or a call made before logging in.

    A ``pb.Error`` (so the server sends it without a traceback or a log line)
    and a ``twisted.cred.error.UnauthorizedLogin`` (so ``except
    UnauthorizedLogin`` from cred catches it once the client turned it back
    into this class).
    """

    def __init__(self, message: str = "login refused") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ExposedWithoutSecret(ValueError):
    """PB asked to listen beyond loopback while the server has no secret."""


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


def checked_path(path: Any) -> str:
    """A PB path argument as the service takes it: checked, '/'-joined, never decoded.

    Text, or UTF-8 bytes; ``%`` is an ordinary character (``100%.png`` is that file).
    """
    if isinstance(path, (bytes, bytearray)):
        try:
            path = bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path is not valid UTF-8") from None
    if not isinstance(path, str):
        raise BadRequest("path must be text")
    return paths.join(paths.split_decoded(path))


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _check_call(method: Callable[..., Any], args: Any, kw: Any) -> None:
    """BadRequest when ``method`` cannot be called with these arguments."""
    function = getattr(method, "__func__", method)
    signature = _SIGNATURES.get(function)
    if signature is None:
        signature = _SIGNATURES[function] = inspect.signature(method)
    try:
        signature.bind(*args, **kw)
    except TypeError:
        raise BadRequest(f"wrong arguments for {method.__name__.split('_', 1)[-1]}") from None


_log = Logger()


class _ConnectionGone(pb.Error):
    """The answer to a call whose client disconnected: nobody receives it."""


# -- cred: checker, realm, portal ---------------------------------------------------


@implementer(checkers.ICredentialsChecker)
class SecretChecker:
    """Accepts :data:`USERNAME` with :func:`derive_password` of the secret.

    Checks PB's challenge/response (``IUsernameHashedPassword``) and, for
    callers in the same process, plain ``IUsernamePassword`` (compared in
    constant time).
    """

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, secret: bytes | str) -> None:
        self._password = derive_password(secret)

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes]:
        username = creds.username
        if isinstance(username, str):
            username = username.encode("utf-8")
        if username != USERNAME:
            return defer.fail(cred_error.UnauthorizedLogin())
        if isinstance(creds, credentials.UsernamePassword):
            password = creds.password
            if isinstance(password, str):
                password = password.encode("utf-8")
            ok: Any = isinstance(password, bytes) and hmac.compare_digest(password, self._password)
        else:
            ok = creds.checkPassword(self._password)

        def decided(match: Any) -> bytes:
            if not match:
                raise cred_error.UnauthorizedLogin()
            return USERNAME

        return defer.maybeDeferred(lambda: ok).addCallback(decided)


@implementer(portal.IRealm)
class ImageRealm:
    """Gives each login its own :class:`ImagePerspective` over the shared front end."""

    def __init__(self, front: PBFrontEnd) -> None:
        self.front = front

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("imgserver's realm only gives PB perspectives")
        avatar = ImagePerspective(self.front, avatar_id)
        return pb.IPerspective, avatar, avatar.logout


def make_portal(front: PBFrontEnd, secret: bytes | None) -> portal.Portal:
    """The portal: the secret's checker, or anonymous access when there is no secret."""
    checker: Any = SecretChecker(secret) if secret is not None else checkers.AllowAnonymousAccess()
    return portal.Portal(ImageRealm(front), [checker])


# -- one connection -------------------------------------------------------------------


@implementer(IPushProducer)
class _Link:
    """One PB connection: its login state, deadlines and write back-pressure.

    Registered as the transport's streaming producer, so the transport tells
    it when more than its buffer waits to be sent (``pauseProducing``) and
    when that drained (``resumeProducing``).  Meanwhile it stops reading the
    connection and holds large answers in :meth:`writable`'s queue.
    """

    log = Logger()

    def __init__(self, front: PBFrontEnd, broker: pb.Broker) -> None:
        self.front = front
        self.broker = broker
        self.avatar: ImagePerspective | None = None
        self.reference: pb.AsReferenceable | None = None
        self.failures = 0
        self.calls_before_login = 0
        self.paused = False
        self.closed = False
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._login_timer: IDelayedCall | None = None
        self._send_timer: IDelayedCall | None = None
        self._producing = False

    @property
    def peer(self) -> str:
        transport = getattr(self.broker, "transport", None)
        try:
            return str(transport.getPeer())
        except Exception:  # noqa: BLE001 - only for log lines
            return "?"

    # -- life --
    def made(self) -> None:
        reactor = self.front.reactor
        settings = self.front.service.settings
        self._login_timer = reactor.callLater(settings.header_timeout, self._login_expired)
        transport = self.broker.transport
        try:
            transport.registerProducer(self, True)
            self._producing = True
        except Exception:  # noqa: BLE001 - a transport without producers: no back-pressure
            self._producing = False

    def lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.front.links.discard(self)
        for timer in (self._login_timer, self._send_timer):
            if timer is not None and timer.active():
                timer.cancel()
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(_ConnectionGone("the client disconnected"))

    def close(self, abort: bool = False) -> None:
        """Close the connection (its answers already written go first unless ``abort``)."""
        transport = self.broker.transport
        if transport is None or self.closed:
            return
        if self._producing:
            # A transport with a registered producer waits for it to go before closing.
            self._producing = False
            transport.unregisterProducer()
        if abort and hasattr(transport, "abortConnection"):
            transport.abortConnection()
        else:
            transport.loseConnection()

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.avatar is None and not self.closed:
            self.front.counts["login_timeouts"] += 1
            self.log.info("PB connection from {peer} did not log in in time: dropped",
                          peer=self.peer)
            self.close(abort=True)

    def _send_expired(self) -> None:
        self._send_timer = None
        if self.paused and not self.closed:
            self.front.counts["send_timeouts"] += 1
            self.log.info("PB client {peer} stopped reading its answers: dropped", peer=self.peer)
            self.close(abort=True)

    # -- login --
    def count_call_before_login(self) -> None:
        """UnauthorizedLogin (and the connection closed) past MAX_CALLS_BEFORE_LOGIN."""
        if self.avatar is not None:
            return
        self.calls_before_login += 1
        if self.calls_before_login > MAX_CALLS_BEFORE_LOGIN:
            if self.calls_before_login == MAX_CALLS_BEFORE_LOGIN + 1:
                self.front.reactor.callLater(0, self.close)  # after this answer
            raise UnauthorizedLogin("too many calls before logging in")

    def logged_in(self, avatar: ImagePerspective, logout: Callable[[], None]) -> pb.AsReferenceable:
        if self.reference is not None:  # a second login on this connection: the same session
            logout()
            return self.reference
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        self.avatar = avatar
        avatar.link = self
        self.reference = pb.AsReferenceable(avatar, "perspective")
        self.broker.notifyOnDisconnect(logout)
        if self.closed:  # lost while the login was being checked
            logout()
        return self.reference

    # -- back-pressure --
    def writable(self) -> defer.Deferred[None]:
        """Fires when a large answer may be written (at once unless the client lags)."""
        if self.closed:
            return defer.fail(_ConnectionGone("the client disconnected"))
        if not self.paused and not self._waiters:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._forget(d))
        self._waiters.append(d)
        return d

    def _forget(self, d: defer.Deferred[None]) -> None:
        try:
            self._waiters.remove(d)
        except ValueError:
            pass

    def pauseProducing(self) -> None:
        if self.paused or self.closed:
            return
        self.paused = True
        transport = self.broker.transport
        if transport is not None and hasattr(transport, "pauseProducing"):
            transport.pauseProducing()  # read no further calls until it reads our answers
        self._send_timer = self.front.reactor.callLater(
            self.front.service.settings.send_timeout, self._send_expired)

    def resumeProducing(self) -> None:
        if not self.paused or self.closed:
            return
        self.paused = False
        if self._send_timer is not None and self._send_timer.active():
            self._send_timer.cancel()
        self._send_timer = None
        # One waiting answer at a time: each may fill the buffer (and pause) again.
        while self._waiters and not self.paused and not self.closed:
            self._waiters.popleft().callback(None)
        transport = self.broker.transport
        if not self.paused and not self.closed and transport is not None \
                and hasattr(transport, "resumeProducing"):
            transport.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away; :meth:`lost` follows."""


class _Broker(pb.Broker):
    """A server broker that tells its :class:`_Link` when it connects and disconnects."""

    link: _Link

    def connectionMade(self) -> None:
        super().connectionMade()
        self.link.made()

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.link.lost()


@implementer(credentials.IUsernameHashedPassword)
class _Challenger(pb.Referenceable):
    """Checks one answer to one login challenge (``IUsernameHashedPassword``)."""

    def __init__(self, login: _Login, username: Any, challenge: bytes) -> None:
        self.login = login
        self.username = username
        self.challenge = challenge
        self.response: bytes | None = None

    def remoteMessageReceived(self, broker: pb.Broker, message: Any, args: Any, kw: Any) -> Any:
        self.login.link.count_call_before_login()
        return _guarded(super().remoteMessageReceived, broker, message, args, kw,
                        pb.Referenceable.remoteMessageReceived)

    def remote_respond(self, response: Any, mind: Any = None) -> defer.Deferred[Any]:
        if self.response is not None:
            raise UnauthorizedLogin("this challenge was already answered: call login again")
        if not isinstance(response, bytes):
            response = b""
        self.response = response
        return self.login.authenticate(self)

    def checkPassword(self, password: bytes) -> bool:
        return self.response is not None and hmac.compare_digest(
            self.response, pb.respond(self.challenge, password))


class _Login(pb.Referenceable):
    """A connection's root before login: ``login``/``respond`` or ``loginAnonymous``.

    The same two methods as Twisted's own portal root, so ``PBClientFactory.login``
    works unchanged; every other call is refused with "log in first".
    """

    log = Logger()

    def __init__(self, link: _Link) -> None:
        self.link = link

    def remoteMessageReceived(self, broker: pb.Broker, message: Any, args: Any, kw: Any) -> Any:
        self.link.count_call_before_login()
        return _guarded(super().remoteMessageReceived, broker, message, args, kw,
                        pb.Referenceable.remoteMessageReceived, not_logged_in=True)

    def remote_login(self, username: Any) -> tuple[bytes, _Challenger]:
        challenge = secrets.token_bytes(16)
        return challenge, _Challenger(self, username, challenge)

    def remote_loginAnonymous(self, mind: Any = None) -> defer.Deferred[Any]:
        return self.authenticate(credentials.Anonymous())

    def authenticate(self, creds: Any) -> defer.Deferred[Any]:
        link = self.link
        front = link.front
        if link.failures >= MAX_LOGIN_FAILURES:
            return defer.fail(UnauthorizedLogin("too many failed logins"))
        d = front.portal.login(creds, None, pb.IPerspective)

        def accepted(result: tuple[Any, ImagePerspective, Callable[[], None]]) -> Any:
            _interface, avatar, logout = result
            front.counts["logins"] += 1
            return link.logged_in(avatar, logout)

        def refused(failure: Failure) -> Failure:
            if not failure.check(cred_error.LoginFailed):
                front.counts["internal_errors"] += 1
                self.log.failure("unexpected error in PB login", failure)
                return Failure(InternalError())
            link.failures += 1
            front.counts["login_failures"] += 1
            self.log.info("PB login refused for {peer}", peer=link.peer)
            if failure.check(cred_error.UnhandledCredentials):
                if front.secret is None:
                    message = "this server has no secret: log in anonymously (connect without one)"
                else:
                    message = "this server requires a login with its secret"
            else:
                message = "login refused: wrong credentials"
            if link.failures >= MAX_LOGIN_FAILURES:
                # After this answer is written; then the connection goes.
                front.reactor.callLater(0, link.close)
            return Failure(UnauthorizedLogin(message))

        return d.addCallbacks(accepted, refused)


def _guarded(dispatch: Callable[..., Any], broker: pb.Broker, message: Any, args: Any, kw: Any,
             dispatch_function: Any, not_logged_in: bool = False) -> Any:
    """Run a Referenceable's dispatch, turning what clients can cause into pb.Errors.

    Unknown methods and wrong arguments would otherwise be logged with a
    traceback for every attempt (the broker logs any non-``pb.Error``).
    """
    name = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    try:
        return dispatch(broker, message, args, kw)
    except pb.Error:
        raise
    except pb.NoSuchMethod:
        if not_logged_in:
            raise UnauthorizedLogin("not logged in: log in first (imgserver.client.connect)") \
                from None
        raise BadRequest(f"no such method: {name}") from None
    except jelly.InsecureJelly:
        raise BadRequest("arguments of a type this server does not accept") from None
    except Exception as e:
        if isinstance(e, TypeError) and _raised_by_call(e, dispatch_function):
            raise BadRequest(f"wrong arguments for {name}") from None
        _log.failure("unexpected error in PB call {method}", Failure(), method=name)
        raise InternalError() from None


def _raised_by_call(e: BaseException, function: Any) -> bool:
    """Whether ``e`` came from calling a method in ``function`` (a bad signature), not inside it."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is function.__code__


# -- the avatar ----------------------------------------------------------------------------


class _Held:
    """A paged result waiting to be read, and its expiry timer."""

    __slots__ = ("body", "expiry")

    def __init__(self, body: bytes, expiry: IDelayedCall) -> None:
        self.body = body
        self.expiry = expiry


class ImagePerspective(pb.Avatar):
    """One login: ``thumbnail``, ``thumbnail_begin``/``read``/``release``, ``info``, ``stats``.

    Holds that login's calls in progress (cancelled when it logs out, i.e.
    when its connection goes) and its paged results (readable only through
    it, dropped at logout).  Called directly (not over PB) it works the same,
    without back-pressure.
    """

    log = Logger()

    def __init__(self, front: PBFrontEnd, avatar_id: Any = None) -> None:
        self.front = front
        self.avatar_id = avatar_id
        self.link: _Link | None = None
        self.pending: set[defer.Deferred[Any]] = set()
        self.held: dict[str, _Held] = {}
        self.closed = False
        front.avatars.add(self)

    # -- dispatch ------------------------------------------------------
    def perspectiveMessageReceived(self, broker: pb.Broker, message: Any, args: Any,
                                   kw: Any) -> Any:
        """As ``pb.Avatar``'s, with every client-caused failure a ``pb.Error``.

        Unknown methods and wrong arguments are BadRequest; an Overloaded
        raised at once still carries ``retry_after``; an unexpected exception
        is logged here once and sent as a bare InternalError.
        """
        name = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        try:
            try:
                args = broker.unserialize(args, self)
                kw = broker.unserialize(kw, self)
            except Exception:
                raise BadRequest("arguments of a type this server does not accept") from None
            method = getattr(self, f"perspective_{name}", None)
            if method is None:
                raise BadRequest(f"no such method: {name}")
            _check_call(method, args, kw)
            state = method(*args, **kw)
        except Overloaded as e:
            state = defer.fail(_overloaded_failure(e))
        except pb.Error:
            raise
        except Exception:
            self.front.counts["internal_errors"] += 1
            self.log.failure("unexpected error in PB call {method}", Failure(), method=name)
            raise InternalError() from None
        return broker.serialize(state, self, method, args, kw)

    def logout(self) -> None:
        """The login is over (its connection went): cancel its calls, drop its results."""
        if self.closed:
            return
        self.closed = True
        self.front.avatars.discard(self)
        for work in list(self.pending):
            work.cancel()
        for token in list(self.held):
            self.drop(token)

    # -- remote methods ---------------------------------------------------
    def perspective_thumbnail(
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

    def perspective_thumbnail_begin(
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

        def start() -> defer.Deferred[Result]:
            _positive_int("page_size", page_size)
            if len(self.held) >= self.front.max_held:
                raise self.front.overloaded(
                    f"{len(self.held)} results already wait to be read on this connection; "
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
                "format": getattr(result, "format", None),
                "data": body[:first],
            }

        return self._call("thumbnail_begin", start, answer)

    def perspective_read(self, token: str, offset: int, length: int) -> defer.Deferred[bytes]:
        """Up to ``length`` bytes of a held result from ``offset``; empty at the end.

        Reading the last byte releases the result; each read restarts its expiry.
        """
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BadRequest("offset must be a whole number >= 0")
        _positive_int("length", length)
        held = self._held(token)
        if offset > len(held.body):
            raise BadRequest(f"offset {offset} is past the end ({len(held.body)} bytes)")
        held.expiry.reset(self.front.result_ttl)

        def page(_: Any) -> bytes:
            held = self._held(token)  # it may have expired or been released meanwhile
            size = len(held.body)
            end = offset + min(length, max_answer_bytes())
            chunk = held.body[offset:end]
            if end >= size:
                self.drop(token)
            else:
                held.expiry.reset(self.front.result_ttl)
            return chunk

        return self._writable().addCallback(page)

    def perspective_release(self, token: str) -> bool:
        """Forget a held result (a client that stops reading); False if it was not held."""
        return isinstance(token, str) and self.drop(token)

    def perspective_info(self, path: str | bytes) -> defer.Deferred[dict[str, Any]]:
        """Width, height (as displayed), format, mode, bytes and orientation of an image."""
        return self._call("info", lambda: self.front.service.info(checked_path(path)), _plain)

    def perspective_stats(self) -> dict[str, Any]:
        """The service's counters plus this PB front end's (connections, held results)."""
        return self.front.stats()

    # -- plumbing ---------------------------------------------------------
    def _held(self, token: Any) -> _Held:
        held = self.held.get(token) if isinstance(token, str) else None
        if held is None:
            raise NotFound("no such result: expired, released or already read")
        return held

    def drop(self, token: str) -> bool:
        held = self.held.pop(token, None)
        if held is None:
            return False
        if held.expiry.active():
            held.expiry.cancel()
        self.front.held_bytes -= len(held.body)
        return True

    def _writable(self) -> defer.Deferred[None]:
        if self.link is None:
            return defer.succeed(None)
        return self.link.writable()

    def _transform(self, path: Any, width: Any, height: Any, fit: Any, fmt: Any,
                   quality: Any) -> defer.Deferred[Result]:
        path = checked_path(path)
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
        settings = self.front.service.settings
        spec = parse_transform(
            args, max_dimension=settings.max_dimension, default_quality=settings.default_quality
        )
        if spec is None:  # nothing asked: re-encode in the source's format
            spec = TransformSpec(quality=settings.default_quality)
        return self.front.service.transform(path, spec)

    def _hold(self, body: bytes) -> str:
        front = self.front
        if len(self.held) >= front.max_held:  # checked at the start too, but calls overlap
            raise front.overloaded(
                f"{len(self.held)} results already wait to be read on this connection; "
                "read or release them"
            )
        if front.held_bytes + len(body) > front.max_held_bytes:
            raise front.overloaded("too many paged results wait to be read; try again shortly")
        token = secrets.token_urlsafe(16)
        self.held[token] = _Held(body, front.reactor.callLater(front.result_ttl, self.drop, token))
        front.held_bytes += len(body)
        return token

    def _call(self, name: str, start: Callable[[], defer.Deferred[Any]],
              answer: Callable[[Any], Any]) -> defer.Deferred[Any]:
        """Run ``start()`` bounded by the timeout and the connection; map its outcome."""
        front = self.front
        front.counts["calls"] += 1
        timeout = front.service.settings.timeout
        try:
            if self.closed:
                raise _ConnectionGone("logged out")
            if len(self.pending) >= front.max_calls:
                raise front.overloaded(
                    f"{len(self.pending)} calls already in progress on this connection")
            work = start()
        except Exception:
            work = defer.fail()

        def timed_out(result: Any, seconds: float) -> Any:
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                front.counts["timeouts"] += 1
                raise Timeout(f"no result within {seconds:g} s")
            return result

        def settled(result: Any) -> Any:
            self.pending.discard(work)
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(Overloaded):
                return _overloaded_failure(failure.value)
            if failure.check(pb.Error):
                return failure
            if self.closed and failure.check(defer.CancelledError):
                front.counts["cancelled"] += 1
                return Failure(_ConnectionGone("the client disconnected"))
            front.counts["internal_errors"] += 1
            self.log.failure("unexpected error in PB call {method}", failure, method=name)
            return Failure(InternalError())

        if not work.called:
            self.pending.add(work)
            work.addTimeout(timeout, front.reactor, onTimeoutCancel=timed_out)
            work.addBoth(settled)
        # A large answer waits until the client read the previous ones.
        work.addCallback(lambda result: self._writable().addCallback(lambda _: result))
        work.addCallback(answer)
        work.addErrback(failed)
        return work


def _overloaded_failure(error: BaseException) -> Failure:
    """A Failure for an Overloaded error that keeps ``retry_after`` on the wire.

    PB copies a Failure's attributes (not the exception's) to the client's
    ``CopiedFailure``; :func:`imgserver.client.remote_error` reads it back.
    """
    failure = Failure(error)
    failure.retry_after = int(getattr(error, "retry_after", 1))
    return failure


# -- the front end and its factory ----------------------------------------------------------


@implementer(pb.IPBRoot)
class PBFrontEnd:
    """What all PB connections share: the service, limits, counters, the portal."""

    log = Logger()

    def __init__(
        self,
        service: ImageService,
        *,
        result_ttl: float = RESULT_TTL,
        max_held: int = MAX_HELD_PER_CONNECTION,
        max_held_bytes: int = MAX_HELD_BYTES,
        max_calls: int = MAX_CALLS_PER_CONNECTION,
        max_connections: int | None = None,
    ) -> None:
        self.service = service
        self.reactor = service.reactor
        self.secret: bytes | None = service.settings.secret
        self.result_ttl = result_ttl
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.max_calls = max_calls
        self.max_connections = (service.settings.max_connections if max_connections is None
                                else max_connections)
        self.portal = make_portal(self, self.secret)
        self.links: set[_Link] = set()
        self.avatars: set[ImagePerspective] = set()
        self.held_bytes = 0
        self.counts = {
            "calls": 0, "timeouts": 0, "cancelled": 0, "internal_errors": 0,
            "logins": 0, "login_failures": 0, "login_timeouts": 0, "send_timeouts": 0,
            "refused_connections": 0,
        }

    def rootObject(self, broker: pb.Broker) -> _Login:
        """A new connection's root: it can only log in."""
        link = _Link(self, broker)
        broker.link = link
        self.links.add(link)
        return _Login(link)

    def retry_after(self) -> int:
        estimate = getattr(self.service, "retry_after", None)
        if callable(estimate):
            try:
                return max(1, int(estimate()))
            except Exception:  # noqa: BLE001 - an estimate, never a reason to fail
                pass
        return 1

    def overloaded(self, message: str) -> Overloaded:
        return Overloaded(message, retry_after=self.retry_after())

    def pb_stats(self) -> dict[str, Any]:
        """This PB front end's counters: connections, logins, calls, held results."""
        return {
            "connections": len(self.links),
            "sessions": len(self.avatars),
            "pending_calls": sum(len(a.pending) for a in self.avatars),
            "held_results": sum(len(a.held) for a in self.avatars),
            "held_bytes": self.held_bytes,
            "authenticated": self.secret is not None,
            **self.counts,
        }

    def stats(self) -> dict[str, Any]:
        """The service's counters plus this PB front end's (under ``"pb"``)."""
        stats = dict(self.service.stats())
        stats["pb"] = self.pb_stats()
        return _plain(stats)


class ImagePBFactory(pb.PBServerFactory):
    """PB server factory: a :class:`_Login` root per connection, a connection cap."""

    protocol = _Broker

    def __init__(self, front: PBFrontEnd) -> None:
        super().__init__(front)
        self.front = front

    def buildProtocol(self, addr: Any) -> pb.Broker | None:
        if len(self.front.links) >= self.front.max_connections:
            self.front.counts["refused_connections"] += 1
            return None  # the port closes the connection at once
        return super().buildProtocol(addr)


def make_pb_factory(service: ImageService, **options: Any) -> ImagePBFactory:
    """A PB server factory for ``service`` (``options`` go to :class:`PBFrontEnd`)."""
    return ImagePBFactory(PBFrontEnd(service, **options))


def is_local_address(address: Any) -> bool:
    """Whether a listening address is reachable only from this machine (loopback, UNIX)."""
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) is not None  # a UNIX socket
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def endpoint_is_local(description: str) -> bool | None:
    """Whether a server endpoint string listens only for this machine, from the string alone.

    True for ``unix:`` and for ``tcp``/``tcp6``/``ssl`` with a loopback
    ``interface=``; False for those kinds without one (every interface) or
    with another address; None for kinds it cannot tell (:func:`listen_pb`
    checks the bound address in every case).
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind = parts[0].strip().lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    interface = ""
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "interface":
            interface = value
    if not interface:
        return False
    try:
        return ipaddress.ip_address(interface.split("%", 1)[0]).is_loopback
    except ValueError:
        return interface.lower() == "localhost"


def check_exposure(description: str, secret: bytes | None) -> None:
    """ExposedWithoutSecret when ``description`` is clearly not loopback and there is no secret.

    For start-up (option parsing), before anything listens; :func:`listen_pb`
    also checks the address actually bound.
    """
    if secret is None and endpoint_is_local(description) is False:
        raise ExposedWithoutSecret(_exposed_message(description))


def _exposed_message(description: str) -> str:
    return (
        f"refusing to serve Perspective Broker on {description!r} without a secret: "
        "anyone who can reach it could use it. Bind it to 127.0.0.1 "
        "(tcp:8789:interface=127.0.0.1), or give a secret (--secret-file or "
        "IMGSERVER_SECRET) so that clients must log in."
    )


async def listen_pb(reactor: Any, description: str, service: ImageService,
                    **options: Any) -> Any:
    """Listen for PB on endpoint ``description``; the listening port.

    Without a secret, only a loopback address or a UNIX socket is allowed:
    anything else is closed again at once and :class:`ExposedWithoutSecret`
    raised (nothing was accepted in between).
    """
    factory = make_pb_factory(service, **options)
    port = await endpoints.serverFromString(reactor, description).listen(factory)
    address = port.getHost()
    if service.settings.secret is None and not is_local_address(address):
        await port.stopListening()
        raise ExposedWithoutSecret(_exposed_message(description))
    return port
