"""HTTP validators, preconditions and ranges, as pure functions (RFC 9110 §8.8, §13, §14).

* :func:`parse_http_date` reads the three HTTP date formats (IMF-fixdate,
  RFC 850, asctime), all as UTC; anything else is ``None`` (ignored, as RFC
  9110 §13.1.3/§13.1.4 require).
* :func:`evaluate` decides a request's preconditions in the order of RFC 9110
  §13.2.2 — If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since —
  and answers :data:`OK` (200: go on), :data:`NOT_MODIFIED` (304) or
  :data:`PRECONDITION_FAILED` (412).  If-Match compares entity tags strongly,
  If-None-Match weakly (§8.8.3.2).
* :func:`select_range` decides the range of a GET: Range only for GET, only
  when If-Range (a strong entity tag or the exact Last-Modified date of a
  strong validator) still holds; a single ``bytes=`` range; several ranges,
  other units and malformed headers are ignored (the whole representation is
  a valid answer); a well-formed range past the end raises
  :class:`Unsatisfiable` (416, with the size for ``Content-Range: bytes */size``).

Header values are ``str`` (latin-1 decoded) under lower-case names; a header
sent on several lines is one value joined with ``", "`` (which makes a date
invalid, as it should).  Nothing here raises on any input but the documented
:class:`Unsatisfiable`.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from enum import IntEnum

from .errors import PreconditionFailed, RangeNotSatisfiable

__all__ = [
    "Outcome",
    "OK",
    "NOT_MODIFIED",
    "PRECONDITION_FAILED",
    "evaluate",
    "select_range",
    "parse_range",
    "range_applies",
    "parse_http_date",
    "http_date",
    "parse_etags",
    "strong_match",
    "weak_match",
    "not_modified",
    "Unsatisfiable",
    "RangeNotSatisfiable",
    "PreconditionFailed",
    "CONDITIONAL_HEADERS",
]

#: The request headers this module reads (lower case).
CONDITIONAL_HEADERS = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
                       "if-range", "range")


class Outcome(IntEnum):
    """What the preconditions decided: the status to answer (200 = go on)."""

    OK = 200
    NOT_MODIFIED = 304
    PRECONDITION_FAILED = 412


OK = Outcome.OK
NOT_MODIFIED = Outcome.NOT_MODIFIED
PRECONDITION_FAILED = Outcome.PRECONDITION_FAILED


#: A Range no byte of the representation satisfies: 416, answered as a JSON
#: error with ``Content-Range: bytes */<size>`` (``errors.RangeNotSatisfiable``).
Unsatisfiable = RangeNotSatisfiable


# --- dates -----------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(_DAY + r", ([0-9]{2}) " + _MONTH + r" ([0-9]{4}) " + _TIME + r" GMT")
_RFC850 = re.compile(_DAY_LONG + r", ([0-9]{2})-" + _MONTH + r"-([0-9]{2}) " + _TIME + r" GMT")
_ASCTIME = re.compile(_DAY + r" " + _MONTH + r" ([0-9]{2}| [0-9]) " + _TIME + r" ([0-9]{4})")


def http_date(seconds: float) -> str:
    """IMF-fixdate of ``seconds`` since the epoch (whole seconds, GMT)."""
    return formatdate(seconds, usegmt=True)


def _timestamp(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int | None:
    if not (1 <= day <= calendar.monthrange(year, month)[1] and hour <= 23 and minute <= 59
            and second <= 60):
        return None
    return calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))


def parse_http_date(value: str | None, now: float | None = None) -> int | None:
    """Seconds since the epoch (UTC) of an HTTP-date (RFC 9110 §5.6.7); None
    unless ``value`` is exactly one IMF-fixdate, RFC 850 or asctime date.

    An RFC 850 two-digit year more than 50 years in the future (from ``now``,
    default: the clock) is the most recent past year with those digits.
    """
    if not isinstance(value, str):
        return None
    text = value.strip(" \t")
    if len(text) > 40:
        return None
    m = _IMF_FIXDATE.fullmatch(text)
    if m:
        day, month, year, hh, mm, ss = m.groups()
        return _timestamp(int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss))
    m = _RFC850.fullmatch(text)
    if m:
        day, month, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year - this_year % 100 + int(yy)
        if year > this_year + 50:
            year -= 100
        return _timestamp(year, _MONTHS[month], int(day), int(hh), int(mm), int(ss))
    m = _ASCTIME.fullmatch(text)
    if m:
        month, day, hh, mm, ss, year = m.groups()
        return _timestamp(int(year), _MONTHS[month], int(day), int(hh), int(mm), int(ss))
    return None


# --- entity tags -------------------------------------------------------------------

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE ; etagc = %x21 / %x23-7E / obs-text
_ENTITY_TAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_LIST_SEPARATOR = re.compile(r"[ \t,]*")


def parse_etags(header: str | None) -> list[tuple[bool, str]] | None:
    """The entity tags of an If-Match / If-None-Match value as ``(weak, opaque)``
    pairs; None for ``*``.  Members that are not entity tags are skipped (they
    match nothing)."""
    if header is None:
        return []
    if header.strip(" \t") == "*":
        return None
    tags: list[tuple[bool, str]] = []
    pos, end = 0, len(header)
    while pos < end:
        pos = _LIST_SEPARATOR.match(header, pos).end()
        if pos >= end:
            break
        m = _ENTITY_TAG.match(header, pos)
        if m and (m.end() == end or header[m.end()] in " \t,"):
            tags.append((m.group(1) is not None, m.group(2)))
            pos = m.end()
        else:  # not an entity tag: skip to the next member
            comma = header.find(",", pos)
            pos = end if comma < 0 else comma + 1
    return tags


def _tag(etag: str | None) -> tuple[bool, str] | None:
    if etag is None:
        return None
    m = _ENTITY_TAG.fullmatch(etag.strip())
    return (m.group(1) is not None, m.group(2)) if m else None


def strong_match(header: str, etag: str | None) -> bool:
    """Whether an If-Match value matches ``etag`` (strong comparison; ``*``
    matches any current representation)."""
    tags = parse_etags(header)
    if tags is None:
        return True
    current = _tag(etag)
    if current is None or current[0]:
        return False  # a weak (or no) current tag never matches strongly
    return any(not weak and opaque == current[1] for weak, opaque in tags)


def weak_match(header: str, etag: str | None) -> bool:
    """Whether an If-None-Match value matches ``etag`` (weak comparison)."""
    tags = parse_etags(header)
    if tags is None:
        return True
    current = _tag(etag)
    if current is None:
        return False
    return any(opaque == current[1] for _, opaque in tags)


# --- preconditions -------------------------------------------------------------------


def _method(method: str | bytes) -> str:
    if isinstance(method, (bytes, bytearray)):
        method = bytes(method).decode("latin-1")
    return method.upper()


def evaluate(method: str | bytes, etag: str | None, last_modified: float | None,
             headers: Mapping[str, str]) -> Outcome:
    """The outcome of a request's preconditions (RFC 9110 §13.2.2).

    ``etag`` is the current representation's entity tag (``'"x"'`` or
    ``'W/"x"'``) or None; ``last_modified`` its modification time in seconds
    (compared at the whole second sent in Last-Modified) or None; ``headers``
    maps lower-case names to values (see the module docstring).

    1. If-Match: no strong match → 412 (then If-Unmodified-Since is ignored).
    2. else If-Unmodified-Since (a valid date): modified since → 412.
    3. If-None-Match: a weak match → 304 for GET/HEAD, 412 otherwise (then
       If-Modified-Since is ignored).
    4. else, for GET/HEAD, If-Modified-Since (a valid date): not modified since → 304.
    5. otherwise 200.
    """
    verb = _method(method)
    modified = int(last_modified) if last_modified is not None else None
    if_match = headers.get("if-match")
    if if_match is not None:
        if not strong_match(if_match, etag):
            return PRECONDITION_FAILED
    else:
        since = parse_http_date(headers.get("if-unmodified-since"))
        if since is not None and modified is not None and modified > since:
            return PRECONDITION_FAILED
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if weak_match(if_none_match, etag):
            return NOT_MODIFIED if verb in ("GET", "HEAD") else PRECONDITION_FAILED
    elif verb in ("GET", "HEAD"):
        since = parse_http_date(headers.get("if-modified-since"))
        if since is not None and modified is not None and modified <= since:
            return NOT_MODIFIED
    return OK


def not_modified(etag: str, mtime: float, if_none_match: str | None, if_modified_since: str | None) -> bool:
    """Whether a GET with only these two headers gets 304 (see :func:`evaluate`)."""
    headers = {}
    if if_none_match is not None:
        headers["if-none-match"] = if_none_match
    if if_modified_since is not None:
        headers["if-modified-since"] = if_modified_since
    return evaluate("GET", etag, mtime, headers) is NOT_MODIFIED


# --- ranges ----------------------------------------------------------------------------


def range_applies(if_range: str | None, etag: str | None, mtime: float | None, now: float) -> bool:
    """Whether a Range may be honoured, given the request's If-Range (RFC 9110 §13.1.5).

    Without If-Range, yes.  An entity tag must be strong and equal to the
    current ``etag`` (strong comparison); a date must equal the Last-Modified
    second, and only counts if that is a strong validator, i.e. at least a
    second older than ``now`` (§8.8.2.2).  Anything else: send the whole
    representation.
    """
    if if_range is None:
        return True
    value = if_range.strip(" \t")
    if value.startswith(("W/", '"')):
        given, current = _tag(value), _tag(etag)
        return (given is not None and current is not None and not given[0] and not current[0]
                and given[1] == current[1])
    since = parse_http_date(value)
    if since is None or mtime is None:
        return False
    return int(mtime) == since and mtime <= now - 1


_RANGE_NUMBER = re.compile(r"[0-9]{1,19}")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(offset, length)`` for a single-range ``bytes=`` header; None to send it all.

    Several ranges, other units and malformed headers are ignored (the whole
    file is a valid answer); a well-formed range past the end raises
    :class:`Unsatisfiable` (carrying ``size``).  The result always lies
    inside ``[0, size)`` with ``length >= 1``.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip(" \t").lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip(" \t").partition("-")
    if not dash:
        return None
    if first == "":
        if not _RANGE_NUMBER.fullmatch(last):
            return None
        suffix = int(last)
        if suffix == 0 or size <= 0:
            raise Unsatisfiable(size)
        start = max(0, size - suffix)
        return start, size - start
    if not _RANGE_NUMBER.fullmatch(first) or (last and not _RANGE_NUMBER.fullmatch(last)):
        return None
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None  # an invalid range-spec: the header is ignored (RFC 9110 §14.1.1)
    if start >= size:  # also "bytes=<size>-": no byte satisfies it
        raise Unsatisfiable(size)
    end = size - 1 if end is None else min(end, size - 1)
    return start, end - start + 1


def select_range(method: str | bytes, headers: Mapping[str, str], size: int, etag: str | None,
                 last_modified: float | None, now: float | None = None) -> tuple[int, int] | None:
    """``(offset, length)`` to answer 206 with, or None to answer the whole
    representation (200); raises :class:`Unsatisfiable` for 416.

    Range is only for GET (RFC 9110 §14.2: HEAD and others ignore it), and
    only while If-Range (if sent) holds; evaluate the preconditions first
    (:func:`evaluate`).
    """
    if _method(method) != "GET":
        return None
    header = headers.get("range")
    if header is None:
        return None
    if not range_applies(headers.get("if-range"), etag, last_modified,
                         time.time() if now is None else now):
        return None
    return parse_range(header, size)
