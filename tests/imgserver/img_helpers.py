"""Helpers for the imgserver core tests: small images made on the fly.

Imported by the test modules (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def halves(size, left=(255, 0, 0), right=(0, 0, 255), mode="RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    width, height = size
    im = Image.new(mode, size, right)
    im.paste(Image.new(mode, (width // 2, height), left), (0, 0))
    return im


def noisy(size, mode="RGB") -> Image.Image:
    """Incompressible content, so truncating the file really cuts pixel data."""
    return Image.merge("RGB", [Image.effect_noise(size, 60).convert("L")] * 3).convert(mode)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is patched to claim ``width`` x ``height``.

    The pixel data is still that of one pixel: decoding would fail (corrupt)
    rather than exhaust memory, so TooLarge proves the header check ran first.
    """
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 marker is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    # marker(2) length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def with_orientation(im: Image.Image, fmt: str, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif, **params)


def png_with_late_exif(im: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after the pixel data (allowed by the spec)."""
    data = with_orientation(im, "PNG", orientation)
    signature, pos, chunks = data[:8], 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1
    return signature + b"".join(rest[:-1] + exif + rest[-1:])  # just before IEND
