"""A byte-bounded LRU cache of transformed images and /info documents.

Transforming costs tens of milliseconds of CPU; serving the same thumbnail
again from memory costs nothing, so recent results are kept up to a byte
budget.  The budget counts what an entry really costs (:func:`entry_size`):
its body plus the Python objects around it and the cache's own bookkeeping,
so a cache of many small ``/info`` documents cannot hold many times its
budget (a 6-key dict costs about 400 bytes, not the 6 its length says).

Not thread-safe by design: it is used from the reactor thread only (workers
hand their results back to the reactor, which stores them).  Values are
shared by every caller that gets them: nobody may mutate a cached value
(``ImageService.info`` hands out copies of its dicts).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["ResultCache", "entry_size", "ENTRY_OVERHEAD"]

#: Bytes an entry costs besides its value: the key (a tuple of the source's
#: version and the variant string), the LRU's node and dict slot, the
#: (value, size) pair.  Measured with tracemalloc at ~350-450 bytes; rounded up.
ENTRY_OVERHEAD = 512

_BYTES_HEADER = sys.getsizeof(b"")


def _value_size(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return _BYTES_HEADER + len(value)
    if isinstance(value, memoryview):
        return sys.getsizeof(value) + value.nbytes
    body = getattr(value, "body", None)
    if isinstance(body, (bytes, bytearray, memoryview)):
        # The result object (a dataclass with a few small fields) and its body.
        own = sys.getsizeof(value) + sum(sys.getsizeof(v) for v in getattr(value, "__dict__", {}).values()
                                         if v is not body)
        return own + _value_size(body)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(_value_size(k) + _value_size(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(_value_size(v) for v in value)
    return sys.getsizeof(value)


def entry_size(value: Any) -> int:
    """What storing ``value`` costs in memory, conservatively: the value's
    objects (a body's bytes, a dict's keys and values) plus ``ENTRY_OVERHEAD``."""
    return ENTRY_OVERHEAD + _value_size(value)


class ResultCache:
    """Least-recently-used cache holding at most ``max_bytes`` (as ``size_of`` counts).

    ``max_bytes == 0`` disables it (nothing is stored).  A value larger than
    ``max_bytes`` on its own is not stored, rather than flushing everything
    else for one entry.  ``size_of`` defaults to :func:`entry_size`.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] = entry_size) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for ``key`` (now most recently used), else ``default``."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return default
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Store ``value``, evicting least recently used entries; whether it was stored.

        Replacing a key drops the old value first.
        """
        self.discard(key)
        if self.max_bytes == 0:
            return False
        size = self.size_of(value)
        if size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            _, (_, old_size) = self._entries.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
        self._entries[key] = (value, size)
        self.bytes += size
        return True

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` if present (e.g. when its source file changed)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        """Forget everything; the counters are kept."""
        self._entries.clear()
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        # Does not count as a use, nor as a hit or miss.
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: hits, misses, evictions, entries, bytes, max_bytes."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
        }
