"""Bounded cost per connection (issue 9 items 2 and 3), against real servers on 127.0.0.1.

A client that sends slowly, reads slowly or not at all, pipelines without
reading, or opens too many connections cannot hold what others need:
deadlines for a request's headers, idle keep-alive and sending; a cap on
connections; ``/healthz`` degraded (503) when a lane is full or the reactor
lags; every overload a 503 with ``Retry-After``.  Small timeouts keep the
tests short; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import pytest
import pytest_twisted
from http_helpers import Servers, get_reactor, port_of, raw_request, sleep, slow_reader, wait_for
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from imgserver.settings import SAMPLES_DIR
from imgserver.web import MAX_REQUEST_BODY

PHOTO = open(os.path.join(SAMPLES_DIR, "photo.jpg"), "rb").read()
LOGO = open(os.path.join(SAMPLES_DIR, "logo.png"), "rb").read()


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The samples, and a large original (sniffed as JPEG, never decoded)."""
    root = tmp_path_factory.mktemp("conn-root")
    for name in ("photo.jpg", "logo.png"):
        shutil.copy(os.path.join(SAMPLES_DIR, name), root / name)
    (root / "huge.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(24 * 1024 * 1024))
    (root / "large.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(4 * 1024 * 1024))
    return root


def dropped(server: Any, reason: str) -> float:
    value = server.metrics.registry.get_sample_value("imgserver_connections_dropped_total", {"reason": reason})
    return value or 0.0


def answered(server: Any, endpoint: str, status: int) -> float:
    value = server.metrics.registry.get_sample_value("imgserver_requests_total",
                                                     {"endpoint": endpoint, "status": str(status)})
    return value or 0.0


class Conn(protocol.Protocol):
    """A raw connection: keeps what the server sends and when it closed."""

    def __init__(self, reactor: Any, to_send: bytes = b"", interval: float | None = None) -> None:
        self.reactor = reactor
        self.to_send, self.interval = to_send, interval
        self.data = bytearray()
        self.made_at = self.closed_at = None
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._call: Any = None

    def connectionMade(self) -> None:
        self.made_at = self.reactor.seconds()
        if self.interval is None:
            self.transport.write(self.to_send)
        else:
            self._trickle()

    def _trickle(self) -> None:
        """One byte every ``interval`` seconds (slowloris)."""
        self._call = None
        if self.to_send:
            byte, self.to_send = self.to_send[:1], self.to_send[1:]
            self.transport.write(byte)
            self._call = self.reactor.callLater(self.interval, self._trickle)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.closed_at = self.reactor.seconds()
        self.closed.callback(bytes(self.data))


async def connect(reactor: Any, port: int, to_send: bytes = b"", interval: float | None = None) -> Conn:
    conn = Conn(reactor, to_send, interval)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), conn)
    return conn


async def gather(coroutines: Any) -> list[Any]:
    return await defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in coroutines])


async def closed(conn: Conn, timeout: float) -> bytes:
    return await conn.closed.addTimeout(timeout, get_reactor())


def request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def probe(client: Any, round_: int, bound: float) -> None:
    """A transform (a new size each time: real work) and a small original,
    each answered 200 within ``bound`` seconds."""
    for path, check in ((f"/images/photo.jpg?w={40 + round_}", lambda r: r.image().width == 40 + round_),
                        ("/images/logo.png", lambda r: r.body == LOGO)):
        started = time.monotonic()
        reply = await client.get(path)
        took = time.monotonic() - started
        assert reply.code == 200 and check(reply), (path, reply.code, reply.body[:100])
        assert took < bound, f"{path} took {took:.2f} s"


# --- slow senders (slowloris) -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slowloris_is_dropped_while_others_are_served(servers, root):
    """200 connections send their request a byte every 0.4 s — always faster than
    ``header_timeout`` (1 s), so an idle timeout reset by each byte would keep
    them forever; the deadline for the whole header is absolute."""
    reactor = get_reactor()
    header_timeout = 1.0
    server, client = await servers.start(root=str(root), header_timeout=header_timeout, workers=2)
    slow = request("/images/photo.jpg", "X-Padding: " + "a" * 200 + "\r\n")
    started = reactor.seconds()
    lorises = await gather(connect(reactor, port_of(server), slow, interval=0.4) for _ in range(200))
    await wait_for(reactor, lambda: len(server.site.channels) >= 200, what="200 slow connections open")
    rounds = 0
    while any(c.closed_at is None for c in lorises) or rounds < 3:
        await probe(client, rounds, bound=2.0)
        rounds += 1
        assert reactor.seconds() - started < 10, "slow connections not dropped"
    latest = max(c.closed_at - c.made_at for c in lorises)
    earliest = min(c.closed_at - c.made_at for c in lorises)
    assert earliest >= header_timeout - 0.05
    assert latest <= header_timeout + 2 * server.site.sweep_interval + 1.0
    for conn in lorises:
        assert conn.data.startswith(b"HTTP/1.1 408 "), bytes(conn.data[:100])
        assert b"X-Content-Type-Options: nosniff" in conn.data
        assert b'"error":"request_timeout"' in conn.data
    assert dropped(server, "header_timeout") == 200
    await wait_for(reactor, lambda: len(server.site.channels) == 0, what="connections closed")


@pytest_twisted.ensureDeferred
async def test_a_silent_connection_is_closed_after_header_timeout(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), header_timeout=0.3, idle_timeout=5)
    conn = await connect(reactor, port_of(server))
    data = await closed(conn, timeout=5)
    assert data == b""  # nothing was asked: nothing is answered
    assert 0.3 - 0.05 <= conn.closed_at - conn.made_at <= 0.3 + 2 * server.site.sweep_interval + 0.5
    assert dropped(server, "idle_timeout") == 1


# --- idle keep-alive ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(servers, root):
    """After an answer the connection may stay idle ``idle_timeout`` (1 s) —
    longer than ``header_timeout`` (0.3 s), which only bounds a request on its way."""
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), header_timeout=0.3, idle_timeout=1.0)
    answered_at = []
    conn = await connect(reactor, port_of(server), request("/images/logo.png"))
    await wait_for(reactor, lambda: conn.data.endswith(LOGO), what="the answer")
    answered_at.append(reactor.seconds())
    # Still usable after header_timeout: a second request on the same connection.
    await sleep(reactor, 0.5)
    assert conn.closed_at is None
    conn.transport.write(request("/images/logo.png"))
    await wait_for(reactor, lambda: conn.data.count(b"HTTP/1.1 200 ") == 2 and conn.data.endswith(LOGO),
                   what="the second answer")
    answered_at.append(reactor.seconds())
    await closed(conn, timeout=5)
    idle = conn.closed_at - answered_at[-1]
    assert 1.0 - 0.05 <= idle <= 1.0 + 2 * server.site.sweep_interval + 0.5, idle
    assert dropped(server, "idle_timeout") == 1


# --- slow and stalled readers -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stalled_readers_are_dropped_and_their_files_closed(servers, root):
    """Clients that stop reading a large original are dropped ``send_timeout``
    after they last took a byte: the stream is stopped, its descriptor closed
    and its place in the streams lane given back; meanwhile transforms and
    small originals are answered."""
    reactor = get_reactor()
    send_timeout = 1.0
    server, client = await servers.start(root=str(root), send_timeout=send_timeout, workers=2)
    service, loader = server.service, server.service.loader
    readers = await gather(slow_reader(reactor, port_of(server), request("/images/huge.jpg"), 64 * 1024)
                           for _ in range(8))
    paused_at = reactor.seconds()
    await wait_for(reactor, lambda: service.stats()["streams"] == 8, what="8 streams in their lane")
    assert loader.stats()["open"] >= 8  # each stalled stream holds its descriptor, for now
    await probe(client, 0, bound=2.0)
    # Seen from the server: the clients are paused, so they do not notice yet.
    await wait_for(reactor, lambda: dropped(server, "send_timeout") == 8, timeout=send_timeout + 5,
                   what="the stalled readers dropped")
    took = reactor.seconds() - paused_at
    assert send_timeout - 0.05 <= took <= send_timeout + 2 * server.site.sweep_interval + 2.0, took
    await wait_for(reactor, lambda: len(server.site.channels) == 0, what="connections gone")
    for r in readers:
        assert r.data.startswith(b"HTTP/1.1 200 ")
        r.transport.resumeProducing()  # now they read what is left and find the connection gone
    for r in readers:
        data = await r.done.addTimeout(5, reactor)
        assert len(data) < 24 * 1024 * 1024  # cut short: they never got it all
    await wait_for(reactor, lambda: loader.stats()["open"] == 0 and service.stats()["streams"] == 0,
                   what="descriptors closed and places given back")
    assert dropped(server, "send_timeout") == 8
    await probe(client, 1, bound=2.0)


class Trickle(protocol.Protocol):
    """Reads at most ``quota`` bytes, pauses ``pause`` seconds, reads on: a slow,
    steady client."""

    def __init__(self, reactor: Any, quota: int, pause: float) -> None:
        self.reactor, self.quota, self.pause = reactor, quota, pause
        self.data = bytearray()
        self.budget = quota
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(request("/images/large.jpg", "Connection: close\r\n"))

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.budget -= len(data)
        if self.budget <= 0:
            self.transport.pauseProducing()
            self.reactor.callLater(self.pause, self._go_on)

    def _go_on(self) -> None:
        self.budget = self.quota
        if self.transport.connected:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


@pytest_twisted.ensureDeferred
async def test_a_slow_but_steady_reader_is_not_dropped(servers, root):
    """The deadline is on progress, not on the whole transfer: a client taking
    512 KiB every 0.5 s gets its 4 MiB original in several seconds, however
    short ``send_timeout`` (1 s)."""
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), send_timeout=1.0)
    reader = Trickle(reactor, 512 * 1024, 0.5)
    started = reactor.seconds()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(server)), reader)
    data = await reader.done.addTimeout(40, reactor)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == (root / "large.jpg").read_bytes()
    assert reactor.seconds() - started > 2.0  # it really was slower than send_timeout
    assert dropped(server, "send_timeout") == 0


@pytest_twisted.ensureDeferred
async def test_a_client_that_pipelines_without_reading_holds_one_answer(servers, root):
    """1500 pipelined requests for /metrics (about 4.5 KB each, written in one
    go), never read: twisted.web would answer them all into the connection's
    buffer (6 MB here, and the reactor busy for seconds); the next request is
    read only once the previous answer has left the buffer, so the server
    holds one answer beyond what the kernel took; then the send deadline
    drops the connection."""
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), send_timeout=1.0)
    conn = Conn(reactor, request("/metrics") * 1500)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(server))
    await connectProtocol(endpoint, conn)
    conn.transport.pauseProducing()  # never reads
    # Answers go out while the kernel takes them, then stop; the buffer of the
    # connection never holds more than one answer beyond the transport's own
    # 64 KiB, however many requests wait; then the connection is dropped.
    largest, started = 0, time.monotonic()
    while server.site.channels:
        assert time.monotonic() - started < 20, "never dropped"
        for channel in list(server.site.channels):
            largest = max(largest, channel.unsent())
        await sleep(reactor, 0.01)
    assert 0 < largest <= 2 ** 16 + 16 * 1024
    assert dropped(server, "send_timeout") == 1
    assert answered(server, "metrics", 200) < 1500
    conn.transport.resumeProducing()
    await closed(conn, timeout=5)


# --- the connection cap ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_over_the_cap_get_503_at_once(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), max_connections=4, header_timeout=30)
    port = port_of(server)
    idle = [await connect(reactor, port) for _ in range(4)]
    await wait_for(reactor, lambda: len(server.site.channels) == 4, what="4 connections open")
    started = time.monotonic()
    raw = await raw_request(reactor, port, request("/images/logo.png"), timeout=5)
    assert time.monotonic() - started < 2
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    lines = head.split(b"\r\n")
    assert b"Retry-After: 1" in lines and b"Connection: close" in lines
    assert b"X-Content-Type-Options: nosniff" in lines and b"Cache-Control: no-store" in lines
    assert json.loads(body) == {"error": "overloaded", "message": "too many connections; try again shortly",
                                "retry_after": 1}
    reply = await client.get("/images/logo.png")  # an ordinary client sees an ordinary 503
    assert reply.code == 503 and reply.header("retry-after") == "1"
    assert len(server.site.channels) == 4
    assert server.metrics.registry.get_sample_value("imgserver_connections") == 4
    assert server.metrics.registry.get_sample_value("imgserver_max_connections") == 4
    # A flood over the cap: answered or reset, never let in, nothing left behind.
    flood = await gather(connect(reactor, port, request("/healthz")) for _ in range(100))
    await gather(closed(c, timeout=5) for c in flood)
    assert sum(c.data.startswith(b"HTTP/1.1 503 ") for c in flood) >= 1
    assert len(server.site.channels) == 4
    await wait_for(reactor, lambda: server.site.refused_lingering == 0, what="refused connections gone")
    assert server.metrics.registry.get_sample_value("imgserver_connections_refused_total") == 102
    # One leaves: the next one is served.
    idle[0].transport.loseConnection()
    await wait_for(reactor, lambda: len(server.site.channels) == 3, what="one connection closed")
    reply = await client.get("/images/logo.png")
    assert reply.code == 200 and reply.body == LOGO
    for conn in idle[1:]:
        conn.transport.loseConnection()


# --- request bodies -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_bodies_over_the_limit_are_refused(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root))
    port = port_of(server)
    declared = (f"POST /images/photo.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: {10 ** 9}\r\n\r\n"
                .encode() + b"x" * 1000)
    chunk = b"x" * (MAX_REQUEST_BODY + 1)
    chunked = (b"POST /images/photo.jpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n")
    for raw in (declared, chunked):
        answer = await raw_request(reactor, port, raw, timeout=5)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert json.loads(body)["error"] == "too_large"
    assert dropped(server, "body_too_large") == 2
    # A small body is read (and the method refused as usual).
    small = b"POST /images/photo.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    answer = await raw_request(reactor, port, small, timeout=5)
    assert answer.startswith(b"HTTP/1.1 405 ")


# --- health and overload ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_is_degraded_while_the_reactor_lags(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root))
    assert (await client.get("/healthz")).code == 200
    reactor.callLater(0, time.sleep, 0.8)  # the reactor thread blocked: every timer runs late
    await wait_for(reactor, lambda: server.metrics.lag.current() > 0.5, what="lag measured")
    reply = await client.get("/healthz")
    assert reply.code == 503
    health = reply.json()
    assert health["status"] == "degraded" and "reactor lag" in health["reasons"]
    assert health["reactor_lag"] > 0.5
    assert int(reply.header("retry-after")) >= 1 and reply.header("cache-control") == "no-store"
    metrics = (await client.get("/metrics")).body.decode()
    lag = [line for line in metrics.splitlines() if line.startswith("imgserver_reactor_lag_seconds ")]
    assert lag and float(lag[0].split()[1]) > 0.5
    # It passes: healthy again once the lag is out of the window.
    await wait_for(reactor, lambda: server.metrics.lag.current() < 0.5, timeout=10, what="lag gone")
    assert (await client.get("/healthz")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_full_streams_lane_is_503_with_retry_after_and_degrades_healthz(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root), max_streams=1)
    reader = await slow_reader(reactor, port_of(server), request("/images/huge.jpg"), 64 * 1024)
    await wait_for(reactor, lambda: server.service.stats()["streams"] == 1, what="the lane full")
    reply = await client.get("/images/large.jpg")
    assert reply.code == 503
    assert reply.header("cache-control") == "no-store"
    assert int(reply.header("retry-after")) == reply.json()["retry_after"] >= 1
    # Small originals and transforms need no place in that lane.
    await probe(client, 0, bound=2.0)
    health = await client.get("/healthz")
    assert health.code == 503 and "streams lane full" in health.json()["reasons"]
    assert int(health.header("retry-after")) >= 1
    reader.transport.abortConnection()
    await wait_for(reactor, lambda: server.service.stats()["streams"] == 0, what="the lane free")
    assert (await client.get("/healthz")).code == 200


@pytest_twisted.ensureDeferred
async def test_the_file_loaders_own_overload_is_a_503_with_retry_after(servers, root):
    from asyncfile import Overloaded as QueueFull

    server, client = await servers.start(root=str(root))
    server.service.open_image = lambda *a, **k: defer.fail(QueueFull(64, 1024))
    reply = await client.get("/images/photo.jpg")
    assert reply.code == 503 and reply.json()["error"] == "overloaded"
    assert int(reply.header("retry-after")) == reply.json()["retry_after"] >= 1
    del server.service.open_image
