"""asyncfile.testing.MemoryLoader: FileLoader's contract in memory, on a Clock."""

from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from asyncfile import ConsumerStopped, FileLoader, IFileLoader, Overloaded
from asyncfile.testing import MemoryLoader


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_both_loaders_provide_the_interface():
    from twisted.internet import reactor

    verifyObject(IFileLoader, MemoryLoader())
    loader = FileLoader(reactor)
    verifyObject(IFileLoader, loader)
    loader.close()
    assert isinstance(MemoryLoader(), FileLoader)


def test_loads_ranges_and_errors_without_latency():
    loader = MemoryLoader({"/a": b"hello world", "/dir/b": b"x"})
    assert result_of(loader.load("/a")) == b"hello world"
    assert result_of(loader.load("/a", offset=6, length=3)) == b"wor"
    assert result_of(loader.load("/a", offset=50)) == b""
    assert result_of(loader.load("/nope")).check(FileNotFoundError)
    assert result_of(loader.load("/dir")).check(IsADirectoryError)
    assert result_of(loader.load("/a\0")).check(ValueError)
    stats = loader.stats()
    assert stats["loaded"] == 3 and stats["errors"] == 3 and stats["engine"] == "memory"


def test_an_oserror_entry_fails_with_it():
    loader = MemoryLoader({"/locked": PermissionError(13, "Permission denied", "/locked")})
    assert result_of(loader.load("/locked")).check(PermissionError)


def test_latency_queueing_and_overload_on_a_clock():
    clock = task.Clock()
    loader = MemoryLoader({"/a": b"A"}, reactor=clock, latency=1.0, max_open=2, max_waiting=1)
    running = [loader.load("/a"), loader.load("/a")]
    waiting = loader.load("/a")
    assert result_of(loader.load("/a")).check(Overloaded)
    assert loader.stats()["waiting"] == 1
    clock.advance(1.0)
    assert [result_of(d) for d in running] == [b"A", b"A"]
    assert not waiting.called
    clock.advance(1.0)
    assert result_of(waiting) == b"A"


def test_cancel_frees_the_place_and_the_timer():
    clock = task.Clock()
    loader = MemoryLoader({"/a": b"A"}, reactor=clock, latency=5.0, max_open=1)
    first = loader.load("/a")
    second = loader.load("/a")
    first.cancel()
    assert result_of(first).check(defer.CancelledError)
    assert len(clock.getDelayedCalls()) == 1  # second's timer only
    clock.advance(5.0)
    assert result_of(second) == b"A"
    assert loader.stats()["open"] == 0


class Collecting:
    def __init__(self, stop_after=None):
        self.data, self.producer, self.stop_after = [], None, stop_after

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.data.append(data)
        if self.stop_after and len(self.data) >= self.stop_after:
            self.producer.stopProducing()


def test_stream_in_chunks_with_stop():
    clock = task.Clock()
    loader = MemoryLoader({"/a": b"x" * 10}, reactor=clock, latency=0.1, chunk_size=3)
    consumer = Collecting()
    d = loader.stream("/a", consumer)
    clock.pump([0.1] * 5)
    assert result_of(d) == 10 and b"".join(consumer.data) == b"x" * 10
    stopper = Collecting(stop_after=2)
    d = loader.stream("/a", stopper)
    clock.pump([0.1] * 5)
    assert result_of(d).check(ConsumerStopped)


def test_latency_without_a_reactor_is_refused():
    loader = MemoryLoader({"/a": b"A"}, latency=1.0)
    assert result_of(loader.load("/a")).check(ValueError)


def test_handles_roots_and_limits_are_the_real_ones():
    clock = task.Clock()
    loader = MemoryLoader({"/img/a.jpg": b"0123456789"}, reactor=clock, latency=1.0, max_open=1)
    root = result_of(loader.open_root("/img"))
    handle_d = loader.open("a.jpg", root=root)
    handle = result_of(handle_d)
    assert handle.size == 10 and loader.stats()["open"] == 1
    waiting = loader.load("a.jpg", root=root)  # max_open=1: the handle holds the place
    assert not waiting.called and loader.stats()["waiting"] == 1
    ranged = loader.load(handle, 2, 3)
    clock.advance(1.0)
    assert result_of(ranged) == b"234"
    escaping = loader.load("../etc/passwd", root=root)  # waits for a place like any load
    closing = handle.close()
    assert result_of(closing) is None and handle.closed
    assert loader.stats()["open"] == 1 and loader.stats()["waiting"] == 1  # the next load took the place
    clock.advance(1.0)
    assert result_of(waiting) == b"0123456789"
    assert result_of(escaping).type.__name__ == "OutsideRoot"
    assert result_of(loader.close()) is None
    assert result_of(loader.load("a.jpg", root=root)).check(Exception)
