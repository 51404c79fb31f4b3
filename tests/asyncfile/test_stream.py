"""FileLoader.stream: push production into consumers that pause, stop, or are real sockets."""


import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor
from zope.interface import implementer
from twisted.internet.interfaces import IConsumer

from asyncfile import ConsumerStopped

from .test_loader import CHUNK, until, write

pytestmark = pytest.mark.usefixtures("no_fd_leak")


@implementer(IConsumer)
class SlowConsumer:
    """Pauses the producer after every write and resumes it a moment later."""

    def __init__(self, stop_after=None):
        self.producer = None
        self.chunks = []
        self.paused = False
        self.writes_while_paused = 0
        self.pauses = 0
        self.stop_after = stop_after
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered = True

    def write(self, data):
        assert type(data) is bytes
        if self.paused:
            self.writes_while_paused += 1
        self.chunks.append(data)
        if self.stop_after is not None and len(self.chunks) >= self.stop_after:
            self.producer.stopProducing()
            return
        self.paused = True
        self.pauses += 1
        self.producer.pauseProducing()
        reactor.callLater(0.001, self._resume)

    def _resume(self):
        self.paused = False
        self.producer.resumeProducing()


@pytest.mark.parametrize("size", [0, 1, CHUNK, 10 * CHUNK + 3])
@pytest_twisted.ensureDeferred
async def test_stream_into_a_slow_consumer_honours_pause(make_loader, tmp_path, size):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, size)
    consumer = SlowConsumer()
    written = await loader.stream(path, consumer)
    assert written == size
    assert b"".join(consumer.chunks) == data
    assert consumer.writes_while_paused == 0
    assert consumer.unregistered
    assert consumer.pauses == len(consumer.chunks) == -(-size // CHUNK)


@pytest_twisted.ensureDeferred
async def test_stream_range(make_loader, tmp_path):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, 10 * CHUNK)
    consumer = SlowConsumer()
    assert await loader.stream(path, consumer, offset=CHUNK + 5, length=3 * CHUNK) == 3 * CHUNK
    assert b"".join(consumer.chunks) == data[CHUNK + 5:4 * CHUNK + 5]


@pytest_twisted.ensureDeferred
async def test_stream_into_a_consumer_that_disconnects(make_loader, tmp_path):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "f"
    write(path, 50 * CHUNK)
    consumer = SlowConsumer(stop_after=3)
    with pytest.raises(ConsumerStopped) as info:
        await loader.stream(path, consumer)
    assert info.value.written == 3 * CHUNK
    assert len(consumer.chunks) == 3
    stats = loader.stats()
    assert stats["open"] == 0 and stats["active"] == 0


@pytest_twisted.ensureDeferred
async def test_stream_missing_file_fails_with_its_error(loader, tmp_path):
    consumer = SlowConsumer()
    with pytest.raises(FileNotFoundError):
        await loader.stream(tmp_path / "nope", consumer)
    assert consumer.producer is None


class Collector(protocol.Protocol):
    def connectionMade(self):
        self.received = []
        self.factory.connected.callback(self)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.factory.done.callback(b"".join(self.received))


@pytest_twisted.ensureDeferred
async def test_stream_into_a_real_tcp_connection(make_loader, tmp_path):
    """Into a real transport on 127.0.0.1, whose buffers fill and drain."""
    loader = make_loader()
    path = tmp_path / "f"
    data = write(path, 8 * 1024 * 1024)
    server_side = defer.Deferred()

    class Sender(protocol.Protocol):
        def connectionMade(self):
            server_side.callback(self)

    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Sender))
    try:
        factory = protocol.ClientFactory.forProtocol(Collector)
        factory.connected, factory.done = defer.Deferred(), defer.Deferred()
        client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(factory)
        sender = await server_side
        written = await loader.stream(path, sender.transport)
        sender.transport.loseConnection()
        received = await factory.done
        assert written == len(data) and received == data
        assert client.received
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_stream_into_a_tcp_connection_that_drops(make_loader, tmp_path):
    loader = make_loader()
    path = tmp_path / "f"
    write(path, 64 * 1024 * 1024)
    server_side = defer.Deferred()

    class Sender(protocol.Protocol):
        def connectionMade(self):
            server_side.callback(self)

    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Sender))
    try:
        class DropsAtFirstBytes(protocol.Protocol):
            def dataReceived(self, data):  # the stream is under way: the client goes
                self.transport.abortConnection()

        factory = protocol.ClientFactory.forProtocol(DropsAtFirstBytes)
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(factory)
        sender = await server_side
        streaming = loader.stream(path, sender.transport)
        with pytest.raises(ConsumerStopped) as info:
            await streaming
        assert 0 < info.value.written < 64 * 1024 * 1024
        await until(lambda: loader.stats()["open"] == 0)
        assert loader.stats()["active"] == 0
    finally:
        await port.stopListening()
