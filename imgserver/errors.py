"""The errors imgserver reports to clients, over HTTP and over Perspective Broker.

Every expected failure is an :class:`ImageServerError` carrying the HTTP
``status`` and a short machine-readable ``code``.  The classes derive from
``twisted.spread.pb.Error`` so that a PB client receives a ``pb.RemoteError``
whose ``remoteType`` names the class, and the PB server logs no traceback for
them.

Messages are written for the client: they never contain absolute file-system
paths or tracebacks.  :func:`error_body` additionally scrubs anything that
looks like an absolute path, and turns unexpected exceptions into a generic
500 body, so a bug cannot leak server internals.
"""

from __future__ import annotations

import json
import re

from twisted.spread import pb

__all__ = [
    "ImageServerError",
    "BadRequest",
    "Forbidden",
    "NotFound",
    "PreconditionFailed",
    "TooLarge",
    "RangeNotSatisfiable",
    "UnsupportedImage",
    "CorruptImage",
    "Overloaded",
    "Timeout",
    "InternalError",
    "error_status",
    "error_body",
    "error_headers",
]


class ImageServerError(pb.Error):
    """Base class: an expected failure with an HTTP status and a short code."""

    status: int = 500
    code: str = "internal"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)

    def __str__(self) -> str:
        # pb sends str(exception) to the client as RemoteError.value.
        return self.message


class BadRequest(ImageServerError):
    """The request is malformed: bad query parameters or a malformed URL."""

    status = 400
    code = "bad_request"
    default_message = "bad request"


class Forbidden(ImageServerError):
    """Refused by policy: bad signature, path traversal, hidden files, symlinks out of root."""

    status = 403
    code = "forbidden"
    default_message = "forbidden"


class NotFound(ImageServerError):
    """No image under that name."""

    status = 404
    code = "not_found"
    default_message = "not found"


class PreconditionFailed(ImageServerError):
    """``If-Match`` / ``If-Unmodified-Since`` did not hold (RFC 9110 §13.1.1, §13.1.4)."""

    status = 412
    code = "precondition_failed"
    default_message = "the image does not match the request's preconditions"


class TooLarge(ImageServerError):
    """The source file or image (bytes or pixels), or the requested output, is over a limit."""

    status = 413
    code = "too_large"
    default_message = "image too large"


class RangeNotSatisfiable(ImageServerError):
    """No byte of the file satisfies the request's Range (416).

    An error like the others (a JSON body, ``Cache-Control: no-store``, no
    image Content-Type), plus ``Content-Range: bytes */<size>`` as RFC 9110
    §15.5.17 asks: ``size`` is the length of the file the range was checked
    against.
    """

    status = 416
    code = "range_not_satisfiable"
    default_message = "the requested range is not satisfiable"

    def __init__(self, size: int, message: str | None = None) -> None:
        super().__init__(message)
        self.size = int(size)
        self.args = (self.size, self.message)


class UnsupportedImage(ImageServerError):
    """Not an image, or an image format the server does not handle."""

    status = 415
    code = "unsupported_image"
    default_message = "not a supported image (JPEG, PNG, WebP, GIF or AVIF)"


class CorruptImage(UnsupportedImage):
    """A supported format whose data is truncated or cannot be decoded.

    A subclass of :class:`UnsupportedImage` so that callers catching "bad
    image" catch both, but with its own status: 422 tells the client the
    format was recognised and the file itself is broken.
    """

    status = 422
    code = "corrupt_image"
    default_message = "image data is truncated or corrupt"


class Overloaded(ImageServerError):
    """A lane or queue is full (workers, streams, open files); retry after ``retry_after`` seconds.

    ``retry_after`` is the server's estimate (queue depth x recent processing
    time / workers, 1..60 s), sent as ``Retry-After``.
    """

    status = 503
    code = "overloaded"
    default_message = "server busy, retry later"

    def __init__(self, message: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = int(retry_after)
        # Keep retry_after in args so the exception pickles and copies faithfully.
        self.args = (self.message, self.retry_after)


class Timeout(ImageServerError):
    """Processing the image took longer than the configured timeout."""

    status = 504
    code = "timeout"
    default_message = "processing timed out"


class InternalError(ImageServerError):
    """An unexpected failure; the body says nothing about its cause."""


_MAX_MESSAGE = 200

# An absolute path: a '/' or a drive letter + separator starting a token (at the
# start, after whitespace, a quote, '=', '(' or ':'), followed by path characters.
_ABSOLUTE_PATH = re.compile(r"""(?:^|(?<=[\s'"=(:]))(?:[A-Za-z]:[\\/]|/)[^\s'"]*""")


def _scrub(message: str) -> str:
    message = _ABSOLUTE_PATH.sub("<path>", message)
    message = " ".join(message.split())  # no newlines, hence no tracebacks
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return message


def error_status(err: BaseException) -> int:
    """The HTTP status for any exception: the error's own, else 500."""
    if isinstance(err, ImageServerError):
        return err.status
    return InternalError.status


def error_body(err: BaseException) -> bytes:
    """A short JSON body ``{"error": code, "message": ...}`` for ``err``.

    Exceptions that are not :class:`ImageServerError` become a generic
    ``internal`` body: their text may hold paths or internals, so it is not
    sent (log it server-side instead).  :class:`Overloaded` adds
    ``retry_after``.
    """
    if not isinstance(err, ImageServerError):
        err = InternalError()
    body: dict[str, object] = {"error": err.code, "message": _scrub(err.message)}
    if isinstance(err, Overloaded):
        body["retry_after"] = err.retry_after
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_headers(err: BaseException) -> list[tuple[bytes, bytes]]:
    """Response headers that go with :func:`error_body` (content type, Retry-After,
    and for a 416 the Content-Range RFC 9110 asks for)."""
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Cache-Control", b"no-store"),
    ]
    if isinstance(err, Overloaded):
        headers.append((b"Retry-After", str(err.retry_after).encode("ascii")))
    if isinstance(err, RangeNotSatisfiable):
        headers.append((b"Content-Range", f"bytes */{err.size}".encode("ascii")))
    return headers
