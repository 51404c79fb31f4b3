"""FileLoader against real files: content, ranges, errors, limits, cancellation."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from asyncfile import FileLoader, NotRegularFile, Overloaded, read_file

from .conftest import open_fds

CHUNK = 4096
pytestmark = pytest.mark.usefixtures("no_fd_leak")


def write(path, size, seed=0):
    data = os.urandom(size) if size else b""
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 2 * 1024 * 1024])
@pytest_twisted.ensureDeferred
async def test_whole_file_is_byte_exact(make_loader, tmp_path, size):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, size)
    got = await loader.load(path)
    assert type(got) is bytes
    assert got == data == path.read_bytes()
    stats = loader.stats()
    assert stats["loaded"] == 1 and stats["bytes"] == size and stats["open"] == 0


@pytest_twisted.ensureDeferred
async def test_fifty_megabytes(loader, tmp_path):
    path = tmp_path / "big"
    data = write(path, 50 * 1024 * 1024)
    got = await loader.load(str(path))
    assert len(got) == len(data) and got == data


@pytest_twisted.ensureDeferred
async def test_small_cached_file_completes_without_a_reactor_turn(make_loader, engine, tmp_path):
    if engine not in ("nowait", "io_uring"):
        pytest.skip("only the nowait and io_uring engines read inline")
    loader = make_loader()
    path = tmp_path / "small"
    data = write(path, 16 * 1024)
    await loader.load(path)  # now cached
    d = loader.load(path)
    assert d.called, "a cached small file should load in the calling reactor turn"
    assert await d == data
    assert loader.stats()["pool_reads"] == loader.stats().get("ring_reads", 0) == 0


@pytest.mark.parametrize("proc", ["/proc/version", "/proc/self/cmdline", "/proc/filesystems"])
@pytest_twisted.ensureDeferred
async def test_proc_files_with_size_zero_come_back_whole(make_loader, proc):
    if not os.path.exists(proc):
        pytest.skip("no /proc")
    assert os.stat(proc).st_size == 0
    loader = make_loader(chunk_size=256)
    got = await loader.load(proc)
    assert got and got == open(proc, "rb").read()


@pytest_twisted.ensureDeferred
async def test_file_growing_while_read_comes_back_whole(make_loader, tmp_path):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "growing"
    write(path, 16 * CHUNK)
    appended = []

    def grow():
        with open(path, "ab") as f:
            f.write(os.urandom(5 * CHUNK + 7))
        appended.append(True)

    d = loader.load(path)
    reactor.callLater(0, grow)
    got = await d
    assert appended
    assert got == path.read_bytes() and len(got) == 21 * CHUNK + 7


@pytest_twisted.ensureDeferred
async def test_file_shrinking_while_read_gives_what_is_there(make_loader, tmp_path):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "shrinking"
    write(path, 16 * CHUNK)
    d = loader.load(path)
    reactor.callLater(0, os.truncate, path, 5 * CHUNK + 3)
    got = await d
    assert got == path.read_bytes() and len(got) == 5 * CHUNK + 3


@pytest.mark.parametrize(
    "offset,length",
    [(0, 0), (0, 10), (5, None), (CHUNK - 1, 2), (CHUNK, CHUNK), (3 * CHUNK, None),
     (10 * CHUNK, None), (10 * CHUNK, 5), (3 * CHUNK - 10, 1000), (100, 10 * CHUNK)],
)
@pytest_twisted.ensureDeferred
async def test_ranges_behave_like_pread(make_loader, tmp_path, offset, length):
    loader = make_loader(chunk_size=CHUNK)
    path = tmp_path / "r"
    data = write(path, 3 * CHUNK + 17)
    got = await loader.load(path, offset=offset, length=length)
    end = None if length is None else offset + length
    assert got == data[offset:end]


@pytest.mark.parametrize("offset,length", [(-1, None), (0, -5), (1.5, None), (0, "3")])
@pytest_twisted.ensureDeferred
async def test_bad_ranges_fail_with_value_error(loader, tmp_path, offset, length):
    path = tmp_path / "r"
    write(path, 10)
    with pytest.raises(ValueError):
        await loader.load(path, offset=offset, length=length)


@pytest_twisted.ensureDeferred
async def test_missing_file_is_file_not_found_with_path(loader, tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        await loader.load(path)
    assert info.value.filename == str(path)
    assert loader.stats()["open"] == 0 and loader.stats()["active"] == 0


@pytest_twisted.ensureDeferred
async def test_directory_is_a_directory_error(loader, tmp_path):
    with pytest.raises(IsADirectoryError) as info:
        await loader.load(tmp_path)
    assert info.value.filename == str(tmp_path)


@pytest_twisted.ensureDeferred
async def test_fifo_is_refused_at_once(loader, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = loader.load(fifo)
    with pytest.raises(NotRegularFile) as info:
        await d.addTimeout(2, reactor)
    assert info.value.kind == "FIFO" and info.value.filename == str(fifo)


@pytest_twisted.ensureDeferred
async def test_socket_and_device_are_refused(loader, tmp_path):
    sock_path = str(tmp_path / "sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    try:
        with pytest.raises(NotRegularFile) as info:
            await loader.load(sock_path)
        assert info.value.kind == "socket"
    finally:
        s.close()
    with pytest.raises(NotRegularFile) as info:
        await loader.load("/dev/null")
    assert info.value.kind == "device"


def test_no_permission_is_permission_error(tmp_path, engine):
    """Run as a process without the capabilities that let root read anything."""
    path = tmp_path / "secret"
    path.write_bytes(b"x")
    path.chmod(0)
    program = textwrap.dedent(f"""
        from twisted.internet import task, defer
        from asyncfile import FileLoader
        async def main(reactor):
            try:
                await FileLoader(reactor, engine={engine!r}).load({str(path)!r})
            except Exception as e:
                print(type(e).__name__, e.filename)
        task.react(lambda r: defer.ensureDeferred(main(r)))
    """)
    cmd = [sys.executable, "-c", program]
    if os.geteuid() == 0:
        if not os.path.exists("/usr/bin/setpriv"):
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + cmd
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == f"PermissionError {path}", out.stderr


def _mapped_region_end():
    """The end of a readable mapping followed by an unmapped gap."""
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            regions.append((lo, hi, line.split()[1]))
    for (lo, hi, perms), (nlo, _, _) in zip(regions, regions[1:]):
        if perms.startswith("r") and nlo > hi and hi - lo >= 3 * CHUNK:
            return hi
    pytest.skip("no suitable mapping")


@pytest_twisted.ensureDeferred
async def test_io_error_mid_read_fails_the_load_and_closes(make_loader):
    """/proc/self/mem reads fine up to the end of a mapping, then EIO."""
    loader = make_loader(chunk_size=CHUNK)
    end = _mapped_region_end()
    with pytest.raises(OSError) as info:
        await loader.load("/proc/self/mem", offset=end - 2 * CHUNK)
    assert info.value.errno == 5  # EIO
    assert loader.stats()["open"] == 0 and loader.stats()["chunks" if False else "active"] == 0


@pytest_twisted.ensureDeferred
async def test_read_file_default_loader(tmp_path):
    path = tmp_path / "x"
    data = write(path, 1000)
    assert await read_file(path) == data
    assert await read_file(str(path), offset=10, length=5) == data[10:15]


async def until(condition, timeout=5.0):
    """Let the reactor run until ``condition()`` holds (bounded)."""
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("condition not reached in time")


class PausedConsumer:
    """A consumer that pauses its producer at once: holds a load 'running'."""

    def __init__(self):
        self.producer = None
        self.data = []

    def registerProducer(self, producer, streaming):
        self.producer = producer
        producer.pauseProducing()

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.data.append(data)


@pytest_twisted.ensureDeferred
async def test_overloaded_beyond_max_waiting(make_loader, tmp_path):
    loader = make_loader(max_open=1, max_waiting=2, chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, 10 * CHUNK)
    holder = PausedConsumer()
    streaming = loader.stream(path, holder)
    await until(lambda: holder.producer is not None)
    waiting = [loader.load(path), loader.load(path)]
    assert loader.stats()["waiting"] == 2 and loader.stats()["open"] == 1
    with pytest.raises(Overloaded):
        await loader.load(path)
    assert loader.stats()["rejected"] == 1
    holder.producer.resumeProducing()
    assert await streaming == len(data)
    assert await defer.gatherResults(waiting) == [data, data]
    assert loader.stats()["peak_open"] == 1


@pytest_twisted.ensureDeferred
async def test_cancel_waiting_load_frees_its_place(make_loader, tmp_path):
    loader = make_loader(max_open=1, max_waiting=1, chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, 10 * CHUNK)
    holder = PausedConsumer()
    streaming = loader.stream(path, holder)
    await until(lambda: holder.producer is not None)
    waiter = loader.load(path)
    waiter.cancel()
    with pytest.raises(defer.CancelledError):
        await waiter
    assert loader.stats()["waiting"] == 0
    after = loader.load(path)  # the freed place in the queue is usable
    holder.producer.resumeProducing()
    await streaming
    assert await after == data
    assert loader.stats()["cancelled"] == 1


@pytest_twisted.ensureDeferred
async def test_cancel_running_load_closes_its_descriptor(make_loader, tmp_path):
    loader = make_loader(max_open=1, chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, 2000 * CHUNK)
    before = open_fds()
    d = loader.load(path)
    await until(lambda: loader.stats()["open"] == 1)  # opened, a few chunks in
    assert not d.called
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await until(lambda: loader.stats()["open"] == 0)  # a read in a thread finishes first
    assert loader.stats()["open"] == 0 and loader.stats()["active"] == 0
    assert open_fds() <= before
    assert await loader.load(path) == data


@pytest_twisted.ensureDeferred
async def test_many_concurrent_loads_respect_max_open(make_loader, tmp_path):
    loader = make_loader(max_open=8, chunk_size=CHUNK)
    files = []
    for i in range(60):
        p = tmp_path / f"f{i}"
        files.append((p, write(p, (i * 997) % (5 * CHUNK))))
    results = await defer.gatherResults([loader.load(p) for p, _ in files])
    assert results == [data for _, data in files]
    stats = loader.stats()
    assert stats["peak_open"] <= 8 and stats["loaded"] == 60 and stats["open"] == 0


@pytest_twisted.ensureDeferred
async def test_stats_names_the_engine(loader, engine):
    stats = loader.stats()
    for key in ("engine", "open", "waiting", "loaded", "bytes", "inline_reads", "pool_reads", "rejected"):
        assert key in stats
    assert stats["engine"] == engine


def test_unknown_engine_is_a_value_error():
    with pytest.raises(ValueError):
        FileLoader(reactor, engine="warp")


@pytest_twisted.ensureDeferred
async def test_cancel_a_load_queued_for_the_next_turn_after_handover(make_loader, tmp_path):
    """With the turn's budget spent, loads wait for the next turn; one that turns
    out not to be small is handed to the general path, and cancelling it must
    stop that work (not just the wrapper's Deferred)."""
    loader = make_loader(chunk_size=CHUNK, turn_budget=0.0)
    path = tmp_path / "big"
    write(path, 2000 * CHUNK)
    loads = [loader.load(path) for _ in range(3)]
    await until(lambda: loader.stats()["open"] >= 1)
    for d in loads:
        d.cancel()
    for d in loads:
        with pytest.raises(defer.CancelledError):
            await d
    await until(lambda: loader.stats()["open"] == 0 and loader.stats()["active"] == 0)
    assert loader.stats()["loaded"] == 0


@pytest_twisted.ensureDeferred
async def test_reader_by_hand_reads_one_chunk_per_doread(make_loader, tmp_path):
    loader = make_loader(max_open=1, chunk_size=CHUNK)
    path = tmp_path / "f"
    data = write(path, 5 * CHUNK + 1)
    reader = await loader.reader(path)
    assert loader.stats()["open"] == 1 and not reader.deferred.called
    processed = []
    reader.deferred.addCallback(lambda got: processed.append(len(got)) or got)
    waiting = loader.load(path)  # the place is held while the reader exists
    assert loader.stats()["waiting"] == 1
    assert await reader.start() == data
    assert processed == [len(data)]
    assert reader.chunks == 7  # 6 with data, then the read that returns 0
    assert await waiting == data
    assert loader.stats()["open"] == 0


@pytest_twisted.ensureDeferred
async def test_reader_cancelled_before_start_gives_back_its_place(make_loader, tmp_path):
    loader = make_loader(max_open=1)
    path = tmp_path / "f"
    data = write(path, 100)
    reader = await loader.reader(path)
    reader.deferred.cancel()
    with pytest.raises(defer.CancelledError):
        await reader.deferred
    await until(lambda: loader.stats()["open"] == 0)
    assert await loader.load(path) == data
    with pytest.raises(FileNotFoundError):
        await loader.reader(tmp_path / "missing")
    assert loader.stats()["active"] == 0


@pytest_twisted.ensureDeferred
async def test_uses_root_tells_when_a_root_can_be_closed(loader, tmp_path):
    """``uses_root``: a handle or a write beneath a root keeps it in use until
    closed or finished (the result store closes its root only then)."""
    (tmp_path / "f").write_bytes(b"data")
    root = await loader.open_root(str(tmp_path))
    other = await loader.open_root(str(tmp_path))
    try:
        assert not loader.uses_root(root)
        handle = await loader.open("f", root=root)
        assert loader.uses_root(root) and not loader.uses_root(other)
        await handle.close()  # (closing may take a thread hop: in use until it ends)
        assert not loader.uses_root(root)
        consumer = loader.file_consumer("g", root=root, fsync=False)
        consumer.write(b"new")
        assert loader.uses_root(root)
        assert await consumer.finish() == 3
        assert not loader.uses_root(root)
        assert (tmp_path / "g").read_bytes() == b"new"
    finally:
        root.close()
        other.close()
