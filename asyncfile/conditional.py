"""HTTP validators, preconditions and byte ranges, as pure functions (RFC 9110 §8.8, §13, §14).

Nothing here imports Twisted or does I/O: a server (``asyncfile.web.File``,
imgserver) reads the request's headers into a mapping, asks these functions
what to answer, and does the answering itself.  So the rules exist once and
are tested once, without a reactor.

* :func:`parse_http_date` reads the three HTTP date formats (IMF-fixdate,
  RFC 850, asctime), all as UTC; anything else is ``None`` (ignored, as RFC
  9110 §13.1.3/§13.1.4 require).  :func:`http_date` writes IMF-fixdate.
* :func:`evaluate` decides a request's preconditions in the order of RFC 9110
  §13.2.2 — If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since —
  and answers :data:`OK` (200: go on), :data:`NOT_MODIFIED` (304) or
  :data:`PRECONDITION_FAILED` (412).  If-Match compares entity tags strongly,
  If-None-Match weakly (§8.8.3.2).
* :func:`select_range` / :func:`select_ranges` decide the range(s) of a GET:
  Range only for GET, only while If-Range (a strong entity tag, or the exact
  Last-Modified date of a strong validator) still holds (§13.1.5, §14.2).
  :func:`parse_range` takes a single range and ignores several;
  :func:`parse_ranges` takes up to ``max_ranges`` (see it for exactly what
  happens to overlapping, unordered, too many and unsatisfiable ranges).
  When no range is satisfiable they raise :class:`Unsatisfiable` (416, with
  the size for ``Content-Range: bytes */size``).
* :func:`content_range` and :func:`multipart_byteranges` write the
  ``Content-Range`` value and the ``multipart/byteranges`` framing (§14.4,
  §14.6) with its exact Content-Length, so the body can be streamed.

Header values are ``str`` (latin-1 decoded) under lower-case names; a header
sent on several lines is one value joined with ``", "`` (which makes a date
invalid, as it should, and several Range lines several ranges).  Nothing here
raises on any header value but the documented :class:`Unsatisfiable`; the
framing functions raise ``ValueError`` for arguments a server made wrong.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping, Sequence
from email.utils import formatdate
from enum import IntEnum

__all__ = [
    "Outcome",
    "OK",
    "NOT_MODIFIED",
    "PRECONDITION_FAILED",
    "CONDITIONAL_HEADERS",
    "Unsatisfiable",
    "evaluate",
    "not_modified",
    "range_applies",
    "parse_range",
    "parse_ranges",
    "select_range",
    "select_ranges",
    "content_range",
    "multipart_byteranges",
    "parse_http_date",
    "http_date",
    "parse_etags",
    "strong_match",
    "weak_match",
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


class Unsatisfiable(Exception):
    """A well-formed Range that no byte of the representation satisfies: answer
    416 with ``Content-Range: bytes */<size>`` (RFC 9110 §15.5.17).

    ``size`` is the length the ranges were checked against; ``status`` is 416.
    """

    status = 416

    def __init__(self, size: int, message: str | None = None) -> None:
        self.size = int(size)
        super().__init__(message or f"no range is satisfiable (size {self.size})")


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
        while pos < end and header[pos] in " \t,":
            pos += 1
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


_DIGITS = re.compile(r"[0-9]+")
# Past any file's size (2**63 - 1 at most): a position with more than 19
# significant digits compares as this, so a long number costs no int() work
# and never hits int()'s digit limit (RFC 9110 §14.1.1 asks for no overflow).
_HUGE = 10 ** 19
_SUFFIX = -1  # marks (first, last) = (_SUFFIX, suffix-length)


def _position(text: str) -> int | None:
    """A 1*DIGIT value (ASCII digits only: no sign, space, ``_`` or ``²``)."""
    if not _DIGITS.fullmatch(text):
        return None
    significant = text.lstrip("0")
    return _HUGE if len(significant) > 19 else int(significant or "0")


def _range_spec(text: str) -> tuple[int, int | None] | None:
    """``(first, last)`` (``last`` None when open), ``(_SUFFIX, length)``, or
    None for an invalid range-spec (RFC 9110 §14.1.2)."""
    first, dash, last = text.partition("-")
    if not dash:
        return None
    if first == "":
        length = _position(last)
        return None if length is None else (_SUFFIX, length)
    start = _position(first)
    if start is None:
        return None
    if last == "":
        return start, None
    end = _position(last)
    if end is None or end < start:
        return None  # last-pos < first-pos: invalid, not unsatisfiable
    return start, end


def parse_ranges(header: str | None, size: int, *, max_ranges: int = 100) -> list[tuple[int, int]] | None:
    """Every satisfiable range of a ``bytes=`` Range header as ``(offset, length)``,
    in request order, clipped to ``size``; None to ignore the header (answer
    the whole representation, 200); raises :class:`Unsatisfiable` (416).

    Each result lies inside ``[0, size)`` with ``length >= 1``.  RFC 9110
    §14.2 lets a server ignore Range; what this does, case by case:

    * **syntax** (§14.1.1, §14.1.2): the unit is ``bytes`` in any case, with
      optional spaces/tabs around it and around each range-spec; empty list
      elements are skipped (§5.6.1); positions are ASCII digits only.  Any
      invalid range-spec (``5-1``, ``a-b``, ``+5-``, ``-``…), another unit, or
      no range at all: the header is ignored (None).
    * **too many**: more than ``max_ranges`` range-specs (empty elements not
      counted): ignored (None), whatever they are.
    * **unsatisfiable among satisfiable** (first-pos at or past the end, or
      ``-0``): dropped; the others are answered (§14.1.1: a set is
      satisfiable if one of its ranges is; §15.3.7.2).
    * **all unsatisfiable**: :class:`Unsatisfiable`, even for a single one.
    * **past the end**: ``last-pos`` past the end is clipped, a suffix longer
      than the representation selects all of it (§14.1.2).
    * **order and overlap**: kept as requested, neither sorted nor merged
      (§15.3.7.2: parts SHOULD come in request order; merging is optional).
      But if the ranges add up to more bytes than the representation has —
      possible only when they overlap, as in ``0-,0-,0-`` — the header is
      ignored (None): the whole representation is smaller than that answer
      and nobody gets it many times over (§17.15; nginx does the same).
      Overlaps that stay within the size (``0-99,50-149``) are answered.
    * **an empty representation** (``size == 0``): no first-pos is
      satisfiable (416); a non-zero suffix is (§14.1.2) but selects no byte,
      which no 206 can express: the header is ignored (None, a 200 with the
      empty body).

    One satisfiable range is one range: a server answers it as a single-part
    206 even when several were asked for (§15.3.7.2 allows either; nginx and
    Apache do this).

    ``twisted.web.static.File`` (``_parseRangeHeader``,
    ``_rangeToOffsetAndSize``, ``_doMultipleRangeRequest``) gives the same
    ranges where the RFC is clear, and differs here (this follows the RFC):

    * a suffix longer than the file gives it a negative offset (a
      ``Content-Range`` of ``bytes -5-9/10`` and a failed seek); here the
      whole file;
    * the unit is compared case-sensitively (``BYTES=0-9`` is ignored there;
      §14.1: units are case-insensitive);
    * positions go through ``int()``, so ``+5``, ``1_0`` and spaces inside a
      range-spec are accepted there; here they make the header invalid
      (ignored: 200);
    * no bound on the number of ranges, nor on overlap: ``bytes=0-,0-,…``
      sends the file once per range there; here 200 (see above);
    * several ranges of which one is satisfiable: a multipart body with one
      part there, a single-part 206 here;
    * several ranges none of which is satisfiable: static.File sets 416 and
      then fails in its producer (a 500); here :class:`Unsatisfiable` (416);
    * a suffix on an empty file: a negative offset there, 200 here.
    """
    if not header:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes":
        return None
    elements = [element for element in (e.strip(" \t") for e in spec.split(",")) if element]
    if not elements or len(elements) > max_ranges:
        return None
    specs = []
    for element in elements:
        parsed = _range_spec(element)
        if parsed is None:
            return None
        specs.append(parsed)
    ranges: list[tuple[int, int]] = []
    empty_suffix = False
    for first, last in specs:
        if first == _SUFFIX:
            assert last is not None
            if last == 0:
                continue  # "-0": unsatisfiable
            if size <= 0:
                empty_suffix = True
                continue
            start = max(0, size - last)
            ranges.append((start, size - start))
        elif first < size:
            end = size - 1 if last is None else min(last, size - 1)
            ranges.append((first, end - first + 1))
    if not ranges:
        if empty_suffix:
            return None
        raise Unsatisfiable(size)
    if len(ranges) > 1 and sum(length for _, length in ranges) > size:
        return None
    return ranges


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(offset, length)`` for a single-range ``bytes=`` header; None to send it all.

    Several ranges (any comma), other units and malformed headers are
    ignored (the whole file is a valid answer); a well-formed range past the
    end raises :class:`Unsatisfiable` (carrying ``size``).  The result always
    lies inside ``[0, size)`` with ``length >= 1``.  One range is read
    exactly as :func:`parse_ranges` reads it.
    """
    if not header or "," in header.partition("=")[2]:
        return None
    ranges = parse_ranges(header, size, max_ranges=1)
    return None if ranges is None else ranges[0]


def _applicable_range(method: str | bytes, headers: Mapping[str, str], etag: str | None,
                      last_modified: float | None, now: float | None) -> str | None:
    """The Range header if this request may have ranges: GET only (RFC 9110
    §14.2: HEAD and others ignore it), and only while If-Range holds."""
    if _method(method) != "GET":
        return None
    header = headers.get("range")
    if header is None:
        return None
    if not range_applies(headers.get("if-range"), etag, last_modified,
                         time.time() if now is None else now):
        return None
    return header


def select_range(method: str | bytes, headers: Mapping[str, str], size: int, etag: str | None,
                 last_modified: float | None, now: float | None = None) -> tuple[int, int] | None:
    """``(offset, length)`` to answer 206 with, or None to answer the whole
    representation (200); raises :class:`Unsatisfiable` for 416.

    Range is only for GET (RFC 9110 §14.2: HEAD and others ignore it), and
    only while If-Range (if sent) holds; evaluate the preconditions first
    (:func:`evaluate`).  Several ranges are ignored (:func:`parse_range`).
    """
    header = _applicable_range(method, headers, etag, last_modified, now)
    return None if header is None else parse_range(header, size)


def select_ranges(method: str | bytes, headers: Mapping[str, str], size: int, etag: str | None,
                  last_modified: float | None, now: float | None = None, *,
                  max_ranges: int = 100) -> list[tuple[int, int]] | None:
    """The ranges to answer 206 with (one: a single part; several:
    ``multipart/byteranges``), or None to answer the whole representation
    (200); raises :class:`Unsatisfiable` for 416.

    :func:`select_range`'s rules (GET only, If-Range) with :func:`parse_ranges`'s.
    """
    header = _applicable_range(method, headers, etag, last_modified, now)
    return None if header is None else parse_ranges(header, size, max_ranges=max_ranges)


def content_range(offset: int, length: int, size: int) -> str:
    """The ``Content-Range`` value of a 206 part: ``bytes first-last/size`` (RFC 9110 §14.4)."""
    if offset < 0 or length < 1 or offset + length > size:
        raise ValueError(f"range ({offset}, {length}) is not inside a representation of {size} bytes")
    return f"bytes {offset}-{offset + length - 1}/{size}"


# RFC 2046 §5.1.1: 1-70 of these, not ending with a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def multipart_byteranges(ranges: Sequence[tuple[int, int]], size: int, content_type: bytes,
                         boundary: bytes) -> tuple[int, list[tuple[bytes, int, int]], bytes]:
    """The framing of a ``multipart/byteranges`` body (RFC 9110 §14.6):
    ``(content_length, [(part_header, offset, length), ...], trailer)``.

    A server sends ``Content-Type: multipart/byteranges; boundary=<boundary>``
    and ``Content-Length: <content_length>``, then for each part its
    ``part_header`` followed by ``length`` bytes of the representation from
    ``offset``, then ``trailer``; ``content_length`` is exactly the length of
    all that.  Each part header is ``CRLF --boundary CRLF``, ``Content-type:
    <content_type> CRLF`` (left out when ``content_type`` is empty: a part
    carries the Content-Type a 200 would have), ``Content-range: bytes
    first-last/size CRLF CRLF``; the trailer ``CRLF --boundary-- CRLF``.

    These are the bytes ``twisted.web.static.File`` writes, field-name case
    included (names are case-insensitive, §5.1), so a drop-in answers
    byte for byte what it does but for the boundary (static.File quotes it in
    the header: ``boundary="..."``; it uses ``bytes`` as the part type of a
    file with no type).  The boundary must not occur in the content: use a
    random one (e.g. ``os.urandom(16).hex()``), not a clock.

    Raises ValueError for no ranges, a range outside ``[0, size)``, a
    boundary that RFC 2046 does not allow, or a content type with CR, LF or NUL.
    """
    if not ranges:
        raise ValueError("a multipart/byteranges body needs at least one range")
    if not _BOUNDARY.fullmatch(boundary):
        raise ValueError(f"not an RFC 2046 boundary: {boundary!r}")
    if any(c in content_type for c in b"\r\n\0"):
        raise ValueError(f"not a header value: {content_type!r}")
    type_line = b"Content-type: " + content_type + b"\r\n" if content_type else b""
    delimiter = b"\r\n--" + boundary + b"\r\n"
    parts = []
    total = 0
    for offset, length in ranges:
        header = (delimiter + type_line + b"Content-range: "
                  + content_range(offset, length, size).encode("ascii") + b"\r\n\r\n")
        parts.append((header, offset, length))
        total += len(header) + length
    trailer = b"\r\n--" + boundary + b"--\r\n"
    return total + len(trailer), parts, trailer
