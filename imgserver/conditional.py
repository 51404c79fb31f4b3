"""HTTP validators and ranges, as pure functions (RFC 9110 §13, §14)."""

from __future__ import annotations

from email.utils import formatdate, parsedate_to_datetime

__all__ = ["not_modified", "parse_range", "range_applies", "http_date", "Unsatisfiable"]


class Unsatisfiable(Exception):
    """A Range no byte of the file satisfies: 416."""


def http_date(seconds: float) -> str:
    return formatdate(seconds, usegmt=True)


def _etags(header: str) -> list[str]:
    return [t.strip().removeprefix("W/") for t in header.split(",") if t.strip()]


def not_modified(etag: str, mtime: float, if_none_match: str | None, if_modified_since: str | None) -> bool:
    """Whether a GET/HEAD with these headers gets 304.

    If-None-Match wins over If-Modified-Since when both are sent (§13.1.3).
    """
    if if_none_match is not None:
        tags = _etags(if_none_match)
        return "*" in tags or etag.removeprefix("W/") in tags
    if if_modified_since is not None:
        since = _parse_date(if_modified_since)
        return since is not None and int(mtime) <= since
    return False


def _parse_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def range_applies(if_range: str | None, etag: str, mtime: float, now: float) -> bool:
    """Whether a Range may be honoured, given the request's If-Range (§13.1.5).

    Without If-Range, yes.  An entity tag must be strong and equal to the
    current ``etag``; a date must equal the Last-Modified second, and only
    counts if that is a strong validator, i.e. at least a second older than
    ``now`` (§8.8.2.2).  Anything else: send the whole representation.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(("W/", '"')):
        return value == etag and not etag.startswith("W/")
    since = _parse_date(value)
    if since is None:
        return False
    return int(mtime) == since and mtime <= now - 1


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(offset, length)`` for a single-range ``bytes=`` header; None to send it all.

    Several ranges, other units and malformed headers are ignored (the whole
    file is a valid answer); a well-formed range past the end raises
    ``Unsatisfiable``.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix < 0 or not last.isdigit():
                return None
            if suffix == 0 or size == 0:
                raise Unsatisfiable()
            start = max(0, size - suffix)
            return start, size - start
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = int(last) if last else None
    except ValueError:
        return None
    if end is not None and end < start:
        return None  # an invalid range-spec: the header is ignored (RFC 9110 §14.1.1)
    if start >= size:  # also "bytes=<size>-": no byte satisfies it
        raise Unsatisfiable()
    end = size - 1 if end is None else end
    end = min(end, size - 1)
    return start, end - start + 1
