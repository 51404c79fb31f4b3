"""Property tests (hypothesis) of the pure HTTP-side logic: URL paths, query
parameters, signatures, preconditions and ranges.

* paths: any input gives segments or one of the documented errors, never a
  path that leaves the root; decoding happens exactly once
  (``split_url_path(quote(p)) == split_decoded(p)``);
* query: ``parse_transform`` gives a spec or BadRequest, the same each time;
* signing: ``signed_url`` → the HTTP layer's parse → ``verify`` round-trips,
  and any change of endpoint, path, query or signature is refused;
* conditional: ``evaluate`` gives 200/304/412 for any headers, consistently
  with RFC 9110 §13.2.2; dates round-trip in all three formats; ranges stay
  inside the file.
"""

from __future__ import annotations

import calendar
import os
import time
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from imgserver import conditional, paths, signing
from imgserver.conditional import NOT_MODIFIED, OK, PRECONDITION_FAILED, Unsatisfiable, evaluate
from imgserver.errors import BadRequest, Forbidden, ImageServerError, NotFound
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


# --- dates -----------------------------------------------------------------------------

timestamps = st.integers(min_value=0, max_value=calendar.timegm((9999, 12, 31, 23, 59, 59)))


def _formats(t: int) -> tuple[str, str, str]:
    g = time.gmtime(t)
    days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    imf = conditional.http_date(t)
    rfc850 = f"{days[g.tm_wday]}, {g.tm_mday:02d}-{months[g.tm_mon - 1]}-{g.tm_year % 100:02d} " \
             f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} GMT"
    asctime = f"{days[g.tm_wday][:3]} {months[g.tm_mon - 1]} {g.tm_mday:2d} " \
              f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} {g.tm_year}"
    return imf, rfc850, asctime


@common
@given(timestamps)
def test_the_three_date_formats_round_trip_as_utc(t):
    imf, rfc850, asctime = _formats(t)
    assert conditional.parse_http_date(imf) == t
    assert conditional.parse_http_date(asctime) == t
    # A two-digit year is the one within 50 years of now (here: of t).
    assert conditional.parse_http_date(rfc850, now=t) == t


@common
@given(st.text(max_size=50))
def test_parse_http_date_never_raises(value):
    result = conditional.parse_http_date(value)
    assert result is None or isinstance(result, int)


# --- preconditions -------------------------------------------------------------------------

opaque = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=6)
etags = st.builds(lambda weak, o: ("W/" if weak else "") + f'"{o}"', st.booleans(), opaque)
tag_lists = st.one_of(
    st.just("*"),
    st.lists(etags, max_size=3).map(", ".join),
    st.text(max_size=20),
)
dates = st.one_of(timestamps.map(conditional.http_date), st.text(max_size=12))
headers = st.fixed_dictionaries({}, optional={
    "if-match": tag_lists, "if-none-match": tag_lists,
    "if-modified-since": dates, "if-unmodified-since": dates,
})
methods = st.sampled_from(["GET", "HEAD", "POST", b"GET", "get"])
last_modified = st.one_of(st.none(), timestamps.map(float), st.floats(0, 2e9, allow_nan=False))


@common
@given(methods, st.one_of(st.none(), etags), last_modified, headers)
def test_evaluate_is_total_and_deterministic(method, etag, modified, hdrs):
    outcome = evaluate(method, etag, modified, hdrs)
    assert outcome in (OK, NOT_MODIFIED, PRECONDITION_FAILED)
    assert evaluate(method, etag, modified, dict(hdrs)) == outcome
    if not hdrs:
        assert outcome == OK
    verb = (method.decode() if isinstance(method, bytes) else method).upper()
    if outcome == NOT_MODIFIED:
        assert verb in ("GET", "HEAD")


@common
@given(methods, etags, last_modified, headers)
def test_evaluate_follows_the_rfc_9110_order(method, etag, modified, hdrs):
    outcome = evaluate(method, etag, modified, hdrs)
    # 1. A failed If-Match decides, whatever else is sent.
    if "if-match" in hdrs and not conditional.strong_match(hdrs["if-match"], etag):
        assert outcome == PRECONDITION_FAILED
    # If-Match present: If-Unmodified-Since plays no part.
    if "if-match" in hdrs:
        without = {k: v for k, v in hdrs.items() if k != "if-unmodified-since"}
        assert evaluate(method, etag, modified, without) == outcome
    # If-None-Match present: If-Modified-Since plays no part.
    if "if-none-match" in hdrs:
        without = {k: v for k, v in hdrs.items() if k != "if-modified-since"}
        assert evaluate(method, etag, modified, without) == outcome
    # Preconditions that hold: a matching If-None-Match means 304 (GET/HEAD).
    passes = {k: v for k, v in hdrs.items() if k in ("if-modified-since",)}
    passes["if-none-match"] = etag
    verb = (method.decode() if isinstance(method, bytes) else method).upper()
    assert evaluate(method, etag, modified, passes) == (NOT_MODIFIED if verb in ("GET", "HEAD") else PRECONDITION_FAILED)
    # "*" always matches a current representation.
    assert evaluate(method, etag, modified, {"if-match": "*"}) == OK


@common
@given(etags, timestamps)
def test_dates_against_last_modified(etag, t):
    lm = float(t) + 0.75  # sub-second part: Last-Modified shows whole seconds
    same, earlier = conditional.http_date(t), conditional.http_date(t - 1)
    assert evaluate("GET", etag, lm, {"if-modified-since": same}) == NOT_MODIFIED
    assert evaluate("GET", etag, lm, {"if-modified-since": earlier}) == OK
    assert evaluate("GET", etag, lm, {"if-unmodified-since": same}) == OK
    assert evaluate("GET", etag, lm, {"if-unmodified-since": earlier}) == PRECONDITION_FAILED


@common
@given(etags)
def test_if_match_is_strong_and_if_none_match_weak(etag):
    weak = etag.startswith("W/")
    opaque_tag = etag.removeprefix("W/")
    assert evaluate("GET", etag, None, {"if-match": opaque_tag}) == (PRECONDITION_FAILED if weak else OK)
    assert evaluate("GET", etag, None, {"if-match": "W/" + opaque_tag}) == PRECONDITION_FAILED
    assert evaluate("GET", etag, None, {"if-none-match": "W/" + opaque_tag}) == NOT_MODIFIED
    assert evaluate("GET", etag, None, {"if-none-match": opaque_tag}) == NOT_MODIFIED


# --- ranges --------------------------------------------------------------------------------

range_headers = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, 3000)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(0, 3000)),
    st.text(max_size=30),
    st.just("bytes=99999999999999999999999999-"),
)


@common
@given(range_headers, st.integers(0, 2000))
def test_parse_range_stays_inside_the_file(header, size):
    try:
        wanted = conditional.parse_range(header, size)
    except Unsatisfiable as e:
        assert e.size == size and e.status == 416
        return
    if wanted is not None:
        offset, length = wanted
        assert 0 <= offset < size and 1 <= length and offset + length <= size


@common
@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(1, 2000))
def test_parse_range_exact(a, b, size):
    assume(a <= b)
    header = f"bytes={a}-{b}"
    if a >= size:
        with pytest.raises(Unsatisfiable):
            conditional.parse_range(header, size)
    else:
        assert conditional.parse_range(header, size) == (a, min(b, size - 1) - a + 1)


@common
@given(st.sampled_from(["HEAD", "POST", "PUT"]), range_headers, st.one_of(st.none(), etags), st.integers(0, 100))
def test_range_is_for_get_only(method, header, etag, size):
    assert conditional.select_range(method, {"range": header}, size, etag, 0.0, now=10.0) is None


@common
@given(range_headers, etags, st.text(max_size=30), st.integers(1, 100))
def test_a_failed_if_range_means_the_whole_file(header, etag, if_range, size):
    if conditional.range_applies(if_range, etag, 1000.0, 5000.0):
        return
    assert conditional.select_range("GET", {"range": header, "if-range": if_range}, size, etag, 1000.0,
                                    now=5000.0) is None


def test_errors_are_image_server_errors():
    assert issubclass(Unsatisfiable, ImageServerError) and Unsatisfiable(5).status == 416
