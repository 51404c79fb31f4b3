"""``asyncfile.web.File``: ``twisted.web.static.File`` without blocking the reactor.

    from asyncfile.web import File
    site = server.Site(File("/srv/www"))          # the same constructor as static.File

``twisted.web.static.File`` stats, lists, opens and reads files in the
reactor thread: a slow disk or a network mount stalls every connection of
the process for as long as the storage takes.  This ``File`` is a drop-in
``Resource`` with the same constructor, attributes and URL behaviour, served
through an ``asyncfile.FileLoader``:

* **Nothing blocks the reactor**: a request is resolved by
  ``loader.open(relpath, root=root)`` beneath a ``Root`` opened once, lazily,
  from ``path`` (``loader.open_root``): opens on FUSE/NFS run in the loader's
  pool or ring, directory listings with ``loader.listdir`` and their entries'
  ``fstat`` in the pool, reads through ``loader.stream``.  Resource traversal
  (``getChild``) does no I/O at all: what a path is (file, directory,
  missing) is found out when the request is rendered.
* **One descriptor per request**: the headers (size, Last-Modified, ETag),
  the preconditions, the ranges and the body all come from the one open
  handle (``handle.size``, ``handle.mtime_ns``, ``handle.ino``), so a file
  replaced meanwhile never gives one version's headers with another's bytes.
  The request owns the handle and closes it on every way out (the answer
  sent, an error of any type, the client going away, a HEAD, 304, 412 or
  416 answered early).  The request is finished as soon as its last byte is
  handed over, without waiting for that close (off the reactor thread on
  FUSE/NFS, a turn or more): a client that has its whole answer may close
  the connection at once, and Twisted would then count the request as lost
  (``notifyFinish`` failing, no access-log line).
* **Confined by the kernel** (``openat2(RESOLVE_BENEATH)``, see
  ``asyncfile.confine``): ``..``, and symlinks leading outside the directory
  are refused (403), whatever the path or the tree contains.
* **HTTP**: ETag, Last-Modified, If-None-Match, If-Modified-Since, If-Match,
  If-Unmodified-Since, If-Range, single and multipart byte ranges, HEAD, 416,
  with ``asyncfile.conditional`` (the same code imgserver uses).
* **Small bodies in one piece**: a body (or a part of a multipart body) of
  at most ``SMALL_BODY`` bytes (64 KiB) is read with one ``loader.load`` and
  written with one ``request.write``; on a cached local file the whole
  answer is written in the reactor turn that opened it.  Once the directory
  is open a request is a chain of plain callbacks, no coroutine: cheaper,
  and it leaves no reference cycles (garbage only the cyclic collector
  frees, whose full collections stop the reactor for tens of milliseconds).
* **Zero-copy**: with ``zero_copy=True`` (default) a larger body to a plain
  TCP/UNIX transport on a local file system is sent with ``os.sendfile``
  (``asyncfile.sendfile``); anywhere else (TLS, HTTP/2, FUSE) it is read
  through asyncfile and written to the request.
* **Logging**: an error after the answer started closes the connection (the
  client sees a short body).  Unexpected errors are logged with their
  traceback (server side only, never sent to the client); a request cut
  short because the loader or the ``File`` closed (reactor shutdown) is one
  short line; a client going away is not logged.

Differences from ``twisted.web.static.File`` (each one deliberate):

1. **Symlinks leading outside the directory are refused with 403**
   (``forbidden``), as are magic links; static.File follows them.  (``..``
   in a URL is 404 in both, refused before any I/O.)
   A directory listing leaves out the entries it cannot open beneath the
   directory (symlinks out, dangling symlinks); static.File lists symlinks
   out (and leaves out dangling ones).  Where ``openat2`` is missing
   (Linux < 5.6, some seccomp policies) every symlink is refused.
2. **ETag** (strong: ``"<ino>-<size>-<mtime_ns>"``, hexadecimal) on every
   answer from a file; **If-None-Match**, **If-Match**, **If-Unmodified-Since**
   (412) and **If-Range** are honoured (static.File knows If-Modified-Since
   only and always honours Range).  304 and 412 follow RFC 9110 §13.2.2:
   If-None-Match, when sent, decides instead of If-Modified-Since; an
   If-Modified-Since with a trailing ``; length=...`` (old browsers) is not a
   date and is ignored (static.File cuts it off).
3. **Ranges** follow RFC 9110 (``asyncfile.conditional.parse_ranges``):
   a suffix longer than the file is the whole file (static.File answers 500
   after a negative seek); several ranges of which one is satisfiable are a
   single-part 206 (static.File: a multipart body with one part); several
   ranges none of which is satisfiable are a 416 (static.File: 500); ranges
   that overlap beyond the file's size (``0-,0-,0-``) or more than 100 ranges
   are ignored (200; static.File sends the file once per range); the unit is
   case-insensitive (``BYTES=``); ``+5`` or ``1_0`` make the header invalid
   (ignored: 200).  The multipart boundary is random, not the clock.
4. **Errors**: a symlink loop and a FIFO, socket or device (``NotRegularFile``)
   are 403 (static.File: 404, and an open that waits forever for a FIFO's
   writer, blocking the whole server); a permission error is 403 as there;
   a NUL byte in a name is 404 (static.File: 500); an I/O error before the
   answer started is a 500 page with no traceback or path (static.File: the
   Site's 500 page); after it started the connection is closed (the client
   sees a short body); a full loader queue (``Overloaded``) is 503 with
   ``Retry-After: 1``; a closed or forked loader (or ``File.close()`` racing
   a request) is 503 with ``Retry-After: 1`` too.
5. **Last-Modified**: the same value as static.File's (the mtime rounded up
   to the second), but set as a header, not through
   ``request.setLastModified`` (``request.lastModified`` stays None).
6. **The directory is opened once** (lazily, on the first request) and kept
   open (an ``O_PATH`` descriptor): renaming or replacing the directory
   itself while the server runs keeps serving the one that was opened (a
   missing directory is retried on each request).  ``File.close()`` releases
   it (a new request opens it again).  Only the ``File`` given to the
   ``Site`` (and its children built by ``getChild``/``createSimilarFile``) share it.
7. **Blocking ``FilePath`` methods are left alone**: ``File`` is still a
   ``FilePath`` (``path``, ``child()``, ``basename()``...), but ``exists``,
   ``isdir``, ``getsize``, ``open``... are ``FilePath``'s blocking calls,
   never used while serving.  static.File's blocking helpers ``listNames``,
   ``listEntities``, ``openForReading``, ``getFileSize``, ``makeProducer``
   and the ``StaticProducer`` classes are not provided (subclasses that
   override ``openForReading`` to transform a file do not apply); use
   ``loader.listdir`` / ``loader.open``.
8. **Directory listings**: ``directoryListing()`` returns a ``DirectoryLister``
   subclass whose ``render`` lists the directory with ``loader.listdir`` and
   calls ``fstat`` on its entries in the loader's pool (the same HTML as
   static.File's); override ``directoryListing`` as before (e.g. to return
   ``self.forbidden``).  A ``DirectoryLister`` of your own still lists in the
   reactor thread, as static.File's does.  An index file (``indexNames``)
   that is a directory is skipped (static.File serves it as a redirect).
9. **ignoredExts**: ``"*"`` picks the first matching name in sorted order
   (static.File: ``os.listdir`` order); a match that is a directory is
   skipped.
10. **processors** (e.g. ``{".rpy": script.ResourceScript}``): a path whose
    last segment has a processor's extension is checked (opened beneath the
    directory, confined, then closed: 404/403 as for files) before the
    processor is called with its absolute path, and the rest of the URL is
    traversed into the resource the processor returns, as static.File does.
    The processor itself runs in the reactor thread, as with static.File
    (``ResourceScript`` reads and executes the file there; a symlink swapped
    in between the check and that read is not confined).  Index files with
    a processor (``index.rpy``) work the same way; a name found through
    ``ignoredExts`` that has a processor is handed to it too.
11. **Bodies sent with sendfile** bypass ``request.write``: ``request.sentLength``
    is counted by hand, so access logs are right.

HTTP/1.1 ``Content-Length`` is always sent for file bodies, as static.File does.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import stat
import warnings
from collections.abc import Sequence
from html import escape
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python import filepath
from twisted.python.failure import Failure
from twisted.python.runtime import platformType
from twisted.python.util import InsensitiveDict
from twisted.web import http, pages, resource, server, static
from twisted.web.util import redirectTo

from . import conditional
from .confine import OutsideRoot, open_beneath
from .engines.base import Root
from .errors import ConsumerStopped, ForkedError, LoaderClosed, NotRegularFile, Overloaded
from .handle import FileHandle
from .loader import FileLoader, default_loader

__all__ = ["File", "DirectoryLister", "etag_of"]

_log = Logger()

_O_PATH = getattr(os, "O_PATH", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

#: Errors that mean "no such resource": 404.
_NOT_FOUND = (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeError)
#: The headers of a file's answer, removed before an error page replaces it.
_REPRESENTATION_HEADERS = (b"content-type", b"content-length", b"content-encoding", b"content-range",
                           b"etag", b"last-modified", b"accept-ranges")
#: errno values of a plain OSError that mean 404 too.
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR})


def etag_of(handle: FileHandle) -> str:
    """The strong entity tag of an open file: its inode, size and mtime (ns)."""
    f = handle.file
    if f is None:
        raise ValueError("the handle is not open")
    return f'"{f.ino:x}-{f.size:x}-{f.mtime_ns:x}"'


def _last_modified(mtime_ns: int) -> int:
    """The whole second static.File sends: ``ceil(st_mtime)``, with ``st_mtime``
    computed as CPython computes it (``seconds + ns * 1e-9``)."""
    seconds, ns = divmod(mtime_ns, 10**9)
    return int(math.ceil(seconds + ns * 1e-9))


def _join(*parts: str) -> str:
    """Relative paths joined with ``/``, empty parts left out (``.`` if none)."""
    return "/".join(p for p in parts if p) or "."


def _gone(request: Any) -> bool:
    return bool(getattr(request, "finished", False) or getattr(request, "_disconnected", False))


def _finish_bytes(request: Any, body: bytes) -> None:
    """Answer with ``body`` as ``server.Request.render`` does with a ``bytes``
    result (Content-Length; headers only for HEAD), then finish."""
    if _gone(request):
        return
    if request.method == b"HEAD":
        if body:
            request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(b"")
    else:
        request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(body)
    request.finish()


def _render_resource(request: Any, res: Any) -> None:
    """Render ``res`` now (after some asynchronous work), as the Site would have."""
    if _gone(request):
        return
    render = getattr(request, "render", None)
    if isinstance(request, server.Request) and render is not None:
        render(res)  # UnsupportedMethod, faked HEAD, NOT_DONE_YET: all as usual
        return
    body = res.render(request)
    if body is not server.NOT_DONE_YET:
        _finish_bytes(request, body)


#: Request header names (as Twisted stores them) -> ``conditional``'s names.
_CONDITIONAL_NAMES = {b"-".join(w.capitalize() for w in name.encode("ascii").split(b"-")): name
                      for name in conditional.CONDITIONAL_HEADERS}


def _conditional_headers(request: Any) -> dict[str, str]:
    """The request's conditional and range headers, as ``conditional`` takes them."""
    found = {}
    for raw_name, values in request.requestHeaders.getAllRawHeaders():
        name = _CONDITIONAL_NAMES.get(raw_name)
        if name is None:
            name = raw_name.decode("latin-1").lower()
            if name not in conditional.CONDITIONAL_HEADERS:
                continue
        if values:
            found[name] = ", ".join(v.decode("latin-1") for v in values)
    return found


@functools.lru_cache(maxsize=1024)
def _http_date(seconds: int) -> bytes:
    """Last-Modified's value (``email.utils.formatdate`` is slow; files share mtimes)."""
    return conditional.http_date(seconds).encode("ascii")


class _RootClosed(Exception):
    """``File.close()`` was called while the directory was being opened."""


class _Tree:
    """The directory a ``File`` and its children serve, opened once (lazily).

    ``base`` is the configured path.  A directory is opened as a ``Root`` and
    every request is resolved beneath it; a path that is a file (``File`` of
    a single file) is opened by its configured (trusted) path instead.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.root: Root | None = None
        self.is_file = False
        self._waiters: list[defer.Deferred[Root | None]] = []
        self._opening = False
        self._close_pending = False

    def relative(self, path: str) -> str | None:
        """``path`` relative to ``base`` ('' for base itself), or None if outside."""
        if path == self.base:
            return ""
        prefix = self.base.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    def resolve(self, loader: FileLoader) -> defer.Deferred[Root | None]:
        """The ``Root`` (None: ``base`` is a file); opened by the first caller."""
        if self.root is not None and not self.root.closed:
            return defer.succeed(self.root)
        if self.is_file:
            return defer.succeed(None)
        waiter: defer.Deferred[Root | None] = defer.Deferred()
        self._waiters.append(waiter)
        if not self._opening:
            self._opening = True
            self._close_pending = False
            loader.open_root(self.base).addBoth(self._opened)
        return waiter

    def _opened(self, result: Root | Failure) -> None:
        self._opening = False
        outcome: Root | Failure | None = result
        if isinstance(result, Failure):
            if result.check(NotADirectoryError):
                self.is_file = True
                outcome = None
        elif self._close_pending:
            result.close()
            outcome = Failure(_RootClosed("the File was closed while its directory was opened"))
        else:
            self.root = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:  # its request went away
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def close(self) -> None:
        root, self.root = self.root, None
        if root is not None:
            root.close()
        if self._opening:
            self._close_pending = True
        self.is_file = False


class DirectoryLister(static.DirectoryLister):
    """``static.DirectoryLister``'s HTML, for a directory listed off the reactor thread.

    ``render`` lists the directory with ``loader.listdir`` and calls ``fstat``
    on each entry (confined, in the loader's pool), then renders static's
    template with what it found.  ``dirs`` (names to show), if given, is
    listed as is (its entries still looked at off the reactor thread).
    """

    def __init__(self, pathname: str, dirs: Sequence[str] | None = None,
                 contentTypes: dict[str, str] | None = None,
                 contentEncodings: dict[str, str] | None = None,
                 defaultType: str = "text/html", *, file: "File | None" = None) -> None:
        static.DirectoryLister.__init__(
            self, pathname, dirs, static.File.contentTypes if contentTypes is None else contentTypes,
            static.File.contentEncodings if contentEncodings is None else contentEncodings, defaultType)
        self._file = file if file is not None else File(pathname)
        self._entries: dict[str, tuple[bool, int]] = {}

    def render(self, request: Any) -> Any:
        return _run(request, self._list(request), self._file)

    async def _list(self, request: Any) -> None:
        f = self._file
        loader = f.loader
        root = await f._tree.resolve(loader)
        if root is None:  # a File of a single file has no listing
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), f.basename())
        rel = _join(f._rel)
        names = list(self.dirs) if self.dirs is not None else await loader.listdir(rel, root=root)
        self._entries = await loader._off_thread(_describe, root, rel, names)
        self.dirs = names
        body = static.DirectoryLister.render(self, request)
        _finish_bytes(request, body)

    def _getFilesAndDirectories(self, directory: Sequence[str | bytes]) -> tuple[list[dict[str, str]],
                                                                                 list[dict[str, str]]]:
        """static's rows, from the ``fstat`` results gathered off the reactor thread."""
        files: list[dict[str, str]] = []
        dirs: list[dict[str, str]] = []
        for name in directory:
            if isinstance(name, bytes):
                name = name.decode("utf8")
            entry = self._entries.get(name)
            if entry is None:  # vanished, dangling, or leading outside
                continue
            is_dir, size = entry
            url = quote(name, "/")
            escaped = escape(name)
            if is_dir:
                dirs.append({"text": escaped + "/", "href": url + "/", "size": "",
                             "type": "[Directory]", "encoding": ""})
            else:
                mimetype, encoding = static.getTypeAndEncoding(
                    name, self.contentTypes, self.contentEncodings, self.defaultType)
                files.append({"text": escaped, "href": url, "type": "[%s]" % mimetype,
                              "encoding": (encoding and "[%s]" % encoding or ""),
                              "size": static.formatFileSize(size)})
        return dirs, files


def _describe(root: Root, rel: str, names: Sequence[str]) -> dict[str, tuple[bool, int]]:
    """Blocking (a pool thread): ``(is_dir, size)`` of each name in ``rel``,
    each opened ``O_PATH`` beneath the root (symlinks followed only while they
    stay beneath it); names that cannot be opened so are left out."""
    found: dict[str, tuple[bool, int]] = {}
    if root.closed:
        raise ValueError(f"{root!r} is closed")
    for name in names:
        try:
            fd = open_beneath(root.fd, _join(rel, name) if rel != "." else name, _O_PATH | _O_CLOEXEC,
                              no_symlinks=root.no_symlinks, method=root.method)
        except (OSError, ValueError):
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        found[name] = (stat.S_ISDIR(st.st_mode), st.st_size)
    return found


def _run(request: Any, work: Any, file: "File | None" = None) -> Any:
    """Run the coroutine ``work`` for ``request``; the client going away
    cancels it (its handle is closed on the way out); errors become answers."""
    finished = request.notifyFinish()
    d: defer.Deferred[None] = defer.Deferred.fromCoroutine(work)
    finished.addErrback(lambda _: d.cancel())
    d.addErrback(_failed, request, file)
    d.addErrback(lambda failure: _log.failure("error while answering an error", failure))
    return server.NOT_DONE_YET


def _close(handle: FileHandle) -> defer.Deferred[None]:
    """Close ``handle``; a Deferred that fires once it is closed.

    Not ``handle.close()``'s own Deferred: awaited by a request's coroutine,
    it may be cancelled (the client went away), and the close must go on
    regardless (this one just stops being waited for).
    """
    done: defer.Deferred[None] = defer.Deferred()

    def closed() -> None:
        if not done.called:
            done.callback(None)

    handle.when_closed(closed)
    handle.abandon()
    return done


#: Failures that end a request's work for a reason outside the server's
#: control: the client went away, or the loader (or the ``File``) is closing.
#: Expected: no traceback in the log.
_CLIENT_GONE = (defer.CancelledError, ConsumerStopped, error.ConnectionDone, error.ConnectionLost)
_STOPPING = (LoaderClosed, ForkedError, _RootClosed)


def _uri(request: Any) -> str:
    return bytes(getattr(request, "uri", b"") or b"").decode("latin-1")[:200]


def _clean(failure: Failure) -> Failure:
    """``failure`` without its traceback's frames: kept in a coroutine frame,
    a live traceback would make a reference cycle (frame -> failure -> frame)."""
    failure.cleanFailure()
    return failure


def _failed(failure: Failure, request: Any, file: "File | None" = None) -> None:
    """An error that ended a request's work: the answer it deserves, if any is still possible.

    Logged: an unexpected error with its traceback (never sent to the
    client); a stop because the loader or the ``File`` closed (reactor
    shutdown) as one short line once the answer had started, else not (the
    client gets a 503); a client that went away not at all.
    """
    if failure.check(*_CLIENT_GONE) or _gone(request):
        return  # the client went away
    if getattr(request, "startedWriting", False):
        # Headers (and maybe part of the body) are out: the client must see a short answer.
        if failure.check(*_STOPPING) or _root_closed(failure, file):
            _log.info("stopped sending {uri}: {why}", uri=_uri(request),
                      why=failure.getErrorMessage() or type(failure.value).__name__)
        else:
            _log.failure("error while sending {uri}", failure, uri=_uri(request))
        lose = getattr(request, "loseConnection", None)
        if lose is not None:
            lose()
        return
    res, headers = _error_answer(failure, file)
    for name in _REPRESENTATION_HEADERS:  # an error page never carries the file's headers
        request.responseHeaders.removeHeader(name)
    for name, value in headers:
        request.setHeader(name, value)
    _render_resource(request, res)


def _root_closed(failure: Failure, file: "File | None") -> bool:
    """A ValueError because the directory was closed (``File.close()``) while
    the request used it."""
    return bool(failure.check(ValueError)) and file is not None and (
        file._tree.root is None or file._tree.root.closed)


def _error_answer(failure: Failure, file: "File | None") -> tuple[Any, list[tuple[bytes, bytes]]]:
    """The resource (and extra headers) that answers ``failure``."""
    not_found = file.childNotFound if file is not None else File.childNotFound
    forbidden = file.forbidden if file is not None else File.forbidden
    if failure.check(Overloaded):
        return (pages.errorPage(http.SERVICE_UNAVAILABLE, "Service Unavailable",
                                "Too many files open; try again shortly."), [(b"retry-after", b"1")])
    if failure.check(*_STOPPING) or _root_closed(failure, file):
        return (pages.errorPage(http.SERVICE_UNAVAILABLE, "Service Unavailable",
                                "The server is stopping."), [(b"retry-after", b"1")])
    if failure.check(OutsideRoot, PermissionError, NotRegularFile):
        return forbidden, []
    if failure.check(*_NOT_FOUND):
        return not_found, []
    if failure.check(OSError) and getattr(failure.value, "errno", None) in _NOT_FOUND_ERRNOS:
        return not_found, []
    if failure.check(OSError) and getattr(failure.value, "errno", None) == errno.ELOOP:
        return forbidden, []
    _log.failure("error while answering", failure)
    return (pages.errorPage(http.INTERNAL_SERVER_ERROR, "Internal Server Error",
                            "The server could not read this file."), [])


#: Bodies, and parts of multipart bodies, up to this many bytes are read in
#: one piece (``loader.load``) and written with one ``request.write``: for a
#: small cached file that costs less than a streaming producer, and less
#: than ``sendfile`` (its residency check maps and unmaps the file).
SMALL_BODY = 64 * 1024


class _Response:
    """One request's answer from an open handle: headers, preconditions,
    ranges and body.

    A chain of plain callbacks, not coroutines (cheaper, and no reference
    cycles): on a local cached file the whole answer is written in the
    reactor turn that opened it.  The request owns the handle: every way out
    -- the answer sent, an early answer (HEAD, 304, 412, 416), an error, the
    client going away -- starts its close (``abandon``), and the request is
    finished as soon as the last byte is handed over, without waiting for
    the close (a close off the reactor thread, on FUSE or NFS, takes a turn
    or more; a client that has its whole answer may close the connection).
    The client going away is watched (``notifyFinish``) only while
    something is pending.
    """

    __slots__ = ("file", "request", "loader", "name", "handle", "pending", "watching", "parts",
                 "trailer", "index", "consumer", "direct", "stepping", "stepped")

    def __init__(self, file: "File", request: Any, loader: FileLoader) -> None:
        self.file = file
        self.request = request
        self.loader = loader
        self.name = ""
        self.handle: FileHandle | None = None
        self.pending: defer.Deferred[Any] | None = None  # what the answer waits for
        self.watching = False  # notifyFinish hooked
        self.parts: list[tuple[bytes, int, int]] = []
        self.trailer = b""
        self.index = 0
        self.consumer: Any = request
        self.direct = False  # the consumer is the transport: sendfile
        self.stepping = False  # inside _send_parts, waiting for a part
        self.stepped = False  # that part completed at once

    # -- waiting --------------------------------------------------------------------
    def _wait(self, d: defer.Deferred[Any], then: Callable[[Any], None],
              on_error: Callable[[Failure], None] | None = None) -> None:
        """``then(result)`` once ``d`` fires (at once if it has); a failure
        goes to ``on_error`` (default ``_fail``)."""
        self.pending = d
        d.addBoth(self._resume, d, then, on_error)
        if self.pending is d:
            self._watch()

    def _resume(self, result: Any, d: defer.Deferred[Any], then: Callable[[Any], None],
                on_error: Callable[[Failure], None] | None) -> None:
        if self.pending is d:
            self.pending = None
        try:
            if isinstance(result, Failure):
                (on_error or self._fail)(result)
                return
            try:
                then(result)
            except BaseException:
                self._fail(Failure())
        except BaseException:
            _log.failure("error while answering an error")

    def _watch(self) -> None:
        if self.watching:
            return
        self.watching = True
        request = self.request
        if getattr(request, "_disconnected", False):
            self._lost(None)
        else:
            request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Any) -> None:
        """The client went away: stop what runs, close the handle."""
        d, self.pending = self.pending, None
        if d is not None:
            d.cancel()
        self._release()

    def _release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.abandon()

    # -- the open -------------------------------------------------------------------
    def wait_for_open(self, opening: defer.Deferred[FileHandle], name: str) -> None:
        self.name = name
        self._wait(opening, self._opened, self._open_failed)

    def _opened(self, handle: FileHandle) -> None:
        if _gone(self.request):
            handle.abandon()
            return
        self.start(handle, self.name)

    def _open_failed(self, failure: Failure) -> None:
        request, file = self.request, self.file
        if failure.check(IsADirectoryError):
            _finish_bytes(request, file.redirect(request))
        elif failure.check(FileNotFoundError) and file.ignoredExts and file._rel and not _gone(request):
            _run(request, file._serve(request, _clean(failure)), file)
        else:
            _failed(failure, request, file)

    # -- the answer -----------------------------------------------------------------
    def start(self, handle: FileHandle, name: str) -> None:
        """Answer from ``handle`` (``name``: its path, for its type)."""
        self.handle = handle
        try:
            self._answer(handle, name)
        except BaseException:
            self._fail(Failure())

    def _answer(self, handle: FileHandle, name: str) -> None:
        request, file = self.request, self.file
        size, etag = handle.size, etag_of(handle)
        modified = _last_modified(handle.mtime_ns)
        content_type, encoding = file._type_and_encoding(name)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"last-modified", _http_date(modified))
        request.setHeader(b"etag", etag.encode("ascii"))
        headers = _conditional_headers(request)
        ranges = None
        if headers:
            outcome = conditional.evaluate(request.method, etag, modified, headers)
            if outcome is conditional.NOT_MODIFIED:
                request.setResponseCode(http.NOT_MODIFIED)
                self._early(b"")
                return
            if outcome is conditional.PRECONDITION_FAILED:
                self._early(pages.errorPage(http.PRECONDITION_FAILED, "Precondition Failed",
                                            "A precondition of this request does not hold."))
                return
            if request.method != b"HEAD":
                try:
                    ranges = conditional.select_ranges(request.method, headers, size, etag, modified)
                except conditional.Unsatisfiable:
                    request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
                    request.setHeader(b"content-range", b"bytes */%d" % (size,))
                    _content_headers(request, 0, content_type, encoding)
                    self._early(b"")
                    return
        if request.method == b"HEAD":
            _content_headers(request, size, content_type, encoding)
            self._early(b"")
            return
        if ranges is None:
            _content_headers(request, size, content_type, encoding)
            self.parts = [(b"", 0, size)]
        elif len(ranges) == 1:
            offset, length = ranges[0]
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-range",
                              conditional.content_range(offset, length, size).encode("ascii"))
            _content_headers(request, length, content_type, encoding)
            self.parts = [(b"", offset, length)]
        else:
            boundary = os.urandom(12).hex().encode("ascii")
            part_type = (content_type or "bytes").encode("latin-1")
            total, self.parts, self.trailer = conditional.multipart_byteranges(
                ranges, size, part_type, boundary)
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-type", b'multipart/byteranges; boundary="%s"' % (boundary,))
            request.setHeader(b"content-length", b"%d" % (total,))
        if len(self.parts) == 1 and self.parts[0][2] <= SMALL_BODY:
            _, offset, length = self.parts[0]
            if length:  # one read, one write
                self._wait(self.loader.load(handle, offset, length), self._loaded)
            else:
                self._done()
            return
        request.write(b"")  # the status line and headers
        self.consumer, self.direct = file._consumer(request)
        self._send_parts()

    def _early(self, body: Any) -> None:
        """An answer without the file's bytes (``bytes`` or a resource)."""
        self._release()
        if isinstance(body, bytes):
            _finish_bytes(self.request, body)
        else:
            _render_resource(self.request, body)

    def _loaded(self, data: bytes) -> None:
        """The whole (small) body is here: one write, then finish."""
        request = self.request
        if _gone(request):
            self._release()
            return
        request.write(data)
        length = self.parts[0][2]
        if len(data) != length:
            self._short(len(data), length)
        else:
            self._done()

    def _send_parts(self) -> None:
        """Write each part's header and its range (loaded when small, else
        streamed: with sendfile to a plain HTTP/1 transport, else through the
        request), then the trailer, then finish."""
        request, parts, loader = self.request, self.parts, self.loader
        while self.index < len(parts):
            header, offset, length = parts[self.index]
            self.index += 1
            if _gone(request):
                self._release()
                return
            if header:
                request.write(header)
            if not length:
                continue
            d: defer.Deferred[Any]
            if length <= SMALL_BODY:
                d = loader.load(self.handle, offset, length)
                then: Callable[[Any], None] = self._part_loaded
            else:
                d = loader.stream(self.handle, self.consumer, offset, length, zero_copy=self.direct)
                then = self._part_streamed
            self.stepping, self.stepped = True, False
            self._wait(d, then)
            self.stepping = False
            if not self.stepped:
                return  # the part's callback goes on (or the answer ended)
        if self.trailer:
            request.write(self.trailer)
        self._done()

    def _next_part(self) -> None:
        if self.stepping:
            self.stepped = True  # _send_parts' loop goes on: no recursion
        else:
            self._send_parts()

    def _part_loaded(self, data: bytes) -> None:
        request = self.request
        if _gone(request):
            self._release()
            return
        request.write(data)
        length = self.parts[self.index - 1][2]
        if len(data) != length:
            self._short(len(data), length)
        else:
            self._next_part()

    def _part_streamed(self, sent: int) -> None:
        if self.direct:
            self.request.sentLength += sent
        length = self.parts[self.index - 1][2]
        if sent != length:
            self._short(sent, length)
        else:
            self._next_part()

    # -- the ends ----------------------------------------------------------------------
    def _done(self) -> None:
        """The last byte is handed over: close the handle (not waited for), finish."""
        self._release()
        request = self.request
        if not _gone(request):
            request.finish()

    def _short(self, sent: int, length: int) -> None:
        """The file shrank since its ``fstat``: the promised Content-Length
        cannot be met, so the connection is closed (a short answer, not a wrong one)."""
        self._release()
        request = self.request
        _log.warn("{uri}: the file changed size while it was sent ({sent} of {length} bytes); "
                  "connection closed", uri=_uri(request), sent=sent, length=length)
        lose = getattr(request, "loseConnection", None)
        if lose is not None and not _gone(request):
            lose()

    def _fail(self, failure: Failure) -> None:
        self._release()
        _failed(failure, self.request, self.file)


def _content_headers(request: Any, length: int, content_type: str | None, encoding: str | None) -> None:
    request.setHeader(b"content-length", b"%d" % (length,))
    if content_type:
        request.setHeader(b"content-type", content_type.encode("latin-1"))
    if encoding:
        request.setHeader(b"content-encoding", encoding.encode("latin-1"))


class File(resource.Resource, filepath.FilePath[str]):  # type: ignore[misc]  # as static.File
    """A drop-in for ``twisted.web.static.File`` that never blocks the reactor.

    Same constructor and attributes (``contentTypes``, ``contentEncodings``,
    ``processors``, ``indexNames``, ``ignoredExts``/``ignoreExt``, ``type``,
    ``encoding``, ``childNotFound``, ``forbidden``, ``directoryListing``,
    ``createSimilarFile``, ``putChild``); keyword-only ``loader`` (default:
    ``asyncfile.default_loader()``, looked up when first needed) and
    ``zero_copy`` (``os.sendfile`` where the transport and the file allow it).
    See the module docstring for what differs from static.File.
    """

    contentTypes: dict[str, str] = static.File.contentTypes
    contentEncodings: dict[str, str] = {".gz": "gzip", ".bz2": "bzip2"}
    processors: dict[str, Callable[[str, Any], Any]] = {}
    indexNames: list[str] = ["index", "index.html", "index.htm", "index.rpy"]
    ignoredExts: list[str]
    type: str | None = None
    encoding: str | None = None
    childNotFound: Any = static.File.childNotFound
    forbidden: Any = static.File.forbidden

    def __init__(self, path: str, defaultType: str = "text/html", ignoredExts: Sequence[str] = (),
                 registry: static.Registry | None = None, allowExt: int = 0, *,
                 loader: FileLoader | None = None, zero_copy: bool = True) -> None:
        resource.Resource.__init__(self)
        filepath.FilePath.__init__(self, path)
        self.defaultType = defaultType
        legacy: Any = ignoredExts  # static.File still takes a boolean here
        if legacy in (0, 1) or allowExt:
            warnings.warn("ignoredExts should receive a list, not a boolean")
            self.ignoredExts = ["*"] if (legacy or allowExt) else []
        else:
            self.ignoredExts = list(ignoredExts)
        self.registry = registry or static.Registry()
        self._loader = loader
        self.zero_copy = zero_copy
        self._tree = _Tree(self.path)
        self._rel = ""

    @property
    def loader(self) -> FileLoader:
        """The ``FileLoader`` serving this tree (``default_loader()`` unless given)."""
        return self._loader if self._loader is not None else default_loader()

    @loader.setter
    def loader(self, value: FileLoader | None) -> None:
        self._loader = value

    def close(self) -> defer.Deferred[None]:
        """Release the directory's descriptor (kept open between requests).

        Not in static.File: for tests and orderly shutdown.  A later request
        opens it again.
        """
        self._tree.close()
        return defer.succeed(None)

    def ignoreExt(self, ext: str) -> None:
        """Ignore the given extension: serve ``file.ext`` if ``file`` is requested."""
        self.ignoredExts.append(ext)

    # -- traversal: no I/O ----------------------------------------------------------
    def getChild(self, path: bytes | str, request: Any) -> Any:
        """The child for one URL segment, built without touching the disk.

        ``b""`` (a trailing slash) is the directory's index file or listing;
        a name is a ``File`` for that name (or, if its extension has a
        processor, a resource that hands it to the processor); what it is
        (file, directory, missing) is found out when it is rendered.
        """
        if isinstance(path, bytes):
            try:
                path = path.decode("utf-8")
            except UnicodeDecodeError:
                _log.info("could not decode path segment as utf-8: {segment!r}", segment=path)
                return self.childNotFound
        if not path:
            return _DirectoryIndex(self)
        if "\0" in path:
            return self.childNotFound
        try:
            child = self.child(path)  # a plain FilePath, as static.File's
        except filepath.InsecurePath:
            return self.childNotFound
        if self._processor(child.path) is not None:
            return _Processed(self.createSimilarFile(child.path))
        return self.createSimilarFile(child.path)

    def _processor(self, path: str) -> Callable[[str, Any], Any] | None:
        extension = os.path.splitext(path)[1]
        if platformType == "win32":
            found: Any = InsensitiveDict(self.processors).get(extension)
            return found  # type: ignore[no-any-return]
        return self.processors.get(extension)

    def createSimilarFile(self, path: str) -> "File":
        """A ``File`` for ``path`` with this one's settings, sharing its open
        directory when ``path`` is beneath it."""
        f = self.__class__(path, self.defaultType, self.ignoredExts, self.registry)
        f.processors = self.processors
        f.indexNames = self.indexNames[:]
        f.childNotFound = self.childNotFound
        f._loader = self._loader
        f.zero_copy = self.zero_copy
        rel = self._tree.relative(f.path)
        if rel is not None:
            f._tree = self._tree
            f._rel = rel
        return f

    def directoryListing(self) -> Any:
        """A resource that renders the HTML listing of this directory (off the reactor thread)."""
        return DirectoryLister(self.path, None, self.contentTypes, self.contentEncodings,
                               self.defaultType, file=self)

    def redirect(self, request: Any) -> bytes:
        return redirectTo(static._addSlash(request), request)

    # -- rendering --------------------------------------------------------------------
    def render_GET(self, request: Any) -> Any:
        """Answer with the file (or a range of it), a redirect for a directory,
        or an error page; asynchronously.

        Once the directory is open, a request is a plain chain of callbacks
        (open, headers, body), all of it in this reactor turn when the file
        is local and cached.
        """
        tree = self._tree
        root = tree.root
        loader = self.loader
        if root is not None and not root.closed:
            name = self._rel or "."
            opening = loader.open(name, root=root)
        elif tree.is_file and not self._rel:
            name = self.basename()
            opening = loader.open(self.path)
        else:  # the directory is not open yet (first request, after close())
            return _run(request, self._serve(request), self)
        _Response(self, request, loader).wait_for_open(opening, name)
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    async def _serve(self, request: Any, missing: Failure | None = None) -> None:
        """Open the directory if needed, then the file (``missing``: the first
        open already failed with FileNotFoundError: try ``ignoredExts``)."""
        loader = self.loader
        try:
            root = await self._tree.resolve(loader)
            handle, name = await self._open(root, loader, missing)
        except IsADirectoryError:
            _finish_bytes(request, self.redirect(request))
            return
        except Exception:
            _failed(_clean(Failure()), request, self)
            return
        processor = self._processor(name) if root is not None and name != _join(self._rel) else None
        if processor is not None:  # found through ignoredExts, e.g. "page" -> "page.rpy"
            await _close(handle)
            path = os.path.join(self._tree.base, name)
            _render_resource(request, resource.IResource(processor(path, self.registry)))
            return
        self._send(request, handle, name)

    async def _open(self, root: Root | None, loader: FileLoader,
                    missing: Failure | None = None) -> tuple[FileHandle, str]:
        """Open this File's path (or a sibling through ``ignoredExts``)."""
        if root is None:  # the configured path is a file
            if self._rel:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self._rel)
            return await loader.open(self.path), self.basename()
        rel = _join(self._rel)
        if missing is None:
            try:
                return await loader.open(rel, root=root), rel
            except FileNotFoundError:
                if not self.ignoredExts or not self._rel:
                    raise
                missing = _clean(Failure())
        for ext in self.ignoredExts:
            if not ext:
                continue
            if ext == "*":
                parent, _, base = rel.rpartition("/")
                try:
                    names = await loader.listdir(parent or ".", root=root)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                candidates = [_join(parent, n) for n in names if n.startswith(base + ".")]
            else:
                candidates = [rel + ext]
            for candidate in candidates:
                try:
                    return await loader.open(candidate, root=root), candidate
                except (FileNotFoundError, IsADirectoryError):
                    continue
        missing.raiseException()
        raise AssertionError("unreachable")

    def _type_and_encoding(self, name: str) -> tuple[str | None, str | None]:
        """``static.getTypeAndEncoding`` of the name, without its ``FilePath``."""
        if self.type is not None:
            return self.type, self.encoding
        stem, ext = os.path.splitext(name.rpartition("/")[2])
        ext = ext.lower()
        encoding = self.contentEncodings.get(ext)
        if encoding is not None:
            ext = os.path.splitext(stem)[1].lower()
        return self.contentTypes.get(ext, self.defaultType), encoding

    def _send(self, request: Any, handle: FileHandle, name: str) -> None:
        """Answer from the open ``handle`` (``name``: its path, for its type);
        the request owns the handle from here (``_Response``)."""
        _Response(self, request, self.loader).start(handle, name)

    def _consumer(self, request: Any) -> tuple[Any, bool]:
        """Where a large body goes: the transport (sendfile) or the request."""
        if not self.zero_copy or getattr(request, "chunked", True):
            return request, False
        channel = getattr(request, "channel", None)
        if not isinstance(channel, http.HTTPChannel):  # HTTP/2 streams, test doubles
            return request, False
        from .sendfile import zero_copy_refusal

        transport = channel.transport
        if zero_copy_refusal(transport) is not None:
            return request, False
        return transport, True

    def __repr__(self) -> str:
        return f"<asyncfile.web.File {self.path!r}>"


class _DirectoryIndex(resource.Resource):
    """What a directory URL with a trailing slash shows: its first index file
    (``indexNames``) that opens, else ``directoryListing()``; the rest of the
    URL (``/dir//x``) traversed into that, as static.File does."""

    isLeaf = True

    def __init__(self, directory: File) -> None:
        resource.Resource.__init__(self)
        self.directory = directory

    def render(self, request: Any) -> Any:
        return _run(request, self._serve(request), self.directory)

    async def _serve(self, request: Any) -> None:
        d = self.directory
        loader = d.loader
        try:
            root = await d._tree.resolve(loader)
            if root is None:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), d.basename())
            for index in d.indexNames:
                rel = _join(d._rel, index)
                try:
                    handle = await loader.open(rel, root=root)
                except (FileNotFoundError, IsADirectoryError):
                    continue
                child = d.createSimilarFile(os.path.join(d.path, index))
                processor = d._processor(index)
                if processor is None and not request.postpath and request.method in (b"GET", b"HEAD"):
                    child._send(request, handle, rel)
                    return
                await _close(handle)
                found = child if processor is None else resource.IResource(processor(child.path, d.registry))
                _render_resource(request, resource.getChildForRequest(found, request))
                return
        except Exception:
            _failed(Failure(), request, d)
            return
        _render_resource(request, resource.getChildForRequest(d.directoryListing(), request))


class _Processed(resource.Resource):
    """A file whose extension has a processor: checked (opened beneath the
    directory, then closed), then handed to the processor, and the rest of
    the URL traversed into what the processor returns."""

    isLeaf = True

    def __init__(self, file: File) -> None:
        resource.Resource.__init__(self)
        self.file = file

    def render(self, request: Any) -> Any:
        return _run(request, self._serve(request))

    async def _serve(self, request: Any) -> None:
        f = self.file
        loader = f.loader
        try:
            root = await f._tree.resolve(loader)
            handle, name = await f._open(root, loader)
            await _close(handle)
        except Exception:
            _failed(Failure(), request, f)
            return
        processor = f._processor(name)
        assert processor is not None
        path = os.path.join(f._tree.base, name) if root is not None else f.path
        res = resource.getChildForRequest(resource.IResource(processor(path, f.registry)), request)
        _render_resource(request, res)
