"""Helpers for the imgserver HTTP tests: real servers on 127.0.0.1, a small client.

Imported by the test modules (pytest puts this directory on sys.path).  The
reactor is imported inside functions only: pytest-twisted installs it.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from twisted.internet import defer, protocol, task
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.http_headers import Headers

from imgserver.cli import Server
from imgserver.settings import Settings

#: Every test server listens here (port 0: the kernel picks a free one).
#: A large backlog so that a burst of connections is not dropped by the kernel.
LISTEN = "tcp:0:interface=127.0.0.1:backlog=1024"


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@dataclass
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        assert self.header("content-type") == "application/json", (self.code, self.headers, self.body[:200])
        return json.loads(self.body)

    def image(self) -> Image.Image:
        im = Image.open(io.BytesIO(self.body))
        im.load()
        return im


class Client:
    """An HTTP/1.1 client for one server: no persistent connections, so nothing
    stays open after a request; every request is bounded in time."""

    def __init__(self, reactor: Any, port: int, timeout: float = 20.0) -> None:
        self.reactor = reactor
        self.base = f"http://127.0.0.1:{port}".encode()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.timeout = timeout

    def start(self, path: str | bytes, method: str = "GET",
              headers: dict[str, str] | None = None) -> defer.Deferred[Any]:
        """The Agent's Deferred (a response once headers arrive); cancel it to
        abort the connection."""
        raw = path.encode() if isinstance(path, str) else path
        hdrs = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        return self.agent.request(method.encode(), self.base + raw, hdrs)

    def get(self, path: str | bytes, method: str = "GET",
            headers: dict[str, str] | None = None) -> defer.Deferred[Reply]:
        """The whole reply (already on its way: await it, or not yet)."""
        d = self.start(path, method, headers)
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self.reactor)
        return d

    @staticmethod
    def _read(response: Any) -> defer.Deferred[Reply]:
        headers = {k.decode().lower(): [v.decode("latin-1") for v in vs]
                   for k, vs in response.headers.getAllRawHeaders()}
        if "content-length" not in headers and response.length is not UNKNOWN_LENGTH:
            # The Agent keeps Content-Length out of the headers (except for HEAD).
            headers["content-length"] = [str(response.length)]
        done: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_Body(done))
        return done.addCallback(lambda body: Reply(response.code, headers, body))

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class _Body(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class _Raw(protocol.Protocol):
    def __init__(self, request: bytes, stop_after: int | None) -> None:
        self.request = request
        self.stop_after = stop_after
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.stop_after is not None and len(self.data) >= self.stop_after:
            self.stop_after = None
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


def _endpoint(reactor: Any, where: Any) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    return TCP4ClientEndpoint(reactor, "127.0.0.1", where) if isinstance(where, int) else where


async def raw_request(reactor: Any, where: Any, request: bytes, stop_after: int | None = None,
                      timeout: float = 10.0) -> bytes:
    """Send ``request`` as it is to ``where`` (a local port or a client
    endpoint); everything the server sent until it closed (or until
    ``stop_after`` bytes arrived, then the client aborts)."""
    from twisted.internet.endpoints import connectProtocol

    proto = _Raw(request, stop_after)
    await connectProtocol(_endpoint(reactor, where), proto)
    proto.done.addTimeout(timeout, reactor)
    return await proto.done


class SlowReader(protocol.Protocol):
    """Sends a request, reads the first ``pause_after`` bytes of the answer, then
    stops reading (``transport.resumeProducing()`` to go on); ``done`` fires with
    everything once the server closes."""

    def __init__(self, request: bytes, pause_after: int) -> None:
        self.request, self.pause_after = request, pause_after
        self.data = bytearray()
        self.paused: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.paused.called and len(self.data) >= self.pause_after:
            self.transport.pauseProducing()
            self.paused.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


async def slow_reader(reactor: Any, port: int, request: bytes, pause_after: int) -> SlowReader:
    """A connected SlowReader that has stopped reading."""
    from twisted.internet.endpoints import connectProtocol

    reader = SlowReader(request, pause_after)
    await connectProtocol(_endpoint(reactor, port), reader)
    await reader.paused
    return reader


async def start_server(reactor: Any, **settings: Any) -> Server:
    server = Server(reactor, Settings(**settings))
    await server.listen(LISTEN, None)
    return server


def port_of(server: Server) -> int:
    return server.http_port.getHost().port


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(reactor: Any, predicate: Any, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll ``predicate()`` every 5 ms until true; the seconds it took.
    Fails (AssertionError) after ``timeout`` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(reactor, 0.005)
    return time.monotonic() - started


@dataclass
class Servers:
    """What the ``servers`` fixtures hand out: start servers and clients;
    everything is stopped and closed after the test."""

    reactor: Any
    started: list[Server] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    async def start(self, **settings: Any) -> tuple[Server, Client]:
        server = await start_server(self.reactor, **settings)
        self.started.append(server)
        client = Client(self.reactor, port_of(server))
        self.clients.append(client)
        return server, client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for server in self.started:
            await server.stop(grace=10)
            assert server.service.busy() == 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
