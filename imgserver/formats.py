"""The image formats imgserver reads and writes: one table, used everywhere.

Every fact about a format (its ``fm`` names, Pillow's name for it, its
content type, whether it holds alpha or animation, the largest side its
encoder takes, how to recognise its files) is a column of :data:`FORMATS`,
so the parameter parser, the pipeline, content sniffing and the README all
read the same row.

HEIF/HEIC input is optional: it needs the ``pillow-heif`` plugin (``pip
install pillow-heif``); without it a HEIF file is refused with 415 like any
other unsupported file.  imgserver never writes HEIF.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = [
    "Format",
    "FORMATS",
    "FM_VALUES",
    "OUTPUT_FORMATS",
    "CONTENT_TYPES",
    "heif_available",
    "sniff",
    "by_pillow_name",
    "markdown_table",
]


@dataclass(frozen=True)
class Format:
    """One row of :data:`FORMATS`."""

    name: str  # canonical name used throughout imgserver
    pillow: tuple[str, ...]  # Pillow format names read as this format (the first is written)
    content_type: str
    fm: tuple[str, ...]  # ``fm`` values that select it as output ("" if never written)
    alpha: bool  # the output keeps transparency
    animation: bool  # the output can hold several frames
    quality: bool  # ``q`` applies
    max_side: int  # largest side the encoder writes
    writable: bool = True


#: canonical name -> row.  ``pjpg`` (progressive JPEG) is a JPEG with a flag: see FM_VALUES.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("jpeg", ("JPEG", "MPO"), "image/jpeg", ("jpg", "jpeg", "pjpg"), False, False, True, 65500),
        Format("png", ("PNG",), "image/png", ("png",), True, True, False, 2**31 - 1),
        Format("webp", ("WEBP",), "image/webp", ("webp",), True, True, True, 16383),
        Format("avif", ("AVIF",), "image/avif", ("avif",), True, True, True, 65536),
        Format("gif", ("GIF",), "image/gif", ("gif",), True, True, False, 65535),
        Format("heif", ("HEIF",), "image/heif", (), False, False, False, 0, writable=False),
    )
}

#: ``fm`` value -> (format, progressive).
FM_VALUES: dict[str, tuple[str, bool]] = {
    fm: (f.name, fm == "pjpg") for f in FORMATS.values() for fm in f.fm
}

#: Formats imgserver writes.
OUTPUT_FORMATS = tuple(name for name, f in FORMATS.items() if f.writable)

#: canonical name -> MIME type.
CONTENT_TYPES = {name: f.content_type for name, f in FORMATS.items()}

_BY_PILLOW = {p: f for f in FORMATS.values() for p in f.pillow}

# ISO BMFF brands (the ftyp box): AVIF, and HEIF/HEIC images.
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

# Magic numbers of formats we do not read, for a helpful 415 message.
_OTHER_MAGIC = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
)


@functools.lru_cache(maxsize=1)
def heif_available() -> bool:
    """Whether the optional ``pillow-heif`` plugin is installed (looked up once;
    registered with Pillow on first use)."""
    try:
        import pillow_heif  # noqa: F401
    except Exception:  # not installed, or broken: HEIF stays unsupported
        return False
    return True


def by_pillow_name(name: str | None) -> Format | None:
    """The row for a Pillow format name (``"MPO"`` -> jpeg), or None."""
    return _BY_PILLOW.get(name or "")


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (64 are enough).

    A canonical name from :data:`FORMATS`, the name of a format we do not
    read (``"BMP"``, ``"TIFF"``, ...), or None for anything else.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[4:8] == b"ftyp":
        size = int.from_bytes(head[0:4], "big")
        major = head[8:12]
        compatible = [head[i : i + 4] for i in range(16, min(size, len(head)) - 3, 4)]
        if major in _AVIF_BRANDS or (major in (b"mif1", b"msf1") and any(b in _AVIF_BRANDS for b in compatible)):
            return "avif"
        if major in _HEIF_BRANDS or any(b in _HEIF_BRANDS for b in compatible):
            return "heif"
        return None
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    return None


def markdown_table() -> str:
    """:data:`FORMATS` as a Markdown table (the README's)."""
    rows = ["| format | read | written as `fm=` | content type | alpha | animation | largest side written |",
            "|---|---|---|---|---|---|---|"]
    for f in FORMATS.values():
        read = "with the `pillow-heif` plugin" if f.name == "heif" else "yes"
        written = ", ".join(f"`{fm}`" for fm in f.fm) or "no"
        rows.append(f"| {f.name} | {read} | {written} | `{f.content_type}` | {'yes' if f.alpha else 'no'} | "
                    f"{'yes' if f.animation else 'no'} | {f.max_side if f.writable else '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
