"""The contract a file loader offers, so code can take any implementation
(``FileLoader`` on disk, ``asyncfile.testing.MemoryLoader`` over a dict: the
same class over another engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from zope.interface import Interface

if TYPE_CHECKING:
    from os import PathLike

    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IConsumer

    from .engines.base import Root
    from .handle import FileHandle
    from .writer import FileConsumer

    _Source = Union[str, bytes, "PathLike[str]", "PathLike[bytes]", FileHandle]
    _Path = Union[str, bytes, "PathLike[str]", "PathLike[bytes]"]

__all__ = ["IFileLoader"]


class IFileLoader(Interface):
    def load(source: _Source, offset: int = 0, length: int | None = None, *,
             root: Root | None = None) -> Deferred[bytes]:
        """Deferred[bytes]: the bytes of a path (relative to ``root``) or a
        ``FileHandle`` from ``offset``, at most ``length`` of them; fails with
        the original error or ``Overloaded``; cancellable."""

    def stream(source: _Source, consumer: IConsumer, offset: int = 0, length: int | None = None, *,
               root: Root | None = None) -> Deferred[int]:
        """Deferred[int]: write the range into an ``IConsumer`` as a push
        producer; fires with the byte count or fails with ``ConsumerStopped``."""

    def open(path: _Path, *, root: Root | None = None) -> Deferred[FileHandle]:
        """Deferred[FileHandle]: an open descriptor under the loader's limits,
        owned (closed) by the caller."""

    def open_root(path: _Path, *, no_symlinks: bool = False) -> Deferred[Root]:
        """Deferred[Root]: a directory that confined opens resolve beneath."""

    def listdir(path: _Path, *, root: Root | None = None) -> Deferred[list[str]]:
        """Deferred[list[str]]: the sorted names in a directory (beneath
        ``root``), listed off the reactor thread."""

    def write(path: _Path, data: bytes, *, root: Root | None = None, atomic: bool = True,
              mode: int = 0o644, fsync: bool = True) -> Deferred[int]:
        """Deferred[int]: write ``data`` to ``path`` off the reactor thread;
        with ``atomic``, readers see the old file or the new one, never a mix."""

    def file_consumer(path: _Path, *, root: Root | None = None, atomic: bool = True,
                      mode: int = 0o644, fsync: bool = True) -> FileConsumer:
        """An ``IConsumer`` writing to ``path`` like ``write``; ``finish()``
        commits, ``abort()`` leaves nothing behind."""

    def stats() -> dict[str, Any]:
        """dict: at least engine, open, active, waiting, loaded, bytes, errors, rejected."""

    def close() -> Deferred[None]:
        """Deferred[None]: stop everything and release threads and kernel resources."""
