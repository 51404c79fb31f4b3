"""Page-cache helpers for cold-read tests and benchmarks (Linux).

``evict(path)`` drops a file's clean pages (POSIX_FADV_DONTNEED, after an
``fsync``); ``cached_fraction(path)`` says how much of it is resident, from
``mincore`` on a mapping of the file.  The check must not disturb what it
measures: a probing ``preadv(RWF_NOWAIT)`` is no good -- on a miss it fails
with EAGAIN but starts readahead (measured on Linux 6.18: the first 16-64 KiB
were cached again 50 ms later).  Mapping a file and calling ``mincore``
touches no page.
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["evict", "cached_fraction"]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def evict(path: str | os.PathLike[str]) -> None:
    """Drop the file's pages from the page cache (dirty ones are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: str | os.PathLike[str]) -> float:
    """The fraction of the file's pages in the page cache (1.0 for an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        addr = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}", str(path))
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            if _mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}", str(path))
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            _munmap(addr, size)
    finally:
        os.close(fd)
