"""Signed URLs: HMAC-SHA256 over the path and the transform parameters.

With a secret configured, only URLs made by someone holding the secret are
served, so nobody can make the server render arbitrary sizes (a cheap way to
burn its CPU and cache).  The signature is the query parameter ``s``: the
URL-safe base64 (no padding) of HMAC-SHA256 over a canonical message::

    b"imgserver-v1\\n" + canonical path + b"\\n" + canonical query

* canonical path: ``/`` followed by the path segments, each percent-decoded
  once and re-encoded with every byte but ``A-Za-z0-9_.-~`` escaped, so that
  ``/a b.jpg``, ``/a%20b.jpg`` and ``a%20b.jpg`` sign alike while ``a%2Fb``
  and ``a/b`` do not.
* canonical query: the decoded ``(name, value)`` pairs except ``s``, sorted,
  each side percent-encoded the same way, joined as ``n=v&n=v``.  Parameter
  order in the URL does not matter; repeated parameters are all signed.

:func:`sign` and :func:`verify` take the path as it appears in the URL
(percent-encoded, like ``request.path``) and the decoded query (what
``parse_qs`` or ``request.args`` give).  :func:`signed_url` takes a plain,
decoded file path and builds the whole URL for clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, quote_from_bytes, unquote_to_bytes

from imgserver.errors import Forbidden

__all__ = ["sign", "verify", "signed_url", "canonical_message", "SIGNATURE_PARAM"]

#: The query parameter holding the signature.
SIGNATURE_PARAM = "s"

_VERSION = b"imgserver-v1"

Query = Mapping | Iterable | str | bytes


def _bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    raise TypeError(
        f"query names and values must be str, bytes or int, not {type(value).__name__}"
    )


def _pairs(query: Query) -> list[tuple[bytes, bytes]]:
    """All (name, value) pairs of ``query``, as bytes, in the given order."""
    if isinstance(query, (str, bytes, bytearray)):
        text = query.decode("utf-8") if isinstance(query, (bytes, bytearray)) else query
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


def _canonical_path(path: str | bytes) -> str:
    raw = _bytes(path)
    if raw.startswith(b"/"):
        raw = raw[1:]
    return "/" + "/".join(_quote(unquote_to_bytes(seg)) for seg in raw.split(b"/"))


def canonical_message(path: str | bytes, query: Query = ()) -> bytes:
    """The exact bytes that are signed (see the module docstring)."""
    signature_name = SIGNATURE_PARAM.encode("ascii")
    pairs = sorted(p for p in _pairs(query) if p[0] != signature_name)
    canonical_query = "&".join(f"{_quote(n)}={_quote(v)}" for n, v in pairs)
    return b"\n".join(
        [_VERSION, _canonical_path(path).encode("ascii"), canonical_query.encode("ascii")]
    )


def sign(secret: bytes, path: str | bytes, query: Query = ()) -> str:
    """The signature of ``path`` + ``query`` (``s`` is ignored if present)."""
    digest = hmac.new(_bytes(secret), canonical_message(path, query), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(
    secret: bytes,
    path: str | bytes,
    query: Query,
    signature: str | bytes | None = None,
) -> None:
    """Raise Forbidden unless the request carries a valid signature.

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
    expected = sign(secret, path, query).encode("ascii")
    if not hmac.compare_digest(expected, given):
        raise Forbidden("bad signature")


def signed_url(
    secret: bytes,
    path: str,
    params: Mapping | Iterable = (),
) -> str:
    """A signed URL (path and query) for the plain file path ``path``.

    ``path`` is a decoded file path relative to the image root, such as
    ``"photos/a b.jpg"``; it is percent-encoded here.  ``params`` maps
    parameter names to values (or is a list of pairs), e.g.
    ``{"w": 200, "fit": "crop"}``.
    """
    encoded_path = "/" + "/".join(quote(seg, safe="") for seg in path.lstrip("/").split("/"))
    signature_name = SIGNATURE_PARAM.encode("ascii")
    pairs = sorted(p for p in _pairs(params) if p[0] != signature_name)
    signature = sign(secret, encoded_path, pairs)
    query = "&".join(f"{_quote(n)}={_quote(v)}" for n, v in pairs)
    query = f"{query}&{SIGNATURE_PARAM}={signature}" if query else f"{SIGNATURE_PARAM}={signature}"
    return f"{encoded_path}?{query}"
