"""A byte-bounded LRU cache of transformed images.

Transforming costs tens of milliseconds of CPU; serving the same thumbnail
again from memory costs nothing, so recent results are kept up to a byte
budget.  Only the result bodies are counted (``len(value.body)``, or
``len(value)`` for plain bytes); keys and per-entry overhead are not.

Not thread-safe by design: it is used from the reactor thread only (workers
hand their results back to the reactor, which stores them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["ResultCache"]


def _size(value: Any) -> int:
    body = getattr(value, "body", value)
    return len(body)


class ResultCache:
    """Least-recently-used cache holding at most ``max_bytes`` of bodies.

    ``max_bytes == 0`` disables it (nothing is stored).  A value larger than
    ``max_bytes`` on its own is not stored, rather than flushing everything
    else for one entry.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, not {max_bytes!r}")
        self.max_bytes = max_bytes
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
        size = _size(value)
        self.discard(key)
        if size > self.max_bytes or self.max_bytes == 0:
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
