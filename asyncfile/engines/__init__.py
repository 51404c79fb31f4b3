"""Engines: how chunks are read without blocking the reactor thread."""

from __future__ import annotations

from typing import Any

from .base import IFileEngine, IOPool, OpenedFile
from .nowait import NowaitEngine, nowait_supported
from .threads import ThreadsEngine
from .uring import UringEngine, uring_unavailable_reason

__all__ = ["IFileEngine", "IOPool", "OpenedFile", "NowaitEngine", "ThreadsEngine", "UringEngine",
           "make_engine", "ENGINES"]

ENGINES = ("auto", "io_uring", "nowait", "threads")


def make_engine(name: str, reactor: Any, pool: IOPool) -> IFileEngine:
    """Build the named engine; ``auto`` picks the best one this system supports.

    ``auto`` is ``io_uring`` wherever the kernel allows it (``_uring.probe()``
    says why not: old kernel, ``kernel.io_uring_disabled``, a seccomp policy
    such as Docker's default), else ``nowait`` on Linux, else ``threads``.
    Measured with bench/engines.py: cached files take the same inline path as
    ``nowait`` (within a few percent of it), while slow storage and cold
    page-cache reads go through the ring with no thread hop and no thread
    cap (1.5x nowait on FUSE with libfuse's defaults, 6x with a larger
    ``max_background``).
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
        return UringEngine(reactor, pool)
    if name == "nowait":
        if not nowait_supported():
            raise ValueError("engine 'nowait' needs Linux preadv with RWF_NOWAIT")
        return NowaitEngine(reactor, pool)
    if name == "threads":
        return ThreadsEngine(reactor, pool)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
