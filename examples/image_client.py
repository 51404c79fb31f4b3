"""Fetch thumbnails from imgserver over HTTP (treq) and over Perspective Broker.

What it shows: imgserver started in-process on free local ports (the same
``Server`` the ``imgserver`` command runs), then the two ways a program asks
it for images:

* HTTP with treq: ``GET /images/<path>?w=&h=&fit=&fm=&q=``, errors as a
  status and a short JSON body, a 503 with ``Retry-After`` when busy.
* Perspective Broker with ``imgserver.client``: ``connect(reactor, endpoint,
  secret=...)`` logs in (twisted.cred; anonymous only to a server without a
  secret, which listens on loopback only); ``thumbnail()`` returns the
  whole image however big (results over PB's 640 KiB limit come in pages),
  failures arrive as imgserver's own exception classes (``NotFound`` ...).

When to choose which: HTTP for browsers, CDNs and anything cacheable; PB when
a Twisted program wants typed errors and one long-lived connection.

Run: ``python examples/image_client.py`` (needs treq: ``pip install treq``).
"""

from __future__ import annotations

import io
import sys
import time

from PIL import Image
from twisted.internet import defer, task


def describe(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return f"{im.format} {im.width}x{im.height}, {len(data):,} bytes"


async def main(reactor) -> None:
    try:
        import treq
    except ImportError:
        print("this example needs treq: pip install treq")
        raise SystemExit(1)

    from imgserver.cli import Server
    from imgserver.client import connect
    from imgserver.errors import NotFound
    from imgserver.settings import Settings

    settings = Settings(workers=2, max_queue=20)  # a secret, if any, from IMGSERVER_SECRET
    server = Server(reactor, settings)
    await server.listen("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    http_base = f"http://127.0.0.1:{server.http_port.getHost().port}"
    pb_endpoint = f"tcp:127.0.0.1:{server.pb_port.getHost().port}"
    print(f"imgserver on {http_base} (HTTP) and {pb_endpoint} (PB), serving the built-in samples\n")
    failures = 0
    try:
        print("HTTP (treq):")
        for query in ("photo.jpg?w=256&h=256&fit=crop", "photo.jpg?w=400&fm=webp&q=70",
                      "logo.png?w=128&fm=jpg", "landscape.webp?h=120&fit=max"):
            started = time.perf_counter()
            response = await treq.get(f"{http_base}/images/{query}")
            body = await response.content()
            ms = (time.perf_counter() - started) * 1000
            if response.code != 200:
                failures += 1
            print(f"  {response.code} /images/{query:<32} {ms:6.1f} ms  {describe(body)}")
        response = await treq.get(f"{http_base}/images/missing.jpg?w=10")
        print(f"  {response.code} /images/missing.jpg?w=10{'':<15}  {(await response.content()).decode()}")
        failures += response.code != 404

        print("\nPerspective Broker (imgserver.client):")
        # Logs in: with the server's secret (credentials derived from it, sent as a
        # challenge/response), or anonymously when it has none (loopback only).
        client = await connect(reactor, pb_endpoint, secret=settings.secret)
        try:
            for args in (("photo.jpg", 256, 256, "crop"), ("photo.jpg", 1600, None, "clip"), ("logo.png", 64, 64, "scale")):
                started = time.perf_counter()
                data = await client.thumbnail(args[0], args[1], args[2], fit=args[3])
                ms = (time.perf_counter() - started) * 1000
                print(f"  thumbnail{args!s:<32} {ms:6.1f} ms  {describe(data)}")
            print(f"  info('landscape.webp') -> {await client.info('landscape.webp')}")
            try:
                await client.thumbnail("missing.jpg", 10, 10)
                failures += 1
            except NotFound as e:
                print(f"  thumbnail('missing.jpg') raised {type(e).__name__}: {e}")
        finally:
            await client.disconnect()
        stats = server.service.stats()
        print(f"\nserver: {stats['processed']} images processed, cache {stats['cache']['hits']} hits / "
              f"{stats['cache']['misses']} misses, {stats['rejected']} refused")
    finally:
        await server.stop(grace=5)
    if failures:
        print(f"{failures} unexpected answers")
        raise SystemExit(1)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    sys.exit(0)
