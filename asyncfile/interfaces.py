"""The contract a file loader offers, so code can take any implementation
(``FileLoader`` on disk, ``asyncfile.testing.MemoryLoader`` in tests)."""

from __future__ import annotations

from zope.interface import Interface

__all__ = ["IFileLoader"]


class IFileLoader(Interface):
    def load(path, offset=0, length=None):
        """Deferred[bytes]: the file's bytes from ``offset``, at most
        ``length`` of them; fails with the original ``OSError`` or
        ``Overloaded``; cancellable."""

    def stream(path, consumer, offset=0, length=None):
        """Deferred[int]: write the range into an ``IConsumer`` as a push
        producer; fires with the byte count or fails with ``ConsumerStopped``."""

    def stats():
        """dict: at least engine, open, waiting, loaded, bytes, rejected."""

    def close():
        """Release threads and kernel resources."""
