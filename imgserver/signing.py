"""Signed URLs: HMAC-SHA256 over the endpoint, the decoded path and the parameters.

With a secret configured, only URLs made by someone holding the secret are
served, so nobody can make the server render arbitrary sizes (a cheap way to
burn its CPU and cache).  The signature is the query parameter ``s``: the
URL-safe base64 (no padding) of HMAC-SHA256 over a canonical message::

    b"imgserver-v2\\n" + endpoint + b"\\n" + canonical path + b"\\n" + canonical query

* endpoint: the name of the endpoint the URL is for (``images``, ``info``),
  so a signature made for ``/images/a.jpg`` is refused on ``/info/a.jpg``.
* canonical path: the path *as decoded once* by the HTTP layer
  (:func:`imgserver.paths.split_url_path`), i.e. the file's name relative to
  the root such as ``"photos/a b.jpg"``, with every byte of its UTF-8 form but
  ``A-Za-z0-9_.-~`` and the ``/`` separators percent-encoded.  A ``%`` in a
  decoded name is a literal ``%``: ``"%41.jpg"`` and ``"A.jpg"`` are different
  files and sign differently; a leading ``/`` is not part of the name.
* canonical query: the decoded ``(name, value)`` pairs except ``s``, sorted,
  each side percent-encoded the same way, joined as ``n=v&n=v``.  Parameter
  order in the URL does not matter; repeated parameters are all signed.
  Every transform parameter is covered this way, ``preset=NAME`` included:
  the signature binds the preset's name, and the server's definition of it
  (``--preset``) applies -- changing a preset does not require re-signing.

:func:`sign` and :func:`verify` take the decoded path and the decoded query
(what ``parse_qs`` or Twisted's ``request.args`` give).  :func:`signed_url`
builds the whole URL (``/<endpoint>/<encoded path>?<query>&s=...``) for
clients from a plain, decoded file path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, quote_from_bytes

from imgserver.errors import Forbidden

__all__ = ["sign", "verify", "signed_url", "canonical_message", "SIGNATURE_PARAM", "ENDPOINTS"]

#: The query parameter holding the signature.
SIGNATURE_PARAM = "s"

#: The endpoints of the HTTP server whose URLs are signed.
ENDPOINTS = ("images", "info")

_VERSION = b"imgserver-v2"
_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9._~-]+")

Query = Mapping | Iterable | str | bytes


def _bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    raise TypeError(
        f"query names and values must be str, bytes or int, not {type(value).__name__}"
    )


def _pairs(query: Query) -> list[tuple[bytes, bytes]]:
    """All (name, value) pairs of ``query``, as bytes, in the given order."""
    if isinstance(query, (str, bytes, bytearray)):
        text = query.decode("utf-8", "surrogateescape") if isinstance(query, (bytes, bytearray)) else query
        items: Iterable = parse_qsl(text, keep_blank_values=True)
    elif isinstance(query, Mapping):
        items = []
        for name, values in query.items():
            if isinstance(values, (str, bytes, bytearray, int)):
                values = [values]
            items.extend((name, value) for value in values)
    else:
        items = query
    return [(_bytes(name), _bytes(value)) for name, value in items]


def _quote(data: bytes) -> str:
    return quote_from_bytes(data, safe="")


def _endpoint(endpoint: str) -> bytes:
    if not isinstance(endpoint, str) or not _ENDPOINT_NAME.fullmatch(endpoint):
        raise ValueError(f"not an endpoint name: {endpoint!r}")
    return endpoint.encode("ascii")


def _canonical_path(path: str) -> str:
    if not isinstance(path, str):
        raise TypeError(f"the path is the decoded path (str), not {type(path).__name__}")
    if path.startswith("/"):
        path = path[1:]
    return "/".join(_quote(segment.encode("utf-8", "surrogatepass")) for segment in path.split("/"))


def _canonical_query(query: Query) -> str:
    signature_name = SIGNATURE_PARAM.encode("ascii")
    pairs = sorted(p for p in _pairs(query) if p[0] != signature_name)
    return "&".join(f"{_quote(n)}={_quote(v)}" for n, v in pairs)


def canonical_message(endpoint: str, path: str, query: Query = ()) -> bytes:
    """The exact bytes that are signed (see the module docstring)."""
    return b"\n".join([_VERSION, _endpoint(endpoint), _canonical_path(path).encode("ascii"),
                       _canonical_query(query).encode("ascii")])


def sign(secret: bytes | str, endpoint: str, path: str, query: Query = ()) -> str:
    """The signature of ``path`` (decoded) + ``query`` on ``endpoint`` (``s`` is ignored if present)."""
    digest = hmac.new(_bytes(secret), canonical_message(endpoint, path, query), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(
    secret: bytes | str,
    endpoint: str,
    path: str,
    query: Query,
    signature: str | bytes | None = None,
) -> None:
    """Raise Forbidden unless the request carries a valid signature for
    ``endpoint``, the decoded ``path`` and ``query``.

    The signature is ``signature`` if given, else the single ``s`` parameter
    in ``query``.  Compared in constant time (``hmac.compare_digest``).
    """
    if signature is None:
        signature_name = SIGNATURE_PARAM.encode("ascii")
        found = [v for n, v in _pairs(query) if n == signature_name]
        if len(found) > 1:
            raise Forbidden("more than one signature")
        signature = found[0] if found else None
    if not signature:
        raise Forbidden("missing signature")
    given = _bytes(signature)
    expected = sign(secret, endpoint, path, query).encode("ascii")
    if not hmac.compare_digest(expected, given):
        raise Forbidden("bad signature")


def signed_url(
    secret: bytes | str,
    endpoint: str,
    path: str,
    query: Mapping | Iterable = (),
) -> str:
    """A signed URL, ``/<endpoint>/<path>?<query>&s=<signature>``, for the
    plain file path ``path`` on ``endpoint``.

    ``path`` is a decoded file path relative to the image root, such as
    ``"photos/a b.jpg"`` or ``"100%.png"``; it is percent-encoded here.
    ``query`` maps parameter names to values (or is a list of pairs), e.g.
    ``{"w": 200, "fit": "crop"}``.
    """
    name = _endpoint(endpoint).decode("ascii")
    relative = path[1:] if path.startswith("/") else path
    encoded_path = "/".join(quote(seg, safe="") for seg in relative.split("/"))
    signature_name = SIGNATURE_PARAM.encode("ascii")
    pairs = sorted(p for p in _pairs(query) if p[0] != signature_name)
    signature = sign(secret, endpoint, path, pairs)
    text = "&".join(f"{_quote(n)}={_quote(v)}" for n, v in pairs)
    text = f"{text}&{SIGNATURE_PARAM}={signature}" if text else f"{SIGNATURE_PARAM}={signature}"
    return f"/{name}/{encoded_path}?{text}"
