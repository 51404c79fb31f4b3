"""HTTP validators and ranges, as pure functions (RFC 9110 §13, §14)."""

from __future__ import annotations

from email.utils import formatdate, parsedate_to_datetime

__all__ = ["not_modified", "parse_range", "http_date", "Unsatisfiable"]


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
        try:
            since = parsedate_to_datetime(if_modified_since).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return int(mtime) <= since
    return False


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
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if end < start:
        return None
    if start >= size:
        raise Unsatisfiable()
    end = min(end, size - 1)
    return start, end - start + 1
