"""Perspective Broker authentication and per-connection bounds, against real PB servers.

Logging in through ``twisted.cred`` (credentials derived from the server's
secret, challenge/response), anonymous access only without a secret and only
on loopback, paged results owned by their login, write back-pressure, login
deadlines and the connection cap.  The servers listen on 127.0.0.1; the log
capture (``server_log``, from test_img_pb) fails a test whose server logs an
error it did not expect, so "no traceback for expected errors" is checked by
every test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from img_helpers import encode, noisy
from PIL import Image
from test_img_pb import (  # noqa: F401 - fixtures used by name
    BIG,
    Env,
    decoded,
    env,
    eventually,
    gate,
    image_root,
    remote_failure,
    server_log,
)
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin as CredUnauthorizedLogin
from twisted.internet import defer, endpoints, protocol
from twisted.protocols import policies
from twisted.spread import pb

from imgserver import cli, errors, twistd
from imgserver import pb as imgpb
from imgserver.client import connect
from imgserver.service import ImageService
from imgserver.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef-the-pb-test-secret"
OTHER = b"fedcba9876543210-not-the-secret!!"


def _reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture(autouse=True)
def no_secret_from_environment(monkeypatch):
    monkeypatch.delenv("IMGSERVER_SECRET", raising=False)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> str:
    """The issue's ``a.jpg`` (small), a big noisy PNG, and names with ``%`` in them."""
    root = tmp_path_factory.mktemp("pb-auth-root")
    (root / "a.jpg").write_bytes(encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG"))
    (root / BIG).write_bytes(encode(noisy((1000, 1000)), "PNG"))
    return str(root)


def secured(root: str | None = None, **settings: Any) -> Settings:
    return Settings(root=root, workers=2, secret=SECRET, **settings)


async def raw_root(server: Any) -> tuple[pb.PBClientFactory, pb.Broker, pb.RemoteReference]:
    """A bare PB connection's root (before any login)."""
    factory = pb.PBClientFactory()
    endpoint = endpoints.clientFromString(_reactor(), server.endpoint)
    broker = await endpoint.connect(factory)
    return factory, broker, await factory.getRootObject()


async def raw_connection(env: Env, server: Any) -> tuple[pb.PBClientFactory, pb.Broker,
                                                         pb.RemoteReference]:
    factory, broker, root = await raw_root(server)
    env.brokers.append(broker)
    return factory, broker, root


async def lost(broker: pb.Broker) -> None:
    """Until ``broker``'s connection is closed."""
    if broker.disconnected:
        return
    d: defer.Deferred[None] = defer.Deferred()
    broker.notifyOnDisconnect(lambda: d.called or d.callback(None))
    await d.addTimeout(10, _reactor())


def remote_type(e: BaseException) -> bytes:
    assert isinstance(e, pb.RemoteError), repr(e)
    return e.remoteType


# -- credentials ----------------------------------------------------------------------


def test_password_is_derived_from_the_secret():
    password = imgpb.derive_password(SECRET)
    assert len(password) == 64 and int(password, 16) >= 0  # hex HMAC-SHA256
    assert password == imgpb.derive_password(SECRET.decode())
    assert password != imgpb.derive_password(OTHER)
    assert SECRET not in password
    assert imgpb.USERNAME == b"imgserver"


def test_default_endpoints_are_loopback():
    assert cli.DEFAULT_PB == "tcp:8789:interface=127.0.0.1"
    assert cli.build_parser().parse_args([]).pb == cli.DEFAULT_PB
    options = twistd.Options()
    options.parseOptions([])
    assert options["pb"] == cli.DEFAULT_PB


@pytest_twisted.ensureDeferred
async def test_right_secret_logs_in_and_every_method_works(env, server_log):
    server = env.serve(secured())
    for secret in (SECRET, SECRET.decode()):  # bytes or text, as the settings take it
        client = await env.client(server, secret=secret)
        assert decoded(await client.thumbnail("photo.jpg", 64)).size == (64, 43)
        assert (await client.info("photo.jpg"))["width"] == 1600
        body = await client.thumbnail("photo.jpg", fmt="png")  # paged: begin + read
        assert decoded(body).size == (1600, 1067)
        stats = await client.stats()
        assert stats["pb"]["authenticated"] is True
    assert server.pb_stats()["logins"] == 2
    assert server.pb_stats()["sessions"] == 2
    assert server.pb_stats()["login_failures"] == 0


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_and_nothing_is_callable(env, server_log, monkeypatch):
    server = env.serve(secured())
    reached = []
    for name in ("transform", "info"):
        real = getattr(server.service, name)
        monkeypatch.setattr(server.service, name,
                            lambda *a, real=real, name=name: reached.append(name) or real(*a))

    # The client helper: UnauthorizedLogin (imgserver's, also cred's), and its connection closed.
    e = await remote_failure(connect(_reactor(), server.endpoint, secret=OTHER))
    assert isinstance(e, imgpb.UnauthorizedLogin) and isinstance(e, CredUnauthorizedLogin), e
    assert "wrong credentials" in str(e)
    # Without a secret: anonymous logins are refused where a secret is set.
    e = await remote_failure(connect(_reactor(), server.endpoint))
    assert isinstance(e, imgpb.UnauthorizedLogin), e
    assert "requires a login" in str(e)
    await eventually(lambda: server.pb_stats()["connections"] == 0)

    # A bare PB client: the standard login, refused as a RemoteError naming the class.
    factory, broker, root = await raw_connection(env, server)
    refused = await remote_failure(
        factory.login(credentials.UsernamePassword(imgpb.USERNAME, imgpb.derive_password(OTHER))))
    assert remote_type(refused) == b"imgserver.pb.UnauthorizedLogin"
    refused = await remote_failure(factory.login(credentials.UsernamePassword(
        b"admin", imgpb.derive_password(SECRET))))  # the right password, the wrong user
    assert remote_type(refused) == b"imgserver.pb.UnauthorizedLogin"
    # The root itself offers nothing but logging in: the issue's unsigned call is refused.
    for call in (("thumbnail", "a.jpg", 7000, 7000, "scale", "png"),
                 ("thumbnail_begin", "photo.jpg", 100), ("read", "x", 0, 10),
                 ("info", "photo.jpg"), ("stats",)):
        e = await remote_failure(root.callRemote(*call))
        assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin", call
        assert "log in first" in e.args[0]
    assert reached == []  # the service was never asked
    stats = server.pb_stats()
    assert stats["logins"] == 0 and stats["sessions"] == 0
    assert stats["login_failures"] == 4
    assert server_log.errors() == []  # refusals are not tracebacks


@pytest_twisted.ensureDeferred
async def test_the_password_never_crosses_the_wire(env):
    """PB's challenge/response: neither the secret nor the derived password is sent."""
    received: list[bytes] = []

    class Recorder(policies.ProtocolWrapper):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)
            super().dataReceived(data)

    server = env.serve(secured())
    wrapper = policies.WrappingFactory(server.factory)
    wrapper.protocol = Recorder
    port = _reactor().listenTCP(0, wrapper, interface="127.0.0.1")
    env.ports.append(port)
    client = await connect(_reactor(), f"tcp:127.0.0.1:{port.getHost().port}", secret=SECRET)
    env.brokers.append(client.broker)
    assert (await client.info("logo.png"))["format"] == "png"
    wire = b"".join(received)
    assert b"respond" in wire and imgpb.USERNAME in wire  # the login went through here
    for secret in (SECRET, imgpb.derive_password(SECRET)):
        assert secret not in wire


@pytest_twisted.ensureDeferred
async def test_a_challenge_is_fresh_and_answered_once(env, server_log):
    server = env.serve(secured())
    _factory, _broker, root = await raw_connection(env, server)
    challenge, challenger = await root.callRemote("login", imgpb.USERNAME)
    again, _ = await root.callRemote("login", imgpb.USERNAME)
    assert len(challenge) == 16 and challenge != again
    wrong = pb.respond(challenge, imgpb.derive_password(OTHER))
    e = await remote_failure(challenger.callRemote("respond", wrong, None))
    assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin"
    # The right answer comes too late: that challenge is spent.
    right = pb.respond(challenge, imgpb.derive_password(SECRET))
    e = await remote_failure(challenger.callRemote("respond", right, None))
    assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin" and "already" in e.args[0]
    # A fresh challenge with the right answer works, and gives this login's perspective.
    challenge, challenger = await root.callRemote("login", imgpb.USERNAME)
    perspective = await challenger.callRemote(
        "respond", pb.respond(challenge, imgpb.derive_password(SECRET)), None)
    assert (await perspective.callRemote("info", "logo.png"))["format"] == "png"
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_too_many_failed_logins_close_the_connection(env):
    server = env.serve(secured())
    factory, broker, _root = await raw_connection(env, server)
    bad = credentials.UsernamePassword(imgpb.USERNAME, b"guess")
    for _ in range(imgpb.MAX_LOGIN_FAILURES):
        e = await remote_failure(factory.login(bad))
        assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin"
    await lost(broker)
    assert server.pb_stats()["login_failures"] == imgpb.MAX_LOGIN_FAILURES


@pytest_twisted.ensureDeferred
async def test_too_many_calls_before_login_close_the_connection(env, server_log):
    server = env.serve(secured())
    _factory, broker, root = await raw_connection(env, server)
    for _ in range(imgpb.MAX_CALLS_BEFORE_LOGIN):
        e = await remote_failure(root.callRemote("stats"))
        assert "log in first" in e.args[0]
    e = await remote_failure(root.callRemote("stats"))
    assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin" and "too many" in e.args[0]
    await lost(broker)
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_a_connection_that_does_not_log_in_is_dropped(env):
    server = env.serve(secured(header_timeout=0.3))
    _factory, broker, _root = await raw_connection(env, server)
    await lost(broker)
    assert server.pb_stats()["login_timeouts"] == 1
    # One that logs in stays: still there after a later silent connection's deadline passed.
    client = await env.client(server, secret=SECRET)
    _factory, broker, _root = await raw_connection(env, server)
    await lost(broker)
    assert server.pb_stats()["login_timeouts"] == 2
    assert client.connected
    assert (await client.info("logo.png"))["format"] == "png"


# -- the issue's example: refused without login, bounded with it ------------------------


@pytest_twisted.ensureDeferred
async def test_issue_example_is_bounded_by_max_output_pixels_after_login(env, small_root,
                                                                        server_log):
    server = env.serve(secured(small_root))  # max_output_pixels: 25 MP by default
    _factory, _broker, root = await raw_connection(env, server)
    e = await remote_failure(root.callRemote("thumbnail", "a.jpg", 7000, 7000, "scale", "png"))
    assert remote_type(e) == b"imgserver.pb.UnauthorizedLogin"

    client = await env.client(server, secret=SECRET)
    e = await remote_failure(client.thumbnail("a.jpg", 7000, 7000, fit="scale", fmt="png"))
    assert type(e) is errors.TooLarge, e
    e = await remote_failure(client.root.callRemote("thumbnail_begin", "a.jpg", 7000, 7000,
                                                    "scale", "png"))
    assert remote_type(e) == b"imgserver.errors.TooLarge"
    # Within the bound it is served.
    assert decoded(await client.thumbnail("a.jpg", 640, 480, fit="scale", fmt="png")).size \
        == (640, 480)
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_max_output_pixels_setting_applies_to_pb(env, small_root):
    server = env.serve(secured(small_root, max_output_pixels=10_000))
    client = await env.client(server, secret=SECRET)
    assert type(await remote_failure(client.thumbnail("a.jpg", 200, 200, fit="scale"))) \
        is errors.TooLarge
    assert decoded(await client.thumbnail("a.jpg", 100, 100, fit="scale")).size == (100, 100)


# -- without a secret: anonymous, loopback only ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_a_secret_loopback_logs_in_anonymously(env, server_log):
    server = env.serve(Settings(workers=1))
    client = await env.client(server)
    assert (await client.stats())["pb"]["authenticated"] is False
    # A client that believes the server is protected finds out at once.
    e = await remote_failure(connect(_reactor(), server.endpoint, secret=SECRET))
    assert isinstance(e, imgpb.UnauthorizedLogin) and "no secret" in str(e)
    assert server_log.errors() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service(settings: Settings) -> ImageService:
    service = ImageService(settings, _reactor())
    service.start()
    return service


@pytest_twisted.ensureDeferred
async def test_without_a_secret_pb_refuses_to_listen_beyond_loopback(tmp_path):
    reactor = _reactor()
    service = _service(Settings(workers=1))
    try:
        port_number = _free_port()
        with pytest.raises(imgpb.ExposedWithoutSecret, match="without a secret"):
            await imgpb.listen_pb(reactor, f"tcp:{port_number}:interface=0.0.0.0", service)
        # Closed again: nothing listens there.
        probe = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port_number, timeout=5)
        e = await remote_failure(probe.connect(protocol.Factory.forProtocol(protocol.Protocol)))
        assert isinstance(e, Exception) and "refused" in str(e).lower(), e

        # Loopback and UNIX sockets are fine.
        for description in ("tcp:0:interface=127.0.0.1", f"unix:{tmp_path}/pb.sock"):
            port = await imgpb.listen_pb(reactor, description, service)
            try:
                if description.startswith("tcp"):
                    where = f"tcp:127.0.0.1:{port.getHost().port}"
                else:
                    where = f"unix:{tmp_path}/pb.sock"
                client = await connect(reactor, where)
                assert (await client.info("logo.png"))["format"] == "png"
                await client.disconnect()
            finally:
                await port.stopListening()
    finally:
        service.stop()


@pytest_twisted.ensureDeferred
async def test_with_a_secret_pb_may_listen_on_every_interface():
    reactor = _reactor()
    service = _service(secured())
    try:
        port = await imgpb.listen_pb(reactor, "tcp:0:interface=0.0.0.0", service)
        try:
            where = f"tcp:127.0.0.1:{port.getHost().port}"
            e = await remote_failure(connect(reactor, where))
            assert isinstance(e, imgpb.UnauthorizedLogin)
            client = await connect(reactor, where, secret=SECRET)
            assert (await client.info("logo.png"))["format"] == "png"
            await client.disconnect()
        finally:
            await port.stopListening()
    finally:
        service.stop()


def test_is_local_address():
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    assert imgpb.is_local_address(IPv4Address("TCP", "127.0.0.1", 1))
    assert imgpb.is_local_address(IPv4Address("TCP", "127.9.9.9", 1))
    assert imgpb.is_local_address(IPv6Address("TCP", "::1", 1))
    assert imgpb.is_local_address(UNIXAddress("/run/x.sock"))
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "not-an-ip"):
        assert not imgpb.is_local_address(IPv4Address("TCP", host, 1)), host


@pytest.mark.parametrize("command", [["-m", "imgserver.cli"], ["-m", "twisted", "imgserver"]])
def test_command_refuses_public_pb_without_a_secret(command):
    """The CLI and the twistd plugin exit at start-up, saying why, without a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "IMGSERVER_SECRET"}
    proc = subprocess.run(
        [sys.executable, *command, "--http", "none", "--pb", "tcp:0:interface=0.0.0.0",
         "--workers", "1"],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "without a secret" in out and "Traceback" not in out, out


# -- paged results belong to their login --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_belong_to_the_login_that_made_them(env, server_log):
    server = env.serve(secured())
    owner = await env.client(server, secret=SECRET)
    other = await env.client(server, secret=SECRET)
    head = await owner.root.callRemote("thumbnail_begin", "photo.jpg", 400, None, "clip", "png",
                                       None, 10_000)
    token = head["token"]
    assert token is not None
    for call in (("read", token, 10_000, 5_000), ("read", token, 0, 1)):
        e = await remote_failure(other.root.callRemote(*call))
        assert remote_type(e) == b"imgserver.errors.NotFound"
    assert await other.root.callRemote("release", token) is False
    # Still the owner's, whole.
    rest = await owner.root.callRemote("read", token, 10_000, head["size"])
    assert decoded(head["data"] + rest).size == (400, 267)
    assert server.pb_stats()["held_results"] == 0
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_tokens_are_released_when_their_client_disconnects(env):
    server = env.serve(secured())
    stays = await env.client(server, secret=SECRET)
    leaves = await env.client(server, secret=SECRET)
    kept = await stays.root.callRemote("thumbnail_begin", "photo.jpg", 500, None, "clip", "png",
                                       None, 10_000)
    for width in (300, 400):
        await leaves.root.callRemote("thumbnail_begin", "photo.jpg", width, None, "clip", "png",
                                     None, 10_000)
    assert server.pb_stats()["held_results"] == 3
    await leaves.disconnect()
    await eventually(lambda: server.pb_stats()["held_results"] == 1)
    assert server.pb_stats()["held_bytes"] == kept["size"]
    assert server.pb_stats()["sessions"] == 1
    assert await stays.root.callRemote("release", kept["token"]) is True
    assert server.pb_stats()["held_bytes"] == 0


# -- errors: the same types as HTTP, Overloaded with retry_after ----------------------------


@pytest.mark.parametrize("args, error", [
    (("missing.jpg", 10), errors.NotFound),
    (("../x.jpg", 10), errors.Forbidden),
    ((".hidden.jpg", 10), errors.Forbidden),
    (("a\\b.jpg", 10), errors.Forbidden),
    (("", 10), errors.NotFound),
    ((b"\xff.jpg", 10), errors.BadRequest),
    (("photo.jpg", 0), errors.BadRequest),
    (("photo.jpg", 9000), errors.BadRequest),  # over max_dimension, as over HTTP
    (("photo.jpg", 100, None, "zoom"), errors.BadRequest),
])
@pytest_twisted.ensureDeferred
async def test_errors_after_login_are_remote_errors_naming_the_class(env, server_log, args, error):
    server = env.serve(secured())
    client = await env.client(server, secret=SECRET)
    e = await remote_failure(client.root.callRemote("thumbnail", *args))
    assert remote_type(e) == f"imgserver.errors.{error.__name__}".encode(), e
    assert "Traceback" not in str(e.remoteTraceback or "").replace("Traceback unavailable", "")
    e = await remote_failure(client.thumbnail(*args))
    assert type(e) is error
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_overloaded_carries_retry_after(env, gate, server_log):
    server = env.serve(Settings(workers=1, max_queue=0, secret=SECRET))
    client = await env.client(server, secret=SECRET)
    other = await env.client(server, secret=SECRET)
    running = client.thumbnail("photo.jpg", 100)
    await eventually(lambda: gate.entered == 1)
    # The service's own refusal (heavy lane full), through the client helper...
    e = await remote_failure(other.thumbnail("photo.jpg", 120))
    assert type(e) is errors.Overloaded, e
    assert isinstance(e.retry_after, int) and e.retry_after >= 1
    # ... and to a bare client: RemoteError naming Overloaded, retry_after on the copied failure.
    e = await remote_failure(other.root.callRemote("thumbnail", "photo.jpg", 130))
    assert remote_type(e) == b"imgserver.errors.Overloaded"
    (failure,) = await other.root.callRemote("thumbnail", "photo.jpg", 130).addErrback(
        lambda f: (f,))
    assert isinstance(failure, pb.CopiedFailure), failure
    assert failure.type == b"imgserver.errors.Overloaded"
    assert isinstance(failure.retry_after, int) and failure.retry_after >= 1
    gate.open()
    assert decoded(await running).size == (100, 67)
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_per_connection_call_bound_keeps_retry_after(env, gate, monkeypatch):
    server = env.serve(Settings(workers=1, max_queue=10, secret=SECRET), max_calls=1)
    monkeypatch.setattr(server.service, "retry_after", lambda: 7, raising=False)
    client = await env.client(server, secret=SECRET)
    running = client.thumbnail("photo.jpg", 100)
    await eventually(lambda: gate.entered == 1)
    e = await remote_failure(client.thumbnail("photo.jpg", 120))
    assert type(e) is errors.Overloaded and e.retry_after == 7
    assert "in progress on this connection" in str(e)
    (failure,) = await client.root.callRemote("info", "photo.jpg").addErrback(lambda f: (f,))
    assert failure.type == b"imgserver.errors.Overloaded" and failure.retry_after == 7
    # Another connection is not bounded by this one's calls.
    other = await env.client(server, secret=SECRET)
    queued = other.thumbnail("photo.jpg", 130)
    gate.open()
    assert decoded(await running).size == (100, 67)
    assert decoded(await queued).size == (130, 87)


# -- bounded cost per connection -------------------------------------------------------------


def _buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds, not yet given to the kernel (test-only peek)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_held_back_then_dropped(env, image_root):
    server = env.serve(secured(image_root, send_timeout=1.0))
    factory, broker, _root = await raw_connection(env, server)
    perspective = await factory.login(
        credentials.UsernamePassword(imgpb.USERNAME, imgpb.derive_password(SECRET)))
    head = await perspective.callRemote("thumbnail_begin", BIG, None, None, "clip", "png", None,
                                        1000)
    size = head["size"]
    assert size > 2_000_000
    (link,) = server.front.links
    broker.transport.pauseProducing()  # the client stops reading
    page = imgpb.max_answer_bytes()
    reads = [perspective.callRemote("read", head["token"], 0, page).addErrback(lambda f: f.value)
             for _ in range(200)]  # 200 pages: ~128 MB if the server queued them all
    await eventually(lambda: link.paused)
    # Held back: at most one page beyond the transport's buffer, whatever was asked.
    assert _buffered(link.broker.transport) < page + 256 * 1024
    # And dropped once it accepted nothing for send_timeout; its result is released.
    await eventually(lambda: server.pb_stats()["send_timeouts"] == 1)
    await eventually(lambda: server.pb_stats()["connections"] == 0)
    assert server.pb_stats()["held_results"] == 0 and server.pb_stats()["held_bytes"] == 0
    broker.transport.resumeProducing()
    await lost(broker)
    outcomes = await defer.gatherResults(reads)
    assert sum(1 for o in outcomes if isinstance(o, bytes)) < 20


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_gets_every_page_in_order(env, image_root):
    """Back-pressure is not refusal: concurrent paged calls on one connection all complete."""
    server = env.serve(secured(image_root))
    client = await env.client(server, secret=SECRET)
    bodies = await defer.gatherResults(
        [client.thumbnail(BIG, fmt="png") for _ in range(3)]
        + [client.thumbnail(BIG, 900, fmt="png")])
    with Image.open(os.path.join(image_root, BIG)) as original:
        expected = original.convert("RGB").tobytes()
    for body in bodies[:3]:
        assert decoded(body).convert("RGB").tobytes() == expected
    assert decoded(bodies[3]).size == (900, 900)
    assert server.pb_stats()["held_results"] == 0


@pytest_twisted.ensureDeferred
async def test_connection_cap(env):
    server = env.serve(secured(max_connections=2))
    first = await env.client(server, secret=SECRET)
    second = await env.client(server, secret=SECRET)
    e = await remote_failure(connect(_reactor(), server.endpoint, secret=SECRET, timeout=10))
    assert isinstance(e, pb.PBConnectionLost), e  # closed at once, not left to time out
    assert server.pb_stats()["refused_connections"] == 1
    await first.disconnect()
    await eventually(lambda: server.pb_stats()["connections"] == 1)
    third = await env.client(server, secret=SECRET)
    assert (await third.info("logo.png"))["format"] == "png"
    assert (await second.info("logo.png"))["format"] == "png"
