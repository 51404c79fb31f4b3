"""Engines: how files are opened, read and closed without blocking the reactor.

Each engine is an ``Engine`` composed of a backend for blocking calls and,
on Linux, the inline path for what cannot block:

============  ==========================  ===============================
name          inline (reactor thread)     backend (everything else)
============  ==========================  ===============================
``io_uring``  local opens, page cache     io_uring ring behind an eventfd
``nowait``    local opens, page cache     the I/O thread pool
``threads``   nothing                     the I/O thread pool
============  ==========================  ===============================
"""

from __future__ import annotations

import os
from typing import Any

from ..pool import IOPool
from .base import ENGINE_STATS, Engine, IBackend, IFileEngine, Op, OpenedFile, Root
from .inline import InlineIO, nowait_supported
from .threads import PoolBackend

__all__ = ["IFileEngine", "IBackend", "Engine", "IOPool", "Op", "OpenedFile", "Root", "InlineIO",
           "PoolBackend", "make_engine", "ENGINES", "ENGINE_STATS", "nowait_supported",
           "uring_unavailable_reason"]

ENGINES = ("auto", "io_uring", "nowait", "threads")


def uring_unavailable_reason() -> str | None:
    """None when the io_uring engine can run here, else why not."""
    if not hasattr(os, "eventfd"):
        return "os.eventfd is missing (not Linux)"
    try:
        from .uring import uring_unavailable_reason as reason
    except (ImportError, OSError) as e:  # no ctypes libc, not Linux
        return f"io_uring binding unavailable: {e}"
    return reason()


def make_engine(name: str, reactor: Any, pool: IOPool, *, inline: bool = True, **ring_options: Any) -> Engine:
    """Build the named engine; ``auto`` picks the best one this system supports.

    ``auto`` is ``io_uring`` wherever the kernel allows it (``_uring.probe()``
    says why not: old kernel, ``kernel.io_uring_disabled``, a seccomp policy
    such as Docker's default), else ``nowait`` on Linux, else ``threads``.
    ``inline=False`` (io_uring only) sends every open, read and close through
    the ring, for comparisons.
    """
    if name == "auto":
        if uring_unavailable_reason() is None:
            name = "io_uring"
        else:
            name = "nowait" if nowait_supported() else "threads"
    if name == "io_uring":
        reason = uring_unavailable_reason()
        if reason is not None:
            raise ValueError(f"engine 'io_uring' is unusable here: {reason}")
        from .uring import RingBackend

        path = InlineIO()
        backend = RingBackend(reactor, pool, path.is_slow_mount, slow_dev=_slow_dev(path), **ring_options)
        return Engine("io_uring", backend, path if inline and nowait_supported() else None)
    if name == "nowait":
        if not nowait_supported():
            raise ValueError("engine 'nowait' needs Linux preadv with RWF_NOWAIT")
        return Engine("nowait", PoolBackend(pool), InlineIO())
    if name == "threads":
        return Engine("threads", PoolBackend(pool))
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


def _slow_dev(path: InlineIO) -> Any:
    def slow(dev: int) -> bool:
        m = path.mounts.for_dev(dev)
        return m is None or m.slow_open or m.mount_point in path._slow_points

    return slow
