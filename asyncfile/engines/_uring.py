"""A small, sans-reactor io_uring binding in pure Python (ctypes + libc ``syscall``).

Why it exists: a reactor cannot wait for a regular file (epoll refuses it, poll
and select call it always ready), so reads of files block the reactor thread.
io_uring performs open/read/statx/close in the kernel and reports completions
through a ring that an eventfd can announce; the reactor can wait on that eventfd.

This module knows nothing of Twisted. It prepares submission queue entries
(``prep_*``), submits them in one ``io_uring_enter`` (``submit``), and drains
completions (``reap``). No compiled extension: it installs with plain pip.

Rules the caller can rely on:

* Every object the kernel may touch (read buffers, path strings, statx
  buffers) is referenced by the ring, per ``user_data``, until the completion is
  reaped; a read buffer also holds a buffer export, so a ``bytearray`` cannot be
  resized (reallocated) while the kernel may write into it.
* At most ``cq_entries`` operations are in flight, so the completion queue never
  overflows; ``prep_*`` raises ``SubmissionQueueFull`` when there is no room.
* A ``Ring`` is not thread-safe: use it from one thread. It is unusable in a
  forked child (the mapping is shared with the parent).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import select
import struct
import sys
import time
import weakref
from typing import Any, NamedTuple, Union

__all__ = [
    "AT_FDCWD",
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "STATX_BASIC_STATS",
    "IORING_ASYNC_CANCEL_ALL",
    "IORING_ASYNC_CANCEL_ANY",
    "IOSQE_ASYNC",
    "IORING_OP_OPENAT2",
    "Ring",
    "RingClosed",
    "StatxResult",
    "SubmissionQueueFull",
    "UringError",
    "UringUnavailable",
    "check",
    "probe",
    "result_error",
]

# --- Constants from include/uapi/linux/io_uring.h, fcntl.h, stat.h -----------

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800

IORING_OP_NOP = 0
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_OPENAT = 18
IORING_OP_CLOSE = 19
IORING_OP_STATX = 21
IORING_OP_READ = 22
IORING_OP_OPENAT2 = 28
_REQUIRED_OPS = {
    "NOP": IORING_OP_NOP,
    "ASYNC_CANCEL": IORING_OP_ASYNC_CANCEL,
    "OPENAT": IORING_OP_OPENAT,
    "CLOSE": IORING_OP_CLOSE,
    "STATX": IORING_OP_STATX,
    "READ": IORING_OP_READ,
}
# Opcodes a prep_* method uses but probe() does not require: check
# ``op in ring.supported_ops()`` before relying on one.
_OPTIONAL_OPS = {
    "OPENAT2": IORING_OP_OPENAT2,
}

IOSQE_ASYNC = 1 << 4  # issue in an io-wq worker, never inline in io_uring_enter

IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_SUBMIT_ALL = 1 << 7

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_SUBMIT_STABLE = 1 << 2
IORING_FEAT_EXT_ARG = 1 << 8

IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_EXT_ARG = 1 << 3

IORING_SQ_CQ_OVERFLOW = 1 << 1

IORING_ASYNC_CANCEL_ALL = 1 << 0
IORING_ASYNC_CANCEL_ANY = 1 << 2

IORING_REGISTER_EVENTFD = 4
IORING_UNREGISTER_EVENTFD = 5
IORING_REGISTER_PROBE = 8
IORING_REGISTER_IOWQ_MAX_WORKERS = 19
IO_URING_OP_SUPPORTED = 1 << 0

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_POPULATE = 0x08000
_MAP_FAILED = ctypes.c_void_p(-1).value

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
# Linux caps one read at MAX_RW_COUNT (INT_MAX rounded down to a page).
_MAX_RW = 0x7FFFF000

# io_uring_setup, io_uring_enter, io_uring_register. Since Linux 5.1 every
# architecture shares these numbers except alpha, ia64 and mips; only the two
# below are exercised, so only they are enabled.
_SYSCALL_NUMBERS = {
    "x86_64": (425, 426, 427),
    "aarch64": (425, 426, 427),
}

# --- Structures ------------------------------------------------------------------


class _SQOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CQOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SQOffsets),
        ("cq_off", _CQOffsets),
    ]


class _KernelTimespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


class _GetEventsArg(ctypes.Structure):
    _fields_ = [
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("min_wait_usec", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    ]


class _ProbeOp(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("resv", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32),
    ]


class _Probe(ctypes.Structure):
    _fields_ = [
        ("last_op", ctypes.c_uint8),
        ("ops_len", ctypes.c_uint8),
        ("resv", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32 * 3),
        ("ops", _ProbeOp * 256),
    ]


assert ctypes.sizeof(_Params) == 120
assert ctypes.sizeof(_GetEventsArg) == 24

# struct io_uring_sqe is 64 bytes: opcode, flags, ioprio, fd, off/addr2, addr,
# len, op_flags (open_flags, statx_flags, cancel_flags, rw_flags...),
# user_data, then buf_index, personality, splice_fd_in/file_index, addr3, pad.
# Only the first 40 bytes are written (one pack_into per operation): the last
# 24 start zeroed (fresh mapping), the kernel never writes SQEs, and none of
# the operations here uses them, so they stay zero.
_SQE_SIZE = 64
_SQE_HEAD = struct.Struct("=BBHiQQIIQ")
_SQE_PACK = _SQE_HEAD.pack_into
assert _SQE_HEAD.size == 40
# struct io_uring_cqe (16 bytes): user_data, res, flags.
_CQE = struct.Struct("=QiI")
_CQE_ITER = _CQE.iter_unpack
assert _CQE.size == 16
_POINTER = struct.Struct("@P")

# struct statx up to stx_dio_offset_align (0xa0 bytes); the kernel writes 256.
_STATX = struct.Struct("=IIQIIIHxxQQQQqIxxxxqIxxxxqIxxxxqIxxxxIIIIQII")
assert _STATX.size == 0xA0
_STATX_BUFSIZE = 256


class StatxResult(NamedTuple):
    """What a reaped statx gives (times in integer nanoseconds since the epoch)."""

    mask: int
    blksize: int
    attributes: int
    nlink: int
    uid: int
    gid: int
    mode: int
    ino: int
    size: int
    blocks: int
    atime_ns: int
    btime_ns: int
    ctime_ns: int
    mtime_ns: int
    rdev_major: int
    rdev_minor: int
    dev_major: int
    dev_minor: int
    mnt_id: int

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def dev(self) -> int:
        """``st_dev`` as ``os.stat`` reports it, to key per-device decisions."""
        return os.makedev(self.dev_major, self.dev_minor)


def _parse_statx(buf: Any) -> StatxResult:
    (mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks, _amask,
     a_s, a_ns, b_s, b_ns, c_s, c_ns, m_s, m_ns,
     rdev_major, rdev_minor, dev_major, dev_minor, mnt_id, _dma, _doa,
     ) = _STATX.unpack_from(buf)
    return StatxResult(
        mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks,
        a_s * 1_000_000_000 + a_ns, b_s * 1_000_000_000 + b_ns,
        c_s * 1_000_000_000 + c_ns, m_s * 1_000_000_000 + m_ns,
        rdev_major, rdev_minor, dev_major, dev_minor, mnt_id,
    )


class _OpenHow(ctypes.Structure):
    """struct open_how (include/uapi/linux/openat2.h) for IORING_OP_OPENAT2;
    its ``path`` attribute keeps the path alive too, like ``_StatxBuf``."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_OpenHow) == 24


class _StatxBuf(ctypes.Array):  # type: ignore[type-arg]
    """The buffer a statx op writes into; its ``path`` attribute keeps the path
    alive too, so one object is all the ring has to hold until reaped."""

    _type_ = ctypes.c_char
    _length_ = _STATX_BUFSIZE
    path: ctypes.c_char_p


# --- Errors ----------------------------------------------------------------------


class UringError(Exception):
    """Base class of this module's own errors (kernel errors are OSError)."""


class UringUnavailable(UringError):
    """io_uring cannot be used in this process; the message says why."""


class SubmissionQueueFull(UringError):
    """No free submission slot (or the completion queue would be full): queue
    the operation and retry after ``submit()`` / ``reap()``."""


class RingClosed(UringError):
    """The ring was closed (or inherited across fork) and cannot be used."""


def result_error(res: int, filename: Any = None) -> OSError:
    """Turn a negative CQE result (-errno) into the matching OSError subclass.

    ``OSError(errno, strerror, filename)`` picks the subclass itself, e.g.
    ENOENT gives FileNotFoundError, ECANCELED a plain OSError.
    """
    if res >= 0:
        raise ValueError(f"result {res} is not an error")
    err = -res
    if filename is None:
        return OSError(err, os.strerror(err))
    return OSError(err, os.strerror(err), filename)


def check(res: Any, filename: Any = None) -> Any:
    """Return ``res`` unchanged unless it is a negative int; then raise."""
    if type(res) is int and res < 0:
        raise result_error(res, filename)
    return res


# --- libc access -----------------------------------------------------------------

_MACHINE = os.uname().machine if hasattr(os, "uname") else ""
_NR = _SYSCALL_NUMBERS.get(_MACHINE) if sys.platform.startswith("linux") else None
_NR_SETUP, _NR_ENTER, _NR_REGISTER = _NR or (-1, -1, -1)

_libc: Any = None
_syscall: Any = None
_mmap: Any = None
_munmap: Any = None
if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [ctypes.c_long] * 7
    _mmap = _libc.mmap
    _mmap.restype = ctypes.c_void_p
    _mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _munmap = _libc.munmap
    _munmap.restype = ctypes.c_int
    _munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_get_errno = ctypes.get_errno


def _load_fence() -> tuple[Any, str | None]:
    """Find a memory fence for weakly ordered CPUs.

    The kernel publishes a CQE and then store-releases the CQ tail; we must
    load-acquire the tail before reading CQEs and store-release the head after
    reading them. x86-64 is TSO (loads are not reordered with loads, stores not
    with earlier loads or stores) and every ctypes access is an opaque call, so
    plain loads and stores are enough there. Elsewhere ctypes has no barrier;
    libatomic's ``atomic_thread_fence`` provides a real one.
    """
    if _MACHINE == "x86_64":
        return None, None
    try:
        fence = ctypes.CDLL("libatomic.so.1").atomic_thread_fence
    except (OSError, AttributeError):
        return None, f"no memory fence for {_MACHINE}: libatomic.so.1 not found"
    fence.restype = None
    fence.argtypes = [ctypes.c_int]
    return fence, None


_FENCE, _FENCE_PROBLEM = _load_fence()
_SEQ_CST = 5  # memory_order_seq_cst


def _enter(fd: int, to_submit: int, min_complete: int, flags: int,
           arg: int = 0, argsz: int = 0) -> int:
    """One io_uring_enter; returns the result or -errno (no exception)."""
    ret: int = _syscall(_NR_ENTER, fd, to_submit, min_complete, flags, arg, argsz)
    if ret < 0:
        return -_get_errno()
    return ret


def _register(fd: int, opcode: int, arg: int, nr_args: int) -> None:
    ret = _syscall(_NR_REGISTER, fd, opcode, arg, nr_args, 0, 0)
    if ret < 0:
        err = _get_errno()
        raise OSError(err, f"io_uring_register({opcode}): {os.strerror(err)}")


# Rings to disable in a forked child: the child shares the parent's mapping and
# must neither submit nor cancel on the parent's behalf.
_RINGS: "weakref.WeakSet[Ring]" = weakref.WeakSet()
# References the kernel may still write into after a close that timed out while
# ops were in flight: kept forever rather than risking a use-after-free.
_ORPHANS: list[Any] = []


def _after_fork_in_child() -> None:
    for ring in list(_RINGS):
        ring._abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def _c_path(path: PathArg) -> tuple[ctypes.c_char_p, int]:
    """A NUL-terminated path the kernel can read, and its address.

    The ``c_char_p`` points into the bytes object itself (no copy) and keeps it
    alive. An embedded NUL would silently shorten the path: refuse it.
    """
    if type(path) is not bytes:
        path = os.fsencode(path)
    if 0 in path:  # memchr; much cheaper than b"\0" in path
        raise ValueError("embedded null byte in path")
    cp = ctypes.c_char_p(path)
    return cp, _POINTER.unpack_from(cp)[0]


_c_char_from_buffer = ctypes.c_char.from_buffer
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_addressof = ctypes.addressof


# --- The ring ----------------------------------------------------------------------


class Ring:
    """One io_uring instance: SQ/CQ rings and the SQE array mapped into memory.

    ``user_data`` values are caller-chosen integers (0..2**64-1) identifying
    operations; one value may only be in flight once at a time.
    """

    __slots__ = (
        "__weakref__", "fd", "sq_entries", "cq_entries", "features",
        "_closed", "_maps", "_sq_head", "_sq_tail", "_sq_flags", "_sq_mask",
        "_sqes", "_sq_tail_local", "_sq_submitted", "_room", "_cq_head",
        "_cq_tail",
        "_cq_mask", "_cqes", "_cq_head_local", "_inflight", "_ts", "_ext_arg",
        "_eventfd",
    )

    def __init__(self, entries: int = 256) -> None:
        self._closed = True  # until fully set up: close()/__del__ are no-ops
        self._maps: list[tuple[int, int]] = []
        problem = _platform_problem() or _FENCE_PROBLEM
        if problem:
            raise UringUnavailable(problem)
        if entries < 1:
            raise ValueError("entries must be >= 1")
        params = _Params()
        params.flags = IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL
        fd = _syscall(_NR_SETUP, entries, _addressof(params), 0, 0, 0, 0)
        if fd < 0 and _get_errno() == _errno.EINVAL:
            # SUBMIT_ALL is Linux 5.18+; without it a failing SQE stops the
            # batch, which submit() copes with (the rest stay queued).
            params = _Params()
            params.flags = IORING_SETUP_CLAMP
            fd = _syscall(_NR_SETUP, entries, _addressof(params), 0, 0, 0, 0)
        if fd < 0:
            err = _get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        try:
            self._map_rings(params)
        except BaseException:
            self._unmap()
            os.close(fd)
            raise
        self.features = params.features
        self._inflight: dict[int, Any] = {}
        self._ts = _KernelTimespec()
        self._ext_arg = _GetEventsArg()
        self._ext_arg.ts = _addressof(self._ts)
        self._eventfd: int | None = None
        self._closed = False
        self._room = 0
        self._update_room()
        _RINGS.add(self)

    def _map_rings(self, p: _Params) -> None:
        sq_entries = p.sq_entries
        cq_entries = p.cq_entries
        sq_size = p.sq_off.array + sq_entries * 4
        cq_size = p.cq_off.cqes + cq_entries * _CQE.size
        single = bool(p.features & IORING_FEAT_SINGLE_MMAP)
        if single:
            sq_size = cq_size = max(sq_size, cq_size)
        sq_ptr = self._map(sq_size, IORING_OFF_SQ_RING)
        cq_ptr = sq_ptr if single else self._map(cq_size, IORING_OFF_CQ_RING)
        sqe_ptr = self._map(sq_entries * _SQE_SIZE, IORING_OFF_SQES)

        u32 = ctypes.c_uint32
        so, co = p.sq_off, p.cq_off
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self._sq_head = u32.from_address(sq_ptr + so.head)
        self._sq_tail = u32.from_address(sq_ptr + so.tail)
        self._sq_flags = u32.from_address(sq_ptr + so.flags)
        self._sq_mask = u32.from_address(sq_ptr + so.ring_mask).value
        # Identity SQ index array, written once: SQE slot i is entry i.
        array = (u32 * sq_entries).from_address(sq_ptr + so.array)
        for i in range(sq_entries):
            array[i] = i
        self._sqes = memoryview((ctypes.c_char * (sq_entries * _SQE_SIZE))
                                .from_address(sqe_ptr)).cast("B")
        # Unmasked counters: prepared SQEs, and those the kernel accepted.
        self._sq_tail_local = self._sq_submitted = self._sq_tail.value
        self._cq_head = u32.from_address(cq_ptr + co.head)
        self._cq_tail = u32.from_address(cq_ptr + co.tail)
        self._cq_mask = u32.from_address(cq_ptr + co.ring_mask).value
        self._cqes = memoryview((ctypes.c_char * (cq_entries * _CQE.size))
                                .from_address(cq_ptr + co.cqes)).cast("B")
        self._cq_head_local = self._cq_head.value

    def _map(self, size: int, offset: int) -> int:
        ptr: int | None = _mmap(None, size, _PROT_READ | _PROT_WRITE,
                    _MAP_SHARED | _MAP_POPULATE, self.fd, offset)
        if ptr is None or ptr == _MAP_FAILED:
            err = _get_errno()
            raise OSError(err, f"mmap of io_uring ring: {os.strerror(err)}")
        self._maps.append((ptr, size))
        return ptr

    def _unmap(self) -> None:
        # Drop every view into the mappings before unmapping them.
        for name in ("_sq_head", "_sq_tail", "_sq_flags", "_sqes",
                     "_cq_head", "_cq_tail", "_cqes"):
            try:
                delattr(self, name)
            except AttributeError:
                pass
        for ptr, size in self._maps:
            _munmap(ptr, size)
        self._maps = []

    # -- properties -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        """Operations prepared and not yet reaped (submitted or not)."""
        return len(self._inflight)

    @property
    def pending(self) -> int:
        """Operations prepared but not yet accepted by the kernel."""
        return self._sq_tail_local - self._sq_submitted

    def sq_space(self) -> int:
        """How many more operations can be prepared now: free SQ slots, capped
        so that in-flight operations never outnumber CQ slots."""
        return self._room

    def _update_room(self) -> None:
        if self._closed:
            self._room = 0
        else:
            self._room = min(
                self.sq_entries - (self._sq_tail_local - self._sq_submitted),
                self.cq_entries - len(self._inflight))

    # -- preparing operations -------------------------------------------------

    def _put(self, opcode: int, fd: int, off: int, addr: int, length: int,
             op_flags: int, user_data: int, keep: Any,
             sqe_flags: int = 0) -> None:
        """Write one SQE into the next free slot and remember what to keep alive."""
        room = self._room
        if room <= 0:
            raise self._no_room()
        inflight = self._inflight
        if user_data in inflight:
            raise ValueError(f"user_data {user_data} is already in flight")
        tail = self._sq_tail_local
        try:
            _SQE_PACK(self._sqes, (tail & self._sq_mask) << 6, opcode,
                      sqe_flags, 0, fd, off, addr, length, op_flags, user_data)
        except struct.error as e:  # nothing was queued
            raise ValueError(f"argument out of range for an SQE: {e} (fd "
                             f"{fd!r}, user_data {user_data!r})") from None
        self._sq_tail_local = tail + 1
        self._room = room - 1
        inflight[user_data] = keep

    def _no_room(self) -> UringError:
        if self._closed:
            return RingClosed("ring is closed")
        return SubmissionQueueFull(
            f"{self.pending} prepared, {len(self._inflight)} in flight")

    def prep_nop(self, user_data: int) -> None:
        """A no-op; completes with res 0. For tests and wake-ups."""
        self._put(IORING_OP_NOP, -1, 0, 0, 0, 0, user_data, None)

    def prep_read(self, fd: int, buf: Any, offset: int, user_data: int, *,
                  force_async: bool = False) -> None:
        """Read up to ``len(buf)`` bytes at ``offset`` (-1: file position).

        ``buf`` is any writable C-contiguous buffer (bytearray, memoryview
        slice, ctypes array, mmap). The ring holds a buffer export on it until
        the completion is reaped, so it is neither freed nor resized meanwhile.
        The result is the byte count (short reads happen; only 0 is EOF).

        ``force_async`` (IOSQE_ASYNC): the kernel issues reads inline in
        ``io_uring_enter`` first, and some file systems wait there anyway: a
        FUSE direct-I/O read sleeps in ``fuse_get_req`` once ``max_background``
        (default 12) requests are outstanding (measured: 50 ms in submit).
        """
        # The anchor is a c_char over the buffer's first byte: it gives the
        # address and holds the export that pins the memory.
        if buf.__class__ is bytearray:  # fast path: no extra memoryview
            n = len(buf)
            anchor: Any = _c_char_from_buffer(buf) if n else buf
        else:
            mv = memoryview(buf)
            if mv.readonly:
                raise TypeError("prep_read needs a writable buffer")
            n = mv.nbytes
            anchor = _c_char_from_buffer(mv) if n else mv  # C-contiguous only
        if n:
            addr = _addressof(anchor)
            if n > _MAX_RW:
                n = _MAX_RW
        else:
            addr = 0
        self._put(IORING_OP_READ, fd, offset & _U64, addr, n, 0, user_data,
                  anchor, IOSQE_ASYNC if force_async else 0)

    def prep_openat(self, path: PathArg, flags: int, mode: int, user_data: int,
                    dirfd: int = AT_FDCWD, *, force_async: bool = False) -> None:
        """openat(dirfd, path, flags | O_CLOEXEC, mode); the result is the new fd.

        O_CLOEXEC is always added, like ``os.open`` (PEP 446).

        ``force_async`` (IOSQE_ASYNC) matters on FUSE, NFS and the like: when
        the name is in the dentry cache the kernel first tries the open inline
        in ``io_uring_enter``, and their ``->open`` waits for the server there
        (measured: a FUSE open sleeping 200 ms blocked ``submit()`` 200 ms).
        """
        cp, addr = _c_path(path)
        self._put(IORING_OP_OPENAT, dirfd, 0, addr, mode,
                  (flags | _O_CLOEXEC) & _U32, user_data, cp,
                  IOSQE_ASYNC if force_async else 0)

    def prep_openat2(self, dirfd: int, path: PathArg, flags: int, mode: int,
                     resolve: int, user_data: int, *,
                     force_async: bool = False) -> None:
        """openat2(dirfd, path, {flags | O_CLOEXEC, mode, resolve}); the
        result is the new fd or -errno (e.g. -EXDEV for an escape under
        RESOLVE_BENEATH).

        Linux 5.6+: check ``IORING_OP_OPENAT2 in supported_ops()``. The kernel
        is strict: unknown flags, or a ``mode`` without O_CREAT/O_TMPFILE, give
        -EINVAL. ``struct open_how`` and the path stay referenced until the
        completion is reaped; ``force_async`` as in ``prep_openat``.
        """
        cp, addr = _c_path(path)
        how = _OpenHow((flags | _O_CLOEXEC) & _U64, mode & _U64,
                       resolve & _U64)
        how.path = cp
        self._put(IORING_OP_OPENAT2, dirfd, _addressof(how), addr,
                  ctypes.sizeof(_OpenHow), 0, user_data, how,
                  IOSQE_ASYNC if force_async else 0)

    def prep_statx(self, path_or_fd: PathArg | int, user_data: int, *,
                   flags: int = 0, mask: int = STATX_BASIC_STATS,
                   dirfd: int = AT_FDCWD) -> None:
        """statx of a path (relative to ``dirfd``) or of an open fd.

        When reaped successfully the result is a ``StatxResult`` instead of 0.
        """
        if isinstance(path_or_fd, int):
            dirfd = path_or_fd
            path_or_fd = b""
            flags |= AT_EMPTY_PATH
        buf = _StatxBuf()
        buf.path, addr = _c_path(path_or_fd)
        self._put(IORING_OP_STATX, dirfd, _addressof(buf), addr, mask,
                  flags, user_data, buf)

    def prep_close(self, fd: int, user_data: int) -> None:
        """close(fd) in the kernel; the result is 0 or -errno."""
        self._put(IORING_OP_CLOSE, fd, 0, 0, 0, 0, user_data, None)

    def prep_cancel(self, target_user_data: int, user_data: int,
                    flags: int = 0) -> None:
        """Ask the kernel to cancel the op tagged ``target_user_data``.

        This op's result: 0 (found and cancelled; the target then completes
        with -ECANCELED), -ENOENT (not found, e.g. already completed) or
        -EALREADY (already running; it will complete on its own).
        """
        self._put(IORING_OP_ASYNC_CANCEL, -1, 0, target_user_data & _U64, 0,
                  flags, user_data, None)

    # -- submitting and reaping -----------------------------------------------

    def submit(self) -> int:
        """Hand every prepared SQE to the kernel in one io_uring_enter.

        Returns how many the kernel accepted. On EAGAIN/EBUSY (kernel short of
        memory, completion backlog) it returns 0 and the SQEs stay queued for
        the next submit(); EINTR is retried.
        """
        if self._closed:
            raise RingClosed("ring is closed")
        pending = self._sq_tail_local - self._sq_submitted
        if not pending:
            return 0
        if _FENCE is not None:
            _FENCE(_SEQ_CST)  # SQE stores before the tail store
        self._sq_tail.value = self._sq_tail_local & _U32
        while True:
            ret: int = _syscall(_NR_ENTER, self.fd, pending, 0, 0, 0, 0)
            if ret >= 0:
                break
            err = _get_errno()
            if err == _errno.EINTR:
                continue
            if err in (_errno.EAGAIN, _errno.EBUSY):
                return 0
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._sq_submitted += ret
        self._update_room()
        return ret

    def reap(self) -> list[tuple[int, Any]]:
        """Drain the completion queue without blocking: [(user_data, res)].

        ``res`` is the kernel's result (>= 0, or -errno; see ``result_error``),
        except that a successful statx gives a ``StatxResult``. References kept
        for an operation are released here.
        """
        if self._closed:
            raise RingClosed("ring is closed")
        out: list[tuple[int, Any]] = []
        head = self._cq_head_local
        tail = self._cq_tail.value
        if head == tail:
            if not self._sq_flags.value & IORING_SQ_CQ_OVERFLOW:
                return out
            self._flush_overflow()
            tail = self._cq_tail.value
        pop = self._inflight.pop
        cqes = self._cqes
        entries = self._cq_mask + 1
        append = out.append
        statx_buf = _StatxBuf
        while head != tail:
            if _FENCE is not None:
                _FENCE(_SEQ_CST)  # load-acquire of the tail
            # The CQEs between head and tail, as one or two (wrapped) slices.
            first = head & self._cq_mask
            last = first + ((tail - head) & _U32)
            if last <= entries:
                chunks: tuple[memoryview, ...] = (cqes[first << 4:last << 4],)
            else:
                chunks = (cqes[first << 4:], cqes[:(last - entries) << 4])
            for chunk in chunks:
                for user_data, res, _flags in _CQE_ITER(chunk):
                    keep = pop(user_data, None)
                    if res == 0 and keep is not None and (
                            keep.__class__ is statx_buf):
                        res = _parse_statx(keep)
                    append((user_data, res))
            head = tail
            if _FENCE is not None:
                _FENCE(_SEQ_CST)  # CQE loads before the head store (release)
            # Publishing the head hands the slots back to the kernel.
            self._cq_head.value = head
            self._cq_head_local = head
            if self._sq_flags.value & IORING_SQ_CQ_OVERFLOW:
                self._flush_overflow()
            tail = self._cq_tail.value
        self._update_room()
        return out

    def _flush_overflow(self) -> None:
        """Ask the kernel to move overflowed CQEs (kept with FEAT_NODROP) into
        the now-free ring. Not expected: in-flight ops are capped at cq_entries."""
        ret = _enter(self.fd, 0, 0, IORING_ENTER_GETEVENTS)
        if ret < 0 and ret not in (-_errno.EINTR, -_errno.EAGAIN, -_errno.EBUSY):
            raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")

    def wait(self, min_complete: int = 1,
             timeout: float | None = None) -> list[tuple[int, Any]]:
        """Block until ``min_complete`` completions or ``timeout`` seconds.

        For tests and simple scripts; a reactor waits on the eventfd instead.
        Does not submit. Never waits for more ops than were submitted.
        """
        out = self.reap()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            submitted = len(self._inflight) - self.pending
            want = min(min_complete, submitted + len(out)) - len(out)
            if want <= 0:
                return out
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return out
            else:
                remaining = None
            self._wait_kernel(want, remaining)
            out.extend(self.reap())

    def _wait_kernel(self, want: int, remaining: float | None) -> None:
        if self.features & IORING_FEAT_EXT_ARG:
            flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG
            if remaining is None:
                self._ext_arg.ts = 0
            else:
                sec = int(remaining)
                self._ts.tv_sec = sec
                self._ts.tv_nsec = int((remaining - sec) * 1e9)
                self._ext_arg.ts = _addressof(self._ts)
            ret = _enter(self.fd, 0, want, flags, _addressof(self._ext_arg),
                         ctypes.sizeof(_GetEventsArg))
            if ret < 0 and ret not in (-_errno.ETIME, -_errno.EINTR,
                                       -_errno.EAGAIN, -_errno.EBUSY):
                raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")
        else:
            # Pre-5.11 kernels: the ring fd polls readable when CQEs are there.
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.poll(None if remaining is None
                        else max(1, int(remaining * 1000)))

    # -- eventfd --------------------------------------------------------------

    def register_eventfd(self, efd: int) -> None:
        """Have the kernel signal ``efd`` (an eventfd) whenever CQEs are posted.

        The caller owns the eventfd (and closes it); the ring only signals it.
        Drain it (os.eventfd_read) before reaping to avoid lost wake-ups.
        """
        if self._closed:
            raise RingClosed("ring is closed")
        value = ctypes.c_int32(efd)
        _register(self.fd, IORING_REGISTER_EVENTFD, _addressof(value), 1)
        self._eventfd = efd

    def unregister_eventfd(self) -> None:
        if self._closed:
            raise RingClosed("ring is closed")
        _register(self.fd, IORING_UNREGISTER_EVENTFD, 0, 0)
        self._eventfd = None

    def register_iowq_max_workers(self, bounded: int = 0,
                                  unbounded: int = 0) -> tuple[int, int]:
        """Cap the kernel's io-wq worker threads (Linux 5.15+); 0 keeps a limit.

        Operations that cannot complete without blocking (reads of FUSE or NFS
        files, statx, openat on a cold dentry) run in io-wq "bounded" workers,
        by default at most min(sq_entries, 4 * CPUs) of them: on a 2-CPU
        machine 8 slow reads at a time, however many are submitted.  The
        limit applies to the submitting thread's io-wq (shared by its rings).
        Returns the previous (bounded, unbounded) limits.
        """
        if self._closed:
            raise RingClosed("ring is closed")
        values = (ctypes.c_uint32 * 2)(bounded, unbounded)
        _register(self.fd, IORING_REGISTER_IOWQ_MAX_WORKERS,
                  _addressof(values), 2)
        return values[0], values[1]

    def supported_ops(self) -> set[int]:
        """Opcodes this kernel supports (IORING_REGISTER_PROBE, Linux 5.6+)."""
        if self._closed:
            raise RingClosed("ring is closed")
        probe_buf = _Probe()
        _register(self.fd, IORING_REGISTER_PROBE, _addressof(probe_buf), 256)
        return {
            op.op for op in probe_buf.ops[: probe_buf.ops_len]
            if op.flags & IO_URING_OP_SUPPORTED
        }

    # -- closing --------------------------------------------------------------

    def close(self, timeout: float = 1.0) -> None:
        """Cancel what is in flight, wait up to ``timeout`` s, unmap, close.

        Idempotent. If ops are still in flight after the timeout their buffers
        are kept referenced forever (the kernel may still write into them).
        """
        if self._closed:
            return
        try:
            if self._inflight:
                self._cancel_all(timeout)
        finally:
            self._closed = True
            self._room = 0
            _RINGS.discard(self)
            if self._inflight:
                _ORPHANS.extend(self._inflight.values())
            self._inflight = {}
            self._unmap()
            os.close(self.fd)

    def _cancel_all(self, timeout: float) -> None:
        """Cancel every submitted op and wait for their completions.

        Best effort: an io_uring_enter error stops it; close() then keeps the
        references of whatever is still in flight.
        """
        deadline = time.monotonic() + timeout
        try:
            self.submit()
        except OSError:
            pass
        if self.pending:  # never accepted by the kernel: just forget them
            self._drop_unsubmitted()
        if not self._inflight:
            return
        # A user_data the caller is not using, for the cancel op itself.
        cancel_ud = _U64
        while cancel_ud in self._inflight:
            cancel_ud -= 1
        # The SQ is empty now, so there is a slot; bypass the CQ cap (with
        # FEAT_NODROP the kernel keeps an overflowing CQE rather than drop it).
        tail = self._sq_tail_local
        _SQE_PACK(self._sqes, (tail & self._sq_mask) << 6,
                  IORING_OP_ASYNC_CANCEL, 0, 0, -1, 0, 0, 0,
                  IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY,
                  cancel_ud)
        self._sq_tail_local = tail + 1
        self._inflight[cancel_ud] = None
        try:
            self.submit()
            old_kernel = False
            while self._inflight and time.monotonic() < deadline:
                for user_data, res in self.wait(1, deadline - time.monotonic()):
                    if user_data == cancel_ud and res == -_errno.EINVAL:
                        old_kernel = True  # CANCEL_ANY is Linux 5.19+
                if old_kernel:  # cancel one by one instead
                    old_kernel = False
                    for target in list(self._inflight):
                        if self.sq_space() <= 0:
                            break
                        while cancel_ud in self._inflight:
                            cancel_ud -= 1
                        self.prep_cancel(target, cancel_ud)
                    self.submit()
        except OSError:
            pass
        if self.pending:
            self._drop_unsubmitted()

    def _drop_unsubmitted(self) -> None:
        """Forget SQEs the kernel never accepted (they are the newest ones)."""
        pending = self.pending
        if pending:
            for user_data in list(self._inflight)[-pending:]:
                del self._inflight[user_data]
        self._sq_tail_local = self._sq_submitted
        self._sq_tail.value = self._sq_submitted & _U32
        self._update_room()

    def _abandon(self) -> None:
        """In a forked child: release our copy without touching the parent's ops."""
        if self._closed:
            return
        self._closed = True
        self._room = 0
        self._inflight = {}
        self._unmap()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<Ring {state} in_flight={len(self._inflight)}>"


# --- probe -------------------------------------------------------------------------


def _platform_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"io_uring is Linux-only (platform {sys.platform})"
    if _NR is None:
        return f"io_uring syscall numbers not known for machine {_MACHINE!r}"
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return "io_uring binding needs a 64-bit process"
    return None


_SETUP_REASONS: dict[int | None, str] = {
    _errno.ENOSYS: "io_uring_setup: ENOSYS (kernel without io_uring, or a "
                   "seccomp filter answering ENOSYS)",
    _errno.EPERM: "io_uring_setup: EPERM (kernel.io_uring_disabled, or a "
                  "seccomp/container policy such as Docker's default)",
    _errno.EACCES: "io_uring_setup: EACCES (blocked by a security module)",
    _errno.ENOMEM: "io_uring_setup: ENOMEM (RLIMIT_MEMLOCK too low for the "
                   "rings on kernels before 5.12?)",
}

_probe_result: list[str | None] = []


def probe() -> str | None:
    """None if io_uring is usable here, else a reason string.

    Sets up a tiny ring, checks the opcodes this binding uses and does one NOP
    round trip (a seccomp filter may allow setup yet block io_uring_enter).
    The answer is computed once per process.
    """
    if not _probe_result:
        _probe_result.append(_probe())
    return _probe_result[0]


def _probe() -> str | None:
    problem = _platform_problem() or _FENCE_PROBLEM
    if problem:
        return problem
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = int(f.read().strip() or 0)
    except (OSError, ValueError):
        disabled = 0  # before Linux 6.6 the knob does not exist
    if disabled == 2:
        return "io_uring disabled by sysctl kernel.io_uring_disabled=2"
    try:
        ring = Ring(4)
    except OSError as e:
        reason = _SETUP_REASONS.get(e.errno)
        if reason and e.errno == _errno.EPERM and disabled:
            reason += f"; kernel.io_uring_disabled={disabled}"
        return reason or f"io_uring_setup failed: {e}"
    except UringError as e:
        return str(e)
    try:
        try:
            ops = ring.supported_ops()
        except OSError as e:
            return f"IORING_REGISTER_PROBE failed (kernel before 5.6?): {e}"
        missing = sorted(name for name, op in _REQUIRED_OPS.items()
                         if op not in ops)
        if missing:
            return "io_uring lacks opcodes: " + ", ".join(missing)
        ring.prep_nop(1)
        try:
            ring.submit()
            done = ring.wait(1, timeout=1.0)
        except OSError as e:
            return f"io_uring_enter failed: {e}"
        if done != [(1, 0)]:
            return f"io_uring NOP round trip failed: {done!r}"
        return None
    finally:
        ring.close()
