"""Tests of the sans-reactor io_uring binding (asyncfile.engines._uring).

Every wait is bounded: ``Ring.wait`` gets a timeout and eventfd polls get one,
so a lost completion fails a test instead of hanging it. Reads on an empty pipe
serve as the "slow" operation: they stay in flight until data is written.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import select
import time
import weakref
from pathlib import Path

import pytest

from asyncfile.engines import _uring
from asyncfile.engines._uring import (
    Ring,
    RingClosed,
    StatxResult,
    SubmissionQueueFull,
    check,
    result_error,
)

REASON = _uring.probe()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"io_uring unusable: {REASON}"),
    pytest.mark.timeout(30),
]

WAIT = 5.0  # upper bound for any single wait; completions normally take µs


@pytest.fixture
def ring():
    r = Ring(64)
    yield r
    r.close()


@pytest.fixture
def pipe():
    rfd, wfd = os.pipe()
    yield rfd, wfd
    os.close(rfd)
    os.close(wfd)


@pytest.fixture
def eventfd():
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield efd
    os.close(efd)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(100_003))
    return path


def wait_for(r: Ring, n: int) -> dict[int, object]:
    """Exactly ``n`` completions within WAIT seconds, as {user_data: res}."""
    done = r.wait(n, timeout=WAIT)
    assert len(done) == n, f"got {done!r}, wanted {n} completions"
    results = dict(done)
    assert len(results) == n, "a user_data completed twice"
    return results


def readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_probe_says_usable_and_is_cached():
    assert _uring.probe() is None
    assert _uring.probe() is _uring.probe()


def test_probe_reasons_for_unsupported_platforms(monkeypatch):
    monkeypatch.setattr(_uring, "_NR", None)
    monkeypatch.setattr(_uring, "_MACHINE", "sparc64")
    assert "sparc64" in _uring._probe()
    with pytest.raises(_uring.UringUnavailable, match="sparc64"):
        Ring(8)
    monkeypatch.setattr(_uring.sys, "platform", "darwin")
    assert "Linux-only" in _uring._probe()


def test_nop_round_trip(ring):
    ring.prep_nop(42)
    assert ring.in_flight == 1 and ring.pending == 1
    assert ring.submit() == 1
    assert ring.pending == 0
    assert ring.wait(1, timeout=WAIT) == [(42, 0)]
    assert ring.in_flight == 0
    assert ring.reap() == []


def test_read_at_offsets_into_memoryview_slices(ring, data_file):
    expected = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        buf = bytearray(len(expected) + 100)
        view = memoryview(buf)
        # (offset in file, length, where in buf)
        chunks = [(0, 4096, 0), (4096, 10_000, 5000), (99_000, 4096, 20_000),
                  (len(expected) - 3, 3, 30_000), (len(expected), 10, 40_000)]
        for ud, (offset, length, at) in enumerate(chunks):
            ring.prep_read(fd, view[at:at + length], offset, ud)
        assert ring.submit() == len(chunks)
        results = wait_for(ring, len(chunks))
        for ud, (offset, length, at) in enumerate(chunks):
            want = expected[offset:offset + length]
            assert results[ud] == len(want)  # 0 at end of file
            assert buf[at:at + len(want)] == want
    finally:
        os.close(fd)


def test_read_into_ctypes_array_and_empty_buffer(ring, data_file):
    expected = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        arr = (ctypes.c_uint32 * 256)()  # 1 KiB, element size 4
        ring.prep_read(fd, arr, 16, 1)
        ring.prep_read(fd, bytearray(), 0, 2)
        ring.submit()
        assert wait_for(ring, 2) == {1: 1024, 2: 0}
        assert bytes(arr) == expected[16:16 + 1024]
    finally:
        os.close(fd)


def test_read_at_file_position(ring, data_file):
    expected = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        buf = bytearray(500)
        ring.prep_read(fd, buf, -1, 1)
        ring.submit()
        assert wait_for(ring, 1) == {1: 500}
        assert buf == expected[1000:1500]
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1500
    finally:
        os.close(fd)


def test_readonly_buffer_refused(ring):
    with pytest.raises(TypeError):
        ring.prep_read(0, b"immutable", 0, 1)
    assert ring.in_flight == 0


def test_openat_read_close(ring, data_file):
    ring.prep_openat(os.fsencode(data_file), os.O_RDONLY, 0, 1)
    ring.submit()
    fd = check(wait_for(ring, 1)[1])
    assert fd >= 0
    assert not os.get_inheritable(fd)  # O_CLOEXEC added like os.open
    buf = bytearray(64)
    ring.prep_read(fd, buf, 0, 2)
    ring.submit()
    assert wait_for(ring, 1) == {2: 64}
    assert buf == data_file.read_bytes()[:64]
    ring.prep_close(fd, 3)
    ring.submit()
    assert wait_for(ring, 1) == {3: 0}
    with pytest.raises(OSError) as excinfo:
        os.fstat(fd)
    assert excinfo.value.errno == errno.EBADF


def test_openat_missing_file_gives_file_not_found(ring, tmp_path):
    missing = tmp_path / "missing.jpg"
    ring.prep_openat(missing, os.O_RDONLY, 0, 1)
    ring.submit()
    res = wait_for(ring, 1)[1]
    assert res == -errno.ENOENT
    err = result_error(res, str(missing))
    assert isinstance(err, FileNotFoundError)
    assert err.errno == errno.ENOENT and err.filename == str(missing)
    with pytest.raises(FileNotFoundError):
        check(res, missing)


def test_openat_relative_to_dirfd(ring, data_file):
    dirfd = os.open(data_file.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ring.prep_openat(b"data.bin", os.O_RDONLY, 0, 1, dirfd=dirfd)
        ring.submit()
        fd = check(wait_for(ring, 1)[1])
        assert os.fstat(fd).st_ino == data_file.stat().st_ino
        os.close(fd)
    finally:
        os.close(dirfd)


@pytest.mark.slowfs(read_delay=0.0, open_delay=0.3)
def test_force_async_openat_never_runs_in_submit(ring, slow_fs):
    """A FUSE open whose name is cached would run (and sleep) inside
    io_uring_enter; IOSQE_ASYNC hands it to an io-wq worker instead."""
    (Path(slow_fs.source) / "f").write_bytes(b"x")
    path = os.path.join(slow_fs.mount, "f")
    os.stat(path)  # the dentry is cached now
    ring.prep_openat(path, os.O_RDONLY, 0, 1, force_async=True)
    started = time.monotonic()
    ring.submit()
    assert time.monotonic() - started < 0.1
    fd = check(wait_for(ring, 1)[1])
    assert time.monotonic() - started >= 0.25  # the open itself did sleep
    os.close(fd)


@pytest.mark.slowfs(read_delay=0.1)
def test_force_async_reads_never_wait_in_submit(ring, slow_fs):
    """FUSE sends io_uring's direct-I/O reads as background requests; past
    max_background (12) the 13th waits for a slot inside io_uring_enter
    unless IOSQE_ASYNC hands it to an io-wq worker."""
    fds = []
    try:
        for i in range(16):
            (Path(slow_fs.source) / f"f{i}").write_bytes(b"y" * 4096)
            fds.append(os.open(os.path.join(slow_fs.mount, f"f{i}"), os.O_RDONLY))
        bufs = [bytearray(4096) for _ in fds]
        slowest = 0.0
        for i, fd in enumerate(fds):
            ring.prep_read(fd, bufs[i], 0, i, force_async=True)
            started = time.monotonic()
            ring.submit()
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.05
        assert sorted(wait_for(ring, len(fds)).values()) == [4096] * len(fds)
        assert all(buf == b"y" * 4096 for buf in bufs)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.slowfs(read_delay=0.2, max_background=32)
def test_slowfs_max_background_lets_more_async_reads_run(ring, slow_fs):
    """With libfuse's default (12) 24 reads would take two rounds."""
    fds = []
    try:
        for i in range(24):
            (Path(slow_fs.source) / f"f{i}").write_bytes(b"z" * 512)
            fds.append(os.open(os.path.join(slow_fs.mount, f"f{i}"), os.O_RDONLY))
        started = time.monotonic()
        for i, fd in enumerate(fds):
            ring.prep_read(fd, bytearray(512), 0, i, force_async=True)
        ring.submit()
        assert sorted(wait_for(ring, len(fds)).values()) == [512] * len(fds)
        assert time.monotonic() - started < 0.38
    finally:
        for fd in fds:
            os.close(fd)


def test_path_with_nul_refused(ring):
    with pytest.raises(ValueError):
        ring.prep_openat(b"/etc/passwd\0.jpg", os.O_RDONLY, 0, 1)
    assert ring.in_flight == 0


def test_statx_of_path_and_of_fd(ring, data_file):
    st = os.stat(data_file)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        ring.prep_statx(data_file, 1)
        ring.prep_statx(fd, 2)
        ring.submit()
        results = wait_for(ring, 2)
    finally:
        os.close(fd)
    for res in results.values():
        assert isinstance(res, StatxResult)
        assert res.size == st.st_size == 100_003
        assert res.mode == st.st_mode
        assert res.ino == st.st_ino
        assert res.dev == st.st_dev
        assert (res.dev_major, res.dev_minor) == (os.major(st.st_dev),
                                                  os.minor(st.st_dev))
        assert res.mtime_ns == st.st_mtime_ns
        assert res.mtime == pytest.approx(st.st_mtime)


def test_statx_of_directory_and_missing_path(ring, tmp_path):
    ring.prep_statx(tmp_path, 1)
    ring.prep_statx(tmp_path / "nope", 2)
    ring.submit()
    results = wait_for(ring, 2)
    assert results[1].mode == os.stat(tmp_path).st_mode
    assert results[2] == -errno.ENOENT


def test_close_of_bad_fd_gives_ebadf(ring):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    ring.prep_close(fd, 1)
    ring.submit()
    assert wait_for(ring, 1) == {1: -errno.EBADF}


def test_200_reads_in_one_submit(data_file):
    expected = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        with Ring(256) as r:
            buf = bytearray(200 * 400)
            view = memoryview(buf)
            for i in range(200):
                r.prep_read(fd, view[i * 400:(i + 1) * 400], i * 500, i)
            assert r.pending == 200
            assert r.submit() == 200  # one io_uring_enter for all of them
            assert r.pending == 0
            results = wait_for(r, 200)
            assert results == {i: 400 for i in range(200)}
            for i in range(200):
                assert buf[i * 400:(i + 1) * 400] == expected[i * 500:i * 500 + 400]
    finally:
        os.close(fd)


def test_eventfd_becomes_readable_on_completions(ring, pipe, eventfd):
    rfd, wfd = pipe
    ring.register_eventfd(eventfd)
    assert not readable(eventfd, 0)
    buf = bytearray(16)
    ring.prep_read(rfd, buf, -1, 1)
    ring.submit()
    assert not readable(eventfd, 0.05)  # the pipe read is still waiting
    os.write(wfd, b"ping")
    assert readable(eventfd, WAIT)
    assert os.eventfd_read(eventfd) >= 1
    assert ring.reap() == [(1, 4)]
    assert buf[:4] == b"ping"
    # Inline completions (a NOP) signal it too.
    ring.prep_nop(2)
    ring.submit()
    assert readable(eventfd, WAIT)
    os.eventfd_read(eventfd)
    assert ring.reap() == [(2, 0)]
    ring.unregister_eventfd()
    ring.prep_nop(3)
    ring.submit()
    assert ring.wait(1, timeout=WAIT) == [(3, 0)]
    assert not readable(eventfd, 0)


def test_cancel_blocked_pipe_read(ring, pipe):
    rfd, _wfd = pipe
    ring.prep_read(rfd, bytearray(10), -1, 1)
    ring.submit()
    assert ring.wait(1, timeout=0.1) == []  # blocked: no data in the pipe
    ring.prep_cancel(1, 2)
    ring.submit()
    results = wait_for(ring, 2)
    assert results == {1: -errno.ECANCELED, 2: 0}
    assert result_error(results[1]).errno == errno.ECANCELED
    assert ring.in_flight == 0


def test_cancel_of_unknown_op_gives_enoent(ring):
    ring.prep_cancel(12345, 1)
    ring.submit()
    assert wait_for(ring, 1) == {1: -errno.ENOENT}


def test_wait_timeout_is_bounded(ring, pipe):
    rfd, _wfd = pipe
    ring.prep_read(rfd, bytearray(1), -1, 1)
    ring.submit()
    start = time.monotonic()
    assert ring.wait(1, timeout=0.2) == []
    assert 0.15 < time.monotonic() - start < 2.0
    # Nothing submitted: returns at once even without a timeout.
    with Ring(4) as idle:
        idle.prep_nop(2)
        assert idle.wait(5) == []


class _WeakBuf(bytearray):
    """A bytearray that supports weak references."""


def test_buffer_kept_alive_until_reaped(ring, pipe, eventfd):
    rfd, wfd = pipe
    ring.register_eventfd(eventfd)
    buf = _WeakBuf(32)
    ref = weakref.ref(buf)
    ring.prep_read(rfd, memoryview(buf)[8:], -1, 1)
    ring.submit()
    del buf
    gc.collect()
    assert ref() is not None  # the ring holds it while the read is in flight
    os.write(wfd, b"hello")
    assert readable(eventfd, WAIT)  # completed, not yet reaped
    assert bytes(ref()[8:13]) == b"hello"
    assert ring.reap() == [(1, 5)]
    gc.collect()
    assert ref() is None  # released once reaped


def test_buffer_cannot_be_resized_while_in_flight(ring, pipe):
    rfd, wfd = pipe
    buf = bytearray(8)
    ring.prep_read(rfd, buf, -1, 1)
    ring.submit()
    with pytest.raises(BufferError):
        buf.extend(b"x" * 1_000_000)  # would move the memory under the kernel
    os.write(wfd, b"ok")
    assert wait_for(ring, 1) == {1: 2}
    buf.extend(b"now fine")


def test_full_submission_queue_raises():
    with Ring(4) as r:
        assert r.sq_entries == 4
        for ud in range(4):
            r.prep_nop(ud)
        assert r.sq_space() == 0
        with pytest.raises(SubmissionQueueFull):
            r.prep_nop(99)
        assert r.in_flight == 4  # the refused op left no trace
        assert r.submit() == 4
        assert r.sq_space() == 4
        assert wait_for(r, 4) == {0: 0, 1: 0, 2: 0, 3: 0}
        assert r.sq_space() == 4


def test_rings_wrap_around(data_file):
    """Batches of uneven size make SQ and CQ indices wrap mid-batch."""
    expected = data_file.read_bytes()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        with Ring(4) as r:
            ud = 0
            for round_ in range(60):
                batch = round_ % 4 + 1
                bufs = {}
                for _ in range(batch):
                    bufs[ud] = bytearray(7)
                    r.prep_read(fd, bufs[ud], ud * 7, ud)
                    ud += 1
                assert r.submit() == batch
                results = wait_for(r, batch)
                for key, buf in bufs.items():
                    assert results[key] == 7
                    assert buf == expected[key * 7:key * 7 + 7]
    finally:
        os.close(fd)


def test_in_flight_is_capped_at_cq_entries(pipe):
    rfd, _wfd = pipe
    with Ring(2) as r:
        assert r.cq_entries == 4
        for ud in range(4):
            r.prep_read(rfd, bytearray(1), -1, ud)
            r.submit()
        assert r.pending == 0 and r.in_flight == 4
        assert r.sq_space() == 0
        with pytest.raises(SubmissionQueueFull):
            r.prep_nop(99)
        # close() cancels the four blocked reads and waits for them.
        start = time.monotonic()
        r.close()
        assert time.monotonic() - start < 1.0
        assert _uring._ORPHANS == []


def test_duplicate_user_data_refused(ring, pipe):
    rfd, wfd = pipe
    ring.prep_read(rfd, bytearray(1), -1, 7)
    with pytest.raises(ValueError):
        ring.prep_nop(7)
    ring.submit()
    os.write(wfd, b"x")
    assert wait_for(ring, 1) == {7: 1}
    ring.prep_nop(7)  # free again once reaped
    ring.submit()
    assert wait_for(ring, 1) == {7: 0}


def test_out_of_range_arguments_refused(ring):
    with pytest.raises(ValueError):
        ring.prep_nop(-1)
    with pytest.raises(ValueError):
        ring.prep_nop(2**64)
    with pytest.raises(ValueError):
        ring.prep_close(2**31, 1)
    assert ring.in_flight == 0 and ring.pending == 0
    ring.prep_nop(2**64 - 1)
    ring.submit()
    assert wait_for(ring, 1) == {2**64 - 1: 0}


def test_iowq_max_workers_set_and_read_back():
    with Ring(8) as r:
        try:
            bounded, unbounded = r.register_iowq_max_workers(0, 0)  # query only
        except OSError as e:
            pytest.skip(f"IORING_REGISTER_IOWQ_MAX_WORKERS unsupported: {e}")
        assert bounded > 0 and unbounded > 0
        try:
            assert r.register_iowq_max_workers(bounded + 3, 0) == (bounded, unbounded)
            assert r.register_iowq_max_workers(0, 0) == (bounded + 3, unbounded)
        finally:
            r.register_iowq_max_workers(bounded, 0)
    with pytest.raises(RingClosed):
        r.register_iowq_max_workers(1, 1)


def test_close_is_idempotent_and_final():
    r = Ring(8)
    r.prep_nop(1)  # prepared, never submitted
    r.close()
    assert r.closed
    r.close()
    for call in (lambda: r.prep_nop(2), r.submit, r.reap,
                 lambda: r.register_eventfd(0)):
        with pytest.raises(RingClosed):
            call()
    assert r.sq_space() == 0
    with Ring(8) as r2:
        pass
    assert r2.closed


def test_close_cancels_in_flight_reads(pipe):
    rfd, _wfd = pipe
    r = Ring(8)
    buf = bytearray(4)
    r.prep_read(rfd, buf, -1, 1)
    r.submit()
    start = time.monotonic()
    r.close()
    assert time.monotonic() - start < 1.0
    assert _uring._ORPHANS == []  # nothing left for the kernel to write into


def test_no_fd_leaked(data_file, pipe, eventfd):
    rfd, _wfd = pipe
    before = open_fd_count()
    for _ in range(10):
        with Ring(16) as r:
            r.register_eventfd(eventfd)
            r.prep_openat(data_file, os.O_RDONLY, 0, 1)
            r.submit()
            fd = check(wait_for(r, 1)[1])
            r.prep_close(fd, 2)
            r.prep_read(rfd, bytearray(1), -1, 3)  # left in flight on close
            r.submit()
            assert wait_for(r, 1) == {2: 0}
    gc.collect()
    assert open_fd_count() == before


def test_result_error_mapping():
    assert isinstance(result_error(-errno.ENOENT), FileNotFoundError)
    assert isinstance(result_error(-errno.EACCES, "x"), PermissionError)
    assert isinstance(result_error(-errno.EISDIR), IsADirectoryError)
    assert isinstance(result_error(-errno.EAGAIN), BlockingIOError)
    assert check(5) == 5
    assert check(0) == 0
    with pytest.raises(ValueError):
        result_error(3)


def test_ring_unusable_in_forked_child(ring):
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's ring
        try:
            code = 0 if ring.closed else 1
            try:
                ring.prep_nop(1)
                code = 2
            except RingClosed:
                pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ring.prep_nop(1)  # the parent's ring is untouched
    ring.submit()
    assert wait_for(ring, 1) == {1: 0}


# A child process installs a seccomp filter that makes one io_uring syscall
# fail with the given errno, then reports what probe() says. x86-64 only (the
# filter checks the audit architecture).
_SECCOMP_CHILD = r"""
import ctypes, struct, sys
nr, err = int(sys.argv[1]), int(sys.argv[2])
AUDIT_ARCH_X86_64 = 0xC000003E
prog = [  # (code, jt, jf, k)
    (0x20, 0, 0, 4),                   # ld [arch]
    (0x15, 0, 3, AUDIT_ARCH_X86_64),   # jeq arch, else allow
    (0x20, 0, 0, 0),                   # ld [nr]
    (0x15, 0, 1, nr),                  # jeq nr, else allow
    (0x6, 0, 0, 0x00050000 | err),     # ret ERRNO(err)
    (0x6, 0, 0, 0x7FFF0000),           # ret ALLOW
]
filt = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
fprog = ctypes.create_string_buffer(struct.pack("@HP", len(prog),
                                                ctypes.addressof(filt)))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0, ctypes.get_errno()  # NO_NEW_PRIVS
assert libc.prctl(22, 2, fprog, 0, 0) == 0, ctypes.get_errno()  # SECCOMP
from asyncfile.engines import _uring
print(_uring.probe())
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 filter")
@pytest.mark.parametrize(
    ("nr", "err", "expected"),
    [
        (425, errno.ENOSYS, "io_uring_setup: ENOSYS"),
        (425, errno.EPERM, "io_uring_setup: EPERM"),
        (426, errno.EPERM, "io_uring_enter failed"),
        (427, errno.EPERM, "IORING_REGISTER_PROBE failed"),
    ],
)
def test_probe_explains_seccomp_refusal(nr, err, expected):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _SECCOMP_CHILD, str(nr), str(err)],
        capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout
