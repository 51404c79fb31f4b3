"""The engine contract and the pieces every engine is composed of.

An engine (``Engine``) is a name, a *backend* that performs blocking calls
off the reactor thread (the I/O pool, or an io_uring ring), and optionally
an *inline* part (``InlineIO``) that does what cannot block in the reactor
thread itself: opens on local file systems and page-cache copies with
``RWF_NOWAIT``.  ``nowait`` = inline + pool, ``io_uring`` = inline + ring,
``threads`` = pool alone.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..errors import NotRegularFile

if TYPE_CHECKING:
    from .inline import InlineIO

__all__ = ["IFileEngine", "IBackend", "Engine", "OpenedFile", "Op", "Root", "open_regular",
           "check_regular", "OPEN_FLAGS", "pread_into"]

# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused).
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


class OpenedFile:
    """An open regular file: its descriptor, what ``fstat`` said, and how to read it."""

    __slots__ = ("fd", "size", "dev", "ino", "mtime_ns", "path", "inline", "nowait", "via", "open_seconds")

    def __init__(self, fd: int, size: int, dev: int, path: str, ino: int = 0, mtime_ns: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.dev = dev
        self.ino = ino
        self.mtime_ns = mtime_ns
        self.path = path
        self.inline = False  # may be read in the reactor thread without blocking
        self.nowait = False  # needs RWF_NOWAIT for that (page cache) vs memory-backed
        self.via = "inline"  # who opened it, and so who closes it: "inline", "pool", "ring"
        self.open_seconds = 0.0  # how long an open off the reactor thread took (0: unknown)


class Root:
    """A directory that confined opens resolve beneath (``FileLoader.open_root``).

    Holds one ``O_PATH`` descriptor (outside ``max_open``) until ``close()``.
    ``method`` says how confinement is enforced: ``openat2`` (the kernel's
    ``RESOLVE_BENEATH``) or ``walk`` (a per-component ``O_NOFOLLOW`` walk that
    refuses every symlink).
    """

    __slots__ = ("path", "fd", "no_symlinks", "method", "dev", "closed")

    def __init__(self, path: str, fd: int, no_symlinks: bool, method: str, dev: int) -> None:
        self.path = path
        self.fd = fd
        self.no_symlinks = no_symlinks
        self.method = method
        self.dev = dev
        self.closed = False

    def close(self) -> None:
        """Close the directory descriptor (an ``O_PATH`` close never blocks)."""
        if not self.closed:
            self.closed = True
            fd, self.fd = self.fd, -1
            if fd >= 0:
                os.close(fd)

    def join(self, path: str) -> str:
        """Where ``path`` would be, for mount policy and messages (never for opening)."""
        return self.path.rstrip("/") + "/" + path

    def __repr__(self) -> str:
        return f"<Root {self.path!r} {self.method}{' closed' if self.closed else ''}>"


def open_root(path: str, no_symlinks: bool = False) -> Root:
    """Blocking: open ``path`` as a ``Root``."""
    from .. import confine

    fd = confine.open_root(path)
    try:
        dev = os.fstat(fd).st_dev
    except BaseException:
        os.close(fd)
        raise
    return Root(os.path.abspath(path), fd, no_symlinks, confine.confinement_method(), dev)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


def check_regular(mode: int, path: str) -> None:
    """Raise the error a reader of a non-regular file should get."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    raise NotRegularFile(_kind(mode), path)


def _open_fd(path: str, root: Root | None) -> int:
    if root is None:
        return os.open(path, OPEN_FLAGS)
    from .. import confine

    if root.closed:
        raise ValueError(f"{root!r} is closed")
    return confine.open_beneath(root.fd, path, OPEN_FLAGS, no_symlinks=root.no_symlinks,
                                method=root.method)


def open_regular(path: str, root: Root | None = None) -> OpenedFile:
    """Blocking ``open`` + ``fstat``; the descriptor is closed again on any error."""
    try:
        fd = _open_fd(path, root)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a device with no driver
            if root is None:
                check_regular(os.stat(path).st_mode, path)
            raise NotRegularFile("socket or device", path) from None
        raise
    try:
        st = os.fstat(fd)
        check_regular(st.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, st.st_dev, path, st.st_ino, st.st_mtime_ns)


if hasattr(os, "preadv"):
    def pread_into(fd: int, view: memoryview, offset: int) -> int:
        """Blocking positional read into ``view``."""
        return os.preadv(fd, [view], offset)
else:  # macOS before 11, Windows: os.pread and one copy
    def pread_into(fd: int, view: memoryview, offset: int) -> int:
        """Blocking positional read into ``view`` (no ``preadv`` here: one copy)."""
        data = os.pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)


class Op:
    """An engine operation running off the reactor thread.

    ``deferred`` fires exactly once, in the reactor thread, with the
    outcome.  ``cancel()`` asks the operation to stop: one that has not
    started is dropped (``deferred`` fails with ``CancelledError`` and nothing
    happened); one in the kernel is cancelled if the kernel can; one already
    running in a thread runs to its end and ``deferred`` gets its real
    outcome.  Never call ``deferred.cancel()``: Twisted would fire it before
    the operation ends, and whoever owns the descriptor could not know when
    it is free.
    """

    __slots__ = ("deferred", "_canceller")

    def __init__(self, canceller: Callable[[], object] | None = None,
                 deferred: defer.Deferred[Any] | None = None) -> None:
        self.deferred: defer.Deferred[Any] = deferred if deferred is not None else defer.Deferred()
        self._canceller = canceller

    def cancel(self) -> None:
        canceller, self._canceller = self._canceller, None
        if canceller is not None and not self.deferred.called:
            canceller()

    @classmethod
    def failed(cls, failure: Failure | BaseException | None = None) -> "Op":
        op = cls()
        op.deferred.errback(failure if failure is not None else Failure())
        return op

    @classmethod
    def done(cls, value: Any) -> "Op":
        op = cls()
        op.deferred.callback(value)
        return op


class IBackend(Interface):
    """Blocking file calls, performed off the reactor thread."""

    name = Attribute("'pool' or 'ring'")

    def open(path: str, root: "Root | None", slow: bool) -> Op:
        """Open and ``fstat`` a regular file; ``Op`` of an ``OpenedFile``.  A
        cancelled open that did open something closes it."""

    def open_root(path: str, no_symlinks: bool) -> Op:
        """Open a directory as a ``Root``; ``Op`` of it."""

    def read(f: OpenedFile, view: memoryview, offset: int) -> Op:
        """Read into ``view``; ``Op`` of the byte count."""

    def close(f: OpenedFile) -> Op:
        """Close the descriptor; ``Op`` of None."""

    def stats() -> dict[str, Any]:
        """Counters."""

    def stop() -> "defer.Deferred[None]":
        """Release threads / kernel resources, without blocking the reactor."""


class IFileEngine(Interface):
    """How an engine opens, reads and closes files without blocking the reactor."""

    name = Attribute("The engine's name, as in FileLoader(engine=...) and stats()")

    def open(path: str, root: "Root | None" = None) -> "OpenedFile | Op":
        """Open a regular file: the ``OpenedFile`` where it could be done inline
        (or the ``OSError``, raised), else an ``Op`` running off the reactor."""

    def open_root(path: str, no_symlinks: bool = False) -> "Root | Op":
        """Open a directory for confined opens, inline or off-thread like ``open``."""

    def read_inline(f: OpenedFile, view: memoryview, offset: int) -> int:
        """Read in the reactor thread without blocking; ``BlockingIOError``
        when the data is not at hand (or this file is never read inline)."""

    def read(f: OpenedFile, view: memoryview, offset: int) -> Op:
        """Read off the reactor thread; the view stays referenced until the
        operation has ended, even if cancelled."""

    def close(f: OpenedFile) -> "Op | None":
        """Close the descriptor (never while an operation on it runs): None
        when done inline, else an ``Op``."""

    def stats() -> dict[str, Any]:
        """Counters, one schema for every engine (``ENGINE_STATS``)."""

    def stop() -> "defer.Deferred[None]":
        """Release threads and kernel resources; never blocks the reactor."""


# The keys every engine's stats() has, whatever it is made of.
ENGINE_STATS = ("inline_reads", "pool_reads", "ring_reads", "inline_opens", "pool_opens",
                "ring_opens", "ring_closes", "nowait_fallbacks", "io_threads", "io_threads_busy", "io_queue",
                "ring_submits", "ring_ops", "ring_in_flight", "ring_peak_in_flight", "ring_queued",
                "ring_waited", "ring_dropped")


@implementer(IFileEngine)
class Engine:
    """A named composition of a backend and, optionally, the inline path.

    Opens happen inline where ``inline`` says the mount opens fast; reads are
    tried inline first where the file allows it; everything else goes to the
    backend.  Closes follow the open: a file opened by the backend is closed
    by it (``close()`` may flush to a server on FUSE/NFS).
    """

    def __init__(self, name: str, backend: IBackend, inline: InlineIO | None = None) -> None:
        self.name = name
        self.backend = backend
        self.inline = inline

    # The state machine asks this: can a load's open run in this reactor turn?
    def opens_inline(self, path: str, root: Root | None = None) -> bool:
        return self.inline is not None and not self.inline.opens_slowly(path, root)

    def open(self, path: str, root: Root | None = None) -> OpenedFile | Op:
        inline = self.inline
        if inline is not None:
            f = inline.open_fast(path, root)
            if f is not None:
                return f
        op = self.backend.open(path, root, True)
        if inline is not None:
            op.deferred.addCallback(inline.opened_off_thread, path, root)
        return op

    def open_root(self, path: str, no_symlinks: bool = False) -> Root | Op:
        inline = self.inline
        if inline is not None and not inline.opens_slowly(os.path.join(os.path.abspath(path), ".")):
            return open_root(path, no_symlinks)
        return self.backend.open_root(path, no_symlinks)

    def read_inline(self, f: OpenedFile, view: memoryview, offset: int) -> int:
        if not f.inline:
            raise BlockingIOError(errno.EAGAIN, "not readable inline")
        return self.inline.read(f, view, offset)  # type: ignore[union-attr]  # f.inline: set by it

    def read(self, f: OpenedFile, view: memoryview, offset: int) -> Op:
        return self.backend.read(f, view, offset)

    def close(self, f: OpenedFile) -> Op | None:
        if f.via == "inline":
            os.close(f.fd)
            return None
        return self.backend.close(f)

    def stats(self) -> dict[str, Any]:
        out = dict.fromkeys(ENGINE_STATS, 0)
        if self.inline is not None:
            out.update(self.inline.stats())
        out.update(self.backend.stats())
        return out

    def stop(self) -> defer.Deferred[None]:
        return self.backend.stop()

    def owned_fds(self) -> set[int]:
        """Descriptors the engine itself holds open (a ring and its eventfd)."""
        owned = getattr(self.backend, "owned_fds", None)
        return owned() if owned is not None else set()

    def __repr__(self) -> str:
        return f"<Engine {self.name}>"
