"""Writes off the reactor thread: ``FileLoader.write`` and ``FileConsumer``.

Why: ``open``, ``write``, ``fsync`` and ``rename`` block for as long as the
storage takes (a full journal, a FUSE daemon, an NFS server), so a Twisted
server that saves uploads with plain file calls stalls every connection.
Here every system call of a write runs in the loader's I/O pool (on every
engine: the io_uring engine's ring is not used for writes), one step at a
time, while the reactor thread only keeps the books.

An atomic write (the default) goes to a temporary file created with
``O_CREAT | O_EXCL | O_CLOEXEC`` in the target's own directory (opened
beneath ``root`` when given, so ``..``, absolute paths and symlinks leading
outside fail with ``OutsideRoot``), written fully, ``fsync``-ed, closed,
renamed over the target relative to the directory's descriptor, and then the
directory is ``fsync``-ed.  Readers see the old file or the new one, never a
mix; a write that fails or is cancelled leaves no temporary file behind and
the target as it was.

``FileConsumer`` is the one owner of a write's place under the loader's
limits, its two descriptors (the directory and the file) and the temporary
name; its states are ``WriteState``.  ``FileLoader.write`` is a consumer fed
once and finished.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections import deque
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import confine
from .engines.base import Root, check_regular
from .errors import LoaderClosed, NotRegularFile, Overloaded
from .limiter import Limiter, Slot
from .pool import IOPool

__all__ = ["FileConsumer", "WriteState", "file_consumer", "write", "MAX_BUFFER", "TEMP_SUFFIX"]

_log = Logger()

#: Bytes a ``FileConsumer`` accepts ahead of the disk before it pauses a
#: streaming producer (it resumes it below half of this).
MAX_BUFFER = 1 << 20
#: How temporary files end: ``.NAME.<12 hex digits>.tmp`` in the target's directory.
TEMP_SUFFIX = ".tmp"
# A write step checks for cancellation between pieces of this size, so a
# cancelled large write stops within one piece.
_PIECE = 1 << 20
# Temporary names keep at most this many bytes of the target's name (NAME_MAX is 255).
_NAME_KEEP = 200
_TEMP_ATTEMPTS = 16

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a reader
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
_PLAIN_FLAGS = os.O_WRONLY | os.O_CREAT | _O_CLOEXEC | _O_NONBLOCK | _O_NOCTTY

# Module-level so tests can inject failures and park a step (as confine._os_open).
_os_open = os.open
_os_write = os.write
_os_fsync = os.fsync
_os_rename = os.rename


class _Loader(Protocol):
    """What a write needs of its ``FileLoader``."""

    reactor: Any
    pool: IOPool | None
    engine: Any
    _limiter: Limiter
    _handles: set[Any]
    _state: Any
    _closing: defer.Deferred[None] | None
    open_files: int
    written: int
    write_bytes: int
    errors: int
    cancelled: int

    def _refusal(self) -> defer.Deferred[Any] | None: ...

    def _forget(self, handle: Any) -> None: ...


class WriteState(enum.Enum):
    """Where a write is; every state but the last two holds a place."""

    WAITING = "waiting"        # for a place under max_open (holds nothing yet)
    OPENING = "opening"        # the directory and the (temporary) file are being opened
    OPEN = "open"              # writing what arrives, one step at a time
    COMMITTING = "committing"  # fsync, close, rename, fsync of the directory
    CLEANING = "cleaning"      # stopped: closing descriptors, unlinking the temporary file
    DONE = "done"              # committed; holds nothing
    FAILED = "failed"          # ended without committing; holds nothing, no temporary file


class _Kind(enum.Enum):
    OPEN = "open"
    WRITE = "write"
    COMMIT = "commit"
    CLEANUP = "cleanup"


class _Interrupted(Exception):
    """A step saw the stop flag between two pieces."""


class _Files:
    """What a write's steps work on: its target and what it holds.

    Owned by the reactor thread between steps and by the one pool thread
    running a step during it (steps never overlap), so it needs no lock.
    ``stop`` is the one field the reactor writes while a step runs.
    """

    __slots__ = ("path", "dirpath", "name", "root", "atomic", "mode", "fsync",
                 "dfd", "fd", "tmp", "renamed", "stop")

    def __init__(self, path: str, root: Root | None, atomic: bool, mode: int, fsync: bool) -> None:
        head, slash, name = path.rpartition("/")
        self.path = path
        self.dirpath = head or ("/" if slash and root is None else ".")
        self.name = name
        self.root = root
        self.atomic = atomic
        self.mode = mode
        self.fsync = fsync
        self.dfd = -1              # the directory (atomic writes)
        self.fd = -1               # the file being written
        self.tmp: str | None = None  # the temporary name, until renamed or unlinked
        self.renamed = False
        self.stop = False

    def holds(self) -> bool:
        return self.dfd >= 0 or self.fd >= 0 or self.tmp is not None


# -- the steps (blocking; run in a pool thread) ---------------------------------------

def _named(e: OSError, path: str) -> OSError:
    """``e`` naming the path the caller asked for (not a temporary name)."""
    e.filename = path
    e.filename2 = None
    return e


def _temp_name(name: str) -> str:
    keep = os.fsdecode(os.fsencode(name)[:_NAME_KEEP])
    return f".{keep}.{os.urandom(6).hex()}{TEMP_SUFFIX}"


def _open_step(files: _Files) -> None:
    try:
        if files.root is not None:
            confine.check_relative(files.path)
        if files.name in ("", ".", ".."):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), files.path)
        if files.atomic:
            _open_atomic(files)
        else:
            _open_plain(files)
    except OSError as e:
        raise _named(e, files.path) from None


def _open_dir(files: _Files) -> int:
    root = files.root
    if root is None:
        return os.open(files.dirpath, _DIR_FLAGS)
    return confine.open_beneath(root.fd, files.dirpath, _DIR_FLAGS, no_symlinks=root.no_symlinks,
                                method=root.method)


def _open_atomic(files: _Files) -> None:
    files.dfd = dfd = _open_dir(files)
    try:
        st = os.stat(files.name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):  # rename would say so only after all the writing
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), files.path)
    for attempt in range(_TEMP_ATTEMPTS):
        tmp = _temp_name(files.name)
        try:
            fd = _os_open(tmp, _TEMP_FLAGS, 0o600, dir_fd=dfd)
        except FileExistsError:
            if attempt == _TEMP_ATTEMPTS - 1:
                raise
            continue
        files.fd, files.tmp = fd, tmp
        break
    os.fchmod(files.fd, files.mode)  # exactly ``mode``: the umask does not apply


def _open_plain(files: _Files) -> None:
    root = files.root
    try:
        if root is None:
            fd = _os_open(files.path, _PLAIN_FLAGS, files.mode)
        else:
            fd = confine.open_beneath(root.fd, files.path, _PLAIN_FLAGS, no_symlinks=root.no_symlinks,
                                      method=root.method, mode=files.mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO without a reader, a socket, a device without a driver
            raise NotRegularFile("FIFO, socket or device", files.path) from None
        raise
    files.fd = fd
    check_regular(os.fstat(fd).st_mode, files.path)  # before truncating anything
    os.ftruncate(fd, 0)


def _write_step(files: _Files, chunks: list[bytes]) -> int:
    total = 0
    fd = files.fd
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                if files.stop:
                    raise _Interrupted()
                n = _os_write(fd, view[:_PIECE])
                if n <= 0:  # never for a regular file; do not spin
                    raise OSError(errno.EIO, "write() wrote nothing")
                total += n
                view = view[n:]
    except OSError as e:
        raise _named(e, files.path) from None
    return total


def _commit_step(files: _Files) -> None:
    try:
        if files.fsync:
            _os_fsync(files.fd)
        fd, files.fd = files.fd, -1
        os.close(fd)  # NFS reports write errors here: before the rename, not after
        if not files.atomic:
            return
        if files.stop:
            raise _Interrupted()
        assert files.tmp is not None
        _os_rename(files.tmp, files.name, src_dir_fd=files.dfd, dst_dir_fd=files.dfd)
        files.tmp, files.renamed = None, True
        if files.fsync:
            _os_fsync(files.dfd)  # the rename itself survives a crash
        dfd, files.dfd = files.dfd, -1
        os.close(dfd)
    except OSError as e:
        raise _named(e, files.path) from None


def _cleanup_step(files: _Files) -> None:
    """Release everything, whatever fails: the temporary file goes first."""
    fd, files.fd = files.fd, -1
    tmp, files.tmp = files.tmp, None
    dfd, files.dfd = files.dfd, -1
    try:
        if fd >= 0:
            os.close(fd)
    except OSError:
        pass  # the descriptor is released anyway
    finally:
        try:
            if tmp is not None:
                os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warn("asyncfile: could not remove the temporary file {tmp!r} of {path!r}: {e}",
                      tmp=tmp, path=files.path, e=e)
        finally:
            if dfd >= 0:
                os.close(dfd)


def _pool_of(loader: _Loader) -> IOPool:
    """The loader's I/O pool (its own, or its engine's)."""
    if isinstance(loader.pool, IOPool):
        return loader.pool
    backend = getattr(loader.engine, "backend", None)
    pool = getattr(backend, "pool", None)
    pool = getattr(pool, "pool", pool)  # the io_uring backend wraps a PoolBackend
    if isinstance(pool, IOPool):
        return pool
    raise TypeError(f"writes need a FileLoader with an I/O pool; {loader!r} has none")


# -- the owner ------------------------------------------------------------------------

@implementer(IConsumer)
class FileConsumer:
    """An ``IConsumer`` that writes what it is given to a file, off the reactor thread.

    Made by ``FileLoader.file_consumer``.  Writes go to the pool in order, one
    step at a time; at most ``max_buffer`` bytes wait before a streaming
    producer is paused (resumed below half of it), and a pull producer is
    asked for more once nothing waits.  ``finish()`` commits (fsync, rename,
    fsync of the directory) and fires with the bytes written; ``abort()``
    removes the temporary file.  The consumer holds a place under the
    loader's ``max_open`` and its descriptors until one of them (or an error,
    or ``loader.close()``) ends it: call one.

    A failed step stops the producer and makes ``finish()`` fail with its
    error, original type and the path kept (``OSError`` with errno ENOSPC
    for a full disk).  ``write()`` after ``finish()`` or ``abort()`` raises
    ``RuntimeError``; after a failure it drops the data (``finish()`` says
    why).
    """

    def __init__(self, loader: _Loader, path: str, *, root: Root | None = None, atomic: bool = True,
                 mode: int = 0o644, fsync: bool = True, max_buffer: int = MAX_BUFFER) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be positive")
        if "\0" in path:
            raise ValueError("embedded null byte")
        if root is not None and root.closed:
            raise ValueError(f"{root!r} is closed")
        self.loader = loader
        self.path = path
        self.max_buffer = max_buffer
        self.state = WriteState.WAITING
        self.written = 0  # bytes on disk (in the file) so far
        self._files = _Files(path, root, atomic, mode, fsync)
        self._pool = _pool_of(loader)
        self._slot: Slot | None = None
        self._waiter: defer.Deferred[Slot] | None = None
        self._job: Any = None  # the pool job of the running step
        self._withdrawn = False
        self._counted = False  # counted in loader.open_files
        self._pending: deque[bytes] = deque()
        self._buffered = 0  # bytes accepted and not yet written (pending + in the step)
        self._in_step = 0
        self._producer: Any = None
        self._streaming = False
        self._paused = False
        self._closed_by: str | None = None  # "finish" or "abort": no more writes
        self._stopping = False
        self._why: Failure | None = None  # why it stopped
        self._committed = False
        self._finished: defer.Deferred[int] | None = None
        self._aborts: list[defer.Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<FileConsumer {self.path!r} {self.state.value}>"

    # -- admission (by file_consumer) -------------------------------------------------
    def _start(self) -> None:
        """Take a place (or a place in the queue), or raise ``Overloaded`` at once."""
        limiter = self.loader._limiter
        slot = limiter.try_acquire()
        if slot is None:
            waiter = limiter.acquire()
            if waiter.called:  # refused at once
                got: list[Any] = []
                waiter.addBoth(got.append)
                if isinstance(got[0], Failure):
                    got[0].raiseException()
                slot = got[0]
            else:
                self._waiter = waiter
        self.loader._handles.add(self)  # close() stops it; the loader waits for _forget
        if slot is not None:
            self._granted(slot)
        else:
            assert self._waiter is not None
            self._waiter.addCallbacks(self._granted, self._refused)

    def _granted(self, slot: Slot) -> None:
        self._waiter = None
        self._slot = slot
        if self.loader._closing is not None:
            # A place given back while close() stops every handle: start
            # nothing (close() would have stopped this write a moment later).
            self._stop(Failure(LoaderClosed()))
            return
        self.state = WriteState.OPENING
        self._pump()

    def _refused(self, failure: Failure) -> None:
        self._waiter = None  # cancelled by _stop: it handles the rest

    # -- IConsumer ---------------------------------------------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if self._closed_by is not None:
            raise RuntimeError(f"registerProducer() after {self._closed_by}()")
        if self._stopping:
            producer.stopProducing()
            return
        self._producer, self._streaming, self._paused = producer, bool(streaming), False
        if not streaming:
            producer.resumeProducing()
        elif self._buffered > self.max_buffer:
            self._pause()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._paused = False

    def write(self, data: bytes) -> None:
        """Queue ``data`` (bytes-like; copied unless ``bytes``) for the file."""
        if self._closed_by is not None:
            raise RuntimeError(f"write() after {self._closed_by}()")
        if not isinstance(data, bytes):
            if isinstance(data, str):
                raise TypeError("FileConsumer.write() takes bytes, not str")
            data = bytes(data)
        if self._stopping or not data:
            return  # failed: finish() tells why
        self._pending.append(data)
        self._buffered += len(data)
        if self._streaming and self._producer is not None and not self._paused \
                and self._buffered > self.max_buffer:
            self._pause()
        self._pump()

    # -- ending ------------------------------------------------------------------------
    def finish(self) -> defer.Deferred[int]:
        """Write what is queued, then commit; fires with the bytes written.

        Cancelling the Deferred aborts the write (it fails with
        ``CancelledError`` at once; the temporary file is then removed).
        """
        if self._closed_by is not None:
            raise RuntimeError(f"finish() after {self._closed_by}()")
        self._closed_by = "finish"
        self._producer = None
        d: defer.Deferred[int] = defer.Deferred(self._cancel)
        self._finished = d
        if self.state in (WriteState.DONE, WriteState.FAILED):
            self._fire()
        else:
            self._pump()
        return d

    def abort(self) -> defer.Deferred[None]:
        """Stop and remove the temporary file; fires once nothing is held.

        ``finish()``'s Deferred, if any, fails with ``CancelledError`` at once.
        A write already committed (``finish()`` fired) stays; one whose
        rename is running when this is called may end up committed.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if self._closed_by is None:
            self._closed_by = "abort"
        if self.state in (WriteState.DONE, WriteState.FAILED):
            d.callback(None)
            return d
        self._aborts.append(d)
        if not self._stopping:
            self.loader.cancelled += 1
            self._stop(Failure(defer.CancelledError()))
            finished = self._finished
            if finished is not None and not finished.called:
                finished.errback(Failure(defer.CancelledError()))
        return d

    def abandon(self, reason: Failure | None = None) -> None:
        """Stop with ``reason`` (``FileLoader.close()``: ``LoaderClosed``)."""
        self._stop(reason if reason is not None else Failure(defer.CancelledError()))

    def _cancel(self, _: defer.Deferred[int]) -> None:
        self.loader.cancelled += 1
        self._stop(Failure(defer.CancelledError()))  # Twisted fails the Deferred after this

    def _stop(self, why: Failure) -> None:
        if self._stopping or self.state in (WriteState.DONE, WriteState.FAILED):
            return
        self._stopping = True
        self._why = why
        self._files.stop = True
        self._pending.clear()
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                _log.failure("asyncfile: {producer!r}.stopProducing() failed", producer=producer)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.cancel()  # leaves the limiter's queue
        job = self._job
        if job is not None:
            self._withdrawn = True
            if not self._pool.withdraw(job):  # running: it ends, then the cleanup runs
                self._withdrawn = False
            return
        self._pump()

    # -- the steps ---------------------------------------------------------------------
    def _submit(self, kind: _Kind, fn: Any, *args: Any) -> None:
        d, job = self._pool.submit(fn, self._files, *args)
        self._job = job
        d.addBoth(self._step_done, kind)

    def _pump(self) -> None:
        """Start the next step if none runs."""
        if self._job is not None or self.state in (WriteState.DONE, WriteState.FAILED):
            return
        files = self._files
        if self._stopping:
            if files.holds() and not _forked(self.loader):
                self.state = WriteState.CLEANING
                self._submit(_Kind.CLEANUP, _cleanup_step)
            else:
                self._ended()
            return
        if self.state is WriteState.WAITING:
            return
        if self.state is WriteState.OPENING:
            self._submit(_Kind.OPEN, _open_step)
        elif self._pending:
            chunks = list(self._pending)
            self._pending.clear()
            self._in_step = sum(len(c) for c in chunks)
            self._submit(_Kind.WRITE, _write_step, chunks)
        elif self._closed_by == "finish":
            self.state = WriteState.COMMITTING
            self._submit(_Kind.COMMIT, _commit_step)

    def _step_done(self, outcome: Any, kind: _Kind) -> None:
        self._job = None
        self._count_descriptor()
        if isinstance(outcome, Failure):
            if self._withdrawn:  # taken back before it ran
                self._withdrawn = False
            elif not self._stopping and not outcome.check(_Interrupted):
                self._stop(outcome)  # starts the cleanup
                return
        elif kind is _Kind.OPEN:
            self.state = WriteState.OPEN
        elif kind is _Kind.WRITE:
            self.written += outcome
            self._buffered -= self._in_step
            self._in_step = 0
        elif kind is _Kind.COMMIT:
            self._committed = True
        if kind is _Kind.CLEANUP or self._committed:
            self._ended()
            return
        self._pump()
        if not self._stopping:
            self._ask_producer()

    def _ask_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
            if self._streaming:
                if self._paused and self._buffered <= self.max_buffer // 2:
                    self._paused = False
                    producer.resumeProducing()
            elif not self._pending:
                producer.resumeProducing()
        except Exception:
            self._stop(Failure())

    def _pause(self) -> None:
        self._paused = True
        try:
            self._producer.pauseProducing()
        except Exception:
            self._stop(Failure())

    def _count_descriptor(self) -> None:
        now = self._files.fd >= 0
        if now != self._counted:
            self._counted = now
            self.loader.open_files += 1 if now else -1

    def _ended(self) -> None:
        """Nothing is held any more: give the place back, then tell everyone."""
        loader = self.loader
        self._count_descriptor()
        self.state = WriteState.DONE if self._committed else WriteState.FAILED
        self._pending.clear()
        self._buffered = 0
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        if self._committed:
            loader.written += 1
            loader.write_bytes += self.written
        elif self._why is not None and not self._why.check(defer.CancelledError, Overloaded):
            loader.errors += 1
        self._fire()
        aborts, self._aborts = self._aborts, []
        for d in aborts:
            d.callback(None)
        loader._forget(self)  # last: close() fires after the writes it stopped

    def _fire(self) -> None:
        d = self._finished
        if d is None or d.called:
            return
        if self._committed:
            d.callback(self.written)
        else:
            d.errback(self._why if self._why is not None else Failure(defer.CancelledError()))


def _forked(loader: _Loader) -> bool:
    """In a fork's child: the descriptors and the temporary file are the parent's."""
    return getattr(loader._state, "value", None) == "forked"


def file_consumer(loader: _Loader, path: Any, *, root: Root | None = None, atomic: bool = True,
                  mode: int = 0o644, fsync: bool = True, max_buffer: int = MAX_BUFFER) -> FileConsumer:
    """``FileLoader.file_consumer``: raises ``LoaderClosed``, ``ForkedError``
    or ``Overloaded`` at once, else returns a started ``FileConsumer``."""
    refused = loader._refusal()
    if refused is not None:
        got: list[Failure] = []
        refused.addErrback(got.append)
        got[0].raiseException()
    consumer = FileConsumer(loader, os.fsdecode(os.fspath(path)), root=root, atomic=atomic, mode=mode,
                            fsync=fsync, max_buffer=max_buffer)
    consumer._start()
    return consumer


def write(loader: _Loader, path: Any, data: Any, *, root: Root | None = None, atomic: bool = True,
          mode: int = 0o644, fsync: bool = True) -> defer.Deferred[int]:
    """``FileLoader.write``: one consumer, fed ``data`` once and finished."""
    try:
        if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        consumer = file_consumer(loader, path, root=root, atomic=atomic, mode=mode, fsync=fsync)
    except Exception:
        return defer.fail()
    consumer.write(data if type(data) is bytes else bytes(data))  # a copy: the caller may reuse its buffer
    return consumer.finish()
