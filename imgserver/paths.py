"""Map a URL path to a file under the image root, refusing to leave the root.

Percent-decoding happens here and nowhere else:

* :func:`split_url_path` takes the raw (still percent-encoded) URL path of a
  request, decodes each segment **once** and rejects any name that could
  climb out of the root or reach a hidden file.  The HTTP layer calls it and
  hands the result on as a decoded ``str`` (:func:`join` of the segments).
* :func:`split_decoded` applies the same name policy to a path that is
  already decoded (Perspective Broker arguments, the service): it never
  decodes, so the file ``%41.jpg`` stays ``%41.jpg``.

Both are pure string functions (no system calls): run them in the reactor
thread.  Opening is the I/O layer's job (asyncfile's confined open beneath the
root: the kernel refuses ``..``, absolute paths and symlinks leading out).
The older helpers remain for tools and tests: :func:`resolve` (pure join) and
:func:`confine` (``os.path.realpath`` + :func:`check_inside`, blocking; it
takes a *raw URL path* and decodes it itself, so never give it a decoded one).

Which error, consistently:

* :class:`~imgserver.errors.Forbidden` (403): names the server refuses by
  policy: ``..`` or ``.`` segments, encoded separators (``%2F``, ``%5C``),
  backslashes, NUL or other control characters, empty segments (``//``, which
  is also how an absolute path would sneak in), hidden files and directories
  (any segment starting with ``.``; this covers ``%2e%2e``), and symlinks
  whose target leaves the root or is hidden.  These are decided from the name
  alone (or, for symlinks, from where they point), so a 403 says nothing about
  whether a file exists.
* :class:`~imgserver.errors.NotFound` (404): well-formed names that cannot
  name an image: the empty path (the root itself) and over-long names.  The
  I/O layer also answers 404 when the file is missing or not a regular file.
* :class:`~imgserver.errors.BadRequest` (400): a malformed URL: a ``%`` not
  followed by two hex digits, or bytes that are not UTF-8 once decoded.

Messages say what rule was broken, never the absolute path.

Decoding happens exactly once: ``%252e%252e`` decodes to the literal file name
``%2e%2e``, which is allowed and never decoded again.  POSIX paths only.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote_to_bytes

from imgserver.errors import BadRequest, Forbidden, NotFound

__all__ = [
    "split_url_path",
    "split_decoded",
    "join",
    "resolve",
    "check_inside",
    "confine",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
]

#: Longest file or directory name (NAME_MAX on Linux).
MAX_NAME_BYTES = 255
#: Longest decoded path below the root (PATH_MAX on Linux).
MAX_PATH_BYTES = 4096

_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_segment(segment: str) -> None:
    """Reject a decoded path segment that is not a plain, visible name."""
    if segment == "":
        raise Forbidden("forbidden path: empty segment")
    if segment in (".", ".."):
        raise Forbidden("forbidden path: dot segment")
    if "/" in segment or "\\" in segment:
        raise Forbidden("forbidden path: encoded separator")
    if _CONTROL.search(segment):
        raise Forbidden("forbidden path: control character")
    if segment.startswith("."):
        raise Forbidden("forbidden path: hidden file or directory")
    if len(segment.encode("utf-8")) > MAX_NAME_BYTES:
        raise NotFound("not found: name too long")


def _check_segments(segments: list[str]) -> tuple[str, ...]:
    total = 0
    for segment in segments:
        _check_segment(segment)
        total += len(segment.encode("utf-8")) + 1
    if total > MAX_PATH_BYTES:
        raise NotFound("not found: path too long")
    return tuple(segments)


def split_url_path(url_path: str | bytes) -> tuple[str, ...]:
    """The decoded, validated segments of a raw (still percent-encoded) URL path.

    ``url_path`` is the path part of the request target, e.g. Twisted's
    ``request.path``; a leading ``/`` is optional.  This is the one place a
    path is percent-decoded: each segment exactly once.  Pure: no system calls.
    Raises only BadRequest, Forbidden or NotFound.
    """
    if isinstance(url_path, str):
        try:
            raw = url_path.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no URL decodes to it
            raise BadRequest("path is not valid UTF-8") from None
    else:
        raw = bytes(url_path)
    # Checked on the raw form too: a literal NUL or backslash is never a name.
    if b"\0" in raw:
        raise Forbidden("forbidden path: control character")
    if b"\\" in raw:
        raise Forbidden("forbidden path: backslash")
    if raw.startswith(b"/"):
        raw = raw[1:]
    if not raw:
        raise NotFound("not found: no image named")
    if len(raw) > 3 * MAX_PATH_BYTES:  # cheap bound before decoding
        raise NotFound("not found: path too long")
    if _BAD_ESCAPE.search(raw):
        raise BadRequest("malformed percent-encoding in path")

    segments = []
    for raw_segment in raw.split(b"/"):
        try:
            segment = unquote_to_bytes(raw_segment).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path is not valid UTF-8") from None
        _check_segment(segment)
        segments.append(segment)
    return _check_segments(segments)


def split_decoded(path: str) -> tuple[str, ...]:
    """The validated segments of an already-decoded path (no decoding at all).

    The same name policy as :func:`split_url_path` for a path that arrived
    decoded (Perspective Broker, the service): ``"a%41.jpg"`` is the file
    named ``a%41.jpg``.  A leading ``/`` is optional.  Pure.  Raises only
    BadRequest (not text, or not encodable as UTF-8), Forbidden or NotFound;
    ``join(split_decoded(p))`` is the canonical form of ``p``.
    """
    if not isinstance(path, str):
        raise BadRequest("the path must be text")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("path is not valid UTF-8") from None
    if "\0" in path:
        raise Forbidden("forbidden path: control character")
    if "\\" in path:
        raise Forbidden("forbidden path: backslash")
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise NotFound("not found: no image named")
    if len(path) > 3 * MAX_PATH_BYTES:  # cheap bound, as for a raw URL path
        raise NotFound("not found: path too long")
    return _check_segments(path.split("/"))


def join(segments: tuple[str, ...] | list[str]) -> str:
    """The decoded relative path of checked segments: ``'/'.join(segments)``."""
    return "/".join(segments)


def resolve(root: str, url_path: str | bytes) -> str:
    """``root`` joined with the validated segments of ``url_path``.

    Pure string work: symlinks are not looked at (use :func:`confine` for
    that).  The result is always ``root`` + separator + plain names.
    """
    return os.path.join(root, *split_url_path(url_path))


def check_inside(root_real: str, real_path: str) -> None:
    """Raise Forbidden unless ``real_path`` is strictly inside ``root_real``.

    Both must be absolute and symlink-free (``os.path.realpath`` results).
    Pure.  The part of ``real_path`` below the root must not be hidden either,
    so a symlink inside the root cannot expose ``.git`` or similar.
    """
    if not (os.path.isabs(root_real) and os.path.isabs(real_path)):
        raise ValueError("check_inside needs absolute paths")
    prefix = root_real if root_real.endswith(os.sep) else root_real + os.sep
    if not real_path.startswith(prefix) or len(real_path) == len(prefix):
        raise Forbidden("forbidden path: leads outside the image root")
    for part in real_path[len(prefix) :].split(os.sep):
        if part.startswith("."):
            raise Forbidden("forbidden path: leads to a hidden file or directory")


def confine(root: str, url_path: str | bytes) -> str:
    """The real (symlink-free) path ``url_path`` names under ``root``.

    Touches the file system (``os.path.realpath`` of the root and of the
    target): call it from a worker thread.  Symlinks inside the root are
    followed; if the result is outside ``realpath(root)`` or hidden, raises
    Forbidden.  A missing file is not an error here: opening the result will
    fail with ENOENT, which the caller turns into NotFound.

    To keep a symlink from being swapped in between this check and the open,
    open the result with ``O_NOFOLLOW``; anyone able to rename directories
    inside the root can still race it, so the root must not be writable by
    untrusted users.
    """
    segments = split_url_path(url_path)
    root_real = os.path.realpath(root)
    real_path = os.path.realpath(os.path.join(root_real, *segments))
    check_inside(root_real, real_path)
    return real_path
