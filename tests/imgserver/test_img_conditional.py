"""The pure HTTP validator, precondition and range rules of imgserver.conditional (RFC 9110)."""

from __future__ import annotations

import time

import pytest

from imgserver.conditional import (
    NOT_MODIFIED,
    OK,
    PRECONDITION_FAILED,
    Unsatisfiable,
    evaluate,
    http_date,
    not_modified,
    parse_etags,
    parse_http_date,
    parse_range,
    range_applies,
    select_range,
)

ETAG = '"abc-10-ff"'
MTIME = 1_700_000_000.75  # a file time with a fraction of a second
LAST_MODIFIED = http_date(MTIME)  # "Tue, 14 Nov 2023 22:13:20 GMT": whole seconds
NOW = MTIME + 3600


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


# --- Range -------------------------------------------------------------------------

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
    ("BYTES=0-9", (0, 10)),
    (" bytes = 0-9 ", (0, 10)),
    # ignored: the whole file is a valid answer
    ("bytes=0-1,5-6", None),  # several ranges
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
])
def test_unsatisfiable(header):
    with pytest.raises(Unsatisfiable):
        parse_range(header, SIZE)


def test_empty_file():
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-5", 0)
    assert parse_range("bytes=5-1", 0) is None


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


# --- entity tags ---------------------------------------------------------------------------


def test_parse_etags():
    assert parse_etags('"a", W/"b",  "c,d"') == [(False, "a"), (True, "b"), (False, "c,d")]
    assert parse_etags("*") is None
    assert parse_etags('junk, "a", W/junk') == [(False, "a")]
    assert parse_etags("") == []


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


# --- select_range ----------------------------------------------------------------------------


def test_select_range():
    now = LM + 10
    assert select_range("GET", {"range": "bytes=0-9"}, 100, STRONG, LM, now) == (0, 10)
    assert select_range("HEAD", {"range": "bytes=0-9"}, 100, STRONG, LM, now) is None  # GET only
    assert select_range("HEAD", {"range": "bytes=500-"}, 100, STRONG, LM, now) is None  # no 416 either
    assert select_range("GET", {}, 100, STRONG, LM, now) is None
    assert select_range("GET", {"range": "bytes=0-9", "if-range": STRONG}, 100, STRONG, LM, now) == (0, 10)
    assert select_range("GET", {"range": "bytes=0-9", "if-range": WEAK}, 100, STRONG, LM, now) is None
    assert select_range("GET", {"range": "bytes=0-9", "if-range": SAME}, 100, STRONG, LM, now) == (0, 10)
    assert select_range("GET", {"range": "bytes=0-9", "if-range": EARLIER}, 100, STRONG, LM, now) is None
    # If-Range does not hold: the whole file, even for a range past the end.
    assert select_range("GET", {"range": "bytes=500-", "if-range": '"old"'}, 100, STRONG, LM, now) is None
    with pytest.raises(Unsatisfiable) as info:
        select_range("GET", {"range": "bytes=500-"}, 100, STRONG, LM, now)
    assert info.value.size == 100 and info.value.status == 416


def test_unsatisfiable_carries_the_size():
    with pytest.raises(Unsatisfiable) as info:
        parse_range("bytes=5000-", SIZE)
    assert info.value.size == SIZE
