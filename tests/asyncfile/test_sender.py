"""asyncfile.sender.FileSender against twisted.protocols.basic.FileSender.

Both send the same inputs over real connections; the client must receive the
same bytes and the Deferreds must fire with the same result.
"""

from __future__ import annotations

import io
import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IConsumer
from twisted.protocols import basic
from zope.interface import implementer

from asyncfile import NotRegularFile
from asyncfile.sender import FileSender, FileSenderStopped

from .test_sendfile import Blocked, Collector, MiB, connect, first_of, until_, write_file

pytestmark = pytest.mark.usefixtures("no_fd_leak")

SIZES = [0, 1, 16383, 16384, 16385, 3 * 16384 + 5, MiB + 7]


def reverse_and_mark(chunk: bytes) -> bytes:
    return chunk[::-1] + b"|"


def halve(chunk: bytes) -> bytes:
    return chunk[:len(chunk) // 2 + 1]


def drop_short(chunk: bytes) -> bytes:
    """Returns b"" for a short (last) chunk: the last byte sent is then b""."""
    return chunk if len(chunk) == 16384 else b""


# (Not drop_short over a transport: Twisted's FileSender is a pull producer,
# and a transport never resumes a pull producer whose write was b"" -- it
# stalls until something else makes the transport write.  Ours does not;
# test_results_for_edge_cases_match_twisted_exactly compares it in memory.)
TRANSFORMS = {"none": None, "reverse": reverse_and_mark, "halve": halve}


async def send(sender, source, kind="tcp", transform=None, client=None, rcvbuf=None):
    """Run one transfer on a fresh connection: (outcome, bytes received)."""
    link = await connect(kind, client, rcvbuf=rcvbuf)
    try:
        d = sender.beginFileTransfer(source, link.transport, transform)
        try:
            outcome = ("ok", await d)
        except Exception as e:  # Twisted's raises a bare Exception: compare messages
            outcome = ("error", str(e))
    finally:
        received = await link.finish()
    return outcome, received


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest_twisted.ensureDeferred
async def test_same_bytes_and_result_as_twisted(loader, engine, tmp_path, transform):
    fn = TRANSFORMS[transform]
    for size in SIZES:
        path = tmp_path / f"f{size}"
        write_file(path, size)
        for start in (0, size // 2):
            with open(path, "rb") as f:
                f.seek(start)
                want = await send(basic.FileSender(), f, transform=fn)
                twisted_end = f.tell()
            for source in ("file", "fd", "path"):
                if source == "path" and start:
                    continue
                ours = FileSender(loader)
                if source == "file":
                    with open(path, "rb") as f:
                        f.seek(start)
                        got = await send(ours, f, transform=fn)
                        assert f.tell() == twisted_end, "left where Twisted's leaves it"
                elif source == "fd":
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.lseek(fd, start, os.SEEK_SET)
                        got = await send(ours, fd, transform=fn)
                        assert os.lseek(fd, 0, os.SEEK_CUR) == twisted_end
                    finally:
                        os.close(fd)
                else:
                    got = await send(ours, str(path), transform=fn)
                assert got == want, (size, start, source, transform)
                if fn is not None:
                    assert ours.route == "read"
                elif size - start > 0:
                    # Plain TCP, no transform: zero-copy (the threads engine reads nothing inline).
                    assert ours.route == ("read" if engine == "threads" else "sendfile")
    assert loader.stats()["open"] == 0


@pytest_twisted.ensureDeferred
async def test_results_for_edge_cases_match_twisted_exactly(loader, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with open(empty, "rb") as f:
        (kind, result), _ = await send(basic.FileSender(), f)
    assert (kind, result) == ("ok", "") and type(result) is str  # Twisted's quirk: the str ""
    with open(empty, "rb") as f:
        (kind, ours), _ = await send(FileSender(loader), f)
    assert ours == "" and type(ours) is str

    path = tmp_path / "f"
    data = write_file(path, 16384 * 2 + 3)
    for sender in (basic.FileSender(), FileSender(loader)):
        consumer = CollectingConsumer()
        with open(path, "rb") as f:
            assert await sender.beginFileTransfer(f, consumer, drop_short) == b""
        assert consumer.data() == data[:2 * 16384]
        assert consumer.unregistered
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)  # at the end already: nothing read, like an empty file
        assert (await send(FileSender(loader), f))[0] == ("ok", "")


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_read_route_and_zero_copy_route_agree(loader, engine, tmp_path, kind, zero_copy):
    path = tmp_path / "f"
    data = write_file(path, 3 * MiB + 11)
    sender = FileSender(loader, zero_copy=zero_copy)
    with open(path, "rb") as f:
        outcome, received = await send(sender, f, kind=kind)
    assert outcome == ("ok", data[-1:]) and received == data
    assert sender.route == ("sendfile" if zero_copy and engine != "threads" else "read")
    assert sender.written == len(data)


@pytest.mark.parametrize("route", ["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_consumer_that_stops(loader, engine, tmp_path, route):
    """The client goes away mid-file: Twisted's error (type and message), the
    descriptor we duplicated closed, the caller's file untouched and open."""
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    with open(path, "rb") as f:
        want, _ = await send(basic.FileSender(), f, client=Collector(stop_after=MiB), rcvbuf=64 * 1024)
    assert want == ("error", "Consumer asked us to stop producing")
    sender = FileSender(loader)
    transform = None if route == "sendfile" else (lambda c: c)
    with open(path, "rb") as f:
        got, received = await send(sender, f, transform=transform, client=Collector(stop_after=MiB),
                                   rcvbuf=64 * 1024)
        assert not f.closed and len(f.read(4)) == 4  # the caller's file: open and usable
    assert got == want
    assert sender.route == ("read" if engine == "threads" else route)
    assert loader.stats()["open"] == 0
    assert MiB <= len(received) < 16 * MiB


@pytest_twisted.ensureDeferred
async def test_stopped_error_is_typed(loader, tmp_path):
    path = tmp_path / "f"
    write_file(path, 8 * MiB)
    link = await connect("tcp", Collector(stop_after=MiB), rcvbuf=64 * 1024)
    try:
        with pytest.raises(FileSenderStopped) as stopped:
            await FileSender(loader).beginFileTransfer(str(path), link.transport)
        assert isinstance(stopped.value, Exception) and 0 < stopped.value.written < 8 * MiB
    finally:
        await link.close()


@implementer(IConsumer)
class CollectingConsumer:
    """Collects writes; pulls a pull producer (Twisted's FileSender) after each
    write, as a transport would once its buffer drained."""

    def __init__(self):
        self.chunks = []
        self.producer = None
        self.streaming = None
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        self.producer, self.streaming = producer, streaming
        if not streaming:
            reactor.callLater(0, self._pull)

    def _pull(self):
        if self.producer is not None:
            self.producer.resumeProducing()

    def unregisterProducer(self):
        self.unregistered = True
        self.producer = None

    def write(self, data):
        self.chunks.append(data)
        if not self.streaming:
            reactor.callLater(0, self._pull)

    def data(self):
        return b"".join(self.chunks)


@implementer(IConsumer)
class PausingConsumer:
    """Pauses its producer after every write and resumes it in a later turn;
    may pause at once when the producer registers."""

    def __init__(self, pause_at_register=False):
        self.chunks = []
        self.producer = None
        self.streaming = None
        self.paused = False
        self.writes_while_paused = 0
        self.pauses = 0
        self.pause_at_register = pause_at_register
        self.unregistered = 0

    def registerProducer(self, producer, streaming):
        self.producer, self.streaming = producer, streaming
        if self.pause_at_register:
            self._pause()

    def unregisterProducer(self):
        self.unregistered += 1
        self.producer = None

    def _pause(self):
        self.paused = True
        self.pauses += 1
        self.producer.pauseProducing()
        reactor.callLater(0, self._resume)

    def _resume(self):
        self.paused = False
        if self.producer is not None:
            self.producer.resumeProducing()

    def write(self, data):
        assert type(data) is bytes
        if self.paused:
            self.writes_while_paused += 1
        self.chunks.append(data)
        self._pause()


@pytest.mark.parametrize("pause_at_register", [False, True])
@pytest.mark.parametrize("transform", ["none", "reverse"])
@pytest_twisted.ensureDeferred
async def test_slow_consumer_pauses(loader, tmp_path, transform, pause_at_register):
    fn = TRANSFORMS[transform]
    path = tmp_path / "f"
    data = write_file(path, 2 * MiB + 5)
    consumer = PausingConsumer(pause_at_register)
    sender = FileSender(loader)
    last = await sender.beginFileTransfer(str(path), consumer, fn)
    assert consumer.writes_while_paused == 0
    assert consumer.unregistered == 1 and consumer.streaming is True
    assert sender.route == "read"  # not a socket transport
    body = b"".join(consumer.chunks)
    if fn is None:
        assert body == data and last == data[-1:]
    else:
        pieces = [data[i:i + 16384] for i in range(0, len(data), 16384)]
        assert body == b"".join(fn(p) for p in pieces) and last == b"|"
    assert consumer.pauses >= len(consumer.chunks)


@pytest.mark.parametrize("transform", ["none", "reverse"])
@pytest_twisted.ensureDeferred
async def test_slow_reading_client(loader, tmp_path, monkeypatch, transform):
    """Over TCP with a client that stops reading until the server waits:
    zero-copy without a transform, the read path with one; same bytes as Twisted's."""
    fn = TRANSFORMS[transform]
    path = tmp_path / "f"
    write_file(path, 4 * MiB + 1)
    blocked = Blocked(monkeypatch)
    results = {}
    for name, sender in (("twisted", basic.FileSender()), ("ours", FileSender(loader))):
        finished: defer.Deferred[None] = defer.Deferred()
        client = Collector(step=256 * 1024, resume_on=lambda: first_of(blocked.next(), finished))
        link = await connect("tcp", client, rcvbuf=16 * 1024)
        blocked.server = link.transport
        try:
            with open(path, "rb") as f:
                result = await sender.beginFileTransfer(f, link.transport, fn)
        finally:
            finished.callback(None)
            results[name] = (result, await link.finish(), client.pauses)
    assert results["ours"][:2] == results["twisted"][:2]
    assert results["ours"][2] >= 10
    assert blocked.count > 0


@pytest_twisted.ensureDeferred
async def test_in_memory_files_go_to_twisteds_sender(loader):
    data = bytes(range(256)) * 300
    want = await send(basic.FileSender(), io.BytesIO(data), transform=reverse_and_mark)
    sender = FileSender(loader)
    got = await send(sender, io.BytesIO(data), transform=reverse_and_mark)
    assert got == want and sender.route == "memory"


@pytest_twisted.ensureDeferred
async def test_what_it_refuses(loader, tmp_path):
    path = tmp_path / "t"
    path.write_text("text")
    link = await connect("tcp")
    try:
        with open(path, "r") as f, pytest.raises(TypeError):
            FileSender(loader).beginFileTransfer(f, link.transport)
        assert link.transport.producer is None
        r, w = os.pipe()
        try:
            with open(r, "rb", closefd=False) as pipe:
                with pytest.raises(NotRegularFile):
                    await FileSender(loader).beginFileTransfer(pipe, link.transport)
            assert link.transport.producer is None  # unregistered after an error
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(FileNotFoundError):
            await FileSender(loader).beginFileTransfer(str(tmp_path / "missing"), link.transport)
        assert link.transport.producer is None
    finally:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_unflushed_writes_are_sent(loader, tmp_path):
    path = tmp_path / "w"
    with open(path, "w+b") as f:
        f.write(b"x" * 100000)  # still in Python's buffer
        f.seek(10)
        outcome, received = await send(FileSender(loader), f)
        assert f.tell() == 100000
    assert outcome == ("ok", b"x") and received == b"x" * 99990


@pytest.mark.parametrize("route", ["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_cancel(loader, engine, tmp_path, route):
    path = tmp_path / "f"
    write_file(path, 16 * MiB)
    client = Collector(step=64 * 1024, resume_on=lambda: defer.Deferred())  # stops reading
    link = await connect("tcp", client, rcvbuf=16 * 1024)
    try:
        sender = FileSender(loader, zero_copy=route == "sendfile")
        with open(path, "rb") as f:
            d = sender.beginFileTransfer(f, link.transport)
            await task.deferLater(reactor, 0.02, lambda: None)
            assert sender.route == ("read" if engine == "threads" else route)
            d.cancel()
            with pytest.raises(defer.CancelledError):
                await d
            await until_(lambda: loader.stats()["open"] == 0)
            assert link.transport.producer is None
            assert not f.closed
    finally:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_handles_and_the_default_loader(loader, tmp_path):
    path = tmp_path / "f"
    data = write_file(path, 100000)
    handle = await loader.open(str(path))
    try:
        outcome, received = await send(FileSender(loader), handle)
        assert outcome == ("ok", data[-1:]) and received == data
        assert handle.state.value == "open"  # the caller's: not closed
    finally:
        await handle.close()
    sender = FileSender()  # asyncfile.default_loader()
    with open(path, "rb") as f:
        assert await send(sender, f) == (("ok", data[-1:]), data)
    from asyncfile import default_loader

    assert default_loader().stats()["open"] == 0


@pytest_twisted.ensureDeferred
async def test_a_consumer_already_gone(loader, tmp_path):
    """registerProducer on a disconnected transport calls stopProducing at once."""
    path = tmp_path / "f"
    write_file(path, 1000)
    link = await connect("tcp")
    await link.close()
    with open(path, "rb") as f:
        with pytest.raises(FileSenderStopped):
            await FileSender(loader).beginFileTransfer(f, link.transport)
    assert loader.stats()["open"] == 0


@pytest_twisted.ensureDeferred
async def test_stop_while_pieces_wait_for_a_resume(loader, tmp_path):
    """The consumer pauses at the first transformed piece (the rest of the
    chunk waits), then stops: the Deferred fails, nothing more is written."""
    path = tmp_path / "f"
    write_file(path, 100000)

    @implementer(IConsumer)
    class PauseThenStop:
        def __init__(self):
            self.writes = 0
            self.producer = None

        def registerProducer(self, producer, streaming):
            self.producer = producer

        def unregisterProducer(self):
            self.producer = None

        def write(self, data):
            self.writes += 1
            if self.writes == 1:
                self.producer.pauseProducing()

    consumer = PauseThenStop()
    sender = FileSender(loader)
    d = sender.beginFileTransfer(str(path), consumer, lambda c: c)
    await until_(lambda: consumer.writes == 1)
    await task.deferLater(reactor, 0.01, lambda: None)
    assert consumer.writes == 1 and not d.called and sender._pending
    sender.stopProducing()
    with pytest.raises(FileSenderStopped):
        await d
    assert consumer.writes == 1 and loader.stats()["open"] == 0
