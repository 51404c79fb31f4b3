"""Result buffers that become ``bytes`` without a second full copy.

``load()`` promises ``bytes``.  Reading into a ``bytearray`` and calling
``bytes()`` on it copies every byte again, which costs as much as the read
itself for cached data.  CPython's C API allows allocating an uninitialised
``bytes`` object (``PyBytes_FromStringAndSize(NULL, n)``) and filling it before
anyone else sees it; we do exactly that through ctypes.  Other interpreters
fall back to ``bytearray`` + one copy.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["allocate", "finish"]

_ZERO_COPY = sys.implementation.name == "cpython"

if _ZERO_COPY:
    _from_size = ctypes.pythonapi.PyBytes_FromStringAndSize
    _from_size.restype = ctypes.py_object
    _from_size.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
    # ob_sval follows the header; bytes.__basicsize__ counts its 1 trailing NUL.
    _DATA_OFFSET = bytes.__basicsize__ - 1
    # One array type for every buffer, its view cut to size: ``c_char * size``
    # is a type per size (remade after each collection), and a type is
    # cyclic garbage: 8 objects for each size not seen since the last
    # collection -- about one type a load when files have many sizes.
    _SPAN = ctypes.c_char * (sys.maxsize // 2)

# Below this size a bytearray plus one copy is cheaper than the ctypes calls
# (measured: 2.8 vs 4.2 µs at 16 KiB, 4.7 vs 3.2 µs at 64 KiB).  It also keeps
# clear of sizes 0 and 1, whose bytes objects are shared singletons.
_ZERO_COPY_MIN = 32 * 1024


def allocate(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A new buffer of ``size`` bytes and a writable byte view of it.

    The first element must not be shared until it has been filled: it is
    returned as the result (``bytes`` where supported) by ``finish``.
    """
    if _ZERO_COPY and size >= _ZERO_COPY_MIN:
        obj = _from_size(None, size)
        array = _SPAN.from_address(id(obj) + _DATA_OFFSET)
        array.owner = obj  # type: ignore[attr-defined]  # a view (say, in a pool thread) keeps the bytes alive
        return obj, memoryview(array).cast("B")[:size]
    obj = bytearray(size)
    return obj, memoryview(obj)


def finish(obj: bytes | bytearray | None, view: memoryview, filled: int) -> bytes:
    """The first ``filled`` bytes as ``bytes``, without copying when the buffer was filled exactly."""
    if filled == len(view) and isinstance(obj, bytes):
        return obj
    return bytes(view[:filled])
