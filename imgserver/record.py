"""How a transformed image is keyed and stored outside the process (sans I/O).

The result store (:mod:`imgserver.store`) and the memcached tier
(:mod:`imgserver.memcached`) keep the same self-checking record, so neither
ever serves bytes it cannot vouch for: a record names the key it was written
for, its body's length and a checksum of the body, and :func:`decode` refuses
anything else (a truncated file, another key's record, a flipped bit, a file
someone else put there) with :class:`CorruptRecord`, which the tiers treat as
a miss.

Record layout (all integers big-endian)::

    MAGIC (8) | key digest (16) | body length (8) | body checksum (16)
    | meta length (2) | meta (UTF-8 JSON: content_type, width, height, format, frames)
    | body
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from .processing import Result

__all__ = ["ResultKey", "CorruptRecord", "encode", "decode", "parse_header", "checksum",
           "MAGIC", "FIXED_HEADER", "MAX_META", "RECORD_VERSION"]

#: Bumped whenever the layout or the meaning of a key changes: old records become misses.
RECORD_VERSION = 1
MAGIC = b"IMGSRES" + bytes([RECORD_VERSION])
_FIXED = struct.Struct(">8s16sQ16sH")
#: Bytes before the meta JSON.
FIXED_HEADER = _FIXED.size
#: Longest meta JSON accepted (a record claiming more is corrupt).
MAX_META = 1024
_DIGEST = 16


class CorruptRecord(ValueError):
    """Not a whole, intact record for the key asked for (a tier treats it as a miss)."""


@dataclass(frozen=True)
class ResultKey:
    """What identifies a transformed image: its source file's version and the canonical transform.

    ``dev``/``inode``/``size``/``mtime_ns`` come from the source's fstat (one
    descriptor: what was processed is what was stat-ed); ``path`` is the
    source's path relative to the image root; ``variant`` is
    ``TransformSpec.cache_key()``.
    """

    dev: int
    inode: int
    size: int
    mtime_ns: int
    path: str
    variant: str

    def local_digest(self) -> bytes:
        """16 bytes naming the result on this machine (the result store's key):
        the source's identity (dev, inode, size, mtime) and the transform."""
        return _digest(["local", RECORD_VERSION, self.dev, self.inode, self.size, self.mtime_ns, self.variant])

    def shared_digest(self) -> bytes:
        """16 bytes naming the result across machines (memcached's key): device
        and inode differ between machines holding copies of the same files, so
        this uses the relative path, size and mtime (which ``rsync -a``,
        ``cp -p`` and image volumes keep) with the transform."""
        return _digest(["shared", RECORD_VERSION, self.path, self.size, self.mtime_ns, self.variant])


def _digest(fields: list[object]) -> bytes:
    """16 bytes naming ``fields``: JSON (ASCII, every string quoted and escaped) so
    that no field can run into the next (a path holding ``|``), and any ``str``
    (a lone surrogate of an undecodable file name) can be named."""
    text = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("ascii"), digest_size=_DIGEST).digest()


def checksum(body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=_DIGEST).digest()


def encode(digest: bytes, result: Result) -> bytes:
    """The record of ``result`` stored under ``digest``."""
    if len(digest) != _DIGEST:
        raise ValueError("a key digest is 16 bytes")
    meta = json.dumps({"content_type": result.content_type, "width": result.width, "height": result.height,
                       "format": result.format, "frames": result.frames},
                      separators=(",", ":")).encode()
    body = result.body
    return b"".join([_FIXED.pack(MAGIC, digest, len(body), checksum(body), len(meta)), meta, body])


@dataclass(frozen=True)
class Header:
    """A record's header, checked: where its body is and what it must hash to."""

    meta: dict[str, object]
    body_offset: int
    body_length: int
    body_checksum: bytes

    def result(self, body: bytes) -> Result:
        """The :class:`Result` with ``body``, once its length and checksum are checked."""
        if len(body) != self.body_length:
            raise CorruptRecord(f"body of {len(body)} bytes, the header says {self.body_length}")
        if checksum(body) != self.body_checksum:
            raise CorruptRecord("the body does not match its checksum")
        m = self.meta
        return Result(body=bytes(body), content_type=str(m["content_type"]), width=int(m["width"]),  # type: ignore[call-overload]
                      height=int(m["height"]), format=str(m["format"]), frames=int(m["frames"]))  # type: ignore[call-overload]


def parse_header(head: bytes | memoryview, digest: bytes, total: int | None = None) -> Header:
    """Check the start of a record (at least ``FIXED_HEADER + MAX_META`` bytes,
    or the whole record if shorter) against ``digest``; with ``total`` (the
    record's whole length, e.g. its file's size) check the length too."""
    head = bytes(head[:FIXED_HEADER + MAX_META])
    if len(head) < FIXED_HEADER:
        raise CorruptRecord("shorter than a record's header")
    magic, key, length, body_sum, meta_len = _FIXED.unpack_from(head)
    if magic != MAGIC:
        raise CorruptRecord("not a record of this version")
    if key != digest:
        raise CorruptRecord("a record of another key")
    if meta_len > MAX_META or FIXED_HEADER + meta_len > len(head):
        raise CorruptRecord("its meta data is cut or too long")
    try:
        meta = json.loads(head[FIXED_HEADER:FIXED_HEADER + meta_len])
        if not isinstance(meta, dict):
            raise ValueError
        for name, kind in (("content_type", str), ("format", str), ("width", int), ("height", int),
                           ("frames", int)):
            if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
                raise ValueError
    except ValueError:
        raise CorruptRecord("its meta data is not valid") from None
    offset = FIXED_HEADER + meta_len
    if total is not None and total != offset + length:
        raise CorruptRecord(f"{total} bytes long, the header says {offset + length}")
    return Header(meta, offset, length, body_sum)


def decode(data: bytes | memoryview, digest: bytes) -> Result:
    """The :class:`Result` in the whole record ``data`` written for ``digest``;
    :class:`CorruptRecord` for anything else."""
    header = parse_header(data, digest, total=len(data))
    return header.result(bytes(data[header.body_offset:]))
