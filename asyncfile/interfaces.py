"""The contract a file loader offers, so code can take any implementation
(``FileLoader`` on disk, ``asyncfile.testing.MemoryLoader`` over a dict: the
same class over another engine)."""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IFileLoader"]


class IFileLoader(Interface):
    def load(source, offset=0, length=None, *, root=None):
        """Deferred[bytes]: the bytes of a path (relative to ``root``) or a
        ``FileHandle`` from ``offset``, at most ``length`` of them; fails with
        the original error or ``Overloaded``; cancellable."""

    def stream(source, consumer, offset=0, length=None, *, root=None):
        """Deferred[int]: write the range into an ``IConsumer`` as a push
        producer; fires with the byte count or fails with ``ConsumerStopped``."""

    def open(path, *, root=None):
        """Deferred[FileHandle]: an open descriptor under the loader's limits,
        owned (closed) by the caller."""

    def open_root(path, *, no_symlinks=False):
        """Deferred[Root]: a directory that confined opens resolve beneath."""

    def stats():
        """dict: at least engine, open, active, waiting, loaded, bytes, errors, rejected."""

    def close():
        """Deferred[None]: stop everything and release threads and kernel resources."""
