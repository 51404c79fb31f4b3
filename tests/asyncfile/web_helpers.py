"""Helpers for the ``asyncfile.web.File`` tests: a served tree, real sites on
127.0.0.1, and a raw HTTP/1.1 client whose answers are parsed byte for byte.

The reactor is imported inside functions only: pytest-twisted installs it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, task

#: mtime of every served file: a fraction of a second, so that rounding matters.
MTIME_NS = 1_700_000_000_250_000_000
HELLO = b"".join(b"line %04d of hello.txt\n" % i for i in range(60))  # 1,320 bytes
OUTSIDE = b"a secret outside the served directory\n"


def build_tree(base: str) -> dict[str, str]:
    """The served tree (``served``) and a directory beside it (``outside``);
    returns ``{"served": ..., "outside": ...}``."""
    served = os.path.join(base, "served")
    outside = os.path.join(base, "outside")
    files = {
        "hello.txt": HELLO,
        "big.bin": os.urandom(3 * 256 * 1024 + 12345),
        "empty.txt": b"",
        "page.html": b"<html><body>page</body></html>\n",
        "data.unknownext": b"unknown extension\n",
        "noext": b"no extension\n",
        "archive.tar.gz": b"\x1f\x8b" + os.urandom(600),
        "notes.txt.bz2": b"BZh" + os.urandom(300),
        ".hidden": b"a dot file\n",
        "with space.txt": b"a name with a space\n",
        "\u00fcn\u00ef.txt": b"a non-ASCII name\n",
        "doc.html": b"<p>doc</p>\n",
        "sub/index.html": b"<p>the index of sub</p>\n",
        "sub/inner.txt": b"inside sub\n",
        "list/a.txt": b"a\n",
        "list/b.html": b"<b>b</b>\n",
        "list/c.tar.gz": b"\x1f\x8b" + b"c" * 2000,
        "list/nested/deep.txt": b"deep\n",
        "scripts/hello.rpy": b"from twisted.web import static\n"
                             b"resource = static.Data(b'rpy says hello', 'text/plain')\n",
        "scripts/withindex/index.rpy": b"from twisted.web import static\n"
                                       b"resource = static.Data(b'rpy index', 'text/plain')\n",
        "escape/inside.txt": b"inside escape\n",
    }
    for name, data in files.items():
        path = os.path.join(served, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    os.makedirs(outside)
    with open(os.path.join(outside, "secret.txt"), "wb") as f:
        f.write(OUTSIDE)
    os.utime(os.path.join(outside, "secret.txt"), ns=(MTIME_NS, MTIME_NS))
    os.symlink("hello.txt", os.path.join(served, "link-in.txt"))
    os.symlink("../hello.txt", os.path.join(served, "list", "link-up.txt"))
    os.symlink("../../outside/secret.txt", os.path.join(served, "escape", "link-out.txt"))
    os.symlink("../../outside", os.path.join(served, "escape", "dir-out"))
    os.symlink("missing-target", os.path.join(served, "escape", "dangling"))
    os.symlink("loop", os.path.join(served, "escape", "loop"))
    return {"served": served, "outside": outside}


def etag_of_path(path: str) -> str:
    st = os.stat(path)
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


# -- a raw HTTP/1.1 client ---------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def parts(self) -> list[tuple[str | None, str | None, bytes]]:
        """A multipart/byteranges body as ``(content-type, content-range, data)``."""
        return parse_multipart(self.header("content-type") or "", self.body)


class _Raw(protocol.Protocol):
    def __init__(self, request: bytes, stop_after: int | None) -> None:
        self.request = request
        self.stop_after = stop_after
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.stop_after is not None and len(self.data) >= self.stop_after:
            self.stop_after = None
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


def request_bytes(path: str | bytes, method: str = "GET", headers: dict[str, str] | None = None) -> bytes:
    raw_path = path.encode("latin-1") if isinstance(path, str) else path
    lines = [method.encode() + b" " + raw_path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def raw_exchange(port: int, request: bytes, stop_after: int | None = None,
                       timeout: float = 20.0) -> bytes:
    """Send ``request`` to 127.0.0.1:port; everything the server sent until it
    closed (or until ``stop_after`` bytes, then the client aborts)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    proto = _Raw(request, stop_after)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.done.addTimeout(timeout, reactor)
    return await proto.done


def parse_answer(raw: bytes, method: str = "GET") -> Answer:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {raw[:300]!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.decode("latin-1").strip().lower(), []).append(
            value.decode("latin-1").strip())
    body = rest
    if method == "HEAD" or status in (204, 304):
        assert rest == b"", rest[:100]
    elif "chunked" in (headers.get("transfer-encoding") or [""])[0]:
        body = _dechunk(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"][0])
        assert len(rest) == length, (len(rest), length)
    return Answer(status, headers, body, raw)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2:]


async def fetch(port: int, path: str | bytes, method: str = "GET",
                headers: dict[str, str] | None = None) -> Answer:
    return parse_answer(await raw_exchange(port, request_bytes(path, method, headers)), method)


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str | None, str | None, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    assert m, content_type
    boundary = m.group(1).encode("latin-1")
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n"), body[-80:]
    chunks = body.split(b"\r\n--" + boundary)
    assert chunks[0] == b"", chunks[0][:80]
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n"), chunk[:40]
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            fields[name.decode().strip().lower()] = value.decode().strip()
        parts.append((fields.get("content-type"), fields.get("content-range"), data))
    assert chunks[-1] == b"--\r\n"
    return parts


# -- open descriptors ----------------------------------------------------------------------
def fds_under(*dirs: str) -> dict[str, str]:
    """Descriptors of this process that point into ``dirs``."""
    found = {}
    prefixes = tuple(os.path.realpath(d).rstrip("/") + "/" for d in dirs)
    exact = {os.path.realpath(d) for d in dirs}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in exact or target.startswith(prefixes):
            found[fd] = target
    return found


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` every 2 ms until true; AssertionError after ``timeout`` s."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(reactor, 0.002, lambda: None)


@dataclass
class Sites:
    """Listening sites started by a test; stopped after it."""

    ports: list[Any] = field(default_factory=list)

    def listen(self, root: Any) -> int:
        from twisted.internet import reactor
        from twisted.web import server

        port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        self.ports.clear()


async def all_closed(loader: Any, timeout: float = 20.0) -> None:
    """Fires once every handle ``loader`` has open now is closed.

    A request starts its handle's close before it finishes, but does not
    wait for it: with the threads engine (or on FUSE) the close runs in the
    pool, and may end after the client has its answer.
    """
    from twisted.internet import reactor

    from asyncfile.handle import FileHandle

    waits: list[defer.Deferred[None]] = []
    for handle in list(loader._handles):  # a test may look inside
        if isinstance(handle, FileHandle) and not handle.closed:
            closed: defer.Deferred[None] = defer.Deferred()
            handle.when_closed(lambda closed=closed: closed.callback(None))
            waits.append(closed)
    if waits:
        await defer.gatherResults(waits).addTimeout(timeout, reactor)


# -- a client that closes as soon as it has its whole answer ------------------------------
class EagerClient:
    """One HTTP/1.1 request on a plain socket (no Twisted protocol), read at
    the start of every reactor iteration, before the reactor polls.

    Once it holds the status line, the headers and Content-Length bytes of
    body it closes the socket there and then, as curl does: the server's
    very next poll sees the close.  A server that finishes the request only
    a turn after its last byte reached the socket then finds the connection
    gone first (Twisted fails ``notifyFinish`` and writes no access-log line).
    ``done`` fires with everything received.
    """

    def __init__(self, port: int, request: bytes, timeout: float = 20.0) -> None:
        import socket

        from twisted.internet import reactor

        self.reactor = reactor
        self.sock = socket.create_connection(("127.0.0.1", port))  # loopback: the backlog accepts at once
        self.sock.sendall(request)
        self.sock.setblocking(False)
        self.request = request
        self.data = bytearray()
        self.wanted: int | None = None  # header length + Content-Length, once known
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.done.addTimeout(timeout, reactor, onTimeoutCancel=self._timed_out)
        self._call: Any = reactor.callLater(0, self._poll)

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if self._call is not None:
            self._call.cancel()
        self.sock.close()
        return result

    def _poll(self) -> None:
        self._call = None  # not kept: a DelayedCall of our own method is a reference cycle
        eof = False
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    eof = True
                    break
                self.data += chunk
        except BlockingIOError:
            pass
        if self.wanted is None:
            head, sep, _ = bytes(self.data).partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                bodiless = self.request.startswith(b"HEAD ") or head.startswith(b"HTTP/1.1 304")
                assert m or bodiless, head
                self.wanted = len(head) + 4 + (int(m.group(1)) if m and not bodiless else 0)
        if self.wanted is not None and len(self.data) >= self.wanted:
            self.sock.close()
            self.done.callback(bytes(self.data))
        elif eof:
            self.sock.close()
            self.done.errback(AssertionError(f"closed by the server after {len(self.data)} bytes"))
        else:
            self._call = self.reactor.callLater(0, self._poll)


# -- what the server logged ---------------------------------------------------------------------
class LogCapture:
    """Every log event while it is installed (``with LogCapture() as log:``)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> "LogCapture":
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: Any) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.events.append)

    def failures(self) -> list[Any]:
        """The failures logged (each with its traceback), from anywhere."""
        return [e["log_failure"] for e in self.events if "log_failure" in e]

    def lines(self, namespace: str = "asyncfile.web") -> list[str]:
        """The messages logged without a failure in ``namespace``, formatted."""
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == namespace and "log_failure" not in e]
