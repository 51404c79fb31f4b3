"""Writes off the reactor thread: ``FileLoader.write`` and ``FileConsumer``.

Against real files on every engine: round trips, atomic replacement while
readers (asyncfile loads and plain reads in threads) read, a full disk (a
real 256 KiB tmpfs), cancellation in every state, confinement beneath a
``Root``, errors of every type, ``loader.close()`` during writes, consumers
fed by real producers, and a hypothesis test of chunkings.

Races are made deterministic by parking a step in its pool thread: the
test replaces ``asyncfile.writer._os_write`` / ``_os_fsync`` /
``_os_rename`` with a ``Gate`` that waits for the test, or fills the
loader's only I/O thread with a blocked job.  Every test checks that no
descriptor is left open (``no_fd_leak``) and no temporary file is left
anywhere beneath ``tmp_path`` (``no_temp_files``).
"""

from __future__ import annotations

import errno
import os
import pathlib
import stat
import subprocess
import sys
import threading
from typing import Any, Callable

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.protocols import basic
from zope.interface import implementer
from zope.interface.verify import verifyObject

from asyncfile import FileSender, LoaderClosed, NotRegularFile, OutsideRoot, Overloaded
from asyncfile import writer
from asyncfile.writer import TEMP_SUFFIX, FileConsumer, WriteState

from .conftest import open_fds
from .test_model import run_in_greenlet, spin_until as model_spin_until
from .test_ownership import WAIT, KiB, Outcome, _InsertionOrdered, assert_idle, turns, until

MiB = 1024 * KiB

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class Gate:
    """Stands in for a system call: the first ``times`` calls (that ``match``)
    park in their pool thread until ``release()``; the rest go through."""

    def __init__(self, real: Callable[..., Any], times: int = 1,
                 match: Callable[..., bool] = lambda *a, **k: True) -> None:
        self.real = real
        self.left = times
        self.match = match
        self.entered = threading.Event()
        self._release = threading.Event()
        self.parked = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.left > 0 and self.match(*args, **kwargs):
            self.left -= 1
            self.parked += 1
            self.entered.set()
            if not self._release.wait(WAIT * 3):  # never hang a pool thread for good
                raise AssertionError("gate never released")
        return self.real(*args, **kwargs)

    def release(self) -> None:
        self._release.set()

    async def reached(self) -> None:
        await until(self.entered.is_set, what="a step parked at the gate")


@pytest.fixture
def gates(monkeypatch):
    """``gates("_os_write", times=1)``: park that call of asyncfile.writer;
    every gate is released at teardown."""
    made: list[Gate] = []

    def make(name: str, times: int = 1, match: Callable[..., bool] = lambda *a, **k: True) -> Gate:
        gate = Gate(getattr(writer, name), times, match)
        monkeypatch.setattr(writer, name, gate)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.release()


def temp_files(top: Any) -> list[str]:
    """Temporary files of asyncfile's writes beneath ``top``."""
    found = []
    for dirpath, _dirs, files in os.walk(top):
        found += [os.path.join(dirpath, f) for f in files if f.endswith(TEMP_SUFFIX)]
    return found


@pytest.fixture(autouse=True)
def no_temp_files(tmp_path):
    yield
    assert temp_files(tmp_path) == []


def fds_on(path: Any) -> list[str]:
    """This process's descriptors on ``path`` or beneath it (also deleted ones)."""
    prefix = os.path.realpath(os.fspath(path))
    found = []
    for fd in open_fds():
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link == prefix or link.startswith(prefix + "/"):
            found.append(link)
    return found


async def ended(consumer: FileConsumer) -> None:
    await until(lambda: consumer.state in (WriteState.DONE, WriteState.FAILED), what=f"{consumer!r} ended")


def version(v: int, size: int) -> bytes:
    return bytes([v]) * size


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB tmpfs (needs root / CAP_SYS_ADMIN, else skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {got.stderr.strip() or got.returncode}")
    try:
        yield mount
    finally:
        left = temp_files(mount)
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
    assert left == []


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_round_trip(loader, tmp_path, no_fd_leak):
    target = tmp_path / "a.bin"
    data = os.urandom(3 * MiB + 17)
    assert await loader.write(target, data) == len(data)
    assert target.read_bytes() == data
    assert await loader.load(target) == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    # bytes-like data is copied; empty data makes an empty file
    buf = bytearray(b"abc")
    d = loader.write(str(target), buf, mode=0o600)
    buf[:] = b"xyz"
    assert await d == 3
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # exactly, whatever the umask
    assert await loader.write(os.fsencode(target), memoryview(b"")) == 0
    assert target.read_bytes() == b""
    s = loader.stats()
    assert (s["written"], s["write_bytes"], s["errors"]) == (3, len(data) + 3, 0)
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_atomic_write_replaces_the_inode_and_plain_write_keeps_it(loader, tmp_path, no_fd_leak):
    target = tmp_path / "t"
    target.write_bytes(b"old contents, longer than the new")
    ino = target.stat().st_ino
    await loader.write(target, b"new", fsync=False)
    assert target.read_bytes() == b"new" and target.stat().st_ino != ino
    ino = target.stat().st_ino
    os.chmod(target, 0o640)
    assert await loader.write(target, b"in place", atomic=False) == 8
    assert target.read_bytes() == b"in place" and target.stat().st_ino == ino
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # an existing file keeps its mode
    await loader.write(tmp_path / "created", b"x", atomic=False, mode=0o600)
    assert stat.S_IMODE((tmp_path / "created").stat().st_mode) == 0o600
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_an_atomic_write_replaces_a_symlink_instead_of_following_it(loader, tmp_path, no_fd_leak):
    (tmp_path / "real").write_bytes(b"real")
    (tmp_path / "link").symlink_to("real")
    await loader.write(tmp_path / "link", b"new")
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link").read_bytes() == b"new"
    assert (tmp_path / "real").read_bytes() == b"real"


@pytest_twisted.ensureDeferred
async def test_relative_paths_are_relative_to_the_working_directory(loader, tmp_path, monkeypatch,
                                                                   no_fd_leak):
    monkeypatch.chdir(tmp_path)
    await loader.write("rel.txt", b"here")
    assert (tmp_path / "rel.txt").read_bytes() == b"here"


# ---------------------------------------------------------------------------
# Readers racing with writers
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_readers_see_the_old_or_the_new_file_never_a_mix(make_loader, tmp_path, no_fd_leak):
    """Two writers replace a 600 KiB file over and over with distinguishable
    contents (every byte = the version number) while asyncfile loads and
    plain 64 KiB reads in threads read it: every read is one whole version."""
    loader = make_loader(chunk_size=64 * KiB)  # a load is several reads
    size = 600 * KiB
    target = tmp_path / "raced"
    target.write_bytes(version(1, size))
    seen: set[int] = set()
    bad: list[str] = []
    writing = True

    def check(data: bytes, who: str) -> None:
        if len(data) != size or data != data[:1] * size:
            bad.append(f"{who}: {len(data)} bytes, first {data[:1]!r}, "
                       f"versions {sorted(set(data))[:8]}")
        else:
            seen.add(data[0])

    stop = threading.Event()

    def plain_reader() -> None:
        while not stop.is_set():
            with open(target, "rb", buffering=0) as f:
                parts = []
                while True:
                    part = f.read(64 * KiB)
                    if not part:
                        break
                    parts.append(part)
            check(b"".join(parts), "plain read")

    threads = [threading.Thread(target=plain_reader, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()

    async def load_reader() -> int:
        n = 0
        while writing:
            check(await loader.load(target), "asyncfile load")
            n += 1
        return n

    async def writer_task(versions: range) -> None:
        for v in versions:
            assert await loader.write(target, version(v, size)) == size

    try:
        readers = [defer.ensureDeferred(load_reader()) for _ in range(6)]
        await defer.gatherResults([defer.ensureDeferred(writer_task(range(2, 40, 2))),
                                   defer.ensureDeferred(writer_task(range(3, 40, 2)))],
                                  consumeErrors=True)
        writing = False
        loads = sum(await defer.gatherResults(readers, consumeErrors=True))
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT)
    check(await loader.load(target), "final load")
    assert not bad, bad[:5]
    assert loads > 0 and len(seen) >= 2, (loads, seen)
    assert loader.stats()["written"] == 38
    assert_idle(loader)


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_with_enospc_and_leaves_the_old_file(loader, small_fs, no_fd_leak):
    target = small_fs / "t"
    old = version(7, 32 * KiB)
    await loader.write(target, old)
    with pytest.raises(OSError) as raised:
        await loader.write(target, os.urandom(MiB))
    assert raised.value.errno == errno.ENOSPC and type(raised.value) is OSError
    assert raised.value.filename == str(target)
    assert os.listdir(small_fs) == ["t"]
    assert target.read_bytes() == old
    assert fds_on(small_fs) == []
    # the space is back: a write that fits works
    assert await loader.write(target, version(8, 64 * KiB)) == 64 * KiB
    s = loader.stats()
    assert (s["errors"], s["written"]) == (1, 2)
    # not atomic: the same error (the file is left partly written)
    with pytest.raises(OSError) as raised:
        await loader.write(small_fs / "plain", os.urandom(MiB), atomic=False)
    assert raised.value.errno == errno.ENOSPC
    assert fds_on(small_fs) == []
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_the_consumer_and_stops_its_producer(loader, small_fs, no_fd_leak):
    target = small_fs / "upload"
    consumer = loader.file_consumer(target, max_buffer=64 * KiB)
    producer = PushProducer(consumer, chunk=16 * KiB, total=2 * MiB)
    consumer.registerProducer(producer, True)
    producer.start()
    await until(lambda: producer.stopped, what="the producer stopped")
    with pytest.raises(OSError) as raised:
        await consumer.finish()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert os.listdir(small_fs) == [] and fds_on(small_fs) == []
    assert_idle(loader)


# ---------------------------------------------------------------------------
# Cancellation in every state
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_cancel_while_waiting_for_a_place(make_loader, tmp_path, no_fd_leak):
    loader = make_loader(max_open=1, max_waiting=1)
    (tmp_path / "held").write_bytes(b"h")
    handle = await loader.open(tmp_path / "held")  # the only place
    queued = Outcome(loader.write(tmp_path / "w", b"data"))
    assert loader.stats()["waiting"] == 1
    with pytest.raises(Overloaded):  # the queue is full
        await loader.write(tmp_path / "w2", b"data")
    with pytest.raises(Overloaded):
        loader.file_consumer(tmp_path / "w3")
    await turns()
    assert not queued.fired and not (tmp_path / "w").exists()
    await handle.close()
    assert await queued.wait() == 4  # it got the place once the handle was closed
    # cancel one that waits
    handle = await loader.open(tmp_path / "held")
    d = loader.write(tmp_path / "never", b"data")
    outcome = Outcome(d)
    d.cancel()
    assert outcome.failed_with(defer.CancelledError) and outcome.fired == 1  # at once
    assert loader.stats()["waiting"] == 0
    await handle.close()
    await turns()
    assert sorted(os.listdir(tmp_path)) == ["held", "w"]
    s = loader.stats()
    assert (s["cancelled"], s["rejected"], s["errors"]) == (1, 2, 0)
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_while_the_open_is_queued_in_the_pool_never_runs_it(make_loader, tmp_path, no_fd_leak):
    loader = make_loader(io_threads=1)
    blocker = threading.Event()
    busy = loader.pool.run(blocker.wait, WAIT)  # the only I/O thread
    try:
        d = loader.write(tmp_path / "w", b"data")
        outcome = Outcome(d)
        await turns()
        assert loader.stats()["io_queue"] == 1 and loader.stats()["active"] == 1
        d.cancel()
        assert outcome.failed_with(defer.CancelledError)
        assert loader.stats()["io_queue"] == 0 and loader.stats()["active"] == 0  # place back at once
    finally:
        blocker.set()
    await busy
    await turns()
    assert os.listdir(tmp_path) == []
    assert loader.stats()["io_cancelled_unstarted"] >= 1
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_while_the_temporary_file_is_being_created(loader, tmp_path, gates, no_fd_leak):
    gate = gates("_os_open")
    d = loader.write(tmp_path / "t", b"new")
    outcome = Outcome(d)
    await gate.reached()
    d.cancel()
    assert outcome.failed_with(defer.CancelledError)
    assert loader.stats()["active"] == 1  # the open still runs, and keeps its place
    gate.release()  # the temporary file is created now, and must go again
    await until(lambda: loader.stats()["active"] == 0)
    assert os.listdir(tmp_path) == [] and fds_on(tmp_path) == []
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_abort_while_a_write_step_is_queued_never_runs_it(make_loader, tmp_path, gates, no_fd_leak):
    loader = make_loader(io_threads=1)
    write_gate = gates("_os_write", times=0)  # counts calls only
    consumer = loader.file_consumer(tmp_path / "t")
    await until(lambda: consumer.state is WriteState.OPEN)
    blocker = threading.Event()
    busy = loader.pool.run(blocker.wait, WAIT)  # the only I/O thread
    try:
        consumer.write(b"queued")
        assert loader.stats()["io_queue"] == 1
        aborted = Outcome(consumer.abort())
        await turns()
        assert not aborted.fired and len(temp_files(tmp_path)) == 1  # the cleanup waits for the thread
    finally:
        blocker.set()
    await busy
    assert await aborted.wait() is None
    assert write_gate.calls == 0  # the queued write never ran
    assert os.listdir(tmp_path) == []
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_during_a_write_step_removes_the_temporary_file(loader, tmp_path, gates, no_fd_leak):
    target = tmp_path / "t"
    target.write_bytes(b"old")
    gate = gates("_os_write")
    d = loader.write(target, os.urandom(4 * MiB))
    outcome = Outcome(d)
    await gate.reached()
    assert len(temp_files(tmp_path)) == 1 and loader.stats()["open"] == 1
    d.cancel()
    assert outcome.failed_with(defer.CancelledError) and outcome.fired == 1  # at once
    assert len(temp_files(tmp_path)) == 1  # the step still runs
    assert loader.stats()["active"] == 1  # and holds its place
    gate.release()
    await until(lambda: loader.stats()["active"] == 0)
    assert temp_files(tmp_path) == [] and target.read_bytes() == b"old"
    assert gate.calls <= 2  # stopped after the piece that was running
    assert fds_on(tmp_path) == []
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_during_the_fsync_prevents_the_rename(loader, tmp_path, gates, no_fd_leak):
    target = tmp_path / "t"
    target.write_bytes(b"old")
    gate = gates("_os_fsync")
    d = loader.write(target, b"new")
    outcome = Outcome(d)
    await gate.reached()
    d.cancel()
    assert outcome.failed_with(defer.CancelledError)
    gate.release()
    await until(lambda: loader.stats()["active"] == 0)
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []
    assert loader.stats()["written"] == 0
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_during_the_rename_may_commit_but_never_half(loader, tmp_path, gates, no_fd_leak):
    target = tmp_path / "t"
    target.write_bytes(b"old")
    gate = gates("_os_rename")
    d = loader.write(target, b"new")
    outcome = Outcome(d)
    await gate.reached()
    d.cancel()
    assert outcome.failed_with(defer.CancelledError)
    gate.release()
    await until(lambda: loader.stats()["active"] == 0)
    # The rename was already running: it happened, whole (documented).
    assert target.read_bytes() == b"new" and temp_files(tmp_path) == []
    assert loader.stats()["written"] == 1
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_cancel_a_plain_write_closes_its_descriptor(loader, tmp_path, gates, no_fd_leak):
    gate = gates("_os_write")
    d = loader.write(tmp_path / "plain", os.urandom(2 * MiB), atomic=False)
    outcome = Outcome(d)
    await gate.reached()
    d.cancel()
    assert outcome.failed_with(defer.CancelledError)
    gate.release()
    await until(lambda: loader.stats()["active"] == 0)
    assert fds_on(tmp_path) == [] and (tmp_path / "plain").exists()  # left as far as it got
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_a_second_cancel_or_abort_changes_nothing(loader, tmp_path, no_fd_leak):
    consumer = loader.file_consumer(tmp_path / "c")
    consumer.write(b"abc")
    d = consumer.finish()
    outcome = Outcome(d)
    d.cancel()
    d.cancel()
    aborted = await consumer.abort()
    assert aborted is None and outcome.fired == 1 and outcome.failed_with(defer.CancelledError)
    assert consumer.state is WriteState.FAILED
    assert await consumer.abort() is None
    assert loader.stats()["cancelled"] == 1
    assert not (tmp_path / "c").exists()
    assert_idle(loader)


# ---------------------------------------------------------------------------
# Confinement
# ---------------------------------------------------------------------------

@pytest.fixture(params=["openat2", "walk"])
def confined(request, loader, tmp_path):
    """(root, inside, outside) directories; the Root's method as parametrized."""
    from asyncfile.confine import openat2_unavailable_reason

    if request.param == "openat2" and openat2_unavailable_reason() is not None:
        pytest.skip(openat2_unavailable_reason())
    inside = tmp_path / "root"
    outside = tmp_path / "outside"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (inside / "out").symlink_to(outside)           # a directory outside
    (inside / "esc").symlink_to(outside / "secret")  # a file outside
    (inside / "insub").symlink_to("sub")           # a directory inside
    root = pytest_twisted.blockon(loader.open_root(inside))
    root.method = request.param
    yield root, inside, outside
    root.close()


@pytest_twisted.ensureDeferred
async def test_writes_are_confined_beneath_the_root(loader, confined, no_fd_leak):
    root, inside, outside = confined
    before = sorted(os.listdir(outside))
    assert await loader.write("sub/f", b"in", root=root) == 2
    assert (inside / "sub" / "f").read_bytes() == b"in"
    for path in ["../outside/x", "/abs", str(outside / "x"), "sub/../../outside/x", "out/x", "..",
                 "sub/.."]:
        for atomic in (True, False):
            with pytest.raises(OutsideRoot) as raised:
                await loader.write(path, b"no", root=root, atomic=atomic)
            assert raised.value.filename == path
    with pytest.raises(OutsideRoot):  # a symlink leading outside, followed by a plain write
        await loader.write("esc", b"no", root=root, atomic=False)
    assert sorted(os.listdir(outside)) == before and (outside / "secret").read_bytes() == b"secret"
    # an atomic write replaces the link itself: nothing outside changes
    await loader.write("esc", b"link replaced", root=root)
    assert not (inside / "esc").is_symlink() and (outside / "secret").read_bytes() == b"secret"
    # a symlink inside: followed with openat2, refused by the walk
    if root.method == "openat2":
        await loader.write("insub/g", b"g", root=root)
        assert (inside / "sub" / "g").read_bytes() == b"g"
    else:
        with pytest.raises(OutsideRoot):
            await loader.write("insub/g", b"g", root=root)
    assert loader.stats()["errors"] == 15 + (root.method == "walk")
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_a_closed_root_is_refused(loader, tmp_path, no_fd_leak):
    root = await loader.open_root(tmp_path)
    root.close()
    with pytest.raises(ValueError):
        await loader.write("f", b"x", root=root)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Errors keep their type and the path
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_errors_keep_their_type_and_the_path(loader, tmp_path, gates, no_fd_leak):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"f")
    os.mkfifo(tmp_path / "fifo")
    cases: list[tuple[str, dict[str, Any], type[BaseException]]] = [
        ("missing/x", {}, FileNotFoundError),
        ("missing/x", {"atomic": False}, FileNotFoundError),
        ("dir", {}, IsADirectoryError),
        ("dir", {"atomic": False}, IsADirectoryError),
        ("dir/", {}, IsADirectoryError),
        ("file/x", {}, NotADirectoryError),
        ("fifo", {"atomic": False}, NotRegularFile),  # refused, never waits for a reader
    ]
    for name, kwargs, expected in cases:
        path = str(tmp_path / name)
        with pytest.raises(expected) as raised:
            await loader.write(path, b"data", **kwargs)
        assert type(raised.value) is expected, (name, kwargs, raised.value)
        assert raised.value.filename == path, (name, raised.value)
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    with pytest.raises(ValueError):
        await loader.write(str(tmp_path / "nul\0"), b"x")
    with pytest.raises(TypeError):
        await loader.write(tmp_path / "s", "text")
    with pytest.raises(TypeError):
        await loader.write(tmp_path / "s", 12)
    consumer = loader.file_consumer(tmp_path / "s")
    with pytest.raises(TypeError):
        consumer.write("text")  # type: ignore[arg-type]
    await consumer.abort()
    # a failure that is not an OSError, from inside a step
    boom = RuntimeError("boom")

    def raising(*args: Any) -> int:
        raise boom

    writer_write = writer._os_write
    writer._os_write = raising
    try:
        with pytest.raises(RuntimeError) as raised_rt:
            await loader.write(tmp_path / "file", b"new")
        assert raised_rt.value is boom
    finally:
        writer._os_write = writer_write
    assert (tmp_path / "file").read_bytes() == b"f"
    await until(lambda: loader.stats()["active"] == 0)
    # refused before starting (ValueError, TypeError) is not counted, as for loads
    assert loader.stats()["errors"] == len(cases) + 1
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_a_read_only_file_system_fails_with_erofs(loader, tmp_path, no_fd_leak):
    mount = tmp_path / "ro"
    mount.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {got.stderr.strip()}")
    try:
        for atomic in (True, False):
            with pytest.raises(OSError) as raised:
                await loader.write(mount / "f", b"x", atomic=atomic)
            assert raised.value.errno == errno.EROFS and raised.value.filename == str(mount / "f")
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


PERMISSION_SCRIPT = r"""
import os, sys
from twisted.internet import reactor, defer
from asyncfile import FileLoader
target = sys.argv[1]
os.setgid(65534); os.setuid(65534)
async def main():
    loader = FileLoader(reactor, engine=sys.argv[2])
    out = []
    for atomic in (True, False):
        try:
            await loader.write(target, b"x", atomic=atomic)
            out.append("written")
        except Exception as e:
            out.append(f"{type(e).__name__} {e.filename}")
    await loader.close()
    print("|".join(out))
d = defer.ensureDeferred(main())
d.addErrback(lambda f: print(f.getTraceback()))
d.addBoth(lambda _: reactor.stop())
reactor.run()
"""


def test_permission_denied_is_a_permission_error(engine):
    """As a user who may enter the directory but not write it (a child
    process that dropped root)."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    top = tempfile.mkdtemp(prefix="asyncfile-perm-")  # in /tmp: others may enter it
    try:
        os.chmod(top, 0o755)
        target = os.path.join(top, "f")
        got = subprocess.run([sys.executable, "-c", PERMISSION_SCRIPT, target, engine],
                             capture_output=True, text=True, timeout=60,
                             cwd=pathlib.Path(__file__).resolve().parents[2])
        assert got.stdout.strip() == f"PermissionError {target}|PermissionError {target}", got
        assert os.listdir(top) == []
    finally:
        shutil.rmtree(top)


# ---------------------------------------------------------------------------
# loader.close() during writes
# ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_close_stops_writes_and_waits_for_them(make_loader, tmp_path, gates, no_fd_leak):
    loader = make_loader(max_open=2)
    target = tmp_path / "t"
    target.write_bytes(b"old")
    gate = gates("_os_write")
    running = Outcome(loader.write(target, os.urandom(2 * MiB)))
    await gate.reached()
    consumer = loader.file_consumer(tmp_path / "c")
    consumer.write(b"opened")
    await until(lambda: consumer.state is WriteState.OPEN or consumer._job is not None)
    waiting = Outcome(loader.write(tmp_path / "w", b"w"))
    assert loader.stats()["waiting"] == 1
    closing = Outcome(loader.close())
    await turns()
    assert waiting.failed_with(LoaderClosed)  # held nothing: at once
    assert not closing.fired and not running.fired  # the parked step still runs
    gate.release()
    await closing.wait()
    assert running.failed_with(LoaderClosed)
    with pytest.raises(LoaderClosed):
        await consumer.finish()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["t"]
    with pytest.raises(LoaderClosed):
        await loader.write(target, b"after")
    with pytest.raises(LoaderClosed):
        loader.file_consumer(target)
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_close_fails_writes_waiting_for_a_place_and_starts_none(make_loader, tmp_path, monkeypatch):
    """close() closes an open handle before it reaches the writes waiting for
    its place: the place it gives back must not start one of them (an open
    of a temporary file during close()).  Every waiting write fails with
    LoaderClosed and no step of theirs is submitted to the pool."""
    steps: list[Any] = []
    real_submit = FileConsumer._submit
    monkeypatch.setattr(FileConsumer, "_submit", lambda self, kind, *a: (steps.append(kind), real_submit(self, kind, *a))[1])
    loader = make_loader(max_open=1)
    loader._handles = _InsertionOrdered()
    source = tmp_path / "source"
    source.write_bytes(b"data")
    handle = await loader.open(str(source))
    waiting = [Outcome(loader.write(tmp_path / f"w{i}", b"w")) for i in range(3)]
    consumer = loader.file_consumer(tmp_path / "c")
    assert loader.stats()["waiting"] == 4
    closing = loader.close()
    for write in waiting:
        await write.wait()
        assert write.fired == 1 and write.failed_with(LoaderClosed), write.result
    with pytest.raises(LoaderClosed):
        await consumer.finish()
    await closing
    assert steps == [] and handle.closed
    assert sorted(os.listdir(tmp_path)) == ["source"]
    assert_idle(loader)


# ---------------------------------------------------------------------------
# The consumer with real producers
# ---------------------------------------------------------------------------

@implementer(IPushProducer)
class PushProducer:
    """Pushes ``total`` bytes in ``chunk``s, one per reactor turn, while not
    paused; records what the consumer asked."""

    def __init__(self, consumer: Any, chunk: int, total: int) -> None:
        self.consumer = consumer
        self.chunk = chunk
        self.left = total
        self.sent = bytearray()
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.resumes = 0
        self.max_buffered = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self._call: Any = None

    def start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped and self.left > 0:
            self._call = reactor.callLater(0, self._push)

    def _push(self) -> None:
        self._call = None
        if self.paused or self.stopped:
            return
        data = os.urandom(min(self.chunk, self.left))
        self.left -= len(data)
        self.sent += data
        self.consumer.write(data)
        self.max_buffered = max(self.max_buffered, self.consumer._buffered)
        if self.left == 0:
            self.consumer.unregisterProducer()
            self.done.callback(None)
        else:
            self._schedule()

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.resumes += 1
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


@pytest_twisted.ensureDeferred
async def test_consumer_is_an_iconsumer(loader, tmp_path, no_fd_leak):
    consumer = loader.file_consumer(tmp_path / "c")
    assert verifyObject(IConsumer, consumer)
    assert await consumer.abort() is None
    assert os.listdir(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_twisted_filesender_pull_producer(loader, tmp_path, no_fd_leak):
    source = tmp_path / "source"
    data = os.urandom(MiB + 123)
    source.write_bytes(data)
    consumer = loader.file_consumer(tmp_path / "copy")
    with open(source, "rb") as f:
        await basic.FileSender().beginFileTransfer(f, consumer)
    assert await consumer.finish() == len(data)
    assert (tmp_path / "copy").read_bytes() == data
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_asyncfile_filesender_push_producer(loader, tmp_path, no_fd_leak):
    source = tmp_path / "source"
    data = os.urandom(3 * MiB + 5)
    source.write_bytes(data)
    consumer = loader.file_consumer(tmp_path / "copy", max_buffer=256 * KiB)
    sender = FileSender(loader)
    await sender.beginFileTransfer(str(source), consumer)
    assert await consumer.finish() == len(data)
    assert (tmp_path / "copy").read_bytes() == data
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_is_paused_above_the_bound_and_resumed(loader, tmp_path, gates,
                                                                          no_fd_leak):
    gate = gates("_os_write")
    consumer = loader.file_consumer(tmp_path / "up", max_buffer=64 * KiB)
    producer = PushProducer(consumer, chunk=16 * KiB, total=MiB)
    consumer.registerProducer(producer, True)
    producer.start()
    await gate.reached()  # the first write step is parked: the buffer fills up
    await until(lambda: producer.paused, what="the producer paused")
    assert producer.pauses == 1 and consumer._buffered <= 64 * KiB + 16 * KiB
    await turns()
    assert producer.paused and producer.pauses == 1  # stays paused while the step is parked
    gate.release()
    await producer.done
    assert producer.resumes >= 1
    assert producer.max_buffered <= 64 * KiB + 16 * KiB
    assert await consumer.finish() == MiB
    assert (tmp_path / "up").read_bytes() == bytes(producer.sent)
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_abort_stops_the_producer_and_removes_the_temporary_file(loader, tmp_path, gates, no_fd_leak):
    (tmp_path / "up").write_bytes(b"old")
    gate = gates("_os_write")
    consumer = loader.file_consumer(tmp_path / "up", max_buffer=32 * KiB)
    producer = PushProducer(consumer, chunk=8 * KiB, total=MiB)
    consumer.registerProducer(producer, True)
    producer.start()
    await gate.reached()
    assert len(temp_files(tmp_path)) == 1
    aborted = Outcome(consumer.abort())
    assert producer.stopped
    with pytest.raises(RuntimeError):
        consumer.write(b"more")
    with pytest.raises(RuntimeError):
        consumer.finish()
    await turns()
    assert not aborted.fired  # waits for the parked step
    gate.release()
    assert await aborted.wait() is None
    assert temp_files(tmp_path) == [] and (tmp_path / "up").read_bytes() == b"old"
    assert consumer.state is WriteState.FAILED
    assert loader.stats()["cancelled"] == 1 and loader.stats()["errors"] == 0
    assert_idle(loader)


@pytest_twisted.ensureDeferred
async def test_consumer_misuse_raises(loader, tmp_path, no_fd_leak):
    consumer = loader.file_consumer(tmp_path / "c")
    producer = PushProducer(consumer, 1, 1)
    consumer.registerProducer(producer, True)
    with pytest.raises(RuntimeError):
        consumer.registerProducer(producer, True)
    consumer.unregisterProducer()
    consumer.write(b"x")
    d = consumer.finish()
    with pytest.raises(RuntimeError):
        consumer.write(b"after finish")
    with pytest.raises(RuntimeError):
        consumer.finish()
    assert await d == 1
    assert await consumer.abort() is None  # committed: nothing to remove
    assert (tmp_path / "c").read_bytes() == b"x"


@pytest_twisted.ensureDeferred
async def test_an_error_before_finish_is_reported_by_finish(loader, tmp_path, no_fd_leak):
    consumer = loader.file_consumer(tmp_path / "missing" / "f")
    consumer.write(b"dropped")
    await ended(consumer)
    consumer.write(b"dropped too")  # failed: dropped, finish() says why
    with pytest.raises(FileNotFoundError):
        await consumer.finish()
    assert_idle(loader)


# ---------------------------------------------------------------------------
# Chunkings (hypothesis)
# ---------------------------------------------------------------------------

def spin_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """From the test's own greenlet: let the reactor run until ``condition()``
    (polled from a ``callLater`` of ours, never inside the library's callbacks)."""
    if not model_spin_until(condition, timeout):
        raise AssertionError(f"not reached within {timeout} s")


chunkings = st.lists(
    st.tuples(st.one_of(st.binary(max_size=64), st.integers(0, 300 * KiB).map(lambda n: os.urandom(n))),
              st.booleans()),  # whether to let the reactor turn after this write
    max_size=12)


def test_any_chunking_writes_the_concatenation(make_loader, tmp_path):
    loader = make_loader()
    counter = iter(range(10**6))
    fds_before = open_fds()

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(chunks=chunkings, max_buffer=st.sampled_from([1, 1000, 64 * KiB, MiB]), atomic=st.booleans(),
           abort=st.booleans())
    def example(chunks: list[tuple[bytes, bool]], max_buffer: int, atomic: bool, abort: bool) -> None:
        target = tmp_path / f"f{next(counter)}"
        consumer = loader.file_consumer(target, max_buffer=max_buffer, atomic=atomic, fsync=False)
        for data, yield_turn in chunks:
            consumer.write(data)
            if yield_turn:
                spin_until(lambda: True)
        expected = b"".join(data for data, _ in chunks)
        if abort:
            d = consumer.abort()
            spin_until(lambda: d.called)
            if atomic:
                assert not target.exists()
        else:
            d = consumer.finish()
            spin_until(lambda: d.called)
            got: list[Any] = []
            d.addBoth(got.append)
            assert got == [len(expected)]
            assert target.read_bytes() == expected
        assert temp_files(tmp_path) == []
        assert_idle(loader)

    return run_in_greenlet(example).addCallback(lambda _: _check_fds(fds_before, loader))


def _check_fds(before: set[str], loader: Any) -> None:
    from .conftest import engine_fds

    leaked = open_fds() - before - {str(fd) for fd in engine_fds(loader)}
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}
