"""Tests for the fault-injecting FUSE file system: every fault really
happens on a real mount, and changes take effect at run time."""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted

from asyncfile.testing.faultfs import (
    FaultFS, filler, fuse_unavailable_reason, is_mounted,
)

pytestmark = pytest.mark.timeout(30)

KiB = 1 << 10
WAIT = 10.0  # Upper bound of every wait on the daemon; passing runs take ms.


@pytest.fixture
def fs(tmp_path) -> Iterator[FaultFS]:
    """A mounted FaultFS over an empty source directory (``fs.source``)."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    source = tmp_path / "faultfs-source"
    source.mkdir()
    faultfs = FaultFS(source)
    with faultfs:
        yield faultfs


def write(fs: FaultFS, name: str, data: bytes) -> str:
    """Put *data* into the source; return its path through the mount."""
    path = os.path.join(fs.source, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return os.path.join(fs.mountpoint, name)


def pread_all(path: str, size: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def errno_of(call: Callable[[], Any]) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


class Background:
    """Runs *func* in a thread; keeps its result or exception."""

    def __init__(self, func: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(func,),
                                       daemon=True)
        self.thread.start()

    def _run(self, func: Callable[[], Any]) -> None:
        try:
            self.result = func()
        except BaseException as exc:  # noqa: BLE001 - inspected by tests
            self.error = exc

    def join(self) -> Any:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "call still blocked"
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains *text*."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_mirror(fs: FaultFS) -> None:
    """Without faults it is a read-only mirror, files added live included."""
    data = os.urandom(100 * KiB)
    path = write(fs, "a.bin", data)
    write(fs, "sub/b.bin", b"b")
    with open(path, "rb") as f:
        assert f.read() == data
    assert os.stat(path).st_size == len(data)
    assert sorted(os.listdir(fs.mountpoint)) == ["a.bin", "sub"]
    assert pread_all(os.path.join(fs.mountpoint, "sub/b.bin"), 10) == b"b"
    assert errno_of(lambda: open(path, "ab")) == errno.EROFS
    assert fs.wait_closed(timeout=WAIT)["open_handles"] == 0


def test_read_error_at_offset(fs: FaultFS) -> None:
    """Reads whose range holds the offset fail; others succeed; the errno
    is configurable; clear() heals the file."""
    data = os.urandom(128 * KiB)
    path = write(fs, "a.bin", data)
    fs.set_fault("a.bin", read_error_at=64 * KiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 64 * KiB, 0) == data[:64 * KiB]
        assert errno_of(lambda: os.pread(fd, 1, 64 * KiB)) == errno.EIO
        assert errno_of(lambda: os.pread(fd, 20, 64 * KiB - 10)) == errno.EIO
        assert errno_of(lambda: os.pread(fd, 128 * KiB, 0)) == errno.EIO
        assert os.pread(fd, 100, 64 * KiB + 1) == data[64 * KiB + 1:][:100]
        fs.set_fault("a.bin", read_errno=errno.EBADMSG)
        assert errno_of(lambda: os.pread(fd, 1, 64 * KiB)) == errno.EBADMSG
        assert fs.stats("a.bin")["errors_injected"] == 4
        fs.clear("a.bin")
        assert os.pread(fd, 128 * KiB, 0) == data
    finally:
        os.close(fd)


def test_read_error_past_end_of_file(fs: FaultFS) -> None:
    """The requested range counts, not the bytes the file has: the read
    that would find end of file at the offset fails too."""
    path = write(fs, "a.bin", b"x" * 100)
    fs.set_fault("a.bin", read_error_at=100)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"x" * 100
        assert errno_of(lambda: os.pread(fd, 10, 100)) == errno.EIO
    finally:
        os.close(fd)


def test_open_error(fs: FaultFS) -> None:
    path = write(fs, "a.bin", b"a")
    other = write(fs, "b.bin", b"b")
    fs.set_fault("a.bin", open_error=errno.EACCES)
    assert errno_of(lambda: open(path, "rb")) == errno.EACCES
    assert pread_all(other, 1) == b"b"
    fs.set_fault("a.bin", open_error=errno.EMFILE)
    assert errno_of(lambda: open(path, "rb")) == errno.EMFILE
    stats = fs.stats("a.bin")
    assert (stats["opens"], stats["errors_injected"]) == (2, 2)
    assert stats["open_handles"] == 0
    fs.set_fault("a.bin", open_error=0)  # 0 removes it.
    assert pread_all(path, 1) == b"a"


def test_delays(fs: FaultFS) -> None:
    path = write(fs, "slow.bin", b"s")
    quick = write(fs, "quick.bin", b"q")
    fs.set_fault("slow.bin", open_delay=0.2)
    start = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    assert time.monotonic() - start >= 0.2
    try:
        fs.set_fault("slow.bin", open_delay=0, read_delay=0.2)
        start = time.monotonic()
        assert os.pread(fd, 1, 0) == b"s"
        assert time.monotonic() - start >= 0.2
    finally:
        os.close(fd)
    start = time.monotonic()
    assert pread_all(quick, 1) == b"q"
    assert time.monotonic() - start < 0.2


def test_read_gate_holds_until_released(fs: FaultFS) -> None:
    data = os.urandom(10 * KiB)
    path = write(fs, "g.bin", data)
    fs.set_fault("g.bin", read_gate=True)
    reader = Background(lambda: pread_all(path, len(data)))
    assert fs.wait_blocked("g.bin", "read", timeout=WAIT) == 1
    stats = fs.stats("g.bin")
    assert (stats["reads_in_flight"], stats["blocked_reads"]) == (1, 1)
    assert stats["open_handles"] == 1
    assert not reader.done
    assert fs.release_reads("g.bin") == 1
    assert reader.join() == data
    assert fs.blocked("g.bin") == 0
    # An opened gate stays open.
    assert pread_all(path, 10) == data[:10]


def test_release_count(fs: FaultFS) -> None:
    """release_reads(name, k) lets k reads go, oldest first; left-over
    permits let later reads pass; the gate stays closed."""
    path = write(fs, "g.bin", b"0123456789")
    fs.set_fault("g.bin", read_gate=True)
    first = Background(lambda: pread_all(path, 10, 0))
    fs.wait_blocked("g.bin", "read", timeout=WAIT)
    second = Background(lambda: pread_all(path, 10, 5))
    assert fs.wait_blocked("g.bin", "read", timeout=WAIT, count=2) == 2
    assert fs.release_reads("g.bin", 1) == 1
    assert first.join() == b"0123456789"
    assert not second.done and fs.blocked("g.bin") == 1
    assert fs.release_reads("g.bin", 2) == 1  # One woken, one permit left.
    assert second.join() == b"56789"
    assert Background(lambda: pread_all(path, 1, 9)).join() == b"9"
    third = Background(lambda: pread_all(path, 1))
    assert fs.wait_blocked("g.bin", "read", timeout=WAIT) == 1
    fs.set_fault("g.bin", read_gate=False)  # Same as release_reads(name).
    assert third.join() == b"0"


def test_open_gate_and_fault_set_while_parked(fs: FaultFS) -> None:
    """An open parked at the gate sees faults set meanwhile: here the file
    vanishes between lookup and open."""
    path = write(fs, "g.bin", b"g")
    fs.set_fault("g.bin", open_gate=True)
    opener = Background(lambda: open(path, "rb"))
    assert fs.wait_blocked("g.bin", "open", timeout=WAIT) == 1
    assert fs.stats()["opens_in_flight"] == 1
    assert fs.blocked("g.bin", "read") == 0
    fs.set_fault("g.bin", vanish=True)
    assert fs.release_opens("g.bin") == 1
    with pytest.raises(FileNotFoundError):
        opener.join()
    fs.set_fault("g.bin", vanish=False)
    with open(path, "rb") as f:
        assert f.read() == b"g"


def test_wait_blocked_times_out(fs: FaultFS) -> None:
    write(fs, "g.bin", b"g")
    fs.set_fault("g.bin", read_gate=True)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        fs.wait_blocked("g.bin", "read", timeout=0.1)
    assert time.monotonic() - start < 1.0


@pytest_twisted.inlineCallbacks
def test_when_blocked_in_reactor(fs: FaultFS) -> Any:
    """when_blocked fires in the reactor thread once the read is parked,
    without blocking the reactor; and fails with TimeoutError."""
    from twisted.internet import reactor, threads

    path = write(fs, "g.bin", b"data")
    fs.set_fault("g.bin", read_gate=True)
    read = threads.deferToThread(pread_all, path, 4)
    parked = yield fs.when_blocked(reactor, "g.bin", "read", timeout=WAIT)
    assert parked == 1 and not read.called
    fs.release_reads("g.bin")
    assert (yield read) == b"data"
    closed = yield fs.when_closed(reactor, "g.bin", timeout=WAIT)
    assert closed["open_handles"] == 0
    with pytest.raises(TimeoutError):
        yield fs.when_blocked(reactor, "g.bin", "open", timeout=0.05)


def test_shrink_to(fs: FaultFS) -> None:
    data = os.urandom(1000)
    path = write(fs, "s.bin", data)
    fs.set_fault("s.bin", shrink_to=10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 1000
        assert os.pread(fd, 1000, 0) == data  # The first read: as it was.
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 1000, 0) == data[:10]
        assert os.pread(fd, 100, 500) == b""
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 10
    with open(path, "rb") as f:
        assert f.read() == data[:10]


def test_grow_by(fs: FaultFS) -> None:
    data = os.urandom(1000)
    path = write(fs, "g.bin", data)
    fs.set_fault("g.bin", grow_by=4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 0) == data
        assert os.fstat(fd).st_size == 1000 + 4096
        grown = os.pread(fd, 8192, 0)
        assert grown == data + filler(1000, 4096)
        assert grown[1000:1003] == bytes([1000 % 256, 1001 % 256, 1002 % 256])
        assert os.pread(fd, 10, 5096) == b""
    finally:
        os.close(fd)


def test_size_after_reads(fs: FaultFS) -> None:
    data = os.urandom(1000)
    path = write(fs, "r.bin", data)
    fs.set_fault("r.bin", size_after_reads=(2, 3000))
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(2):
            assert os.pread(fd, 5000, 0) == data
        assert os.pread(fd, 5000, 0) == data + filler(1000, 2000)
        fs.set_fault("r.bin", size_after_reads=(0, 7))  # Resets the count.
        assert os.pread(fd, 5000, 0) == data[:7]
        fs.clear("r.bin", "size_after_reads")
        assert os.pread(fd, 5000, 0) == data
    finally:
        os.close(fd)


def test_vanish(fs: FaultFS) -> None:
    """A vanished file cannot be found or opened; a handle opened before
    keeps reading, as after unlink on a local disk."""
    path = write(fs, "v.bin", b"vanishing")
    write(fs, "stays.bin", b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        fs.set_fault("v.bin", vanish=True)
        assert errno_of(lambda: os.stat(path)) == errno.ENOENT
        assert errno_of(lambda: open(path, "rb")) == errno.ENOENT
        assert os.listdir(fs.mountpoint) == ["stays.bin"]
        assert os.pread(fd, 100, 0) == b"vanishing"
    finally:
        os.close(fd)
    fs.clear("v.bin")
    assert pread_all(path, 100) == b"vanishing"


def test_vanish_after_open(fs: FaultFS) -> None:
    """The open succeeds, then the file is gone and its handles are stale."""
    path = write(fs, "v.bin", b"data")
    fs.set_fault("v.bin", vanish_after_open=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert errno_of(lambda: os.stat(path)) == errno.ENOENT
        assert errno_of(lambda: os.pread(fd, 4, 0)) == errno.ESTALE
        assert errno_of(lambda: os.open(path, os.O_RDONLY)) == errno.ENOENT
        fs.clear("v.bin")
        assert os.pread(fd, 4, 0) == b"data"
    finally:
        os.close(fd)
    assert fs.stats("v.bin")["errors_injected"] == 1


def test_clear_all_releases_parked_calls(fs: FaultFS) -> None:
    a = write(fs, "a.bin", b"a" * 100)
    b = write(fs, "sub/b.bin", b"b")
    fs.set_fault("a.bin", read_gate=True, read_error_at=0)
    fs.set_fault("sub/b.bin", open_error=errno.EIO, vanish=True)
    reader = Background(lambda: pread_all(a, 100, 50))  # Not at offset 0.
    fs.wait_blocked("a.bin", "read", timeout=WAIT)
    assert set(fs.faults()) == {"a.bin", "sub/b.bin"}
    fs.clear_all()
    assert fs.faults() == {}
    assert reader.join() == b"a" * 50
    assert pread_all(a, 1) == b"a"
    assert pread_all(b, 1) == b"b"


def test_counters_and_open_handles(fs: FaultFS) -> None:
    """open_handles counts what the daemon holds; back to 0 once the
    client closed everything (release arrives after close() returns)."""
    paths = [write(fs, f"f{i}", b"x" * 10) for i in range(3)]
    files = [open(p, "rb", buffering=0) for p in paths]
    try:
        for f in files:
            assert f.read(5) == b"xxxxx"
        stats = fs.stats()
        assert stats["open_handles"] == 3
        assert fs.stats("f1")["open_handles"] == 1
        assert stats["opens"] == 3 and stats["reads"] == 3
        assert stats["read_bytes"] == 15
    finally:
        for f in files:
            f.close()
    stats = fs.wait_closed(timeout=WAIT)
    assert stats["open_handles"] == 0
    assert stats["releases"] == stats["opens"] == 3
    assert stats["reads_in_flight"] == stats["opens_in_flight"] == 0
    assert stats["errors_injected"] == 0


def test_bad_arguments(fs: FaultFS) -> None:
    write(fs, "a.bin", b"a")
    with pytest.raises(TypeError):
        fs.set_fault("a.bin", explode=True)  # type: ignore[call-arg]
    for name in ("..", "../x", "/elsewhere/a.bin", ""):
        with pytest.raises(ValueError):
            fs.set_fault(name, vanish=True)
    with pytest.raises(ValueError):
        fs.set_fault("a.bin", read_error_at=-1)
    with pytest.raises(ValueError):
        fs.set_fault("a.bin", shrink_to=1, grow_by=1)
    with pytest.raises(ValueError):
        fs.clear("a.bin", "nonsense")
    with pytest.raises(ValueError):
        fs.wait_blocked("a.bin", "write", timeout=0.1)
    # A path inside the mount names the same file.
    fs.set_fault(os.path.join(fs.mountpoint, "a.bin"), vanish=True)
    assert fs.faults() == {"a.bin": {"vanish": True}}


def test_stop_with_read_parked(tmp_path) -> None:
    """stop() unmounts promptly with a read parked at a gate and leaves no
    mount, mount point or process behind; the parked read fails."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    (tmp_path / "g.bin").write_bytes(b"g")
    fs = FaultFS(tmp_path)
    mount = fs.start()
    try:
        fs.set_fault("g.bin", read_gate=True)
        reader = Background(lambda: pread_all(os.path.join(mount, "g.bin"), 1))
        fs.wait_blocked("g.bin", "read", timeout=WAIT)
    finally:
        start = time.monotonic()
        fs.stop()
    assert time.monotonic() - start < 5
    with pytest.raises(OSError):
        reader.join()
    assert not is_mounted(mount)
    assert not os.path.exists(mount)
    assert fs.process is not None and fs.process.returncode is not None
    with pytest.raises(RuntimeError):
        fs.stats()
    fs.stop()  # Idempotent.
    deadline = time.monotonic() + 5
    while processes_mentioning(mount) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(mount) == []


def test_command_line_help() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "asyncfile.testing.faultfs", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))),
    )
    assert "--gate-timeout" in result.stdout
