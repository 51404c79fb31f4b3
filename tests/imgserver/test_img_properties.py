"""Property tests (hypothesis) of the pure HTTP-side logic: URL paths, query
parameters and signatures.

* paths: any input gives segments or one of the documented errors, never a
  path that leaves the root; decoding happens exactly once
  (``split_url_path(quote(p)) == split_decoded(p)``);
* query: ``parse_transform`` gives a spec or BadRequest, the same each time;
* signing: ``signed_url`` → the HTTP layer's parse → ``verify`` round-trips,
  and any change of endpoint, path, query or signature is refused;
* conditional requests: imgserver uses asyncfile.conditional, whose own
  properties are in tests/asyncfile/test_conditional.py.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from imgserver import paths, signing
from imgserver.errors import BadRequest, Forbidden, ImageServerError, NotFound, RangeNotSatisfiable, error_headers
from imgserver.params import parse_transform

PATH_ERRORS = (BadRequest, Forbidden, NotFound)
ROOT = "/srv/images"

common = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Path-ish text: plenty of the characters that matter (separators, dots,
# percent signs, hex digits, controls), plus anything else.
PATH_ALPHABET = st.sampled_from(list("/.%\\\x00\n\x7fabcAF09 -_~é") + ["%2e", "%2F", "%5c", "%00", "%25", ".."])
path_text = st.one_of(
    st.lists(PATH_ALPHABET, max_size=30).map("".join),
    st.text(max_size=60),
)
raw_bytes = st.one_of(st.binary(max_size=80), path_text.map(lambda t: t.encode("utf-8", "surrogatepass")))


def _escapes(segments: tuple[str, ...]) -> bool:
    joined = os.path.normpath(os.path.join(ROOT, *segments))
    return not joined.startswith(ROOT + "/")


def _check_segments(segments: tuple[str, ...]) -> None:
    assert segments, "an empty path names no image"
    for segment in segments:
        assert segment and segment not in (".", "..")
        assert "/" not in segment and "\\" not in segment and "\0" not in segment
        assert not segment.startswith(".")
        assert not any(ord(c) < 0x20 or c == "\x7f" for c in segment)
    assert not _escapes(segments)


def _outcome(f, *args):
    try:
        return ("ok", f(*args))
    except PATH_ERRORS as e:
        return ("error", type(e))


# --- paths ----------------------------------------------------------------------------


@common
@given(raw_bytes)
@example(b"/%2e%2e/etc/passwd")
@example(b"/a%252e%252e/x")
@example(b"/%ff")
def test_split_url_path_never_escapes_and_fails_only_as_documented(raw):
    try:
        segments = paths.split_url_path(raw)
    except PATH_ERRORS:
        return
    _check_segments(segments)
    # The same input gives the same answer.
    assert paths.split_url_path(raw) == segments


@common
@given(path_text)
def test_split_decoded_never_escapes_and_fails_only_as_documented(path):
    try:
        segments = paths.split_decoded(path)
    except PATH_ERRORS:
        return
    _check_segments(segments)
    assert paths.split_decoded(paths.join(segments)) == segments


@common
@given(st.one_of(st.binary(max_size=10), st.integers(), st.none()))
def test_split_decoded_refuses_what_is_not_text(value):
    with pytest.raises(BadRequest):
        paths.split_decoded(value)


@common
@given(path_text)
@example("100%.png")
@example("%41.jpg")
@example("a%2Fb/c")
def test_decode_once(path):
    """Encoding a decoded path once and splitting it gives what the decoded
    path gives: the same segments or the same kind of error.  Encoding it
    twice gives the literal name with its ``%`` signs."""
    assume(len(path) < 300)
    encoded = quote(path, safe="/")
    assert _outcome(paths.split_url_path, encoded) == _outcome(paths.split_decoded, path)
    # The literal, once-encoded text as a file name: decoded once, not twice.
    assert _outcome(paths.split_url_path, quote(encoded, safe="/")) == _outcome(paths.split_decoded, encoded)


# --- query parameters -----------------------------------------------------------------

query_values = st.one_of(st.sampled_from(["1", "10", "8192", "8193", "0", "-1", "+5", "05", "crop", "clip",
                                          "max", "scale", "png", "jpg", "webp", "gif", "", " 5", "٥", "1.5"]),
                         st.text(max_size=8))
query_names = st.sampled_from(["w", "h", "fit", "fm", "q", "s", "x", "W", ""])
queries = st.dictionaries(query_names, st.lists(query_values, min_size=1, max_size=2), max_size=5)


@common
@given(queries)
def test_parse_transform_gives_a_spec_or_bad_request(args):
    args = {k: v for k, v in args.items() if k != "s"}
    try:
        spec = parse_transform(args, max_dimension=8192, default_quality=85)
    except BadRequest:
        return
    again = parse_transform(args, max_dimension=8192, default_quality=85)
    assert spec == again
    if spec is not None:
        assert spec.cache_key() == again.cache_key()
        assert (spec.width or 1) <= 8192 and (spec.height or 1) <= 8192


# --- signing ----------------------------------------------------------------------------

SECRET = b"property-test-secret-0123456789"
endpoints = st.sampled_from(signing.ENDPOINTS)
# Valid decoded paths (what the HTTP layer would hand on).
valid_paths = path_text.filter(lambda p: _outcome(paths.split_decoded, p)[0] == "ok").map(
    lambda p: paths.join(paths.split_decoded(p)))
pairs = st.lists(st.tuples(st.text(min_size=1, max_size=6).filter(lambda n: n != "s"), st.text(max_size=8)),
                 max_size=4)


def _as_the_server_sees_it(url: str):
    parts = urlsplit(url)
    _, endpoint, raw = parts.path.split("/", 2)
    args = {k.encode(): [v.encode() for v in vs]
            for k, vs in parse_qs(parts.query, keep_blank_values=True).items()}
    return endpoint, paths.join(paths.split_url_path(raw)), args


@common
@given(endpoints, valid_paths, pairs)
def test_signed_urls_round_trip(endpoint, path, query):
    assume(all(c not in n + v for n, v in query for c in "\x00\ud800"))
    url = signing.signed_url(SECRET, endpoint, path, query)
    seen_endpoint, seen_path, args = _as_the_server_sees_it(url)
    assert (seen_endpoint, seen_path) == (endpoint, path)
    signing.verify(SECRET, seen_endpoint, seen_path, args)


@common
@given(endpoints, valid_paths, pairs, st.data())
def test_any_change_is_refused(endpoint, path, query, data):
    sig = signing.sign(SECRET, endpoint, path, query)
    change = data.draw(st.sampled_from(["endpoint", "path", "query", "signature", "secret"]))
    new_endpoint, new_path, new_query, new_sig, secret = endpoint, path, list(query), sig, SECRET
    if change == "endpoint":
        new_endpoint = data.draw(st.sampled_from([e for e in signing.ENDPOINTS if e != endpoint] + ["thumbs"]))
    elif change == "path":
        new_path = data.draw(valid_paths.filter(lambda p: p != path))
    elif change == "query":
        extra = data.draw(st.tuples(st.text(min_size=1, max_size=4).filter(lambda n: n != "s"), st.text(max_size=4)))
        new_query = data.draw(st.sampled_from(
            [query + [extra]] + ([query[1:]] if query else []) +
            ([[(query[0][0], query[0][1] + "x")] + query[1:]] if query else [])))
    elif change == "signature":
        i = data.draw(st.integers(0, len(sig) - 1))
        new_sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1:]
    else:
        secret = SECRET + b"!"
    with pytest.raises(Forbidden):
        signing.verify(secret, new_endpoint, new_path, new_query, signature=new_sig)


@common
@given(st.text(max_size=20), st.one_of(st.text(max_size=40), st.binary(max_size=40)),
       st.dictionaries(st.binary(max_size=5), st.lists(st.binary(max_size=5), max_size=3), max_size=4))
def test_verify_never_fails_except_forbidden(path, sig, args):
    args[b"s"] = [sig if isinstance(sig, bytes) else sig.encode("utf-8", "surrogatepass")]
    with pytest.raises(Forbidden):
        signing.verify(SECRET, "images", path, args)


# --- conditional requests ------------------------------------------------------------
# The rules themselves are asyncfile.conditional's (tests/asyncfile/test_conditional.py);
# imgserver's part is to use that code and answer its Unsatisfiable as a JSON 416.


def test_imgserver_uses_asyncfile_conditional():
    import asyncfile.conditional
    from imgserver import web

    assert web.conditional is asyncfile.conditional


def test_range_not_satisfiable_is_an_image_server_error():
    err = RangeNotSatisfiable(1234)
    assert isinstance(err, ImageServerError) and err.status == 416 and err.size == 1234
    assert (b"Content-Range", b"bytes */1234") in error_headers(err)
