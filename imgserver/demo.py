"""``imgserver --demo``: start on free local ports, ask for images over HTTP and PB, print, exit.

``imgserver --demo --serve``: the same, then keep serving (the gallery at
``/`` included) until SIGINT/SIGTERM, having printed the gallery's URL.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from typing import Any

from PIL import Image
from twisted.internet import defer, protocol
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from .settings import Settings

__all__ = ["run_demo"]


class _Body(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done, self.parts = done, []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(b"".join(self.parts))


async def _get(agent: Agent, url: str) -> tuple[int, dict[str, str], bytes]:
    response = await agent.request(b"GET", url.encode(), Headers({}))
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_Body(done))
    body = await done
    headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, headers, body


def _describe(body: bytes) -> str:
    if body.startswith(b"<!doctype html>"):
        return f"HTML, {len(body):,} bytes, {body.count(b'<img ')} images"
    try:
        with Image.open(io.BytesIO(body)) as im:
            return f"{im.format} {im.width}x{im.height}"
    except Exception:
        return body[:80].decode("utf-8", "replace")


async def run_demo(reactor: Any, settings: Settings, args: argparse.Namespace) -> None:
    from .cli import Server

    server = Server(reactor, settings, gallery=True)
    await server.listen("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    base = f"http://127.0.0.1:{server.http_port.getHost().port}"
    print(f"imgserver demo: serving {settings.image_root} on {base} and PB port {server.pb_port.getHost().port}\n")
    agent = Agent(reactor)
    requests = [
        "/",  # the gallery
        "/info/photo.jpg",
        "/images/photo.jpg?w=320",
        "/images/photo.jpg?w=200&h=200&fit=crop&fm=webp&q=80",
        "/images/logo.png?w=64&fm=jpg",
        "/images/landscape.webp?h=100&fit=max",
        "/images/photo.jpg?w=320",  # again: a cache hit
        "/images/landscape.webp",  # the original, streamed
        "/images/../etc/passwd",
        "/images/missing.jpg?w=10",
        "/images/photo.jpg?w=0",
    ]
    for path in requests:
        started = time.perf_counter()
        code, headers, body = await _get(agent, base + path)
        ms = (time.perf_counter() - started) * 1000
        what = json.loads(body) if headers.get("content-type", "").startswith("application/json") \
            else _describe(body)
        print(f"  HTTP {code} {path:<55} {ms:6.1f} ms  {what}")
    from .client import connect

    client = await connect(reactor, f"tcp:127.0.0.1:{server.pb_port.getHost().port}",
                           secret=server.settings.secret)
    try:
        started = time.perf_counter()
        data = await client.thumbnail("photo.jpg", 256, 256, fit="crop")
        print(f"  PB   thumbnail('photo.jpg', 256, 256, fit='crop') {(time.perf_counter() - started) * 1000:6.1f} ms"
              f"  {_describe(data)}")
        print(f"  PB   info('logo.png') -> {await client.info('logo.png')}")
    finally:
        await client.disconnect()
    stats = server.service.stats()
    print(f"\nprocessed {stats['processed']} images, cache {stats['cache']['hits']} hits / "
          f"{stats['cache']['misses']} misses, files loaded {stats['files']['loaded']} "
          f"({stats['files']['inline_reads']} inline reads, {stats['files']['pool_reads']} in the pool), "
          f"rejected {stats['rejected']}")
    if getattr(args, "serve", False):
        await _keep_serving(reactor, server, base)
        return
    await server.stop(grace=5)


async def _keep_serving(reactor: Any, server: Any, base: str) -> None:
    """Serve until the reactor is stopped (SIGINT, SIGTERM), then stop gracefully."""
    print(f"\nimgserver demo: the gallery is at {base}/ (Ctrl-C to stop)", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: defer.Deferred.fromCoroutine(server.stop(grace=5)))
    await defer.Deferred()  # until a signal stops the reactor
