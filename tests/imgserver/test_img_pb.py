"""imgserver over Perspective Broker: a real PB server on 127.0.0.1, real clients.

Every test gets ``env`` (servers, clients, and their clean-up) and a log
capture that fails the test if the server logs an error it did not expect.
The servers here have no secret, so clients log in anonymously (loopback);
logging in with a secret is tested in test_img_pb_auth.py.
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import pytest_twisted
from img_helpers import encode, noisy
from PIL import Image
from twisted.cred import credentials
from twisted.internet import defer, endpoints, protocol, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.spread import banana, pb

from imgserver import errors, processing
from imgserver.client import ImageClient, connect
from imgserver.pb import PBFrontEnd, make_pb_factory
from imgserver.service import ImageService
from imgserver.settings import Settings

BIG = "noise.png"  # 1000x1000 noise: its full-size PNG is ~2.5 MB, far over Banana's limit
BIG_SIZE = (1000, 1000)


def _reactor():
    from twisted.internet import reactor

    return reactor


async def sleep(seconds: float) -> None:
    await task.deferLater(_reactor(), seconds, lambda: None)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition never held: {condition}")
        await sleep(0.01)


def open_fds() -> set[str]:
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
    """A root with a big noisy PNG, a text file, and a copy of the samples' photo."""
    root = tmp_path_factory.mktemp("pb-root")
    (root / BIG).write_bytes(encode(noisy(BIG_SIZE), "PNG"))
    (root / "notes.txt").write_text("not an image\n" * 10)
    with open(os.path.join(Settings().image_root, "photo.jpg"), "rb") as f:
        (root / "photo.jpg").write_bytes(f.read())
    return str(root)


class LogCapture:
    """Everything logged while the test runs; errors must be claimed with ``take_errors``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._claimed = 0

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @staticmethod
    def is_error(event: dict[str, Any]) -> bool:
        return (
            event.get("log_failure") is not None
            or bool(event.get("isError"))
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        )

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if self.is_error(e)]

    def take_errors(self) -> list[dict[str, Any]]:
        found = self.errors()[self._claimed :]
        self._claimed += len(found)
        return found

    def unclaimed(self) -> list[dict[str, Any]]:
        return self.errors()[self._claimed :]


@pytest.fixture(autouse=True)
def no_secret_from_environment(monkeypatch):
    """These servers run without a secret, whatever the environment says."""
    monkeypatch.delenv("IMGSERVER_SECRET", raising=False)


@pytest.fixture(autouse=True)
def server_log():
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
    leftover = capture.unclaimed()
    assert not leftover, [
        (e.get("log_format"), e.get("log_failure") and e["log_failure"].getTraceback())
        for e in leftover
    ]


@dataclass
class Server:
    service: ImageService
    factory: pb.PBServerFactory
    front: PBFrontEnd
    port: Any

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def pb_stats(self) -> dict[str, Any]:
        return self.front.pb_stats()


class Env:
    """Servers and clients made by a test, all closed by ``close()``."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.brokers: list[pb.Broker] = []
        self.gates: list[Gate] = []
        self.ports: list[Any] = []

    def serve(self, settings: Settings | None = None, **root_options: Any) -> Server:
        reactor = _reactor()
        service = ImageService(settings or Settings(workers=2), reactor)
        service.start()
        factory = make_pb_factory(service, **root_options)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        server = Server(service, factory, factory.front, port)
        self.servers.append(server)
        return server

    async def client(self, server: Server, **options: Any) -> ImageClient:
        client = await connect(_reactor(), server.endpoint, **options)
        self.brokers.append(client.broker)
        return client

    async def raw(self, server: Server) -> pb.RemoteReference:
        """A bare PBClientFactory's anonymous login (its perspective), for plain callRemote."""
        factory = pb.PBClientFactory()
        endpoint = endpoints.clientFromString(_reactor(), server.endpoint)
        broker = await endpoint.connect(factory)
        self.brokers.append(broker)
        return await factory.login(credentials.Anonymous())

    async def close(self) -> None:
        for gate in self.gates:
            gate.open()
        lost = []
        for broker in self.brokers:
            if not broker.disconnected:
                d: defer.Deferred[None] = defer.Deferred()
                broker.notifyOnDisconnect(lambda d=d: d.callback(None))
                broker.transport.loseConnection()
                lost.append(d)
        await defer.gatherResults(lost)
        self.brokers.clear()
        for port in self.ports:
            await port.stopListening()
        self.ports.clear()
        for server in self.servers:
            await server.port.stopListening()
            # The server side of each connection closes once it reads the EOF.
            await eventually(lambda: server.pb_stats()["connections"] == 0)
            await eventually(lambda: server.service.busy() == 0)
            server.service.stop()
        self.servers.clear()


@pytest_twisted.async_yield_fixture
async def env():
    environment = Env()
    yield environment
    await environment.close()


class Gate:
    """Holds every transform in its worker thread until opened: deterministic slow work."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.event = threading.Event()
        self._lock = threading.Lock()
        self.entered = 0

    def transform(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.entered += 1
        if not self.event.wait(30):
            raise RuntimeError("gate never opened")
        return self.real(*args, **kwargs)

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def gate(env, monkeypatch) -> Gate:
    g = Gate(processing.transform)
    env.gates.append(g)
    monkeypatch.setattr(processing, "transform", g.transform)
    yield g
    g.open()


def decoded(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


async def remote_failure(d: defer.Deferred[Any]) -> BaseException:
    """The exception ``d`` fails with (it must fail)."""
    try:
        result = await d
    except Exception as e:  # noqa: BLE001 - returned for inspection
        return e
    raise AssertionError(f"expected a failure, got {result!r:.80}")


# -- results -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fit, width, height, expected",
    [
        ("clip", 200, 200, (200, 133)),
        ("clip", 400, None, (400, 267)),
        ("clip", None, 100, (150, 100)),
        ("max", 3200, 3200, (1600, 1067)),
        ("max", 200, 200, (200, 133)),
        ("crop", 200, 200, (200, 200)),
        ("crop", 300, None, (300, 200)),
        ("scale", 200, 100, (200, 100)),
    ],
)
@pytest_twisted.ensureDeferred
async def test_thumbnail_size_for_each_fit(env, fit, width, height, expected):
    server = env.serve()
    client = await env.client(server)
    body = await client.thumbnail("photo.jpg", width, height, fit=fit)
    im = decoded(body)
    assert (im.format, im.size) == ("JPEG", expected)
    # The plain one-answer call gives the same image.
    raw = await env.raw(server)
    assert await raw.callRemote("thumbnail", "photo.jpg", width, height, fit) == body


@pytest.mark.parametrize(
    "fmt, pillow_format", [("jpeg", "JPEG"), ("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"),
                           (None, "PNG")]
)
@pytest_twisted.ensureDeferred
async def test_thumbnail_formats(env, fmt, pillow_format):
    client = await env.client(env.serve())
    im = decoded(await client.thumbnail("logo.png", 64, fmt=fmt, quality=70))
    assert (im.format, im.size) == (pillow_format, (64, 64))


@pytest_twisted.ensureDeferred
async def test_info_and_stats(env):
    server = env.serve()
    client = await env.client(server)
    info = await client.info("photo.jpg")
    assert info == {"width": 1600, "height": 1067, "format": "jpeg", "mode": "RGB",
                    "bytes": 48634, "orientation": 6}
    assert (await client.info(b"logo.png"))["mode"] == "RGBA"
    await client.thumbnail("logo.png", 32)
    stats = await client.stats()
    assert stats["workers"] == 2
    assert stats["queued"] == 0 and stats["in_processing"] == 0
    assert stats["processed"] >= 1
    assert stats["pb"]["connections"] == 1
    assert stats["pb"]["pending_calls"] == 0
    assert stats["pb"]["calls"] == 3


# -- errors --------------------------------------------------------------------

ERROR_CASES = [
    pytest.param({}, ("missing.jpg",), {}, errors.NotFound, id="not-found"),
    pytest.param({}, ("../x",), {}, errors.Forbidden, id="forbidden-dotdot"),
    pytest.param({}, (".hidden.jpg",), {}, errors.Forbidden, id="forbidden-hidden"),
    pytest.param({}, ("photo.jpg", 0), {}, errors.BadRequest, id="w0"),
    pytest.param({}, ("photo.jpg", 100, None, "zoom"), {}, errors.BadRequest, id="fit-zoom"),
    pytest.param({}, ("photo.jpg", 100, None, "clip", "jp2"), {}, errors.BadRequest, id="fm-jp2"),
    pytest.param({}, ("photo.jpg", 100.5), {}, errors.BadRequest, id="w-float"),
    pytest.param({}, (42, 100), {}, errors.BadRequest, id="path-int"),
    pytest.param({}, ("photo.jpg", 100, None, "clip", "jpeg", 101), {}, errors.BadRequest,
                 id="q101"),
    pytest.param({}, ("notes.txt", 100), {}, errors.UnsupportedImage, id="text-file"),
    pytest.param({"max_file_mb": 0.01}, ("photo.jpg", 100), {}, errors.TooLarge,
                 id="max-file-mb"),
    pytest.param({"max_pixels": 100_000}, ("photo.jpg", 100), {}, errors.TooLarge,
                 id="max-pixels"),
]


@pytest.mark.parametrize("settings, args, kwargs, error", ERROR_CASES)
@pytest_twisted.ensureDeferred
async def test_errors_arrive_as_imgserver_classes(env, image_root, server_log, settings, args,
                                                  kwargs, error):
    server = env.serve(Settings(root=image_root, workers=2, **settings))
    client = await env.client(server)
    e = await remote_failure(client.thumbnail(*args, **kwargs))
    assert type(e) is error, e
    assert str(e)
    # A plain callRemote sees pb.RemoteError naming the class, with the same message.
    raw = await env.raw(server)
    r = await remote_failure(raw.callRemote("thumbnail", *args, **kwargs))
    assert isinstance(r, pb.RemoteError)
    assert r.remoteType == f"imgserver.errors.{error.__name__}".encode()
    assert r.args[0] == str(e)
    assert "Traceback" not in str(r.remoteTraceback or "").replace("Traceback unavailable", "")
    assert server_log.errors() == []  # expected errors leave no traceback in the server log


@pytest_twisted.ensureDeferred
async def test_info_errors(env, image_root):
    client = await env.client(env.serve(Settings(root=image_root, workers=1)))
    assert type(await remote_failure(client.info("missing.png"))) is errors.NotFound
    assert type(await remote_failure(client.info("a/../b.png"))) is errors.Forbidden
    assert type(await remote_failure(client.info("notes.txt"))) is errors.UnsupportedImage


@pytest_twisted.ensureDeferred
async def test_paths_are_never_percent_decoded(env, tmp_path):
    """PB paths are names as they are: ``%41.jpg`` is that file, not ``A.jpg`` (issue 9, item 3)."""
    (tmp_path / "%41.jpg").write_bytes(encode(Image.new("RGB", (30, 20)), "JPEG"))
    (tmp_path / "A.jpg").write_bytes(encode(Image.new("RGB", (50, 40)), "JPEG"))
    (tmp_path / "100%.png").write_bytes(encode(Image.new("RGB", (7, 5)), "PNG"))
    client = await env.client(env.serve(Settings(root=str(tmp_path), workers=1)))
    assert (await client.info("%41.jpg"))["width"] == 30
    assert (await client.info("A.jpg"))["width"] == 50
    assert (await client.info("100%.png"))["width"] == 7
    assert decoded(await client.thumbnail("%41.jpg", 15)).size == (15, 10)
    assert type(await remote_failure(client.info("%2e%2e/A.jpg"))) is errors.NotFound
    assert type(await remote_failure(client.info("%2F"))) is errors.NotFound


@pytest_twisted.ensureDeferred
async def test_wrong_arguments_are_bad_request_without_traceback(env, server_log):
    server = env.serve()
    raw = await env.raw(server)
    r = await remote_failure(raw.callRemote("thumbnail", "photo.jpg", 1, 2, 3, 4, 5, 6, 7, 8))
    assert r.remoteType == b"imgserver.errors.BadRequest"
    r = await remote_failure(raw.callRemote("info", "photo.jpg", colour="red"))
    assert r.remoteType == b"imgserver.errors.BadRequest"
    r = await remote_failure(raw.callRemote("no_such_method"))
    assert r.remoteType == b"imgserver.errors.BadRequest" and "no_such_method" in r.args[0]
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_are_internal_and_logged_once(env, server_log, monkeypatch):
    server = env.serve()

    def broken_info(url_path):
        return defer.fail(RuntimeError("boom in /secret/place"))

    def broken_stats():
        raise ValueError("stats boom in /secret/place")

    monkeypatch.setattr(server.service, "info", broken_info)
    monkeypatch.setattr(server.service, "stats", broken_stats)
    client = await env.client(server)
    for call, cause in [(lambda: client.info("photo.jpg"), RuntimeError),
                        (client.stats, ValueError)]:
        e = await remote_failure(call())
        assert type(e) is errors.InternalError
        assert str(e) == errors.InternalError.default_message  # nothing of the cause
        logged = server_log.take_errors()
        assert len(logged) == 1, logged
        assert logged[0]["log_failure"].check(cause)
    assert server.front.counts["internal_errors"] == 2


# -- Banana's size limit and paging -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_call_over_banana_limit_is_too_large_and_paged_call_returns_it(
        env, image_root):
    server = env.serve(Settings(root=image_root, workers=2, timeout=30))
    raw = await env.raw(server)
    started = time.monotonic()
    r = await remote_failure(raw.callRemote("thumbnail", BIG, None, None, "clip", "png"))
    assert r.remoteType == b"imgserver.errors.TooLarge"
    assert "thumbnail_begin" in r.args[0]
    assert time.monotonic() - started < 15  # promptly: a transform, not a client timeout

    client = await env.client(server)
    body = await client.thumbnail(BIG, fmt="png")
    assert len(body) > banana.SIZE_LIMIT
    im = decoded(body)
    assert (im.format, im.size) == ("PNG", BIG_SIZE)
    with Image.open(os.path.join(image_root, BIG)) as original:
        assert im.tobytes() == original.convert(im.mode).tobytes()  # whole and in order
    stats = server.pb_stats()
    assert stats["held_results"] == 0 and stats["held_bytes"] == 0  # fully read: released


@pytest_twisted.ensureDeferred
async def test_paging_protocol_read_release_and_limits(env):
    server = env.serve(max_held=2)
    raw = await env.raw(server)
    head = await raw.callRemote("thumbnail_begin", "photo.jpg", 400, None, "clip", "png", None,
                                10_000)
    assert head["token"] is not None and len(head["data"]) == 10_000
    assert head["content_type"] == "image/png" and (head["width"], head["height"]) == (400, 267)
    assert server.pb_stats()["held_bytes"] == head["size"]
    page = await raw.callRemote("read", head["token"], 10_000, 5_000)
    assert len(page) == 5_000
    bad = await remote_failure(raw.callRemote("read", head["token"], head["size"] + 1, 10))
    assert bad.remoteType == b"imgserver.errors.BadRequest"
    bad = await remote_failure(raw.callRemote("read", head["token"], 0, 0))
    assert bad.remoteType == b"imgserver.errors.BadRequest"
    second = await raw.callRemote("thumbnail_begin", "photo.jpg", 300, None, "clip", "png", None,
                                  10_000)
    full = await remote_failure(
        raw.callRemote("thumbnail_begin", "photo.jpg", 200, None, "clip", "png", None, 10_000))
    assert full.remoteType == b"imgserver.errors.Overloaded"
    assert await raw.callRemote("release", head["token"]) is True
    assert await raw.callRemote("release", head["token"]) is False
    gone = await remote_failure(raw.callRemote("read", head["token"], 15_000, 5_000))
    assert gone.remoteType == b"imgserver.errors.NotFound"
    # Another connection cannot read this one's results.
    other = await env.raw(server)
    gone = await remote_failure(other.callRemote("read", second["token"], 10_000, 5_000))
    assert gone.remoteType == b"imgserver.errors.NotFound"
    # A small result comes whole in the first answer, with nothing held.
    small = await raw.callRemote("thumbnail_begin", "photo.jpg", 32)
    assert small["token"] is None and len(small["data"]) == small["size"]
    assert decoded(small["data"]).size == (32, 21)
    assert await raw.callRemote("release", second["token"]) is True
    assert server.pb_stats()["held_results"] == 0 and server.pb_stats()["held_bytes"] == 0


@pytest_twisted.ensureDeferred
async def test_unread_results_expire_and_go_with_their_connection(env):
    server = env.serve(result_ttl=0.2)
    raw = await env.raw(server)
    head = await raw.callRemote("thumbnail_begin", "photo.jpg", 400, None, "clip", "png", None,
                                10_000)
    await sleep(0.4)
    gone = await remote_failure(raw.callRemote("read", head["token"], 10_000, 5_000))
    assert gone.remoteType == b"imgserver.errors.NotFound"
    assert server.pb_stats()["held_bytes"] == 0

    client = await env.client(server)
    await client.root.callRemote("thumbnail_begin", "photo.jpg", 500, None, "clip", "png", None,
                                 10_000)
    assert server.pb_stats()["held_results"] == 1
    await client.disconnect()
    await eventually(lambda: server.pb_stats()["held_results"] == 0)
    assert server.pb_stats()["held_bytes"] == 0


@pytest_twisted.ensureDeferred
async def test_paging_follows_a_lowered_banana_limit(env, monkeypatch):
    """Pages and the one-answer check use Banana's live SIZE_LIMIT, not a copy of 640 KiB."""
    monkeypatch.setattr(banana, "SIZE_LIMIT", 64 * 1024)
    server = env.serve()
    client = await env.client(server)
    body = await client.thumbnail("photo.jpg", fmt="png")  # ~190 KB: several pages
    assert len(body) > 2 * 64 * 1024
    assert decoded(body).size == (1600, 1067)
    raw = await env.raw(server)
    r = await remote_failure(raw.callRemote("thumbnail", "photo.jpg", None, None, "clip", "png"))
    assert r.remoteType == b"imgserver.errors.TooLarge"


# -- admission control, timeouts, disconnects --------------------------------------


@pytest_twisted.ensureDeferred
async def test_overloaded_when_workers_and_queue_are_full(env, gate):
    server = env.serve(Settings(workers=1, max_queue=1))
    clients = [await env.client(server) for _ in range(5)]
    calls = [c.thumbnail("photo.jpg", 100 + 10 * i) for i, c in enumerate(clients)]
    outcomes = [defer.Deferred.fromCoroutine(remote_failure_or_body(d)) for d in calls]
    await eventually(lambda: gate.entered == 1 and server.service.stats()["rejected"] == 3)
    assert server.service.stats()["queued"] == 1
    gate.open()
    results = await defer.gatherResults(outcomes)
    overloaded = [r for r in results if isinstance(r, errors.Overloaded)]
    bodies = [r for r in results if isinstance(r, bytes)]
    assert (len(overloaded), len(bodies)) == (3, 2), results
    assert all("busy" in str(e) or "too many" in str(e) for e in overloaded)
    await eventually(lambda: server.service.busy() == 0)


async def remote_failure_or_body(d: defer.Deferred[Any]) -> Any:
    try:
        return await d
    except Exception as e:  # noqa: BLE001 - returned for inspection
        return e


@pytest_twisted.ensureDeferred
async def test_disconnect_cancels_queued_call(env, gate):
    server = env.serve(Settings(workers=1, max_queue=5))
    stay = await env.client(server)
    leave = await env.client(server)
    running = stay.thumbnail("photo.jpg", 100)
    await eventually(lambda: gate.entered == 1)  # in a worker thread, held there
    queued_failure = defer.Deferred.fromCoroutine(
        remote_failure(leave.thumbnail("photo.jpg", 200)))
    await eventually(lambda: server.service.stats()["queued"] == 1)
    assert server.pb_stats()["pending_calls"] == 2

    await leave.disconnect()
    assert isinstance(await queued_failure, pb.PBConnectionLost)
    await eventually(lambda: server.service.stats()["queued"] == 0)
    await eventually(lambda: server.pb_stats()["pending_calls"] == 1)
    assert server.service.stats()["in_processing"] == 1  # the other call is untouched
    assert server.pb_stats()["cancelled"] == 1

    gate.open()
    assert decoded(await running).size == (100, 67)
    await eventually(lambda: server.service.stats()["in_processing"] == 0)
    stats = server.service.stats()
    assert (stats["heavy_active"], stats["queued"]) == (0, 0)
    assert server.pb_stats()["pending_calls"] == 0
    assert gate.entered == 1  # the cancelled call never reached a worker


@pytest_twisted.ensureDeferred
async def test_disconnect_during_processing_is_quiet(env, gate, server_log):
    server = env.serve(Settings(workers=1, max_queue=5))
    client = await env.client(server)
    d = defer.Deferred.fromCoroutine(remote_failure(client.thumbnail("photo.jpg", 120)))
    await eventually(lambda: gate.entered == 1)
    await client.disconnect()
    assert isinstance(await d, pb.PBConnectionLost)
    await eventually(lambda: server.pb_stats()["pending_calls"] == 0)
    gate.open()  # the thread finishes for no one; nothing is sent, nothing logged
    await eventually(lambda: server.service.busy() == 0)
    assert server_log.errors() == []


@pytest_twisted.ensureDeferred
async def test_server_timeout_cancels_work(env, gate):
    server = env.serve(Settings(workers=1, max_queue=5, timeout=0.3))
    client = await env.client(server)
    started = time.monotonic()
    first = defer.Deferred.fromCoroutine(remote_failure(client.thumbnail("photo.jpg", 100)))
    second = defer.Deferred.fromCoroutine(remote_failure(client.thumbnail("photo.jpg", 200)))
    e1, e2 = await first, await second
    assert type(e1) is errors.Timeout and type(e2) is errors.Timeout
    assert "0.3" in str(e1)
    assert time.monotonic() - started < 5
    stats = server.service.stats()
    assert stats["queued"] == 0  # the queued call left the queue
    assert server.pb_stats()["timeouts"] == 2
    gate.open()
    await eventually(lambda: server.service.busy() == 0)
    assert gate.entered == 1


@pytest_twisted.ensureDeferred
async def test_client_timeout(env, gate):
    server = env.serve(Settings(workers=1, timeout=30))
    client = await env.client(server, call_timeout=0.2)
    started = time.monotonic()
    e = await remote_failure(client.thumbnail("photo.jpg", 100))
    assert type(e) is errors.Timeout and "thumbnail" in str(e)
    e = await remote_failure(client.thumbnail("logo.png", 50, timeout=0.05))  # per call
    assert type(e) is errors.Timeout
    assert time.monotonic() - started < 5
    gate.open()
    assert (await client.stats(timeout=None))["workers"] == 1


@pytest_twisted.ensureDeferred
async def test_connect_timeout_against_a_silent_server(env):
    """A peer that accepts but never speaks PB: connect gives up and closes its socket."""
    before = open_fds()
    reactor = _reactor()
    silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                               interface="127.0.0.1")
    env.ports.append(silent)
    started = time.monotonic()
    e = await remote_failure(
        connect(reactor, f"tcp:127.0.0.1:{silent.getHost().port}", timeout=0.3))
    assert type(e) is errors.Timeout
    assert time.monotonic() - started < 5
    e = await remote_failure(connect(reactor, "tcp:127.0.0.1:1", timeout=5))
    assert not isinstance(e, errors.Timeout)  # refused: the endpoint's own error
    await silent.stopListening()
    env.ports.remove(silent)
    await eventually(lambda: open_fds() <= before)


@pytest_twisted.ensureDeferred
async def test_disconnect_aborts_when_the_server_stops_reading(env, monkeypatch):
    """disconnect() waits for a clean close only CLOSE_TIMEOUT seconds: a
    server that stops reading leaves the client's buffer unsent forever, and
    the connection is then aborted (bounded waiting), not kept."""
    from imgserver.client import ImageClient

    monkeypatch.setattr(ImageClient, "CLOSE_TIMEOUT", 0.3)
    server = env.serve()
    client = await env.client(server)
    (link,) = server.front.links
    link.broker.transport.stopReading()  # the server stops reading; the kernel buffers fill up
    transport = client.broker.transport
    transport.write(b"\0" * (32 << 20))  # more than both sockets' buffers hold: some stays in Twisted's
    assert transport.dataBuffer or transport._tempDataBuffer
    started = time.monotonic()
    await client.disconnect()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5 and not client.connected
    assert await client.disconnect() is None  # again: nothing to do
    link.broker.transport.abortConnection()  # what it has not read is junk: not to be parsed
    await eventually(lambda: server.pb_stats()["connections"] == 0)


# -- resources -------------------------------------------------------------------------


async def _round(env: Env, image_root: str) -> None:
    server = env.serve(Settings(root=image_root, workers=2))
    clients = [await env.client(server) for _ in range(3)]
    raw = await env.raw(server)
    await defer.gatherResults([
        clients[0].thumbnail("photo.jpg", 100),
        clients[1].thumbnail(BIG, 900, fmt="png"),
        clients[2].info("photo.jpg"),
        defer.Deferred.fromCoroutine(remote_failure(clients[2].thumbnail("missing.jpg"))),
        raw.callRemote("thumbnail_begin", "photo.jpg", 800, None, "clip", "png", None, 4096),
    ])
    await env.close()


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leak(env, image_root):
    await _round(env, image_root)  # first use creates process-wide things (wakers, pools)
    before = open_fds()
    for _ in range(2):
        await _round(env, image_root)
    await eventually(lambda: open_fds() <= before, timeout=5)
