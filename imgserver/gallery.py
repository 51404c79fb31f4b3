"""The gallery: every image under the root as a page of thumbnails, and a detail view.

    GET|HEAD /                          the root directory
    GET|HEAD /gallery/<dir>[?page=N]    a directory below the root
    GET|HEAD /view/<path>               one image: the original, its /info, a few transforms

Opt-in (``imgserver --gallery``, and ``imgserver --demo``): a listing tells
anyone who can reach the server every image name under the root, and with a
secret the pages hand out signed URLs (:func:`imgserver.signing.signed_url`)
for every listed original and for the gallery's own variants.  Use it where
everyone who reaches the server may see every image.

Plain HTML and a little CSS, no script: thumbnails are ``<img srcset sizes>``
at :data:`THUMB_WIDTHS` (square crops, ``auto=format`` when the server's
parameter parser knows it), so the browser picks the width it needs and the
format it accepts.  Every string that came from the file system or the
request is escaped (:func:`esc`; names that are not UTF-8 or hold control
characters are shown with ``\\xNN`` escapes and never linked: the server
cannot serve them); URLs are built from percent-encoded segments.  Answers
carry a ``Content-Security-Policy`` with no script source at all, and the
stylesheet allowed by its hash only.

Bounded: a listing reads at most :data:`MAX_ENTRIES` directory entries (the
page says when there were more), in a thread (the loader's I/O pool), at most
:data:`LISTINGS_AT_ONCE` at once with :data:`LISTINGS_WAITING` waiting
(beyond: 503); a page shows at most :data:`PAGE_SIZE` entries.  Directories
are opened beneath the root exactly as images are (asyncfile's confined open:
``openat2(RESOLVE_BENEATH)`` or an ``O_NOFOLLOW`` walk); dot-files are never
listed; a symlink is listed as an image when its name says so (serving it is
confined as always) and never followed as a directory.

The first half of this module is pure (rendering, paging, URLs: no I/O, no
Twisted); :func:`scan_directory` is the blocking listing (run it in a
thread); the resources at the end are the Twisted glue.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from . import paths
from .errors import BadRequest, ImageServerError, NotFound, Overloaded

__all__ = [
    "Entry", "Listing", "Urls", "GalleryConfig",
    "esc", "display_name", "classify", "paginate", "render_gallery", "render_detail",
    "scan_directory", "image_extensions", "install",
    "THUMB_WIDTHS", "PAGE_SIZE", "MAX_ENTRIES", "CSP",
]

#: Widths (pixels) of the square thumbnails offered in ``srcset``.
THUMB_WIDTHS = (160, 240, 320, 480, 640)
#: The thumbnail's ``src`` (for browsers without srcset): one of THUMB_WIDTHS.
THUMB_FALLBACK = 320
#: How wide a thumbnail is drawn, for the browser's choice (see CSS below).
THUMB_SIZES = "(max-width: 420px) 45vw, 200px"
#: Entries (folders and images) per page.
PAGE_SIZE = 60
#: Directory entries read per listing at most: a directory with more is
#: listed from the first MAX_ENTRIES the kernel returns, and the page says so.
MAX_ENTRIES = 10_000
#: Thumbnails from this index on are lazy-loaded (those above the fold are not).
EAGER_THUMBNAILS = 12
#: Listings in progress at once, and waiting; beyond that 503.
LISTINGS_AT_ONCE = 2
LISTINGS_WAITING = 16
#: An original larger than this is shown (not linked) as a resized copy.
MAX_SHOWN_ORIGINAL_BYTES = 8 * 2**20
MAX_SHOWN_ORIGINAL_PIXELS = 24_000_000
#: The copy shown instead: at most this wide and high.
SHOWN_COPY = 1600

#: Transforms the detail view shows, in order; each only if the server's
#: parameter parser accepts it and, from the fifth on (parameters newer than
#: ``w h fit fm q``), if the pipeline makes an image with it from a tiny test
#: image (AVIF needs Pillow built with libavif, say).
DETAIL_TRANSFORMS: tuple[tuple[str, Mapping[str, str]], ...] = (
    ("square crop", {"w": "300", "h": "300", "fit": "crop"}),
    ("WebP, quality 40", {"w": "300", "fm": "webp", "q": "40"}),
    ("JPEG, quality 10", {"w": "300", "fm": "jpg", "q": "10"}),
    ("stretched", {"w": "300", "h": "150", "fit": "scale"}),
    ("AVIF", {"w": "300", "fm": "avif"}),
    ("entropy crop", {"w": "300", "h": "300", "fit": "crop", "crop": "entropy"}),
    ("blurred", {"w": "300", "blur": "200"}),
    ("rotated 90°", {"w": "300", "rot": "90"}),
    ("grey", {"w": "300", "sat": "-100"}),
)
#: At most this many of them.
MAX_DETAIL_TRANSFORMS = 6

#: Extensions a file name must end with to be listed, by the magic bytes of
#: their format: listed only when the server serves that format
#: (:func:`image_extensions`).
_EXTENSION_MAGIC: tuple[tuple[tuple[str, ...], bytes], ...] = (
    ((".jpg", ".jpeg", ".jpe", ".jfif"), b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01"),
    ((".png",), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ((".webp",), b"RIFF\x00\x00\x00\x00WEBPVP8 "),
    ((".gif",), b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x00"),
    ((".avif",), b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00"),
)

CSS = """\
:root{color-scheme:light dark;font:15px/1.4 system-ui,sans-serif}
body{margin:0 auto;max-width:1280px;padding:12px 20px 40px}
a{color:inherit}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;margin-bottom:14px}
h1{font-size:1.25rem;margin:0;font-weight:600;overflow-wrap:anywhere}
h1 a{text-decoration:none}h1 a:hover{text-decoration:underline}
.meta,footer,figcaption,.why{color:#777;font-size:.85rem}
.grid{list-style:none;margin:0;padding:0;display:grid;gap:14px;
grid-template-columns:repeat(auto-fill,minmax(150px,1fr))}
.grid a{display:block;text-decoration:none}
.grid img,.folder,.bad{display:block;width:100%;height:auto;aspect-ratio:1;object-fit:cover;
border-radius:6px;background:#8882;box-sizing:border-box}
.folder,.bad{display:flex;align-items:center;justify-content:center;border:1px dashed #8888;
font-size:2.2rem;color:#999}
.name{display:block;font-size:.85rem;margin-top:4px;overflow-wrap:anywhere}
.pages{margin:20px 0;display:flex;gap:16px;justify-content:center}
.detail{display:grid;gap:24px;grid-template-columns:minmax(0,2fr) minmax(240px,1fr)}
@media (max-width:800px){.detail{grid-template-columns:1fr}}
h2{font-size:1.05rem;margin:0 0 8px}
.detail figure,.transforms figure{margin:0}
.detail .shown img{max-width:100%;height:auto;border-radius:6px;background:#8882}
table{border-collapse:collapse;font-size:.9rem}td,th{text-align:left;padding:3px 10px 3px 0}
.transforms{list-style:none;padding:0;display:grid;gap:14px;
grid-template-columns:repeat(auto-fill,minmax(200px,1fr))}
.transforms img{max-width:100%;height:auto;display:block;background:#8882}
code{font-size:.8rem;overflow-wrap:anywhere}
"""

#: Content-Security-Policy of every gallery answer: nothing but same-origin
#: images and this module's stylesheet (by its hash); no script at all.
CSP = ("default-src 'none'; img-src 'self'; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode() + "'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------------------
# Escaping

#: C0 and C1 controls, DEL, and the bidirectional overrides/isolates (which
#: could make one name look like another): shown as escapes.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def display_name(name: str) -> str:
    """``name`` as plain text a person can read, not yet HTML-escaped.

    A file name decoded by ``os.fsdecode`` keeps its non-UTF-8 bytes as lone
    surrogates: those come back as ``\\xNN``; so do control characters and
    bidirectional overrides (``\\u202e``).
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        raw = name.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")

    def escape(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _UNSHOWN.sub(escape, text)


def esc(text: object) -> str:
    """HTML-escape anything for element content or a double-quoted attribute."""
    return html.escape(display_name(str(text)), quote=True)


# ---------------------------------------------------------------------------
# URLs


def _encode_path(path: str) -> str:
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def _query(pairs: Iterable[tuple[str, str]]) -> str:
    return "&".join(f"{quote(str(n), safe='')}={quote(str(v), safe='')}" for n, v in sorted(pairs))


class Urls:
    """Every URL the pages link to: ``/images`` and ``/info`` signed when
    there is a secret, thumbnails with ``auto=format`` when the server knows
    it.  Paths are decoded relative paths (``"photos/a b.jpg"``); the URLs
    are ASCII, each segment percent-encoded (so ``%``, ``?``, ``#``, ``,``
    and spaces in names survive, and a URL never breaks a ``srcset``)."""

    def __init__(self, secret: bytes | None = None, auto_format: bool = False,
                 widths: Sequence[int] = THUMB_WIDTHS) -> None:
        self.secret = secret
        self.auto_format = auto_format
        self.widths = tuple(widths)

    def endpoint(self, endpoint: str, path: str, query: Mapping[str, Any] | None = None) -> str:
        pairs = [(str(k), str(v)) for k, v in (query or {}).items()]
        if self.secret:
            from .signing import signed_url

            return signed_url(self.secret, endpoint, path, pairs)
        url = f"/{endpoint}/{_encode_path(path)}"
        return f"{url}?{_query(pairs)}" if pairs else url

    def image(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        return self.endpoint("images", path, query)

    def info(self, path: str) -> str:
        return self.endpoint("info", path)

    def thumbnail(self, path: str, width: int) -> str:
        query = {"w": width, "h": width, "fit": "crop"}
        if self.auto_format:
            query["auto"] = "format"
        return self.image(path, query)

    def srcset(self, path: str) -> str:
        return ", ".join(f"{self.thumbnail(path, w)} {w}w" for w in self.widths)

    @staticmethod
    def gallery(segments: Sequence[str], page: int = 1) -> str:
        url = "/gallery/" + _encode_path("/".join(segments)) if segments else "/"
        return f"{url}?page={page}" if page > 1 else url

    @staticmethod
    def view(path: str) -> str:
        return "/view/" + _encode_path(path)


# ---------------------------------------------------------------------------
# Listings and pages


@dataclass(frozen=True)
class Entry:
    """One listed name: ``kind`` is ``"dir"``, ``"image"`` or ``"bad"`` (a
    name the server cannot serve; ``why`` says why)."""

    name: str
    kind: str
    why: str = ""


@dataclass
class Listing:
    """A directory's entries worth showing, sorted: folders, then images, then bad names."""

    segments: tuple[str, ...]
    entries: list[Entry] = field(default_factory=list)
    #: Entries read but not listed (hidden, not images, special files).
    skipped: int = 0
    #: True when the directory had more than MAX_ENTRIES entries.
    truncated: bool = False

    @property
    def folders(self) -> int:
        return sum(1 for e in self.entries if e.kind == "dir")

    @property
    def images(self) -> int:
        return sum(1 for e in self.entries if e.kind == "image")


def _sort_key(entry: Entry) -> tuple[int, str, str]:
    return ({"dir": 0, "image": 1}.get(entry.kind, 2), entry.name.casefold(), entry.name)


def classify(segments: Sequence[str], name: str, kind: str, extensions: Iterable[str]) -> Entry | None:
    """What the gallery shows for the directory entry ``name`` of type
    ``kind`` (``"dir"``, ``"file"``, ``"symlink"`` or ``"other"``) below
    ``segments`` (a symlink is given as the kind of what it leads to beneath
    the root): None for nothing (hidden, not an image, special file)."""
    if name.startswith("."):
        return None
    if kind == "dir":
        shown = "dir"
    elif kind in ("file", "symlink") and name.lower().endswith(tuple(extensions)):
        shown = "image"
    else:
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return Entry(name, "bad", "the name is not UTF-8: the server does not serve it")
    try:
        paths.split_decoded(paths.join([*segments, name]))
    except ImageServerError as e:
        return Entry(name, "bad", f"the server does not serve this name ({e.message})")
    return Entry(name, shown)


def paginate(entries: Sequence[Entry], page: int, size: int = PAGE_SIZE) -> tuple[Sequence[Entry], int, int]:
    """The entries of ``page`` (1-based; clamped to the last page), that page and the page count."""
    pages = max(1, -(-len(entries) // size))
    page = min(max(1, page), pages)
    return entries[(page - 1) * size : page * size], page, pages


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _document(title: str, header: str, main: str, footer: str = "") -> str:
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"same-origin\">\n"
        f"<title>{title} · imgserver</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header>{header}</header>\n<main>\n{main}</main>\n"
        f"<footer><p>served by imgserver{footer}</p></footer>\n</body>\n</html>\n"
    )


def _crumbs(segments: Sequence[str], current: str | None = None) -> str:
    """``images / a / b``: every folder a link, but the page's own; then
    ``current`` (an image's name), if given, as plain text."""
    folders = [("images", ())] + [(name, tuple(segments[: i + 1])) for i, name in enumerate(segments)]
    parts = []
    for i, (name, where) in enumerate(folders):
        if i == len(folders) - 1 and current is None:
            parts.append(esc(name))
        else:
            parts.append(f'<a href="{esc(Urls.gallery(where))}">{esc(name)}</a>')
    if current is not None:
        parts.append(esc(current))
    return "<h1>" + " / ".join(parts) + "</h1>"


def render_gallery(listing: Listing, page: int, urls: Urls, size: int = PAGE_SIZE) -> str:
    """The HTML page of ``listing``'s page ``page``."""
    segments = listing.segments
    shown, page, pages = paginate(listing.entries, page, size)
    meta = [_plural(listing.folders, "folder")] if listing.folders else []
    meta.append(_plural(listing.images, "image"))
    if pages > 1:
        meta.append(f"page {page} of {pages}")
    header = _crumbs(segments) + f'\n<p class="meta">{" · ".join(meta)}</p>'
    items = []
    for index, entry in enumerate(shown):
        name = esc(entry.name)
        if entry.kind == "dir":
            href = esc(urls.gallery([*segments, entry.name]))
            items.append(f'<li><a href="{href}"><span class="folder" aria-hidden="true">▤</span>'
                         f'<span class="name">{name}/</span></a></li>')
        elif entry.kind == "image":
            path = paths.join([*segments, entry.name])
            lazy = ' loading="lazy"' if index >= EAGER_THUMBNAILS else ""
            items.append(
                f'<li><a href="{esc(urls.view(path))}"><img src="{esc(urls.thumbnail(path, THUMB_FALLBACK))}" '
                f'srcset="{esc(urls.srcset(path))}" sizes="{THUMB_SIZES}" width="200" height="200" '
                f'alt="{name}" decoding="async"{lazy}><span class="name">{name}</span></a></li>')
        else:
            items.append(f'<li><span class="bad" aria-hidden="true">?</span><span class="name">{name}</span>'
                         f'<span class="why">{esc(entry.why)}</span></li>')
    parts = []
    if items:
        parts.append('<ul class="grid">\n' + "\n".join(items) + "\n</ul>\n")
    else:
        parts.append('<p class="meta">No images here.</p>\n')
    if pages > 1:
        nav = []
        if page > 1:
            nav.append(f'<a rel="prev" href="{esc(urls.gallery(segments, page - 1))}">← previous</a>')
        nav.append(f"<span>page {page} of {pages}</span>")
        if page < pages:
            nav.append(f'<a rel="next" href="{esc(urls.gallery(segments, page + 1))}">next →</a>')
        parts.append('<nav class="pages">' + " ".join(nav) + "</nav>\n")
    if listing.truncated:
        parts.append(f'<p class="meta">This folder has more than {MAX_ENTRIES:,} entries: only the first '
                     f'{MAX_ENTRIES:,} read are listed.</p>\n')
    title = esc(segments[-1]) if segments else "images"
    auto = "&amp;auto=format" if urls.auto_format else ""
    footer = (f" · thumbnails: <code>/images/…?w=W&amp;h=W&amp;fit=crop{auto}</code>, W in "
              f"{', '.join(map(str, urls.widths))}: the browser picks one")
    return _document(title, header, "".join(parts), footer)


def _format_value(name: str, value: object) -> str:
    if name == "bytes" and isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _query_text(query: Mapping[str, str]) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in query.items())


def render_detail(path: str, info: Mapping[str, Any] | None, error: str | None, urls: Urls,
                  transforms: Sequence[tuple[str, Mapping[str, str]]] = ()) -> str:
    """The HTML page of one image: the original (or, when it is very large,
    a resized copy linking to it), its ``/info`` (or the ``error`` that
    prevented reading it) and ``transforms`` (label, query)."""
    segments = path.split("/")
    name = segments[-1]
    header = _crumbs(segments[:-1], name)
    original = urls.image(path)
    left = []
    if info is not None:
        width, height = info.get("width"), info.get("height")
        big = (int(info.get("bytes") or 0) > MAX_SHOWN_ORIGINAL_BYTES
               or int(width or 0) * int(height or 0) > MAX_SHOWN_ORIGINAL_PIXELS)
        if big:
            src = urls.image(path, {"w": SHOWN_COPY, "h": SHOWN_COPY, "fit": "max"})
            caption = f'a copy at most {SHOWN_COPY} px wide and high · <a href="{esc(original)}">the original</a>'
        else:
            src = original
            caption = f'the original · <a href="{esc(original)}">open</a>'
        size = f' width="{int(width)}" height="{int(height)}"' if width and height and not big else ""
        left.append(f'<figure class="shown"><a href="{esc(original)}"><img src="{esc(src)}"{size} '
                    f'alt="{esc(name)}"></a><figcaption>{caption}</figcaption></figure>')
    else:
        left.append(f'<p class="why">{esc(error or "cannot read this image")}</p>'
                    f'<p><a href="{esc(original)}">the file</a></p>')
    right = ['<section><h2>/info</h2>']
    if info is not None:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_format_value(str(k), v))}</td></tr>"
                       for k, v in info.items())
        right.append(f"<table>{rows}</table>")
    right.append(f'<p><a href="{esc(urls.info(path))}">as JSON</a></p></section>')
    if info is not None and transforms:
        figures = []
        for label, query in transforms:
            url = urls.image(path, query)
            figures.append(f'<li><figure><a href="{esc(url)}"><img src="{esc(url)}" alt="{esc(label)}">'
                           f'</a><figcaption>{esc(label)}<br><code>{esc(_query_text(query))}'
                           f'</code></figcaption></figure></li>')
        transforms_html = ('<section><h2>Transforms</h2><ul class="transforms">' + "".join(figures)
                           + "</ul></section>\n")
    else:
        transforms_html = ""
    main = (f'<div class="detail"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>\n'
            + transforms_html)
    return _document(esc(name), header, main)


# ---------------------------------------------------------------------------
# The listing itself: blocking, for a thread


DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)


def entry_kind(entry: os.DirEntry[str], root_fd: int, rel: str) -> str:
    """``"dir"``, ``"file"`` or ``"other"``, from the directory entry's type
    (``d_type``; an ``lstat`` only where the file system gives none).  A
    symlink is resolved the way the server would open it, beneath the root
    (``openat2``; the ``O_NOFOLLOW`` walk refuses every symlink): one that
    leads outside, is refused or dangles is ``"other"``, never listed."""
    from asyncfile import confine

    try:
        if entry.is_symlink():
            fd = confine.open_beneath(root_fd, rel, _PATH_FLAGS)
            try:
                mode = os.fstat(fd).st_mode
            finally:
                os.close(fd)
            return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
    except (OSError, ValueError):
        pass
    return "other"


def scan_directory(root: str, segments: Sequence[str], extensions: Iterable[str],
                   max_entries: int = MAX_ENTRIES) -> Listing:
    """The Listing of the directory ``segments`` (checked names) beneath ``root``.

    Blocking (run it in a thread).  The directory is opened beneath the root
    with asyncfile's confined open, like every image (symlinks leading out,
    ``..``: ``OutsideRoot``); at most ``max_entries`` entries are read.
    Raises what opening raises (FileNotFoundError, NotADirectoryError,
    OutsideRoot, PermissionError, ...).
    """
    from asyncfile import confine

    extensions = tuple(extensions)
    listing = Listing(tuple(segments))
    root_fd = confine.open_root(root)
    try:
        fd = confine.open_beneath(root_fd, "/".join(segments) or ".", DIRECTORY_FLAGS)
        try:
            read = 0
            with os.scandir(fd) as it:
                for item in it:
                    if read >= max_entries:
                        listing.truncated = True
                        break
                    read += 1
                    name = item.name
                    kind = "other" if name.startswith(".") else entry_kind(item, root_fd, "/".join([*segments, name]))
                    entry = classify(segments, name, kind, extensions)
                    if entry is None:
                        listing.skipped += 1
                    else:
                        listing.entries.append(entry)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
    listing.entries.sort(key=_sort_key)
    return listing


def image_extensions() -> tuple[str, ...]:
    """File name extensions of the formats this server serves (by sniffing a
    sample header with the service's own content sniffing)."""
    from .service import sniff_content_type

    found: list[str] = []
    for extensions, magic in _EXTENSION_MAGIC:
        if sniff_content_type(magic) is not None:
            found.extend(extensions)
    return tuple(found)


#: Transforms from this index on are tried on a tiny image before being shown.
_PROBED_FROM = 4


@functools.lru_cache(maxsize=1)
def _probe_image() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 120, 40)).save(out, "JPEG")
    return out.getvalue()


def _accepted(query: Mapping[str, str], settings: Any, probe: bool = False) -> bool:
    """Whether the server's parameter parser accepts ``query`` and (``probe``)
    its pipeline makes an image with it from a tiny JPEG."""
    from . import processing
    from .params import parse_transform

    try:
        spec = parse_transform({k: [v] for k, v in query.items()}, max_dimension=settings.max_dimension,
                               default_quality=settings.default_quality)
        if probe:
            processing.transform(_probe_image(), spec, settings.max_pixels, settings.max_output_pixels)
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class GalleryConfig:
    """What the gallery's resources share, decided once when installed."""

    urls: Urls
    extensions: tuple[str, ...]
    transforms: tuple[tuple[str, Mapping[str, str]], ...]

    @classmethod
    def for_settings(cls, settings: Any) -> "GalleryConfig":
        auto = _accepted({"w": "100", "auto": "format"}, settings)
        transforms = tuple(t for i, t in enumerate(DETAIL_TRANSFORMS)
                           if _accepted(t[1], settings, probe=i >= _PROBED_FROM))[:MAX_DETAIL_TRANSFORMS]
        secret = settings.secret if settings.signed else None
        return cls(Urls(secret, auto_format=auto), image_extensions(), transforms)


# ---------------------------------------------------------------------------
# Twisted glue

@functools.lru_cache(maxsize=None)
def _resources() -> tuple[type, type]:
    """The resource classes (built on first use: :mod:`imgserver.web` imports this module lazily)."""
    from twisted.internet import defer, threads
    from twisted.python.failure import Failure

    from asyncfile import ConsumerStopped, OutsideRoot
    from asyncfile import Overloaded as QueueFull

    from .errors import Forbidden
    from .service import write_body
    from .web import _AsyncResource

    def raw_rest(request: Any) -> bytes:
        """What follows this resource's segment in the path, as sent (still encoded)."""
        consumed = len(request.prepath)
        return b"/".join(request.path.split(b"/")[1 + consumed:])

    async def send_html(resource: Any, request: Any, text: str) -> None:
        body = text.encode("utf-8")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy", CSP.encode("ascii"))
        request.setHeader(b"Referrer-Policy", b"same-origin")
        request.setHeader(b"X-Frame-Options", b"DENY")
        if request.method == b"HEAD":
            request.finish()
            return
        resource._answered(None, request)
        try:
            await write_body(request, body)
        except ConsumerStopped:
            return  # the client went away
        request.finish()

    def only(request: Any, allowed: tuple[bytes, ...]) -> dict[bytes, list[bytes]]:
        for name in request.args:
            if name not in allowed:
                takes = f"only {b', '.join(allowed).decode()}" if allowed else "none"
                raise BadRequest(f"unknown parameter (this page takes {takes})")
        return request.args

    class GalleryResource(_AsyncResource):
        endpoint = "gallery"

        def __init__(self, service: Any, config: GalleryConfig, limiter: Any, at_root: bool = False) -> None:
            super().__init__(service)
            self.config = config
            self.limiter = limiter
            self.at_root = at_root

        async def handle(self, request: Any) -> None:
            if self.at_root and request.path != b"/":
                raise NotFound("no such endpoint")
            raw = raw_rest(request)
            if raw.endswith(b"/"):
                raw = raw[:-1]
            segments = paths.split_url_path(raw) if raw else ()
            args = only(request, (b"page",))
            page = 1
            if b"page" in args:
                values = args[b"page"]
                if len(values) != 1 or not re.fullmatch(rb"[0-9]{1,6}", values[0]) or int(values[0]) < 1:
                    raise BadRequest("page must be a whole number from 1")
                page = int(values[0])
            listing = await self._list(segments)
            await send_html(self, request, render_gallery(listing, page, self.config.urls))

        async def _list(self, segments: tuple[str, ...]) -> Listing:
            try:
                slot = await self.limiter.acquire()
            except QueueFull:
                raise Overloaded("too many listings in progress; try again shortly", retry_after=1) from None
            try:
                scanning = self._scan(slot, segments)  # which releases the slot when its thread is done
            except BaseException:
                slot.release()
                raise
            try:
                return await scanning
            except OutsideRoot:
                raise Forbidden("forbidden path: leads outside the image root") from None
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                raise NotFound("no such folder") from None  # an unreadable one is not told apart

        def _scan(self, slot: Any, segments: tuple[str, ...]) -> defer.Deferred[Listing]:
            """``scan_directory`` in the loader's I/O pool (else the reactor's
            threads).  ``slot`` is released when the thread is done with it,
            not before: a client that leaves (cancelling the Deferred) frees
            the listing's place only once its thread has ended."""
            args = (self.service.root_path, segments, self.config.extensions)
            pool = getattr(self.service.loader, "pool", None)
            if pool is not None and hasattr(pool, "submit"):
                work, job = pool.submit(scan_directory, *args)
                withdraw: Any = lambda: pool.withdraw(job)  # noqa: E731 (a listing not started never runs)
            else:
                work, withdraw = threads.deferToThread(scan_directory, *args), lambda: None
            result: defer.Deferred[Listing] = defer.Deferred(lambda _: withdraw())

            def done(outcome: Any) -> None:
                slot.release()
                if result.called:
                    return None  # given up meanwhile: the outcome is dropped
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
                return None

            work.addBoth(done)
            return result

    class DetailResource(_AsyncResource):
        endpoint = "view"

        def __init__(self, service: Any, config: GalleryConfig) -> None:
            super().__init__(service)
            self.config = config

        async def handle(self, request: Any) -> None:
            path = paths.join(paths.split_url_path(raw_rest(request)))
            only(request, ())
            info, error = None, None
            try:
                info = await self.service.info(path)
            except ImageServerError as e:
                if e.status not in (413, 415, 422):
                    raise
                error = e.message
            await send_html(self, request, render_detail(path, info, error, self.config.urls,
                                                         self.config.transforms))

    return GalleryResource, DetailResource


def install(root: Any, service: Any) -> None:
    """Put the gallery's pages on the site's root resource: ``/``,
    ``/gallery/`` and ``/view/``."""
    from asyncfile import Limiter

    gallery_resource, detail_resource = _resources()
    config = GalleryConfig.for_settings(service.settings)
    limiter = Limiter(LISTINGS_AT_ONCE, LISTINGS_WAITING)
    root.putChild(b"", gallery_resource(service, config, limiter, at_root=True))
    root.putChild(b"gallery", gallery_resource(service, config, limiter))
    root.putChild(b"view", detail_resource(service, config))
