"""The io_uring engine itself: batching, a full ring, cancellation, teardown,
and that the reactor waits on an eventfd (no polling of file descriptors).

The whole asyncfile suite also runs on this engine (``ENGINES`` in
conftest); these tests cover what only it has.  Slow operations come from a
FUSE mount (``slow_fs``) whose opens or reads sleep.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from asyncfile import FileLoader, FileReader, LoaderClosed
from asyncfile.engines import IOPool, make_engine
from asyncfile.engines import uring as uring_module
from asyncfile.engines._uring import RingClosed, UringUnavailable, probe
from asyncfile.testing import pagecache

from .conftest import open_fds
from .test_loader import until

REASON = probe()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"io_uring unusable: {REASON}"),
    pytest.mark.timeout(60),
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ring_loader():
    """Loaders on a UringEngine built with the given options; closed after the test."""
    made = []

    def make(max_open=64, chunk_size=256 * 1024, turn_budget=0.001, **engine_options):
        engine = make_engine("io_uring", reactor, IOPool(reactor), **engine_options)
        loader = FileLoader(reactor, max_open=max_open, max_waiting=10_000, chunk_size=chunk_size, engine=engine,
                            turn_budget=turn_budget)
        made.append(loader)
        return loader

    yield make
    pytest_twisted.blockon(defer.gatherResults([loader.close() for loader in made]).addTimeout(30, reactor))


def fds_without(loader):
    return open_fds() - {str(fd) for fd in loader.engine.owned_fds()}


def write_files(directory, count, size):
    data = {}
    for i in range(count):
        path = os.path.join(directory, f"f{i:03d}")
        blob = os.urandom(size)
        with open(path, "wb") as f:
            f.write(blob)
        data[path] = blob
    return data


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_many_loads_share_few_submits(ring_loader, tmp_path):
    loader = ring_loader(inline=False)  # every open, read and close in the ring
    data = write_files(tmp_path, 200, 4096)
    results = await defer.gatherResults([loader.load(p) for p in data])
    assert results == list(data.values())
    stats = loader.stats()
    # open, statx, read, read (end of file), close
    assert stats["ring_ops"] >= 5 * len(data)
    assert stats["inline_reads"] == stats["inline_opens"] == 0
    assert stats["ring_submits"] * 8 <= stats["ring_ops"], stats
    assert stats["ring_in_flight"] == stats["ring_queued"] == 0


@pytest_twisted.ensureDeferred
async def test_a_full_ring_makes_requests_wait_not_fail(ring_loader, tmp_path):
    loader = ring_loader(max_open=100, entries=4, inline=False)  # 4 SQ, 8 CQ entries
    data = write_files(tmp_path, 100, 3000)
    results = await defer.gatherResults([loader.load(p) for p in data])
    assert results == list(data.values())
    stats = loader.stats()
    assert stats["ring_waited"] > 0
    assert stats["ring_peak_in_flight"] <= 8
    assert stats["ring_in_flight"] == stats["ring_queued"] == 0
    assert stats["errors"] == 0


@pytest.fixture
def fault_fs(tmp_path):
    """A FaultFS mount of its own (gates that park opens in the daemon)."""
    from asyncfile.testing.faultfs import FaultFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    source = tmp_path / "faultfs-source"
    source.mkdir()
    fs = FaultFS(source, gate_timeout=30.0)
    with fs:
        yield fs


@pytest_twisted.ensureDeferred
async def test_cancelled_opens_close_what_they_opened(ring_loader, fault_fs):
    """10 opens on a 2-entry ring (4 in flight): 4 reach the kernel and park
    in the FUSE daemon, 6 wait for room in the ring.  Cancelled, the 6 are
    dropped without reaching the kernel; the 4 are let go afterwards, and
    what they opened is closed.

    Gates, not delays: an open delay raced the test's own turns on a loaded
    machine.  ``turn_budget=None`` starts every open in the calling turn
    (with a budget, a loaded machine defers some to later turns: they then
    wait in the loader, not in the ring's FIFO).
    """
    loader = ring_loader(entries=2, turn_budget=None)  # 2 SQ, 4 CQ entries: 4 ops in flight
    names = [f"f{i:03d}" for i in range(10)]
    for name in names:
        with open(os.path.join(fault_fs.source, name), "wb") as f:
            f.write(b"x" * 100)
        fault_fs.set_fault(name, open_gate=True)
    paths = [os.path.join(fault_fs.mount, name) for name in names]
    loads = [loader.load(p) for p in paths]
    stats = loader.stats()
    assert (stats["ring_in_flight"], stats["ring_queued"]) == (4, 6), stats
    # The 4 opens are in the kernel, parked in the daemon (an io-wq worker each).
    assert await fault_fs.when_blocked(reactor, None, "open", timeout=10, count=4) == 4
    before = fds_without(loader)
    for d in loads:
        d.cancel()
    for d in loads:
        with pytest.raises(defer.CancelledError):
            await d
    # Those waiting for room were dropped without reaching the kernel (the
    # cancel requests for the 4 running opens wait for room themselves).
    assert loader.stats()["ring_dropped"] == len(paths) - 4
    for name in names:
        fault_fs.release_opens(name)
    await until(lambda: loader.stats()["ring_in_flight"] == 0)  # opens done, their fds closed
    await fault_fs.when_closed(reactor, None, timeout=10)  # the daemon saw every close
    assert fault_fs.stats()["opens"] == 4  # the 6 others never reached the file system
    assert fds_without(loader) <= before
    assert not any(os.readlink(f"/proc/self/fd/{fd}").startswith(fault_fs.mount) for fd in fds_without(loader))
    assert loader.stats()["active"] == 0 and loader.stats()["open"] == 0


@pytest.mark.slowfs(read_delay=0.3)
@pytest_twisted.ensureDeferred
async def test_cancelled_read_keeps_its_descriptor_until_the_kernel_is_done(ring_loader, slow_fs):
    loader = ring_loader()
    engine = loader.engine
    write_files(slow_fs.source, 1, 8192)
    path = os.path.join(slow_fs.mount, "f000")
    handle = await loader.open(path)
    f = handle.file
    assert not f.inline  # FUSE: read through the ring
    read = loader.load(handle)
    await until(lambda: loader.stats()["ring_in_flight"] >= 1)
    await sleep(0.05)  # the read is in the kernel (FUSE cannot cancel it)
    read.cancel()
    with pytest.raises(defer.CancelledError):
        await read  # a cancelled Deferred fires at once
    closing = handle.close()
    assert not closing.called
    assert os.readlink(f"/proc/self/fd/{f.fd}") == path  # still open: the kernel may use it
    assert loader.stats()["open"] == 1 and loader.stats()["active"] == 1
    in_flight_when_closed = []
    closing.addCallback(lambda _: in_flight_when_closed.append(loader.stats()["ring_in_flight"]))
    await closing.addTimeout(5, reactor)
    assert in_flight_when_closed == [0]  # closed only once the kernel had completed the read
    assert loader.stats()["ring_in_flight"] == 0 and loader.stats()["open"] == 0
    assert loader.stats()["active"] == 0
    assert not os.path.exists(f"/proc/self/fd/{f.fd}") or os.readlink(f"/proc/self/fd/{f.fd}") != path


@pytest.mark.slowfs(read_delay=0.5)
@pytest_twisted.ensureDeferred
async def test_stop_with_operations_in_flight_and_waiting(ring_loader, slow_fs):
    loader = ring_loader(entries=4)
    engine = loader.engine
    paths = [os.path.join(slow_fs.mount, os.path.basename(p)) for p in write_files(slow_fs.source, 12, 4096)]
    before = open_fds()
    loads = [loader.load(p) for p in paths]
    await until(lambda: loader.stats()["ring_reads"] >= 4)  # reads in the kernel, more requests waiting
    assert loader.stats()["ring_in_flight"] >= 4
    driver = engine.backend.driver
    ring = driver.ring
    closing = loader.close()  # cancel, let the kernel finish (FUSE reads), close
    # Returned before the kernel finished the reads (their completions are
    # reaped in later reactor turns): it never waits for them in this thread.
    # (No wall-clock bound: a loaded machine stalls any call now and then.)
    assert not closing.called and not ring.closed
    outcomes = await defer.DeferredList(loads, consumeErrors=True).addTimeout(5, reactor)
    for ok, outcome in outcomes:
        assert not ok
        assert outcome.check(LoaderClosed, defer.CancelledError), outcome
    await closing.addTimeout(5, reactor)
    assert ring.closed and engine.owned_fds() == set()
    assert driver not in reactor.getReaders()
    assert open_fds() <= before
    assert loader.stats()["open"] == 0 and loader.stats()["active"] == 0
    with pytest.raises(LoaderClosed):
        await loader.load(paths[0])  # the loader is closed; nothing leaks either


@pytest.mark.slowfs(read_delay=0.2)
@pytest_twisted.ensureDeferred
async def test_reactor_waits_on_the_eventfd_not_on_files(ring_loader, slow_fs):
    loader = ring_loader()
    engine = loader.engine
    paths = [os.path.join(slow_fs.mount, os.path.basename(p)) for p in write_files(slow_fs.source, 5, 4096)]
    loads = defer.gatherResults([loader.load(p) for p in paths])
    await until(lambda: loader.stats()["ring_reads"] >= 5)  # every load waits for a read now
    readers = reactor.getReaders()
    driver = engine.backend.driver
    assert driver in readers
    assert not [r for r in readers if isinstance(r, FileReader)]
    assert os.readlink(f"/proc/self/fd/{driver.fileno()}") == "anon_inode:[eventfd]"
    polling = getattr(reactor, "_continuousPolling", None)
    if polling is not None:  # epoll and asyncio reactors poll what epoll refuses
        assert not polling.getReaders()
    await loads


@pytest_twisted.ensureDeferred
async def test_cached_files_take_the_inline_path(ring_loader, tmp_path):
    loader = ring_loader()
    data = write_files(tmp_path, 10, 20_000)
    for p in data:
        await loader.load(p)  # cached now
    before = loader.stats()
    results = await defer.gatherResults([loader.load(p) for p in data])
    assert results == list(data.values())
    after = loader.stats()
    assert after["ring_reads"] == before["ring_reads"] and after["ring_opens"] == before["ring_opens"] == 0
    assert after["inline_reads"] > before["inline_reads"]


@pytest_twisted.ensureDeferred
async def test_evicted_file_is_read_through_the_ring(ring_loader, tmp_path):
    loader = ring_loader()
    path = tmp_path / "cold"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    # Another process's readahead on a busy machine can bring pages back
    # between the eviction and the load: a few tries, each checked cold.
    for attempt in range(3):
        pagecache.evict(path)
        if pagecache.cached_fraction(path) > 0:
            pytest.skip("this file system keeps the pages (tmpfs?)")
        assert await loader.load(path) == data
        if loader.stats()["ring_reads"] >= 1:
            break
    stats = loader.stats()
    assert stats["ring_reads"] >= 1 and stats["pool_reads"] == 0


def test_auto_picks_io_uring_where_the_kernel_allows_it(monkeypatch):
    import asyncfile.engines as engines

    engine = make_engine("auto", reactor, IOPool(reactor))
    try:
        assert engine.name == "io_uring"
    finally:
        engine.stop()
    monkeypatch.setattr(engines, "uring_unavailable_reason", lambda: "io_uring_setup: EPERM (test)")
    engine = make_engine("auto", reactor, IOPool(reactor))
    assert engine.name == "nowait"
    engine.stop()


def test_unusable_io_uring_is_a_value_error_with_the_reason(monkeypatch):
    import asyncfile.engines as engines

    monkeypatch.setattr(engines, "uring_unavailable_reason", lambda: "io_uring_setup: EPERM (test)")
    with pytest.raises(ValueError, match="EPERM \\(test\\)"):
        make_engine("io_uring", reactor, IOPool(reactor))
    monkeypatch.setattr(uring_module, "uring_unavailable_reason", lambda: "nope")
    with pytest.raises(UringUnavailable, match="nope"):
        uring_module.RingBackend(reactor, IOPool(reactor), lambda p: False, slow_dev=lambda d: False)


@pytest.mark.slowfs(read_delay=0.5)
def test_reactor_shutdown_stops_the_engine(slow_fs):
    """A process stopping its reactor with ring reads in flight exits
    promptly, its engine stopped (the shutdown trigger ran)."""
    with open(os.path.join(slow_fs.source, "f"), "wb") as f:
        f.write(b"x" * 4096)
    program = textwrap.dedent(f"""
        import os
        from twisted.internet import reactor
        from asyncfile import FileLoader
        loader = FileLoader(reactor, engine="io_uring")
        outcome = []
        def go():
            d = loader.load({os.path.join(slow_fs.mount, "f")!r})
            d.addBoth(lambda r: outcome.append(type(r).__name__))
            reactor.callLater(0.2, reactor.stop)
        reactor.callWhenRunning(go)
        reactor.run()
        driver = loader.engine.backend.driver
        print("stopped", driver.stopped, "in_flight", driver.in_flight, "outcome", outcome,
              "open", loader.stats()["open"])
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("stopped True in_flight 0"), out.stdout + out.stderr
