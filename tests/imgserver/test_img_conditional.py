"""The pure HTTP validator and range rules of imgserver.conditional."""

from __future__ import annotations

import pytest

from imgserver.conditional import Unsatisfiable, http_date, not_modified, parse_range, range_applies

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
