"""Tests for the slow-storage FUSE file system used by tests and benchmarks."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from asyncfile.testing.slowfs import (
    SlowFS, fuse_unavailable_reason, is_mounted,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def write(fs: SlowFS, name: str, data: bytes) -> str:
    """Write *data* into the source; return the path through the mount."""
    with open(os.path.join(fs.source, name), "wb") as f:
        f.write(data)
    return os.path.join(fs.mount, name)


def timed_read(path: str) -> tuple[bytes, float]:
    start = time.monotonic()
    with open(path, "rb") as f:
        data = f.read()
    return data, time.monotonic() - start


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains *text*."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("size", [0, 1, MiB])
def test_round_trip(slow_fs: SlowFS, size: int) -> None:
    """Files written to the source after mounting read back identically."""
    data = os.urandom(size)
    path = write(slow_fs, "file.bin", data)
    assert timed_read(path)[0] == data
    assert os.stat(path).st_size == size
    assert os.listdir(slow_fs.mount) == ["file.bin"]


def test_reads_are_slow_every_time(slow_fs: SlowFS) -> None:
    """No page cache: the second read of a file is as slow as the first."""
    delay = slow_fs.read_delay
    path = write(slow_fs, "big.bin", os.urandom(MiB))
    for _ in range(2):
        data, elapsed = timed_read(path)
        assert len(data) == MiB
        assert elapsed >= delay


def test_one_mib_read_is_one_request(slow_fs: SlowFS) -> None:
    """The kernel passes big reads through whole, not as 4 KiB pages.

    A page-aligned 1 MiB buffer is one FUSE read (the kernel's limit is 256
    pages); an unaligned one (a bytearray) spans 257 pages and becomes two.
    """
    path = write(slow_fs, "big.bin", os.urandom(MiB))
    buf = mmap.mmap(-1, MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = slow_fs.stats()
        start = time.monotonic()
        assert os.readv(fd, [buf]) == MiB
        elapsed = time.monotonic() - start
        after = slow_fs.stats()
    finally:
        os.close(fd)
    assert after["read"] - before["read"] == 1
    assert after["max_read_size"] == MiB
    assert slow_fs.read_delay <= elapsed < 2 * slow_fs.read_delay + 0.5


@pytest.mark.slowfs(read_delay=0.1)
def test_concurrent_reads_overlap(slow_fs: SlowFS) -> None:
    """Eight threads reading eight files take about as long as one."""
    paths = [write(slow_fs, f"f{i}", os.urandom(MiB)) for i in range(8)]
    single = timed_read(paths[0])[1]
    threads = [threading.Thread(target=timed_read, args=(p,)) for p in paths]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together = time.monotonic() - start
    assert together < 3 * single, (together, single)
    assert slow_fs.stats()["max_concurrent_reads"] >= 4


@pytest.mark.slowfs(read_delay=0.0, open_delay=0.2)
def test_open_delay(slow_fs: SlowFS) -> None:
    path = write(slow_fs, "f", b"x")
    start = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    opened = time.monotonic() - start
    start = time.monotonic()
    assert os.read(fd, 10) == b"x"
    read = time.monotonic() - start
    os.close(fd)
    assert opened >= 0.2
    assert read < 0.2


def test_read_only(slow_fs: SlowFS) -> None:
    path = write(slow_fs, "f", b"data")
    for attempt in (
        lambda: open(path, "ab"),
        lambda: open(os.path.join(slow_fs.mount, "new"), "wb"),
        lambda: os.unlink(path),
        lambda: os.mkdir(os.path.join(slow_fs.mount, "d")),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert os.listdir(slow_fs.source) == ["f"]


def test_rwf_nowait_unsupported(slow_fs: SlowFS) -> None:
    """FUSE refuses RWF_NOWAIT outright (EOPNOTSUPP), not with EAGAIN: a
    reader trying a non-blocking page-cache read first must fall back."""
    path = write(slow_fs, "f", b"data")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.preadv(fd, [bytearray(4)], 0, os.RWF_NOWAIT)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EOPNOTSUPP


def test_cleanup_after_failure_with_open_file(tmp_path) -> None:
    """Leaving the block by an exception, with a file still open on the
    mount, still unmounts and leaves no process or mount point behind."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    (tmp_path / "f").write_bytes(b"data")
    fs = SlowFS(tmp_path, read_delay=0.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="test failed"):
        with fs as mount:
            assert is_mounted(mount)
            held = open(os.path.join(mount, "f"), "rb")
            raise RuntimeError("test failed")
    assert time.monotonic() - start < 5
    held.close()
    assert not is_mounted(mount)
    assert not os.path.exists(mount)
    assert fs.process is not None and fs.process.returncode is not None
    # fusermount3's auto-unmount helper exits on its own once the daemon is
    # gone; give it a moment.
    deadline = time.monotonic() + 5
    while processes_mentioning(mount) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(mount) == []


def test_command_line_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncfile.testing.slowfs", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert "--read-delay" in result.stdout
