"""asyncfile.sendfile: zero-copy sends into real TCP and UNIX connections.

Every test runs on real sockets through the reactor under test (epoll here;
poll, select and asyncio through test_reactors.py or
``ASYNCFILE_TEST_REACTOR=poll|select`` / ``--reactor=asyncio``), and compares
the bytes a client receives with the file.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.python.failure import Failure

from asyncfile import ConsumerStopped
from asyncfile.reader import FileReader
from asyncfile.sendfile import (
    PLAIN_TRANSPORTS,
    SendfileTransfer,
    TransportWritable,
    file_refusal,
    send_file,
    stats,
    zero_copy_refusal,
)

from .conftest import open_fds

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zero-copy is Linux-only (sendfile + mincore)"),
    pytest.mark.usefixtures("no_fd_leak"),
]

MiB = 1 << 20


@pytest.fixture(params=["nowait", "io_uring"])
def engine(request):
    """The engines that read local files inline (so zero-copy applies);
    overrides conftest's (threads never reads inline: see test_threads_engine_falls_back)."""
    if request.param == "io_uring":
        from asyncfile.engines.uring import uring_unavailable_reason

        reason = uring_unavailable_reason()
        if reason is not None:
            pytest.skip(f"io_uring unusable: {reason}")
    return request.param


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes where every 4 KiB block differs, so a misplaced block shows."""
    block = bytes(range(256)) * 16
    out = bytearray()
    i = seed
    while len(out) < size:
        out += i.to_bytes(8, "big") + block[8:]
        i += 1
    return bytes(out[:size])


def write_file(path, size: int, seed: int = 0) -> bytes:
    data = pattern(size, seed)
    with open(path, "wb") as f:
        f.write(data)
    return data


# -- connections ------------------------------------------------------------------------
class Collector(protocol.Protocol):
    """The client: keeps what it receives; ``done`` fires with it at connectionLost.

    With ``step`` it pauses reading after every ``step`` bytes and resumes
    when ``resume_on()`` fires (an event: the server waits for its socket, or
    the transfer ended), so the server's socket fills up between pauses.
    """

    def __init__(self, step: int | None = None, resume_on=None, stop_after: int | None = None):
        self.chunks: list[bytes] = []
        self.received = 0
        self.step = step
        self.resume_on = resume_on
        self.stop_after = stop_after
        self.pauses = 0
        self._next_pause = step
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)
        if self.stop_after is not None and self.received >= self.stop_after:
            self.stop_after = None
            self.transport.abortConnection()
            return
        if self._next_pause is not None and self.received >= self._next_pause:
            self._next_pause = self.received + self.step
            self.pauses += 1
            self.transport.pauseProducing()
            d = self.resume_on()
            d.addTimeout(5, reactor)  # bounded: a lost event must not hang the test
            d.addBoth(lambda _: self.transport.resumeProducing() if self.transport.connected else None)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.done.callback(b"".join(self.chunks))


class _Server(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)


class Link:
    def __init__(self, port, server, client, tmpdir):
        self.port = port
        self.server = server
        self.client = client
        self.tmpdir = tmpdir

    @property
    def transport(self):
        return self.server.transport

    async def finish(self) -> bytes:
        """Close the server side (after its buffer drains) and return what the client got."""
        self.transport.loseConnection()
        try:
            return await self.client.done.addTimeout(30, reactor)
        finally:
            await self.close()

    async def close(self) -> None:
        for side in (self.transport, self.client.transport):
            if side is not None and getattr(side, "connected", False):
                side.abortConnection()
        if not self.client.done.called:
            try:
                await self.client.done.addTimeout(10, reactor)
            except Exception:
                pass
        await self.port.stopListening()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


async def connect(kind: str, client: protocol.Protocol | None = None, *, rcvbuf: int | None = None,
                  sndbuf: int | None = None, server_wrap=None, client_wrap=None) -> Link:
    """A real connection: a listening server of ``kind`` ("tcp"/"unix") and a
    client socket made by hand (so SO_RCVBUF is set before connecting) and
    adopted by the reactor."""
    made: defer.Deferred[protocol.Protocol] = defer.Deferred()
    factory = protocol.Factory.forProtocol(_Server)
    factory.made = made
    listening = server_wrap(factory) if server_wrap else factory
    tmpdir = None
    if kind == "tcp":
        port = reactor.listenTCP(0, listening, interface="127.0.0.1")
        family, address = socket.AF_INET, ("127.0.0.1", port.getHost().port)
    else:
        tmpdir = tempfile.mkdtemp(prefix="sf", dir="/tmp")  # AF_UNIX paths are short
        port = reactor.listenUNIX(os.path.join(tmpdir, "s"), listening)
        family, address = socket.AF_UNIX, os.path.join(tmpdir, "s")
    client = client if client is not None else Collector()
    client_factory = protocol.Factory.forProtocol(lambda: client)
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(address)
        s.setblocking(False)
        reactor.adoptStreamConnection(s.fileno(), family,
                                      client_wrap(client_factory) if client_wrap else client_factory)
    finally:
        s.close()
    server = await made.addTimeout(10, reactor)
    if sndbuf:
        server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return Link(port, server, client, tmpdir)


class Blocked:
    """An event each time the server side waits for its socket: the sendfile
    route asks for writability, the read path's FileReader is paused, or a
    transport's write to its socket was short (Twisted's own FileSender)."""

    def __init__(self, monkeypatch):
        from twisted.internet import tcp

        self.count = 0
        self._waiters: list[defer.Deferred[None]] = []
        want, pause = TransportWritable.want_writable, FileReader.pauseProducing
        write_some = tcp.Connection.writeSomeData

        def writeSomeData(transport, data):
            n = write_some(transport, data)
            if isinstance(n, int) and n < len(data):
                self._fire()
            return n

        monkeypatch.setattr(tcp.Connection, "writeSomeData", writeSomeData)

        def want_writable(hook):
            want(hook)
            self._fire()

        def pauseProducing(reader):
            pause(reader)
            self._fire()

        monkeypatch.setattr(TransportWritable, "want_writable", want_writable)
        monkeypatch.setattr(FileReader, "pauseProducing", pauseProducing)

        self.server = None  # the server's transport, once connected

    def _fire(self) -> None:
        self.count += 1
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            reactor.callLater(0, d.callback, None)

    def next(self) -> defer.Deferred[None]:
        """Fires at the next event, or at once if the server is waiting for
        its socket now (level, not edge: an event before the client paused
        is not lost)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.server is not None and self.server in reactor.getWriters():
            reactor.callLater(0, d.callback, None)
        else:
            self._waiters.append(d)
        return d


def first_of(*ds):
    return defer.DeferredList(list(ds), fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)


def read_path(loader, path, transport, offset=0, length=None):
    return loader.stream(path, transport, offset, length)


async def start(loader, source, transport, offset=0, length=None, **kw):
    """A SendfileTransfer on an opened handle; returns (transfer, handle)."""
    handle = await loader.open(source)
    transfer = SendfileTransfer(loader, handle, transport, offset, length, own_handle=True, **kw)
    return transfer, handle


# -- qualification ---------------------------------------------------------------------------
def test_the_plain_transports_are_twisteds_socket_transports():
    from twisted.internet import tcp, unix

    assert set(PLAIN_TRANSPORTS) == {tcp.Server, tcp.Client, unix.Server, unix.Client}
    assert zero_copy_refusal(object()) is not None


# -- byte for byte ----------------------------------------------------------------------------
RANGES = [(0, None), (0, 1), (5, 3 * MiB), (4096, 4096), (MiB + 17, None), (3 * MiB, 10), (4 * MiB, 100)]


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_sendfile_and_read_path_send_the_same_bytes(loader, tmp_path, kind):
    path = tmp_path / "f"
    data = write_file(path, 4 * MiB + 123)
    for offset, length in RANGES:
        want = data[offset:] if length is None else data[offset:offset + length]
        got = {}
        for route in ("sendfile", "read"):
            link = await connect(kind)
            try:
                if route == "sendfile":
                    transfer, _ = await start(loader, str(path), link.transport, offset, length)
                    n = await transfer.start()
                    assert transfer.route == "sendfile", transfer.reason
                    assert transfer.sendfile_bytes == n  # cached: every byte by sendfile
                else:
                    n = await read_path(loader, str(path), link.transport, offset, length)
            finally:
                received = await link.finish()
            assert n == len(want), (route, offset, length)
            got[route] = received
        assert got["sendfile"] == got["read"] == want, (offset, length)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("route", ["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_slow_reading_client(loader, tmp_path, monkeypatch, kind, route):
    """A client with a small receive buffer that stops reading every 256 KiB
    until the server waits for its socket: the transfer waits (no busy loop,
    nothing piles up in the transport) and every byte arrives in order."""
    path = tmp_path / "f"
    data = write_file(path, 6 * MiB + 5)
    blocked = Blocked(monkeypatch)
    finished: defer.Deferred[None] = defer.Deferred()
    client = Collector(step=256 * 1024, resume_on=lambda: first_of(blocked.next(), finished))
    link = await connect(kind, client, rcvbuf=16 * 1024, sndbuf=32 * 1024)
    transport = blocked.server = link.transport
    most_buffered = [0]
    probe = task.LoopingCall(lambda: most_buffered.__setitem__(
        0, max(most_buffered[0], len(transport.dataBuffer) - transport.offset + transport._tempDataLen)))
    probe.start(0.002)
    try:
        if route == "sendfile":
            transfer, _ = await start(loader, str(path), transport)
            n = await transfer.start()
            assert transfer.route == "sendfile"
            assert transfer.writable_waits > 0
            assert transfer.socket_full > 0  # short sendfile / EAGAIN: backpressure, not the turn budget
            # Cached: every byte went through sendfile, none through the buffer.
            assert transfer.sendfile_bytes == len(data)
            assert most_buffered[0] == 0
        else:
            n = await read_path(loader, str(path), transport)
    finally:
        probe.stop()
        finished.callback(None)
        received = await link.finish()
    assert n == len(data)
    assert received == data
    assert client.pauses >= 5
    assert blocked.count > 0


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_client_transports_send_too(loader, tmp_path, kind):
    """connectTCP/connectUNIX give tcp.Client/unix.Client: the same route."""
    path = tmp_path / "f"
    data = write_file(path, 2 * MiB + 1)
    made: defer.Deferred[protocol.Protocol] = defer.Deferred()
    server = Collector()
    factory = protocol.Factory.forProtocol(lambda: server)
    tmpdir = None
    if kind == "tcp":
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        reactor.connectTCP("127.0.0.1", port.getHost().port,
                           protocol.ClientFactory.forProtocol(lambda: _Made(made)))
    else:
        tmpdir = tempfile.mkdtemp(prefix="sf", dir="/tmp")
        port = reactor.listenUNIX(os.path.join(tmpdir, "s"), factory)
        reactor.connectUNIX(os.path.join(tmpdir, "s"), protocol.ClientFactory.forProtocol(lambda: _Made(made)))
    try:
        client = await made.addTimeout(10, reactor)
        assert type(client.transport).__name__ == "Client"
        transfer, _ = await start(loader, str(path), client.transport)
        assert await transfer.start() == len(data)
        assert transfer.route == "sendfile"
        client.transport.loseConnection()
        assert await server.done.addTimeout(30, reactor) == data
    finally:
        await port.stopListening()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


class _Made(protocol.Protocol):
    def __init__(self, made):
        self.made = made

    def connectionMade(self):
        self.made.callback(self)


@pytest_twisted.ensureDeferred
async def test_bytes_written_before_go_first(loader, tmp_path):
    """Headers (here 3 MiB of them, more than the socket takes at once) that
    the protocol wrote before are sent before the file, never after."""
    path = tmp_path / "f"
    data = write_file(path, 2 * MiB)
    head = b"H" * (3 * MiB) + b"\r\n\r\n"
    link = await connect("tcp", rcvbuf=32 * 1024)
    try:
        link.transport.write(head)
        transfer, _ = await start(loader, str(path), link.transport)
        n = await transfer.start()
        assert transfer.route == "sendfile"
    finally:
        received = await link.finish()
    assert n == len(data)
    assert received == head + data


# -- page cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_evicted_file_is_read_off_the_reactor_thread(loader, tmp_path, kind):
    """A file that is not in the page cache: the residency check sends
    nothing that would have to come from the disk through sendfile in the
    reactor; the missing ranges are read by the engine (counters), then sent."""
    from asyncfile.testing.pagecache import cached_fraction, evict

    path = tmp_path / "f"
    data = write_file(path, 8 * MiB)
    evict(path)
    if cached_fraction(path) > 0.05:
        pytest.skip("this file system keeps the file cached (cannot evict)")
    before = loader.stats()
    link = await connect(kind)
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        n = await transfer.start()
    finally:
        received = await link.finish()
    assert transfer.route == "sendfile"
    assert n == len(data) and received == data
    assert transfer.offthread_reads > 0
    assert transfer.offthread_bytes > 0
    assert transfer.offthread_bytes + transfer.sendfile_bytes == len(data)
    after = loader.stats()
    assert after["pool_reads"] + after["ring_reads"] > before["pool_reads"] + before["ring_reads"]
    # Readahead of those reads brought the rest in: sendfile took over.
    assert transfer.sendfile_bytes > 0

    # The same file, now cached: nothing off-thread.  The page cache is the
    # machine's: on a busy one a page can go between the check and the send
    # (seen once in a loaded run), so a few tries, each checked cached first.
    tries = []
    for attempt in range(3):
        with open(path, "rb") as f:  # cached (again, if pages went)
            while f.read(MiB):
                pass
        cached = cached_fraction(path)
        link = await connect(kind)
        try:
            transfer, _ = await start(loader, str(path), link.transport)
            await transfer.start()
        finally:
            assert await link.finish() == data
        tries.append((cached, transfer.offthread_reads, transfer.sendfile_bytes))
        if cached == 1.0 and transfer.offthread_reads == 0:
            break
    assert transfer.offthread_reads == 0 and transfer.sendfile_bytes == len(data), tries


@pytest_twisted.ensureDeferred
async def test_partly_cached_range(loader, tmp_path):
    """Only the first half cached: the resident prefix is sent, the rest read off-thread."""
    from asyncfile.testing.pagecache import cached_fraction, evict

    path = tmp_path / "f"
    data = write_file(path, 4 * MiB)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        f.read()
        os.posix_fadvise(f.fileno(), 2 * MiB, 0, os.POSIX_FADV_DONTNEED)  # drop the second half
    if not 0.3 < cached_fraction(path) < 0.7:
        pytest.skip("could not make a half-cached file here")
    link = await connect("tcp")
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        await transfer.start()
    finally:
        assert await link.finish() == data
    assert transfer.sendfile_bytes >= 2 * MiB - 256 * 1024
    assert transfer.offthread_reads > 0


# -- ends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("source", ["path", "handle", "fd"])
@pytest_twisted.ensureDeferred
async def test_client_disconnects_mid_transfer(loader, tmp_path, kind, source):
    path = tmp_path / "f"
    write_file(path, 32 * MiB)
    client = Collector(stop_after=1 * MiB)
    link = await connect(kind, client, rcvbuf=64 * 1024)
    handle = None
    fd = None
    try:
        if source == "path":
            d = send_file(loader, str(path), link.transport)
        elif source == "handle":
            handle = await loader.open(str(path))
            d = send_file(loader, handle, link.transport)
        else:
            fd = os.open(path, os.O_RDONLY)
            d = send_file(loader, fd, link.transport)
        with pytest.raises(ConsumerStopped) as stopped:
            await d
        assert 0 < stopped.value.written < 32 * MiB
        assert loader.stats()["open"] == (1 if source == "handle" else 0)  # ours is closed
        if handle is not None:
            assert handle.state.value == "open"  # the caller's stays open
            assert await loader.load(handle, 0, 4) == pattern(4)
        if fd is not None:
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # the caller's offset is untouched
    finally:
        if handle is not None:
            await handle.close()
        if fd is not None:
            os.close(fd)
        await link.close()


@pytest_twisted.ensureDeferred
async def test_peer_reset_while_sending(loader, tmp_path):
    """sendfile itself meets the reset (EPIPE/ECONNRESET): ConsumerStopped,
    and the transport is disconnected as after a failed write."""
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    client = Collector(step=64 * 1024, resume_on=lambda: defer.Deferred())  # stops reading
    link = await connect("tcp", client, rcvbuf=16 * 1024)
    lost: defer.Deferred[None] = defer.Deferred()
    link.server.connectionLost = lambda reason: lost.callback(reason.value)
    # The server does not read: only the sendfile can see the reset.
    link.transport.pauseProducing()
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        d = transfer.start()
        await task.deferLater(reactor, 0.05, lambda: None)
        # Reset from the client side: SO_LINGER 0 then close.
        sock = client.transport.getHandle()
        import struct

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        with pytest.raises(ConsumerStopped):
            await d
        from twisted.internet.error import ConnectionLost

        assert isinstance(await lost.addTimeout(10, reactor), ConnectionLost)
        assert not link.transport.connected
    finally:
        await link.close()


class StopsReading(Collector):
    """Reads ``after`` bytes, then stops reading for good (it may still go)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.stopped = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self.stopped and self.received >= self.after:
            self.stopped = True
            self.transport.pauseProducing()


def fds_on(path) -> list[int]:
    """This process's descriptors open on ``path``."""
    target = os.path.realpath(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_then_goes(loader, tmp_path, monkeypatch, kind, how):
    """A client reads 256 KiB, then stops reading: the transfer fills the
    socket and waits for it (EAGAIN), sending nothing more.  Then the client
    closes (with unread data: a reset on TCP) or aborts: the transfer ends
    with ConsumerStopped, its descriptor and handle are closed, and the
    server's transport is disconnected -- nothing waits for a socket that
    will never drain."""
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    client = StopsReading(256 * 1024)
    link = await connect(kind, client, rcvbuf=16 * 1024, sndbuf=32 * 1024)
    transfer = None
    waits: list[bool] = []  # per wait for writability: was the socket full (not the turn over)?
    want = TransportWritable.want_writable

    def want_writable(hook):
        waits.append(transfer is not None and transfer.socket_full > waits.count(True))
        want(hook)

    monkeypatch.setattr(TransportWritable, "want_writable", want_writable)
    try:
        transfer, handle = await start(loader, str(path), link.transport)
        d = transfer.start()
        # The client has stopped and the transfer waits for its full socket.
        await until_(lambda: client.stopped and waits and waits[-1]
                     and link.transport in reactor.getWriters())
        assert not d.called and transfer.route == "sendfile"
        assert len(fds_on(path)) == 1
        stuck_at = transfer.written
        if how == "close":
            client.transport.loseConnection()
        else:
            client.transport.abortConnection()
        with pytest.raises(ConsumerStopped) as stopped:
            await d.addTimeout(10, reactor)
        assert client.received <= stuck_at <= stopped.value.written < 16 * MiB
        assert handle.closed and fds_on(path) == []
        assert loader.stats()["open"] == 0 and loader.stats()["active"] == 0
        await until_(lambda: link.transport.disconnected)
    finally:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_cancel_and_handle_close_stop_the_transfer(loader, tmp_path):
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    # Cancel: fails at once; the descriptor is closed.
    client = Collector(step=64 * 1024, resume_on=lambda: defer.Deferred())
    link = await connect("tcp", client, rcvbuf=16 * 1024)
    try:
        d = send_file(loader, str(path), link.transport)
        await task.deferLater(reactor, 0.02, lambda: None)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await until_(lambda: loader.stats()["open"] == 0)
        assert link.transport.producer is None  # the hook is gone
    finally:
        await link.close()
    # The caller closes its handle meanwhile: the transfer stops, the close waits for it.
    client = Collector(step=64 * 1024, resume_on=lambda: defer.Deferred())
    link = await connect("tcp", client, rcvbuf=16 * 1024)
    try:
        handle = await loader.open(str(path))
        d = send_file(loader, handle, link.transport)
        await task.deferLater(reactor, 0.02, lambda: None)
        await handle.close()
        with pytest.raises(defer.CancelledError):
            await d
        assert handle.closed and loader.stats()["open"] == 0
    finally:
        await link.close()


async def until_(condition, timeout=5.0):
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("condition not reached in time")


@pytest_twisted.ensureDeferred
async def test_loader_close_stops_transfers(make_loader, tmp_path):
    loader = make_loader()
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    client = Collector(step=64 * 1024, resume_on=lambda: defer.Deferred())
    link = await connect("tcp", client, rcvbuf=16 * 1024)
    try:
        d = send_file(loader, str(path), link.transport)
        await task.deferLater(reactor, 0.02, lambda: None)
        await loader.close()
        from asyncfile import LoaderClosed

        with pytest.raises(LoaderClosed):
            await d
        assert loader.stats()["open"] == 0
    finally:
        await link.close()


# -- descriptors -------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_descriptor_source_is_duplicated(loader, tmp_path):
    path = tmp_path / "f"
    data = write_file(path, MiB + 3)
    fd = os.open(path, os.O_RDONLY)
    os.lseek(fd, 1000, os.SEEK_SET)
    link = await connect("tcp")
    try:
        n = await send_file(loader, fd, link.transport, 10, 5000)
    finally:
        received = await link.finish()
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        os.close(fd)
    assert n == 5000 and received == data[10:5010]
    assert pos == 1000  # offsets are explicit: the descriptor's own is not used or moved


@pytest.mark.parametrize("engine", ["nowait", "threads"])  # fstat and close inline / in the pool
@pytest_twisted.ensureDeferred
async def test_adopt_refuses_what_is_not_a_regular_file(loader):
    from asyncfile import NotRegularFile

    r, w = os.pipe()
    try:
        with pytest.raises(NotRegularFile):
            await loader.adopt(os.dup(r))
        assert loader.stats()["open"] == 0 and loader.stats()["active"] == 0
    finally:
        os.close(r)
        os.close(w)


@pytest_twisted.ensureDeferred
async def test_adopt_waits_for_a_place(make_loader, tmp_path):
    """An adopted descriptor counts under max_open like any open."""
    loader = make_loader(max_open=1)
    path = tmp_path / "f"
    write_file(path, 10)
    first = await loader.open(str(path))
    d = loader.adopt(os.open(path, os.O_RDONLY))
    await task.deferLater(reactor, 0.01, lambda: None)
    assert not d.called and loader.stats()["waiting"] == 1
    await first.close()
    second = await d
    assert second.size == 10 and loader.stats()["open"] == 1
    # Cancelled while waiting: the descriptor is closed.
    third = loader.adopt(os.open(path, os.O_RDONLY))
    third.cancel()
    with pytest.raises(defer.CancelledError):
        await third
    await second.close()
    assert loader.stats()["open"] == 0


# -- where it falls back ------------------------------------------------------------------------------
def _self_signed():
    pytest.importorskip("cryptography")
    from twisted.internet import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return ssl.CertificateOptions(privateKey=key, certificate=cert), ssl.CertificateOptions()


@pytest_twisted.ensureDeferred
async def test_tls_falls_back_to_the_read_path(loader, tmp_path):
    """TLSMemoryBIOProtocol (listenSSL, TLS endpoints) is a wrapper: read path, encrypted bytes."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    server_options, client_options = _self_signed()
    path = tmp_path / "f"
    data = write_file(path, 3 * MiB + 1)
    link = await connect("tcp", server_wrap=lambda f: TLSMemoryBIOFactory(server_options, False, f),
                         client_wrap=lambda f: TLSMemoryBIOFactory(client_options, True, f))
    try:
        assert zero_copy_refusal(link.transport) is not None  # Twisted's TLS transport wrapper
        transfer, _ = await start(loader, str(path), link.transport)
        n = await transfer.start()
    finally:
        received = await link.finish()
    assert transfer.route == "read" and "not a plain" in transfer.reason
    assert transfer.sendfile_calls == 0 and transfer.stream_bytes == n == len(data)
    assert received == data


class _StartTLS(protocol.Protocol):
    """Both ends call startTLS on the plain transport (transport.TLS becomes true)."""

    def __init__(self, options, server, made=None):
        self.options, self.server, self.made = options, server, made
        self.chunks = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.startTLS(self.options)
        if self.made is not None:
            self.made.callback(self)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


@pytest_twisted.ensureDeferred
async def test_starttls_falls_back_to_the_read_path(loader, tmp_path):
    server_options, client_options = _self_signed()
    path = tmp_path / "f"
    data = write_file(path, MiB + 9)
    made = defer.Deferred()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: _StartTLS(server_options, True, made)),
                             interface="127.0.0.1")
    client = _StartTLS(client_options, False)
    reactor.connectTCP("127.0.0.1", port.getHost().port, protocol.ClientFactory.forProtocol(lambda: client))
    try:
        server = await made.addTimeout(10, reactor)
        assert server.transport.TLS
        assert "TLS" in zero_copy_refusal(server.transport)
        transfer, _ = await start(loader, str(path), server.transport)
        assert await transfer.start() == len(data)
        assert transfer.route == "read"
        server.transport.loseConnection()
        assert await client.done.addTimeout(30, reactor) == data
        await server.done.addTimeout(10, reactor)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_protocol_wrappers_fall_back(loader, tmp_path):
    """policies.WrappingFactory (timeouts, throttling, limits) sees every write: not bypassed."""
    from twisted.protocols.policies import WrappingFactory

    path = tmp_path / "f"
    data = write_file(path, MiB)
    link = await connect("unix", server_wrap=WrappingFactory)
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        assert await transfer.start() == len(data)
    finally:
        received = await link.finish()
    assert transfer.route == "read" and received == data


@pytest.mark.parametrize("engine", ["threads"])
@pytest_twisted.ensureDeferred
async def test_threads_engine_falls_back(loader, tmp_path):
    path = tmp_path / "f"
    data = write_file(path, MiB)
    link = await connect("tcp")
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        assert await transfer.start() == len(data)
    finally:
        assert await link.finish() == data
    assert transfer.route == "read" and "inline" in transfer.reason


@pytest_twisted.ensureDeferred
async def test_empty_file_and_range_past_the_end(loader, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    link = await connect("tcp")
    try:
        transfer, _ = await start(loader, str(path), link.transport)
        assert await transfer.start() == 0
        assert transfer.route == "read"  # fstat size 0 (or a /proc file): the read path decides
        path2 = tmp_path / "f"
        data = write_file(path2, 10000)
        transfer, _ = await start(loader, str(path2), link.transport, 9000, 5000)
        assert await transfer.start() == 1000  # like pread: short
        transfer, _ = await start(loader, str(path2), link.transport, 20000, 5)
        assert await transfer.start() == 0
    finally:
        assert await link.finish() == data[9000:]


@pytest_twisted.ensureDeferred
async def test_slow_mount_falls_back(loader, slow_fs):
    """FUSE: a cached sendfile may still wait for the daemon: read path."""
    data = write_file(os.path.join(slow_fs.source, "f"), MiB)
    link = await connect("tcp")
    try:
        transfer, _ = await start(loader, os.path.join(slow_fs.mount, "f"), link.transport)
        assert await transfer.start() == len(data)
    finally:
        assert await link.finish() == data
    assert transfer.route == "read"


@pytest_twisted.ensureDeferred
async def test_proc_files_take_the_read_path(loader):
    """/proc files claim size 0 yet have content: the read path sends it all."""
    handle = await loader.open("/proc/self/mountinfo")
    try:
        assert file_refusal(handle) is not None
    finally:
        await handle.close()
    link = await connect("tcp")
    try:
        transfer, _ = await start(loader, "/proc/self/mountinfo", link.transport)
        n = await transfer.start()
    finally:
        received = await link.finish()
    assert transfer.route == "read" and n == len(received) > 0


# -- concurrency and the reactor ---------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_many_transfers_at_once(loader, tmp_path):
    files = []
    for i in range(8):
        path = tmp_path / f"f{i}"
        files.append((str(path), write_file(path, MiB + i * 4099, seed=i * 1000)))
    links = [await connect("tcp" if i % 2 else "unix", rcvbuf=64 * 1024) for i in range(8)]
    try:
        transfers = [SendfileTransfer(loader, await loader.open(p), link.transport, own_handle=True)
                     for (p, _), link in zip(files, links)]
        counts = await defer.gatherResults([t.start() for t in transfers])
    finally:
        received = [await link.finish() for link in links]
    assert counts == [len(d) for _, d in files]
    assert received == [d for _, d in files]
    assert all(t.route == "sendfile" for t in transfers)


class _Drain(threading.Thread):
    """A client in a thread: reads and discards as fast as it can."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(address)
        self.received = 0

    def run(self):
        buf = bytearray(1 << 20)
        while True:
            n = self.sock.recv_into(buf)
            if not n:
                break
            self.received += n
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_reactor_is_not_blocked_while_sending_200_mb(loader, tmp_path, monkeypatch):
    """A LoopingCall every 5 ms while 200 MB (cached) go out: its worst
    lateness stays small, because each turn sends for at most TURN_BUDGET
    (plus one chunk).  The CPU time of each turn is checked too: wall-clock
    lateness on a loaded 2-core machine is mostly other processes."""
    turns = []
    pump = SendfileTransfer._pump

    def timed_pump(self):
        started = time.thread_time()
        pump(self)
        turns.append(time.thread_time() - started)

    monkeypatch.setattr(SendfileTransfer, "_pump", timed_pump)
    path = tmp_path / "big"
    size = 200 * MiB
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(200):
            f.write(block)
    with open(path, "rb") as f:  # cached
        while f.read(8 * MiB):
            pass
    made: defer.Deferred[protocol.Protocol] = defer.Deferred()
    factory = protocol.Factory.forProtocol(_Server)
    factory.made = made
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    drain = _Drain(("127.0.0.1", port.getHost().port))
    drain.start()
    lateness = []
    interval = 0.005
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        lateness.append(now - last[0] - interval)
        last[0] = now

    probe = task.LoopingCall(tick)
    try:
        server = await made.addTimeout(10, reactor)
        probe.start(interval, now=False)
        transfer, _ = await start(loader, str(path), server.transport)
        started = time.perf_counter()
        n = await transfer.start()
        elapsed = time.perf_counter() - started
        server.transport.loseConnection()
        probe.stop()
        await until_(lambda: not drain.is_alive(), 30)
    finally:
        if probe.running:
            probe.stop()
        await port.stopListening()
    assert n == size and drain.received == size
    assert transfer.route == "sendfile" and transfer.offthread_reads == 0
    worst = max(lateness)
    print(f"\n200 MB in {elapsed:.2f}s ({size / elapsed / 1e6:.0f} MB/s), {len(lateness)} ticks, "
          f"worst lateness {worst * 1000:.1f} ms, p99 "
          f"{sorted(lateness)[int(len(lateness) * 0.99)] * 1000:.1f} ms; "
          f"{len(turns)} sending turns, longest {max(turns) * 1000:.2f} ms CPU")
    assert len(lateness) >= 5
    # Sending all 200 MB in one callback would make one tick as late as the
    # whole transfer; a loaded machine adds its own delays (tens of ms here).
    assert worst < max(0.1, elapsed / 4), worst
    assert max(turns) < 0.02, max(turns)


def test_stats_totals():
    s = stats()
    assert set(s) >= {"transfers", "zero_copy", "fallbacks", "sendfile_bytes", "offthread_reads"}


@pytest_twisted.ensureDeferred
async def test_bad_ranges_and_roots(loader, tmp_path):
    from asyncfile import OutsideRoot

    path = tmp_path / "f"
    data = write_file(path, 5000)
    link = await connect("tcp")
    try:
        for offset, length in ((-1, None), (0, -1), (1.5, None), (0, "3")):
            with pytest.raises(ValueError):
                await send_file(loader, str(path), link.transport, offset, length)
        root = await loader.open_root(str(tmp_path))
        try:
            assert await send_file(loader, "f", link.transport, 100, 50, root=root) == 50
            with pytest.raises(OutsideRoot):
                await send_file(loader, "../" + tmp_path.name + "/f", link.transport, root=root)
        finally:
            root.close()
    finally:
        assert await link.finish() == data[100:150]
    assert loader.stats()["open"] == 0


# -- twisted.web ---------------------------------------------------------------------------------------
def _http_get_twice(port: int, paths: list[bytes]) -> list[tuple[bytes, bytes]]:
    """A blocking keep-alive HTTP/1.1 client (run in a thread): (headers, body) per path."""
    out = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        buf = b""
        for path in paths:
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = int([line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")][0])
            while len(buf) < length:
                buf += s.recv(1 << 20)
            out.append((head, buf[:length]))
            buf = buf[length:]
    return out


@pytest.mark.parametrize("engine", ["nowait", "threads"])  # zero-copy / the read path
@pytest_twisted.ensureDeferred
async def test_twisted_web_response_body(loader, engine, tmp_path):
    """In a twisted.web resource: headers by request.write(b""), the body by
    send_file on the channel's transport (HTTPChannel's producer slot is
    borrowed and given back), twice on one keep-alive connection."""
    from twisted.internet import threads
    from twisted.web import resource, server

    files = {b"/a": write_file(tmp_path / "a", 3 * MiB + 1), b"/b": write_file(tmp_path / "b", 70000, seed=9)}
    fds_before = open_fds()
    transfers = []
    producers = []
    bodies = []  # each fires once its transfer has ended and its handle is closed

    class FileResource(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            name = request.path.decode()[1:]
            path = str(tmp_path / name)
            request.setHeader(b"content-length", b"%d" % os.path.getsize(path))
            request.write(b"")  # the status line and headers

            async def body():
                handle = await loader.open(path)
                transfer = SendfileTransfer(loader, handle, request.channel.transport, own_handle=True)
                transfers.append(transfer)
                n = await transfer.start()
                # The channel is the transport's producer again once a body is sent.
                producers.append(type(request.channel.transport.producer).__name__)
                request.sentLength += n
                if not request._disconnected:  # the client may have read it all and gone
                    request.finish()

            def failed(failure):
                if request.channel is not None:
                    request.channel.transport.abortConnection()

            bodies.append(defer.ensureDeferred(body()).addErrback(failed))
            return server.NOT_DONE_YET

    port = reactor.listenTCP(0, server.Site(FileResource()), interface="127.0.0.1")
    try:
        got = await threads.deferToThread(_http_get_twice, port.getHost().port, [b"/a", b"/b", b"/a"])
    finally:
        await port.stopListening()
    assert [body for _, body in got] == [files[b"/a"], files[b"/b"], files[b"/a"]]
    assert all(head.startswith(b"HTTP/1.1 200") for head, _ in got)
    assert [t.route for t in transfers] == ["sendfile" if engine == "nowait" else "read"] * 3
    # The client has read the last body and closed.  The last transfer may end
    # after that (when the server sees the client go), and its handle is
    # closed before its Deferred fires -- in the I/O pool on the threads
    # engine, so after the transport is gone: wait for both events.
    await defer.gatherResults(bodies).addTimeout(10, reactor)
    # Each body sent in full handed the transport back to the channel (the
    # last may instead end with ConsumerStopped when the client has gone).
    assert len(producers) >= 2 and set(producers) <= {"HTTPChannel", "NoneType"}, producers
    from .test_loader import until

    await until(lambda: all(t.transport.disconnected for t in transfers))
    assert all(t.handle.closed for t in transfers)
    # Every socket of the exchange is closed, soon (bounded: a leak still fails).
    await until(lambda: not {fd for fd in open_fds() - fds_before if os.path.exists(f"/proc/self/fd/{fd}")})
