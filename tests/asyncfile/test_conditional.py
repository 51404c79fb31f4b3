"""asyncfile.conditional: HTTP validators, preconditions and byte ranges as pure
functions (RFC 9110 §8.8, §13, §14) — table tests (the RFC's own examples
among them), hypothesis properties, and byte-for-byte agreement with
``twisted.web.static.File`` wherever static.File follows the RFC.
"""

from __future__ import annotations

import ast
import calendar
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import asyncfile.conditional as conditional
from asyncfile.conditional import (
    NOT_MODIFIED,
    OK,
    PRECONDITION_FAILED,
    Unsatisfiable,
    content_range,
    evaluate,
    http_date,
    multipart_byteranges,
    not_modified,
    parse_etags,
    parse_http_date,
    parse_range,
    parse_ranges,
    range_applies,
    select_range,
    select_ranges,
)

common = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

ETAG = '"abc-10-ff"'
MTIME = 1_700_000_000.75  # a file time with a fraction of a second
LAST_MODIFIED = http_date(MTIME)  # "Tue, 14 Nov 2023 22:13:20 GMT": whole seconds
NOW = MTIME + 3600


def test_the_module_is_pure():
    """No Twisted, no imgserver, no I/O: only these standard-library imports."""
    tree = ast.parse(Path(conditional.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module)
    assert imported <= {"__future__", "calendar", "re", "time", "collections.abc", "email.utils", "enum"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"open", "os", "print", "input"}


def test_http_date():
    assert http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert LAST_MODIFIED == "Tue, 14 Nov 2023 22:13:20 GMT"


# --- If-None-Match / If-Modified-Since -------------------------------------------


@pytest.mark.parametrize("header,expected", [
    (ETAG, True),
    ("W/" + ETAG, True),  # weak comparison for If-None-Match
    (f'"other", {ETAG}', True),
    (f'"other",{ETAG} ', True),
    ("*", True),
    ('"other"', False),
    ('"abc-10-fe"', False),
    ("", False),
    ("abc-10-ff", False),  # unquoted: not the same tag
])
def test_if_none_match(header, expected):
    assert not_modified(ETAG, MTIME, header, None) is expected


@pytest.mark.parametrize("header,expected", [
    (LAST_MODIFIED, True),  # the second of Last-Modified: the fraction is not compared
    ("Tue, 14 Nov 2023 22:13:21 GMT", True),
    ("Tue, 14 Nov 2023 22:13:19 GMT", False),
    ("Thu, 01 Jan 1970 00:00:00 GMT", False),
    ("Tuesday, 14-Nov-23 22:13:20 GMT", True),  # RFC 850 form
    ("Tue Nov 14 22:13:20 2023", True),  # asctime form
    ("yesterday", False),
    ("", False),
    ("Tue, 14 Nov 99999 22:13:20 GMT", False),
])
def test_if_modified_since(header, expected):
    assert not_modified(ETAG, MTIME, None, header) is expected


def test_if_none_match_wins_over_if_modified_since():
    assert not_modified(ETAG, MTIME, '"other"', LAST_MODIFIED) is False
    assert not_modified(ETAG, MTIME, ETAG, "Thu, 01 Jan 1970 00:00:00 GMT") is True


def test_no_validators():
    assert not_modified(ETAG, MTIME, None, None) is False


# --- If-Range --------------------------------------------------------------------


@pytest.mark.parametrize("header,expected", [
    (None, True),
    (ETAG, True),
    (f" {ETAG} ", True),
    ("W/" + ETAG, False),  # If-Range needs a strong match
    ('"other"', False),
    (LAST_MODIFIED, True),
    ("Tue, 14 Nov 2023 22:13:21 GMT", False),  # must be equal, not later
    ("Tue, 14 Nov 2023 22:13:19 GMT", False),
    ("garbage", False),
    ("", False),
])
def test_if_range(header, expected):
    assert range_applies(header, ETAG, MTIME, NOW) is expected


def test_if_range_date_is_weak_for_a_file_changed_within_the_last_second():
    assert range_applies(LAST_MODIFIED, ETAG, MTIME, MTIME + 0.1) is False
    assert range_applies(LAST_MODIFIED, ETAG, MTIME, MTIME + 1.0) is True


def test_if_range_with_a_weak_current_etag_never_matches():
    assert range_applies('W/"x"', 'W/"x"', MTIME, NOW) is False


# --- Range: one range (parse_range) --------------------------------------------------

SIZE = 1000


@pytest.mark.parametrize("header,expected", [
    (None, None),
    ("", None),
    ("bytes=0-99", (0, 100)),
    ("bytes=0-0", (0, 1)),
    ("bytes=999-999", (999, 1)),
    ("bytes=100-", (100, 900)),
    ("bytes=0-", (0, 1000)),
    ("bytes=900-5000", (900, 100)),  # the end is clamped
    ("bytes=-100", (900, 100)),  # suffix
    ("bytes=-1", (999, 1)),
    ("bytes=-5000", (0, 1000)),  # suffix longer than the file: all of it
    ("bytes=-99999999999999999999999", (0, 1000)),  # however long
    ("bytes=0000000000000000000000000000010-11", (10, 2)),  # leading zeros are still the number
    ("BYTES=0-9", (0, 10)),
    (" bytes = 0-9 ", (0, 10)),
    # ignored: the whole file is a valid answer
    ("bytes=0-1,5-6", None),  # several ranges
    ("bytes=0-1,", None),  # a comma at all
    ("items=0-9", None),
    ("bytes", None),
    ("bytes=", None),
    ("bytes=-", None),
    ("bytes=abc", None),
    ("bytes=a-b", None),
    ("bytes=5-1", None),  # last < first: invalid, not unsatisfiable
    ("bytes=5000-10", None),  # invalid even past the end
    ("bytes=+5-9", None),
    ("bytes=-+5", None),
    ("bytes=1.5-9", None),
    ("bytes=0x10-", None),
    ("bytes=1_0-20", None),  # int() would take it
    ("bytes=1 - 2", None),  # no spaces inside a range-spec
    ("bytes=--5", None),
    ("bytes=1-2-3", None),
    ("bytes=²-", None),  # a digit to str.isdigit, not to int()
    ("bytes=-²", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize("header", [
    "bytes=1000-",  # starts at the size
    "bytes=1000-1000",
    "bytes=5000-",
    "bytes=5000-6000",
    "bytes=-0",  # an empty suffix
    "bytes=99999999999999999999999-",  # a first-pos past any file (RFC 9110 §14.1.1: no overflow)
])
def test_unsatisfiable(header):
    with pytest.raises(Unsatisfiable):
        parse_range(header, SIZE)


def test_empty_file():
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-0", 0)
    # A non-zero suffix is satisfiable (RFC 9110 §14.1.2) but selects no
    # byte, which no 206 can say: the whole (empty) representation, 200.
    assert parse_range("bytes=-5", 0) is None
    assert parse_range("bytes=5-1", 0) is None


def test_unsatisfiable_carries_the_size():
    with pytest.raises(Unsatisfiable) as info:
        parse_range("bytes=5000-", SIZE)
    assert info.value.size == SIZE and info.value.status == 416
    assert isinstance(info.value, Exception)


# --- Range: several ranges (parse_ranges) ------------------------------------------------

# RFC 9110 §14.1.2's examples, on its 10000-byte representation.
RFC_SIZE = 10000


@pytest.mark.parametrize("header,expected", [
    ("bytes=0-499", [(0, 500)]),  # the first 500 bytes
    ("bytes=500-999", [(500, 500)]),  # the second 500 bytes
    ("bytes=-500", [(9500, 500)]),  # the final 500 bytes
    ("bytes=9500-", [(9500, 500)]),  # the final 500 bytes, again
    ("bytes=0-0,-1", [(0, 1), (9999, 1)]),  # the first and last bytes only
    # "Other valid (but not canonical) specifications of the second 500 bytes":
    # answered as asked, not merged.
    ("bytes=500-600,601-999", [(500, 101), (601, 399)]),
    ("bytes=500-700,601-999", [(500, 201), (601, 399)]),
])
def test_rfc_9110_examples(header, expected):
    assert parse_ranges(header, RFC_SIZE) == expected


@pytest.mark.parametrize("header,expected", [
    # request order is kept, neither sorted nor merged
    ("bytes=900-999,0-99", [(900, 100), (0, 100)]),
    ("bytes=0-99,50-149", [(0, 100), (50, 100)]),  # overlapping, within the size
    ("bytes=0-9,0-9", [(0, 10), (0, 10)]),
    # overlapping beyond the size: the whole representation is smaller (200)
    ("bytes=0-,0-", None),
    ("bytes=0-599,500-999", None),
    ("bytes=-600,0-599", None),
    # unsatisfiable ranges among satisfiable ones are dropped
    ("bytes=0-9,5000-6000", [(0, 10)]),  # one left: a single part
    ("bytes=5000-,0-9,-0,990-", [(0, 10), (990, 10)]),
    # clipped to the size
    ("bytes=990-5000,-5", [(990, 10), (995, 5)]),
    # list syntax: spaces/tabs around elements, empty elements skipped, unit in any case
    ("bytes= 0-1 ,\t2-3,,", [(0, 2), (2, 2)]),
    ("Bytes=,0-1", [(0, 2)]),
    # one invalid range-spec anywhere: the whole header is ignored
    ("bytes=0-1,5-1", None),
    ("bytes=0-1,x", None),
    ("bytes=0-1,-", None),
    ("bytes=,", None),
    ("bytes=0-1;2-3", None),
    ("items=0-1,2-3", None),
])
def test_parse_ranges(header, expected):
    assert parse_ranges(header, SIZE) == expected


@pytest.mark.parametrize("header", [
    "bytes=1000-,2000-",
    "bytes=-0,1000-1001",
    "bytes=5000-5001,-0,1000-",
])
def test_all_unsatisfiable(header):
    with pytest.raises(Unsatisfiable) as info:
        parse_ranges(header, SIZE)
    assert info.value.size == SIZE


def test_too_many_ranges_are_ignored():
    hundred = "bytes=" + ",".join(f"{i}-{i}" for i in range(100))
    assert parse_ranges(hundred, SIZE) == [(i, 1) for i in range(100)]
    assert parse_ranges(hundred + ",100-100", SIZE) is None  # 101: ignored, 200
    assert parse_ranges(hundred, SIZE, max_ranges=99) is None
    assert parse_ranges("bytes=0-1", SIZE, max_ranges=0) is None
    # Counted before satisfiability: 101 unsatisfiable ranges are not a 416.
    assert parse_ranges("bytes=" + ",".join(["5000-"] * 101), SIZE) is None
    # Empty elements are not ranges.
    assert parse_ranges("bytes=0-1" + "," * 500, SIZE) == [(0, 2)]


def test_empty_representation():
    with pytest.raises(Unsatisfiable):
        parse_ranges("bytes=0-,5-9,-0", 0)
    assert parse_ranges("bytes=0-,-5", 0) is None


def test_select_range():
    strong, weak = '"v1"', 'W/"v1"'
    lm = SECOND + 0.5
    now = lm + 10
    same, earlier = "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 22:13:19 GMT"
    assert select_range("GET", {"range": "bytes=0-9"}, 100, strong, lm, now) == (0, 10)
    assert select_range("HEAD", {"range": "bytes=0-9"}, 100, strong, lm, now) is None  # GET only
    assert select_range("HEAD", {"range": "bytes=500-"}, 100, strong, lm, now) is None  # no 416 either
    assert select_range("GET", {}, 100, strong, lm, now) is None
    assert select_range("GET", {"range": "bytes=0-9", "if-range": strong}, 100, strong, lm, now) == (0, 10)
    assert select_range("GET", {"range": "bytes=0-9", "if-range": weak}, 100, strong, lm, now) is None
    assert select_range("GET", {"range": "bytes=0-9", "if-range": same}, 100, strong, lm, now) == (0, 10)
    assert select_range("GET", {"range": "bytes=0-9", "if-range": earlier}, 100, strong, lm, now) is None
    # If-Range does not hold: the whole file, even for a range past the end.
    assert select_range("GET", {"range": "bytes=500-", "if-range": '"old"'}, 100, strong, lm, now) is None
    with pytest.raises(Unsatisfiable) as info:
        select_range("GET", {"range": "bytes=500-"}, 100, strong, lm, now)
    assert info.value.size == 100 and info.value.status == 416
    # Several ranges: select_range ignores them, select_ranges answers them.
    two = {"range": "bytes=0-9,20-29"}
    assert select_range("GET", two, 100, strong, lm, now) is None
    assert select_ranges("GET", two, 100, strong, lm, now) == [(0, 10), (20, 10)]
    assert select_ranges(b"GET", two, 100, strong, lm, now, max_ranges=1) is None
    assert select_ranges("HEAD", two, 100, strong, lm, now) is None
    assert select_ranges("GET", {**two, "if-range": '"old"'}, 100, strong, lm, now) is None
    assert select_ranges("GET", {**two, "if-range": strong}, 100, strong, lm, now) == [(0, 10), (20, 10)]


# --- Content-Range and multipart/byteranges -------------------------------------------------


def test_content_range():
    # RFC 9110 §14.4 and §15.3.7.1's examples.
    assert content_range(42, 1192, 1234) == "bytes 42-1233/1234"
    assert content_range(21010, 26012, 47022) == "bytes 21010-47021/47022"
    assert content_range(0, 1, 1) == "bytes 0-0/1"
    for bad in ((0, 0, 10), (-1, 2, 10), (5, 6, 10), (10, 1, 10)):
        with pytest.raises(ValueError):
            content_range(*bad)


def test_multipart_byteranges_rfc_9110_example():
    """RFC 9110 §14.6's example: two parts of an 8000-byte PDF."""
    ranges = parse_ranges("bytes=500-999,7000-7999", 8000)
    assert ranges == [(500, 500), (7000, 1000)]
    length, parts, trailer = multipart_byteranges(ranges, 8000, b"application/pdf", b"THIS_STRING_SEPARATES")
    assert parts == [
        (b"\r\n--THIS_STRING_SEPARATES\r\nContent-type: application/pdf\r\n"
         b"Content-range: bytes 500-999/8000\r\n\r\n", 500, 500),
        (b"\r\n--THIS_STRING_SEPARATES\r\nContent-type: application/pdf\r\n"
         b"Content-range: bytes 7000-7999/8000\r\n\r\n", 7000, 1000),
    ]
    assert trailer == b"\r\n--THIS_STRING_SEPARATES--\r\n"
    assert length == sum(len(h) + n for h, _, n in parts) + len(trailer)


def test_multipart_byteranges_without_a_content_type():
    _, parts, _ = multipart_byteranges([(0, 1)], 5, b"", b"b")
    assert parts == [(b"\r\n--b\r\nContent-range: bytes 0-0/5\r\n\r\n", 0, 1)]


@pytest.mark.parametrize("ranges,size,content_type,boundary", [
    ([], 10, b"text/plain", b"b"),  # no part
    ([(0, 11)], 10, b"text/plain", b"b"),  # past the end
    ([(0, 0)], 10, b"text/plain", b"b"),  # empty
    ([(0, 1)], 10, b"text/plain\r\nX-Evil: 1", b"b"),  # header injection
    ([(0, 1)], 10, b"text/plain", b""),  # boundary: 1 to 70 characters
    ([(0, 1)], 10, b"text/plain", b"x" * 71),
    ([(0, 1)], 10, b"text/plain", b"ends with a space "),
    ([(0, 1)], 10, b"text/plain", b"semi;colon"),
])
def test_multipart_byteranges_refuses_bad_arguments(ranges, size, content_type, boundary):
    with pytest.raises(ValueError):
        multipart_byteranges(ranges, size, content_type, boundary)


# --- twisted.web.static.File, where it follows the RFC: the same ranges, the same bytes -------


@pytest.fixture(scope="module")
def static_file(tmp_path_factory):
    """A static.File on a real 1000-byte file (its range methods read the size)."""
    from twisted.web import static

    path = tmp_path_factory.mktemp("static") / "f.txt"
    path.write_bytes(bytes(i % 251 for i in range(SIZE)))
    resource = static.File(str(path))
    resource.type = "text/plain"
    return resource


def _static_ranges(resource, header: str) -> list[tuple[int, int]]:
    """What static.File makes of a Range: its satisfiable (offset, length) pairs."""
    parsed = resource._parseRangeHeader(header.encode("latin-1"))
    found = [resource._rangeToOffsetAndSize(start, end) for start, end in parsed]
    return [r for r in found if r != (0, 0)]


# Headers both read the same way: lower-case unit, plain digits, suffixes no
# longer than the file (static.File computes a negative offset past that).
agreed_specs = st.one_of(
    st.builds(lambda a, n: f"{a}-{a + n}", st.integers(0, 1500), st.integers(0, 1500)),
    st.builds(lambda a: f"{a}-", st.integers(0, 1500)),
    st.builds(lambda n: f"-{n}", st.integers(0, SIZE)),
)
agreed_headers = st.lists(agreed_specs, min_size=1, max_size=6).map(lambda specs: "bytes=" + ",".join(specs))


@common
@given(agreed_headers)
@example("bytes=0-0,-1")
@example("bytes=500-600,601-999")
@example("bytes=0-,0-")
@example("bytes=1000-,-0")
def test_the_same_ranges_as_static_file(static_file, header):
    theirs = _static_ranges(static_file, header)
    if not theirs:
        with pytest.raises(Unsatisfiable):
            parse_ranges(header, SIZE)
        return
    ours = parse_ranges(header, SIZE)
    if sum(n for _, n in theirs) > SIZE:
        assert ours is None  # the documented difference: overlap beyond the size is ignored
    else:
        assert ours == theirs


@pytest.mark.parametrize("header,static_answer,ours", [
    ("bytes=-2000", [(-1000, 2000)], [(0, SIZE)]),  # static.File: a negative offset
    ("BYTES=0-9", ValueError, [(0, 10)]),  # static.File: unit case-sensitive
    ("bytes=+5-9", [(5, 5)], None),  # static.File: int() accepts a sign
    ("bytes=1_0-19", [(10, 10)], None),  # ... and underscores
    ("bytes=0-,0-", [(0, SIZE), (0, SIZE)], None),  # ... and any overlap
])
def test_where_static_file_differs(static_file, header, static_answer, ours):
    """Each difference listed in parse_ranges' docstring, checked against static.File itself."""
    if static_answer is ValueError:
        with pytest.raises(ValueError):
            static_file._parseRangeHeader(header.encode())
    else:
        assert _static_ranges(static_file, header) == static_answer
    assert parse_ranges(header, SIZE) == ours


@common
@given(st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)), min_size=1, max_size=5))
@example([(0, 10), (995, 5)])
def test_the_same_multipart_bytes_as_static_file(static_file, pairs):
    from twisted.web.test.requesthelper import DummyRequest

    ranges = [(offset, min(length, SIZE - offset)) for offset, length in pairs]
    request = DummyRequest([b""])
    info = static_file._doMultipleRangeRequest(request, [(o, o + n - 1) for o, n in ranges])
    boundary = re.search(rb'boundary="([^"]+)"', request.responseHeaders.getRawHeaders(b"content-type")[0])[1]
    length, parts, trailer = multipart_byteranges(ranges, SIZE, b"text/plain", boundary)
    assert [(h, o, n) for h, o, n in info[:-1]] == parts
    assert info[-1] == (trailer, 0, 0)
    assert request.responseHeaders.getRawHeaders(b"content-length") == [str(length).encode()]


# --- properties of the ranges ---------------------------------------------------------------

numbers = st.one_of(st.integers(0, 3000).map(str), st.sampled_from(["", "0", "00", "+1", " 1", "1 ", "x", "²",
                                                                    "99999999999999999999999"]))
range_specs = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", numbers, numbers),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda a: f"{a}-", st.integers(0, 3000)),
    st.builds(lambda a: f"-{a}", st.integers(0, 3000)),
    st.sampled_from(["", " ", "-", "--", "a-b", "1-2-3"]),
)
multi_range_headers = st.builds(
    lambda unit, specs, sep: unit + "=" + sep.join(specs),
    st.sampled_from(["bytes", "BYTES", " bytes ", "items", "byte", ""]),
    st.lists(range_specs, min_size=0, max_size=8),
    st.sampled_from([",", ", ", " ,\t", ";"]),
)
range_headers = st.one_of(
    multi_range_headers,
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, 3000)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(0, 3000)),
    st.text(max_size=30),
    st.just("bytes=99999999999999999999999999-"),
)


def _model(header: str, size: int, max_ranges: int = 100):
    """A plain reading of RFC 9110 §14.1 plus parse_ranges' documented choices."""
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return None
    elements = [e.strip(" \t") for e in spec.split(",") if e.strip(" \t")]
    if not elements or len(elements) > max_ranges:
        return None
    ranges, empty_suffix = [], False
    for element in elements:
        m = re.fullmatch(r"([0-9]*)-([0-9]*)", element, re.ASCII)
        if not m or m[1] == m[2] == "" or (m[1] and m[2] and int(m[2]) < int(m[1])):
            return None
        if m[1] == "":
            n = int(m[2])
            if n and size:
                ranges.append((max(0, size - n), min(n, size)))
            empty_suffix |= bool(n) and not size
        elif int(m[1]) < size:
            last = size - 1 if m[2] == "" else min(int(m[2]), size - 1)
            ranges.append((int(m[1]), last - int(m[1]) + 1))
    if not ranges:
        return None if empty_suffix else "416"
    if len(ranges) > 1 and sum(n for _, n in ranges) > size:
        return None
    return ranges


def _outcome(f, *args, **kwargs):
    try:
        return f(*args, **kwargs)
    except Unsatisfiable:
        return "416"


@common
@given(range_headers, st.integers(0, 2000))
@example("bytes=-0", 0)
@example("bytes=0-,0-", 10)
def test_parse_ranges_stays_inside_the_file(header, size):
    try:
        ranges = parse_ranges(header, size)
    except Unsatisfiable as e:
        assert e.size == size and e.status == 416
        return
    if ranges is not None:
        assert 1 <= len(ranges) <= 100
        for offset, length in ranges:
            assert 0 <= offset < size and 1 <= length and offset + length <= size
        if len(ranges) > 1:
            assert sum(length for _, length in ranges) <= size


@common
@given(multi_range_headers, st.integers(0, 2000), st.integers(0, 10))
@example("bytes=0-0,-1", 10000, 100)
def test_parse_ranges_matches_the_model(header, size, max_ranges):
    assume("99999999999999999999999" not in header)  # the model has no 19-digit cap
    assert _outcome(parse_ranges, header, size, max_ranges=max_ranges) == _model(header, size, max_ranges)


@common
@given(range_headers, st.integers(0, 2000))
def test_parse_range_is_parse_ranges_for_one_range(header, size):
    single = _outcome(parse_range, header, size)
    if "," in header.partition("=")[2]:
        assert single is None
        return
    many = _outcome(parse_ranges, header, size)
    assert single == (many[0] if isinstance(many, list) else many)
    if isinstance(many, list):
        assert len(many) == 1


@common
@given(st.sampled_from(["GET", "HEAD", "POST", b"GET"]), range_headers, st.one_of(st.none(), st.text(max_size=30)),
       st.integers(0, 2000))
def test_select_range_is_single_range_select_ranges(method, header, if_range, size):
    headers = {"range": header} if if_range is None else {"range": header, "if-range": if_range}
    args = (method, headers, size, '"v"', 1000.0, 5000.0)
    single = _outcome(select_range, *args)
    many = _outcome(select_ranges, *args)
    if "," not in header.partition("=")[2]:
        assert single == (many[0] if isinstance(many, list) else many)
    else:
        assert single is None


@common
@given(st.text(max_size=60), st.integers(0, 2000), st.dictionaries(
    st.sampled_from(["if-range", "if-match", "if-none-match", "if-modified-since"]), st.text(max_size=30)))
def test_never_raises_but_unsatisfiable(header, size, extra):
    for f in (parse_range, parse_ranges):
        try:
            f(header, size)
        except Unsatisfiable:
            pass
    try:
        select_ranges("GET", {**extra, "range": header}, size, '"v"', 1000.0, 5000.0)
    except Unsatisfiable:
        pass
    assert evaluate("GET", '"v"', 1000.0, extra) in (OK, NOT_MODIFIED, PRECONDITION_FAILED)


@common
@given(st.sampled_from(["HEAD", "POST", "PUT"]), range_headers, st.integers(0, 100))
def test_ranges_are_for_get_only(method, header, size):
    assert select_ranges(method, {"range": header}, size, '"v"', 0.0, now=10.0) is None


boundaries = st.text(alphabet="0123456789abcdefXYZ'()+_,-./:=? ", min_size=1, max_size=70).filter(
    lambda b: not b.endswith(" ")).map(str.encode)


@common
@given(st.integers(1, 3000).flatmap(lambda size: st.tuples(
    st.just(size), st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, size)), min_size=1, max_size=6))),
    st.sampled_from([b"", b"text/plain", b"image/jpeg", b"application/octet-stream; x=1"]), boundaries)
def test_multipart_content_length_is_the_body_framed(sized, content_type, boundary):
    size, pairs = sized
    ranges = [(offset, min(length, size - offset)) for offset, length in pairs]
    data = bytes(i % 251 for i in range(size))  # no CR LF in a row: never a delimiter
    length, parts, trailer = multipart_byteranges(ranges, size, content_type, boundary)
    body = b"".join(header + data[offset:offset + n] for header, offset, n in parts) + trailer
    assert len(body) == length
    # Read back: the delimiters split it into exactly the parts, in order.
    chunks = body.split(b"\r\n--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n" and len(chunks) == len(ranges) + 2
    for chunk, (offset, n) in zip(chunks[1:-1], ranges):
        head, _, content = chunk.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b""
        assert lines[-1] == f"Content-range: {content_range(offset, n, size)}".encode()
        assert lines[1:-1] == ([b"Content-type: " + content_type] if content_type else [])
        assert content == data[offset:offset + n]


@common
@given(st.integers(0, 10 ** 12), st.integers(1, 10 ** 12), st.integers(0, 10 ** 12))
def test_content_range_round_trips(offset, length, extra):
    size = offset + length + extra
    m = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)", content_range(offset, length, size))
    assert m and (int(m[1]), int(m[2]) - int(m[1]) + 1, int(m[3])) == (offset, length, size)


# --- HTTP dates: all three formats, as UTC ---------------------------------------------

SECOND = 1_700_000_000  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.fixture
def far_timezone(monkeypatch):
    """Local time far from UTC: a date read as local time would be hours off."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("value", [
    "Tue, 14 Nov 2023 22:13:20 GMT",  # IMF-fixdate
    "Tuesday, 14-Nov-23 22:13:20 GMT",  # RFC 850
    "Tue Nov 14 22:13:20 2023",  # asctime
    "  Tue, 14 Nov 2023 22:13:20 GMT ",  # optional whitespace around the value
])
def test_the_three_formats_are_utc(value, far_timezone):
    assert parse_http_date(value) == SECOND


def test_asctime_single_digit_day():
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == 784111777
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", now=SECOND) == 784111777


def test_rfc850_two_digit_years_are_at_most_50_years_ahead():
    now = SECOND  # 2023
    assert time.gmtime(parse_http_date("Sunday, 06-Nov-73 08:49:37 GMT", now=now)).tm_year == 2073
    assert time.gmtime(parse_http_date("Monday, 06-Nov-74 08:49:37 GMT", now=now)).tm_year == 1974


@pytest.mark.parametrize("value", [
    None, "", "yesterday", "Tue, 14 Nov 2023 22:13:20 UTC", "Tue, 14 Nov 2023 22:13:20 +0000",
    "Tue, 31 Nov 2023 22:13:20 GMT",  # no such day
    "Tue, 14 Nov 2023 24:13:20 GMT", "Tue, 14 Nov 2023 22:60:20 GMT",
    "Tue, 14 nov 2023 22:13:20 GMT",  # month names are case-sensitive
    "Tue, 14 Nov 2023 22:13:20 GMT, Wed, 15 Nov 2023 22:13:20 GMT",  # two lines joined
    "Tue, 14 Nov 99999 22:13:20 GMT", "Tue, 1 Nov 2023 22:13:20 GMT",
])
def test_invalid_dates(value):
    assert parse_http_date(value) is None


timestamps = st.integers(min_value=0, max_value=calendar.timegm((9999, 12, 31, 23, 59, 59)))


def _formats(t: int) -> tuple[str, str, str]:
    g = time.gmtime(t)
    days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    imf = http_date(t)
    rfc850 = f"{days[g.tm_wday]}, {g.tm_mday:02d}-{months[g.tm_mon - 1]}-{g.tm_year % 100:02d} " \
             f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} GMT"
    asctime = f"{days[g.tm_wday][:3]} {months[g.tm_mon - 1]} {g.tm_mday:2d} " \
              f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} {g.tm_year}"
    return imf, rfc850, asctime


@common
@given(timestamps)
def test_the_three_date_formats_round_trip_as_utc(t):
    imf, rfc850, asctime = _formats(t)
    assert parse_http_date(imf) == t
    assert parse_http_date(asctime) == t
    # A two-digit year is the one within 50 years of now (here: of t).
    assert parse_http_date(rfc850, now=t) == t


@common
@given(st.text(max_size=50))
def test_parse_http_date_never_raises(value):
    result = parse_http_date(value)
    assert result is None or isinstance(result, int)


# --- entity tags ---------------------------------------------------------------------------


def test_parse_etags():
    assert parse_etags('"a", W/"b",  "c,d"') == [(False, "a"), (True, "b"), (False, "c,d")]
    assert parse_etags("*") is None
    assert parse_etags('junk, "a", W/junk') == [(False, "a")]
    assert parse_etags("") == []
    assert parse_etags(None) == []


# --- evaluate(): RFC 9110 §13.2.2 -----------------------------------------------------------

STRONG, WEAK = '"v1"', 'W/"v1"'
LM = SECOND + 0.5
SAME, EARLIER, LATER = "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 22:13:19 GMT", "Tue, 14 Nov 2023 22:13:21 GMT"


@pytest.mark.parametrize("method,etag,headers,expected", [
    ("GET", STRONG, {}, OK),
    # If-Match: strong comparison
    ("GET", STRONG, {"if-match": STRONG}, OK),
    ("GET", STRONG, {"if-match": '"x", "v1"'}, OK),
    ("GET", STRONG, {"if-match": "*"}, OK),
    ("GET", STRONG, {"if-match": WEAK}, PRECONDITION_FAILED),
    ("GET", WEAK, {"if-match": WEAK}, PRECONDITION_FAILED),
    ("GET", WEAK, {"if-match": STRONG}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-match": '"x"'}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-match": ""}, PRECONDITION_FAILED),
    ("GET", None, {"if-match": STRONG}, PRECONDITION_FAILED),
    # If-Unmodified-Since, only without If-Match
    ("GET", STRONG, {"if-unmodified-since": SAME}, OK),
    ("GET", STRONG, {"if-unmodified-since": LATER}, OK),
    ("GET", STRONG, {"if-unmodified-since": EARLIER}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-unmodified-since": "garbage"}, OK),
    ("GET", STRONG, {"if-match": STRONG, "if-unmodified-since": EARLIER}, OK),
    # If-None-Match: weak comparison; 304 for GET/HEAD, 412 otherwise
    ("GET", STRONG, {"if-none-match": WEAK}, NOT_MODIFIED),
    ("HEAD", WEAK, {"if-none-match": STRONG}, NOT_MODIFIED),
    ("GET", STRONG, {"if-none-match": "*"}, NOT_MODIFIED),
    ("POST", STRONG, {"if-none-match": STRONG}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-none-match": '"x"'}, OK),
    # If-Modified-Since, only without If-None-Match, only for GET/HEAD
    ("GET", STRONG, {"if-modified-since": SAME}, NOT_MODIFIED),
    ("GET", STRONG, {"if-modified-since": EARLIER}, OK),
    ("POST", STRONG, {"if-modified-since": SAME}, OK),
    ("GET", STRONG, {"if-none-match": '"x"', "if-modified-since": SAME}, OK),
    ("GET", STRONG, {"if-none-match": STRONG, "if-modified-since": EARLIER}, NOT_MODIFIED),
    # The order: 412s first
    ("GET", STRONG, {"if-match": '"x"', "if-none-match": STRONG}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-unmodified-since": EARLIER, "if-none-match": STRONG}, PRECONDITION_FAILED),
    ("GET", STRONG, {"if-match": STRONG, "if-none-match": STRONG}, NOT_MODIFIED),
    (b"GET", STRONG, {"if-none-match": STRONG}, NOT_MODIFIED),
])
def test_evaluate(method, etag, headers, expected):
    assert evaluate(method, etag, LM, headers) is expected


def test_evaluate_without_last_modified_ignores_dates():
    assert evaluate("GET", STRONG, None, {"if-modified-since": SAME, "if-unmodified-since": EARLIER}) is OK


opaque = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=6)
etags = st.builds(lambda weak, o: ("W/" if weak else "") + f'"{o}"', st.booleans(), opaque)
tag_lists = st.one_of(
    st.just("*"),
    st.lists(etags, max_size=3).map(", ".join),
    st.text(max_size=20),
)
dates = st.one_of(timestamps.map(http_date), st.text(max_size=12))
headers_strategy = st.fixed_dictionaries({}, optional={
    "if-match": tag_lists, "if-none-match": tag_lists,
    "if-modified-since": dates, "if-unmodified-since": dates,
})
methods = st.sampled_from(["GET", "HEAD", "POST", b"GET", "get"])
last_modified = st.one_of(st.none(), timestamps.map(float), st.floats(0, 2e9, allow_nan=False))


@common
@given(methods, st.one_of(st.none(), etags), last_modified, headers_strategy)
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
@given(methods, etags, last_modified, headers_strategy)
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
    same, earlier = http_date(t), http_date(t - 1)
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


@common
@given(range_headers, etags, st.text(max_size=30), st.integers(1, 100))
def test_a_failed_if_range_means_the_whole_file(header, etag, if_range, size):
    if range_applies(if_range, etag, 1000.0, 5000.0):
        return
    for select in (select_range, select_ranges):
        assert select("GET", {"range": header, "if-range": if_range}, size, etag, 1000.0, now=5000.0) is None


@common
@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(1, 2000))
def test_parse_range_exact(a, b, size):
    assume(a <= b)
    header = f"bytes={a}-{b}"
    if a >= size:
        with pytest.raises(Unsatisfiable):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == (a, min(b, size - 1) - a + 1)
