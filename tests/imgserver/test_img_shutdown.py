"""Graceful shutdown: the ``imgserver`` command on SIGTERM, and ``Server.stop`` in process.

Work in flight finishes and is answered in full, new connections are refused,
idle connections are closed, and the process exits 0 within the grace period.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from http_helpers import Client, Servers, get_reactor, port_of, raw_request, sleep, slow_reader, wait_for
from img_helpers import encode
from PIL import Image
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import ResponseFailed, ResponseNeverReceived

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory) -> Path:
    """A root with a 3000x2000 random-pixel JPEG: ``?fm=webp&w=2000`` takes a
    worker most of a second, ``w=1500`` about half a second."""
    root = tmp_path_factory.mktemp("slow")
    im = Image.frombytes("RGB", (3000, 2000), os.urandom(3000 * 2000 * 3))
    (root / "big.jpg").write_bytes(encode(im, "JPEG", quality=85))
    return root


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


async def refused(reactor, port: int) -> bool:
    """Whether a new TCP connection to ``port`` is refused."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    try:
        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2),
                                      protocol.Protocol())
    except ConnectionRefusedError:
        return True
    proto.transport.abortConnection()
    return False


# --- the command ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_finishes_work_in_flight_refuses_new_connections_and_exits_0(slow_root, tmp_path):
    reactor = get_reactor()
    log_path = tmp_path / "imgserver.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    grace = 10
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgserver.cli", "--root", str(slow_root),
             "--http", "tcp:0:interface=127.0.0.1", "--pb", "none", "--workers", "1",
             "--grace", str(grace)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    client = None
    try:
        found: list[int] = []

        def listening() -> bool:
            assert proc.poll() is None, log_path.read_text()
            match = re.search(r"HTTP on .*port=(\d+)", log_path.read_text())
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        await wait_for(reactor, listening, timeout=20, what="the server to listen")
        port = found[0]
        client = Client(reactor, port)
        in_flight = client.get("/images/big.jpg?fm=webp&w=2000")
        answered: list[bool] = []
        in_flight.addBoth(lambda result: answered.append(True) or result)

        async def processing() -> bool:
            health = (await client.get("/healthz")).json()
            return health["in_processing"] == 1

        deadline = time.monotonic() + 10
        while not await processing():
            assert time.monotonic() < deadline, "the slow transform never started"
            await sleep(reactor, 0.01)

        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await sleep(reactor, 0.1)
        assert proc.poll() is None, "exited before the work in flight was done"
        assert not answered, "answered before the work could be done"
        assert await refused(reactor, port), "a new connection was accepted after SIGTERM"

        reply = await in_flight
        assert reply.code == 200
        assert reply.image().size == (2000, 1333)

        await wait_for(reactor, lambda: proc.poll() is not None, timeout=grace, what="the process to exit")
        assert proc.returncode == 0, log_path.read_text()
        assert time.monotonic() - sent < grace
        text = log_path.read_text()
        assert "shutting down" in text
        assert "Traceback" not in text
        assert re.search(r"GET /images/big\.jpg\?fm=webp&w=2000 200 ", text), text
    finally:
        if client is not None:
            await client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest_twisted.ensureDeferred
async def test_sigterm_with_nothing_in_flight_exits_at_once(tmp_path):
    reactor = get_reactor()
    log_path = tmp_path / "imgserver.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgserver.cli", "--http", "tcp:0:interface=127.0.0.1", "--pb", "none",
             "--workers", "1", "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        await wait_for(reactor, lambda: "HTTP on" in log_path.read_text() or proc.poll() is not None,
                       timeout=20, what="the server to listen")
        assert proc.poll() is None, log_path.read_text()
        port = int(re.search(r"port=(\d+)", log_path.read_text()).group(1))
        client = Client(reactor, port)
        assert (await client.get("/images/logo.png?w=10")).code == 200
        await client.close()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await wait_for(reactor, lambda: proc.poll() is not None, timeout=5, what="the process to exit")
        assert proc.returncode == 0
        assert time.monotonic() - sent < 2
        assert "GET /images/logo.png" not in log_path.read_text()  # --quiet: no access log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# --- Server.stop in process ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_lets_work_in_flight_finish_and_refuses_new_connections(servers, slow_root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(slow_root), workers=1)
    port = port_of(server)
    in_flight = client.get("/images/big.jpg?fm=webp&w=1500")
    await wait_for(reactor, lambda: server.service.stats()["in_processing"] == 1, what="processing")
    stopping = defer.Deferred.fromCoroutine(server.stop(grace=10))
    await sleep(reactor, 0.05)
    assert not stopping.called
    assert await refused(reactor, port)
    reply = await in_flight
    assert reply.code == 200 and reply.image().size == (1500, 1000)
    await stopping
    assert server.service.busy() == 0
    assert not server.site.channels


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_an_original_being_streamed(servers, slow_root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(slow_root))
    size = (slow_root / "big.jpg").stat().st_size
    reader = await slow_reader(reactor, port_of(server), b"GET /images/big.jpg HTTP/1.1\r\nHost: x\r\n\r\n",
                               64 * 1024)
    stopping = defer.Deferred.fromCoroutine(server.stop(grace=10))
    await sleep(reactor, 0.3)
    assert not stopping.called, "stopped while an answer was still being sent"
    reader.transport.resumeProducing()
    await stopping
    data = await reader.done  # the server closed the connection once the answer was sent
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == (slow_root / "big.jpg").read_bytes()
    assert len(body) == size


@pytest_twisted.ensureDeferred
async def test_stop_closes_idle_keep_alive_connections(servers):
    from twisted.web.client import Agent, HTTPConnectionPool

    reactor = get_reactor()
    server, _ = await servers.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    url = f"http://127.0.0.1:{port_of(server)}/healthz".encode()
    try:
        response = await agent.request(b"GET", url)
        assert (await Client._read(response)).code == 200
        await sleep(reactor, 0.01)
        assert len(server.site.channels) == 1  # idle, kept alive by the client
        started = time.monotonic()
        await server.stop(grace=10)
        assert time.monotonic() - started < 1
        await wait_for(reactor, lambda: not server.site.channels, timeout=2, what="connections closed")
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_stop_closes_idle_connections_at_once_and_busy_ones_after_their_answer(servers, slow_root):
    from twisted.web.client import Agent, HTTPConnectionPool

    reactor = get_reactor()
    server, _ = await servers.start(root=str(slow_root), workers=1)
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    base = f"http://127.0.0.1:{port_of(server)}".encode()
    try:
        busy = defer.Deferred.fromCoroutine(raw_request(  # HTTP/1.1: kept alive unless told otherwise
            reactor, port_of(server), b"GET /images/big.jpg?fm=webp&w=1500 HTTP/1.1\r\nHost: x\r\n\r\n"))
        await wait_for(reactor, lambda: server.service.stats()["in_processing"] == 1, what="processing")
        idle = await Client._read(await agent.request(b"GET", base + b"/healthz"))
        assert idle.code == 200 and idle.header("connection") is None  # kept alive
        await sleep(reactor, 0.01)
        assert len(server.site.channels) == 2
        started = time.monotonic()
        stopping = defer.Deferred.fromCoroutine(server.stop(grace=10))
        await wait_for(reactor, lambda: len(server.site.channels) == 1, timeout=0.5,
                       what="the idle connection to close")
        assert not stopping.called
        head, _, body = (await busy).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in head
        assert Image.open(io.BytesIO(body)).size == (1500, 1000)
        await stopping
        assert time.monotonic() - started < 2  # did not wait for the grace period
        assert not server.site.channels
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_stop_gives_up_after_the_grace_period(servers, slow_root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(slow_root), workers=1)
    in_flight = client.get("/images/big.jpg?fm=webp&w=2000")
    await wait_for(reactor, lambda: server.service.stats()["in_processing"] == 1, what="processing")
    started = time.monotonic()
    await server.stop(grace=0.2)
    # The worker thread cannot be interrupted: stop() waits for it once, no longer.
    assert time.monotonic() - started < 3
    with pytest.raises((ResponseFailed, ResponseNeverReceived)):
        await in_flight
    assert not server.site.channels


@pytest_twisted.ensureDeferred
async def test_a_stopped_server_leaves_no_shutdown_trigger_behind(servers):
    """Otherwise every server ever stopped in a process (each test's, say)
    stays referenced by the reactor, result cache included, until it exits."""
    reactor = get_reactor()

    def during_shutdown() -> int:
        """The reactor's own triggers aside (its thread pool's comes on first use)."""
        during = reactor._eventTriggers["shutdown"].during  # no public way to list them
        return sum(1 for f, args, kwargs in during if getattr(f, "__self__", None) is not reactor)

    before = during_shutdown()
    server, client = await servers.start()
    assert (await client.get("/images/photo.jpg?w=20")).code == 200
    assert during_shutdown() > before
    await client.close()
    await server.stop(grace=1)
    assert during_shutdown() == before
