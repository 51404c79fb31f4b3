"""The Pillow pipeline: read headers, estimate memory, transform and describe images.

Everything here is pure apart from CPU (and a scratch in-memory file for
encoding): no sockets, no reactor, no shared mutable state but a small
thread-safe cache of colour transforms (see *ICC profiles*), so the Twisted
layer can run these functions in worker threads, several at once.
Pillow releases the GIL while decoding, resizing, converting and encoding
into a real file, so N threads use N cores.

The service calls, for each transform::

    header = read_header(data, max_pixels)               # cheap: no pixel is decoded
    need = estimate_bytes(header, spec, max_output_pixels)   # admission against a memory budget
    result = transform(data, spec, max_pixels, max_output_pixels)

and :func:`configure_pillow` once at start-up.

Supported sources
-----------------
**JPEG** (including MPO: first picture), **PNG** (APNG: first frame) and
**WebP** (animated: first frame).  GIF, TIFF, BMP, HEIF/AVIF and everything
else are refused with :class:`~imgserver.errors.UnsupportedImage` (415)
without being parsed (``Image.open(..., formats=...)``): a smaller decoder
surface, and every output format handles what these three hold.  A file that
starts like one of the three but cannot be read is
:class:`~imgserver.errors.CorruptImage` (422).  Whatever Pillow raises while
parsing or decoding a file becomes one of these two (or
:class:`~imgserver.errors.TooLarge`), never another exception -- except
``MemoryError``, which is left to the caller (with admission by
:func:`estimate_bytes` it means the machine itself is out of memory).

Limits
------
* ``max_pixels`` (``--max-pixels``): source width x height, from the header,
  before anything is decoded.  For WebP it is checked on the RIFF header even
  before Pillow opens the file (Pillow's WebP decoder allocates its canvases
  when it opens a file).  :func:`configure_pillow` aligns Pillow's own
  decompression-bomb limit with it, so it is the one limit.
* ``max_output_pixels`` (``--max-output-pixels``): output width x height
  after ``fit`` -- also for a plain re-encode, whose output is the source
  size.  Checked from the header before any pixel is decoded (and again if a
  PNG's EXIF orientation only shows after its pixel data).  Also each
  encoder's largest side: JPEG 65500, WebP 16383.
* PNG text chunks: at most ``PngImagePlugin.MAX_TEXT_MEMORY`` of text per
  image (:func:`configure_pillow` sets :data:`PNG_TEXT_MEMORY`, 8 MiB;
  Pillow's default is 64 MiB), each compressed chunk inflating to at most
  ``MAX_TEXT_CHUNK`` (1 MiB); more is :class:`~imgserver.errors.TooLarge`.
  Uncompressed text is measured before Pillow reads it.

Memory model (:func:`estimate_bytes`)
-------------------------------------
The estimate is an upper bound of the memory one :func:`transform` uses at
its peak, including the ``data`` the caller holds, computed from the header
only.  Pillow keeps pixels in 1 (modes 1, L, P), 2 (I;16) or 4 bytes (every
other mode, RGB included) per pixel -- written ``bpp(mode)`` below.  With
``F`` the file size, ``S`` the decoded source pixels (after JPEG ``draft``
scaling: ``ceil(w / s) x ceil(h / s)`` with the ``s`` in 1, 2, 4, 8 that
``draft`` picks for ``REDUCING_GAP`` x the needed size), ``O`` the output
pixels::

    estimate = overhead                                    (header.overhead_bytes)
             + S x (bpp(mode) + decoder)                   decoded source
             + S x convert                                 to L/LA/RGB/RGBA
             + S x 4                  if alpha             premultiplied copy for resizing
             + R + T                                       reduce() result, resampling pass
             + O x live                                    output and its copies
             + encoder(O)                                  encoder state + encoded bytes x 2
             + 256 x longest output side                   encoder row buffers

    overhead = F x (1 + copies)                            the data, and the decoder's copies of it
             + 3 x metadata                                JPEG APPn/COM segments, PNG chunks
             + exif + min(16 x exif, 16 MiB)               EXIF, parsed into Python objects
             + 11 x text                                   PNG text: read/inflated, split, str
             + coefficients                                progressive or multi-scan JPEG
             + width x (256 JPEG, 32 PNG)                  decoder row buffers
             + 256 KiB                                     Python objects, small buffers
             + 4 x icc + 1 MiB        if converting        littlecms and its transform

* ``decoder``: WebP 12 (libwebp's two canvases, 4 bytes each, and the frame
  it hands Pillow), JPEG/PNG 0 (row buffers, counted in ``overhead``).
  ``copies``: WebP 2 (Pillow and libwebp each copy the file), else 0.
* ``coefficients``: a JPEG that is progressive or whose first scan does not
  hold every component is decoded through a whole-image coefficient buffer
  of 2 bytes per coefficient, at the *full* size whatever the draft scale
  (about 3 bytes per pixel for 4:2:0, 6 for 4:4:4).
* ``convert``: ``bpp`` of the working mode when the mode changes (16-bit
  grey: 9, through two 32-bit images); ``R`` = the ``reduce()``d box
  (``reducing_gap`` 2), ``T`` = output width x rows of the first resampling
  pass, both at the working mode's ``bpp``; ``live`` = at most three output
  copies alive at once (premultiplied -> straight alpha, flattening onto
  white for JPEG, transposing for the EXIF orientation).
* ``encoder(O)``: twice the largest encoded size (the memfd and the bytes
  read back: ``O x bands`` for PNG and JPEG, 2 bytes a pixel for WebP), plus
  libwebp's state for WebP: 28 bytes a pixel, 48 with alpha (measured
  worst cases: noise at quality 100, a noisy alpha plane).

Steps release what they no longer need (the decoded source is closed once a
derived image exists), so the true peak is the largest stage rather than the
sum; the sum is the bound.  ``tests/imgserver/test_img_fuzz.py``
checks it against measured peak RSS (``VmHWM``, in a child process whose
malloc returns freed blocks to the system) for real images of each format,
mode and a range of sizes: the estimate is always above, and at most 4x
(WebP output: 6x, as libwebp's memory varies that much with the picture's
detail) plus 4 MiB of constant costs.
``tracemalloc`` cannot measure this: Pillow and its codecs allocate pixels
with ``malloc``, which ``tracemalloc`` does not see.

Not counted: CPU time (a progressive JPEG with thousands of scans is slow,
not large: the service's timeout bounds it); the ``Result`` kept by callers.

ICC profiles
------------
An embedded colour profile is never copied into the output (a JPEG with an
8 MB profile would give an 8 MB thumbnail).  Output is always untagged sRGB:

* an RGB profile of at most :data:`ICC_CONVERT_MAX_BYTES` (1 MiB: display
  and camera profiles are 0.5-60 KB, LUT-based ones some hundreds of KB; a
  PNG's iCCP cannot inflate beyond 1 MiB anyway) that littlecms accepts:
  the *output* pixels are converted to sRGB with ``ImageCms`` (perceptual
  intent, which littlecms treats as relative colorimetric for matrix
  profiles), in place, after resizing -- so the cost follows the output
  size, and a tiny output costs next to nothing: there is no case where
  copying the profile would be cheaper.  Unless the profile is sRGB itself
  (found once per profile by running 4,096 colours through it: no more
  than 2 levels apart), the common case, which then costs nothing per
  image;
* a grey profile of that size: its tone curve is applied to the grey channel
  (a 256-entry table derived through littlecms);
* anything else (larger profiles, profiles that do not match the pixels,
  such as CMYK profiles after Pillow's CMYK -> RGB conversion, or that
  littlecms rejects): dropped; the pixels are taken as sRGB.

What a profile converts to is cached per SHA-256 of its bytes
(:data:`ICC_CACHE_SIZE` profiles), so parsing and building the transform
happen once per distinct profile, not per image.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, ImageCms, PngImagePlugin

from imgserver.errors import CorruptImage, TooLarge, UnsupportedImage
from imgserver.params import TransformSpec

__all__ = [
    "Header",
    "ImageInfo",
    "Result",
    "Plan",
    "CONTENT_TYPES",
    "DEFAULT_MAX_OUTPUT_PIXELS",
    "ICC_CONVERT_MAX_BYTES",
    "PNG_TEXT_MEMORY",
    "read_header",
    "estimate_bytes",
    "probe",
    "plan",
    "transform",
    "info",
    "configure_pillow",
]

#: Canonical format name -> MIME type.
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

#: ``max_output_pixels`` when a caller gives none (``settings.max_output_pixels``' default).
DEFAULT_MAX_OUTPUT_PIXELS = 25_000_000

#: Largest ICC profile converted to sRGB; larger ones are dropped unparsed.
ICC_CONVERT_MAX_BYTES = 1 << 20

#: Distinct ICC profiles whose conversion is remembered.
ICC_CACHE_SIZE = 32

#: Decompressed PNG text (tEXt, zTXt, iTXt) Pillow may hold per image once
#: :func:`configure_pillow` ran (Pillow's default is 64 MiB).
PNG_TEXT_MEMORY = 8 << 20

# Pillow format name -> canonical name.  MPO is a JPEG with extra pictures.
_SOURCE_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP")
_SAVE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

# Largest side each encoder can write.
_MAX_SIDE = {"jpeg": 65500, "png": 2**31 - 1, "webp": 16383}

#: ``draft`` and ``resize`` keep this factor of margin over the target size,
#: as ``Image.thumbnail`` does: JPEG DCT scaling and ``reduce()`` do the cheap
#: integer shrinking, a final Lanczos pass does the last <= 2x with full quality.
REDUCING_GAP = 2.0

_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Magic numbers: ours (to tell "corrupt" from "not an image") and some others
# (for a helpful 415 message).
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
)

_KIB = 1024
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Header:
    """What a file's header says, and what decoding it costs beyond its pixels.

    ``width`` x ``height`` is the stored size; :attr:`display_size` applies
    the EXIF ``orientation``.  ``mode`` is Pillow's mode for the decoded
    pixels, ``bands`` its number of bands, ``frames`` the number of frames an
    animated file declares (only the first is ever decoded).
    ``overhead_bytes`` is the spec-independent part of :func:`estimate_bytes`
    (the file, the decoder's copies of it, metadata, JPEG coefficient
    buffers, colour management); the other fields feed its pixel terms.
    """

    format: str
    width: int
    height: int
    mode: str
    bands: int
    frames: int = 1
    orientation: int = 1
    file_size: int = 0
    working_mode: str = "RGB"
    icc_size: int = 0
    overhead_bytes: int = 0

    @property
    def display_size(self) -> tuple[int, int]:
        """Size once the EXIF orientation is applied (as browsers show it)."""
        if self.orientation in _SWAPPING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height

    def as_info(self) -> dict[str, object]:
        """The ``/info`` document (see :func:`info`)."""
        width, height = self.display_size
        return {
            "width": width,
            "height": height,
            "format": self.format,
            "mode": self.mode,
            "bytes": self.file_size,
            "orientation": self.orientation,
        }


@dataclass(frozen=True)
class ImageInfo:
    """Older summary of a header (kept for callers of :func:`probe`)."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int = 1

    @property
    def display_size(self) -> tuple[int, int]:
        if self.orientation in _SWAPPING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class Result:
    """An encoded image ready to send."""

    body: bytes = field(repr=False)
    content_type: str
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Plan:
    """Output size, and the region of the (oriented) source that fills it."""

    width: int
    height: int
    box: tuple[float, float, float, float]


# ---------------------------------------------------------------------------
# Pillow configuration


def configure_pillow(max_pixels: int) -> None:
    """Once at start-up: make ``max_pixels`` Pillow's limit too, and keep it quiet.

    * ``Image.MAX_IMAGE_PIXELS = max_pixels`` and ``DecompressionBombWarning``
      an error: Pillow then refuses exactly what :func:`read_header` refuses
      (above ``max_pixels``) -- its hard error at twice its limit can no longer
      sit below ours, as the default 179 MP would if ``--max-pixels`` were
      raised, and no warning is printed per refused image.
    * Pillow's other warnings (corrupt EXIF, malformed MPO, invalid APNG, ...:
      one per hostile file) are ignored rather than printed on stderr.
    * ``PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY`` (see *Limits*).

    Process-wide state, idempotent (warning filters are not duplicated).  The
    filters are process-wide on purpose: ``warnings.catch_warnings()`` per
    call would swap the global filter list under concurrent worker threads.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    # Inserted in front of the line above, so it wins for this category.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# ---------------------------------------------------------------------------
# Opening


def _sniff(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return None


def _not_opened(data: bytes) -> UnsupportedImage:
    """The error for data Pillow could not open: corrupt if it looks like ours."""
    kind = _sniff(data)
    if kind in CONTENT_TYPES:
        return CorruptImage(f"{kind.upper()} header is truncated or corrupt")
    if kind is not None:
        return UnsupportedImage(f"{kind} images are not supported (JPEG, PNG or WebP only)")
    return UnsupportedImage("not an image (JPEG, PNG or WebP expected)")


def _too_many_pixels(width: int, height: int, max_pixels: int) -> TooLarge:
    return TooLarge(
        f"image is {width}x{height} ({width * height} pixels), "
        f"over the limit of {max_pixels} pixels"
    )


def _is_metadata_limit(err: BaseException) -> bool:
    # PngImagePlugin's text limits (MAX_TEXT_CHUNK, MAX_TEXT_MEMORY) raise ValueError.
    return isinstance(err, ValueError) and "MAX_TEXT" in str(err)


def _webp_declared_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP's first chunk (VP8X, VP8L or VP8), without libwebp."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    return None


def _open(data: bytes, max_pixels: int | None) -> tuple[Image.Image, _PngChunks | None]:
    """Open from the header only and enforce the format and pixel limits.

    Also checks what Pillow would otherwise find out too late: a WebP's
    canvas size (Pillow's decoder allocates the canvas when it opens the
    file) and a PNG's uncompressed text (Pillow reads a text chunk whole,
    and decodes it to ``str`` at up to 4 bytes a character, before it
    counts it against its limit).
    """
    chunks = None
    if max_pixels is not None:
        declared = _webp_declared_size(data)
        if declared is not None and declared[0] * declared[1] > max_pixels:
            raise _too_many_pixels(*declared, max_pixels)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        chunks = _png_chunks(data)
        if chunks.plain_text > PngImagePlugin.MAX_TEXT_MEMORY:
            raise TooLarge("image metadata (PNG text) is too large")
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # The warning only if a filter made it an error (configure_pillow).
        raise TooLarge(
            f"image has too many pixels (over {Image.MAX_IMAGE_PIXELS} by Pillow's limit)"
        ) from None
    except MemoryError:
        raise
    except Exception as err:  # anything Pillow raises on hostile input
        if _is_metadata_limit(err):
            raise TooLarge("image metadata (PNG text) is too large") from None
        raise _not_opened(data) from None
    try:
        if im.format not in _SOURCE_FORMATS:
            raise UnsupportedImage("unsupported image format")
        width, height = im.size
        if width < 1 or height < 1:
            raise CorruptImage("image header gives an empty size")
        if max_pixels is not None and width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels)
    except BaseException:
        im.close()
        raise
    return im, chunks


def _orientation(im: Image.Image, loaded: bool = False) -> int:
    """The EXIF orientation (1..8) Pillow sees, without decoding pixels.

    PNG keeps EXIF in an ``eXIf`` chunk that may follow the pixel data; Pillow
    only reads it when decoding, so before ``load()`` (``loaded`` false) only
    an ``eXIf`` chunk seen in the header counts (:func:`read_header` finds a
    later one itself).
    """
    if im.format == "PNG" and not loaded and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF: ignore it rather than refuse the image
        return 1
    return _valid_orientation(value)


def _valid_orientation(value: object) -> int:
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_orientation(exif: bytes) -> int:
    """Orientation from raw EXIF bytes (``Exif\\0\\0`` + TIFF, or bare TIFF)."""
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        return _valid_orientation(parsed.get(_ORIENTATION, 1))
    except Exception:
        return 1


# ---------------------------------------------------------------------------
# Headers and what they cost


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel in Pillow's memory (RGB is stored as 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _working_mode(mode: str, transparency: bool) -> str:
    """The mode :func:`_to_working_mode` gives for ``mode`` (see there)."""
    if mode in ("LA", "RGBA"):
        return mode
    if mode in ("L", "RGB"):
        return "RGBA" if transparency else mode
    if mode == "1" or mode == "I" or mode.startswith("I;16"):
        return "L"
    if mode in ("P", "PA"):
        return "RGBA" if transparency else "RGB"
    if mode == "La":
        return "LA"
    if mode == "RGBa":
        return "RGBA"
    return "RGB"


def _convert_bytes(mode: str, working: str) -> int:
    """Extra bytes per source pixel alive while converting ``mode`` to ``working``."""
    if mode == working:
        return 0
    if mode == "I" or mode.startswith("I;16"):
        return 4 + 4 + 1  # through two 32-bit images (see _to_working_mode)
    return _pixel_bytes(working)


def _jpeg_segments(data: bytes) -> tuple[int, int | None]:
    """(bytes of APPn/COM segments, components in the first scan or None).

    Walks the marker segments from SOI to the first SOS: the same headers
    Pillow parsed, at a few microseconds per segment.
    """
    metadata = 0
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            pos += 1  # junk between segments (Pillow skips it too)
            continue
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2  # segments without a length
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xDA:
            return metadata, (data[pos + 4] if pos + 4 < end else None)
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length
        pos += 2 + max(length, 2)
    return metadata, None


def _jpeg_coefficient_bytes(im: Image.Image, data: bytes) -> tuple[int, int]:
    """(whole-image coefficient buffer libjpeg needs or 0, APPn/COM bytes).

    A progressive JPEG, or one whose first scan does not cover every
    component, is decoded through a buffer of every DCT coefficient (2 bytes
    each), at the full size whatever the draft scale.
    """
    metadata, first_scan = _jpeg_segments(data)
    layers = list(getattr(im, "layer", None) or [])
    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    if not layers:
        layers = [("?", 1, 1, 0)] * len(im.getbands())
    multi_scan = progressive or first_scan is None or first_scan < len(layers)
    if not multi_scan:
        return 0, metadata
    width, height = im.size  # the full size: draft() has not run
    hmax = max(1, *(max(1, h) for _, h, _, _ in layers))
    vmax = max(1, *(max(1, v) for _, _, v, _ in layers))
    blocks = 0
    for _, h, v, _ in layers:
        h, v = max(1, h), max(1, v)
        cols = math.ceil(math.ceil(width * h / hmax) / 8)
        rows = math.ceil(math.ceil(height * v / vmax) / 8)
        blocks += (cols + h) * (rows + v)  # rounded up to whole MCUs
    return blocks * 64 * 2, metadata


@dataclass(frozen=True)
class _PngChunks:
    text: int = 0  # bound of the text Pillow will decompress and decode
    plain_text: int = 0  # bytes of uncompressed text chunks
    exif: bytes | None = None  # the last eXIf chunk's data (Pillow keeps the last)
    metadata: int = 0  # bytes of ancillary chunks other than text


_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_PIXELS = (b"IDAT", b"fdAT")


def _png_chunks(data: bytes) -> _PngChunks:
    """Walk a PNG's chunk headers: text to be decompressed, the EXIF chunk.

    Pillow reads the chunks that follow the pixel data only while decoding;
    this finds them up front (a microsecond or so per chunk).  A compressed
    text chunk inflates to at most ``MAX_TEXT_CHUNK`` (and zlib to at most
    ~1032x), all text together to at most ``MAX_TEXT_MEMORY``.
    """
    text = plain = metadata = 0
    exif = None
    pos, end = 8, len(data)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = pos + 8
        if kind == b"IEND":
            break
        if kind in _PNG_TEXT:
            compressed = kind == b"zTXt"
            if kind == b"iTXt":
                key_end = data.find(b"\0", body, min(end, body + length))
                # the compression flag follows the keyword: Pillow inflates if it is not 0
                compressed = key_end >= 0 and key_end + 1 < end and data[key_end + 1] != 0
            if compressed:
                text += min(PngImagePlugin.MAX_TEXT_CHUNK, 1032 * length + 1024)
            else:
                plain += length
        elif kind == b"eXIf":
            exif = data[body : min(end, body + length)]
        elif kind not in _PNG_PIXELS:
            metadata += min(length, max(0, end - body))
        pos = body + length + 4
    text = min(text + plain, PngImagePlugin.MAX_TEXT_MEMORY)
    return _PngChunks(text=text, plain_text=plain, exif=exif, metadata=metadata)


def _header_from(im: Image.Image, data: bytes, chunks: _PngChunks | None) -> Header:
    """A :class:`Header` for an opened (not loaded) image."""
    fmt = _SOURCE_FORMATS[im.format]
    mode = im.mode
    orientation = _orientation(im)
    file_size = len(data)
    try:
        frames = max(1, int(getattr(im, "n_frames", 1)))
    except Exception:
        frames = 1
    icc = im.info.get("icc_profile") or b""
    try:
        transparency = bool(im.has_transparency_data)
    except Exception:
        transparency = "transparency" in im.info
    working = _working_mode(mode, transparency)

    exif = im.info.get("exif") or b""
    overhead = file_size
    if fmt == "jpeg":
        coefficients, metadata = _jpeg_coefficient_bytes(im, data)
        # row buffers: a few MCU rows of the full width, every component
        overhead += coefficients + 3 * metadata + im.width * 256
    elif fmt == "png":
        chunks = chunks or _png_chunks(data)
        if chunks.exif is not None:
            exif = chunks.exif
            if "exif" not in im.info:  # only after the pixel data: Pillow sees it later
                orientation = _exif_orientation(b"Exif\x00\x00" + chunks.exif)
        # text: read or inflated, split (two copies), decoded to str at up to
        # 4 bytes a character, copied into an iTXt str: 11 bytes a byte at most
        overhead += 11 * chunks.text + 2 * chunks.metadata + im.width * 32
        if icc:
            overhead += 2 * PngImagePlugin.MAX_TEXT_CHUNK  # iCCP is inflated at most this far
    else:  # webp: Pillow and libwebp each keep a copy of the file
        overhead += 2 * file_size
    # EXIF parsed into Python objects: Pillow reads at most the EXIF's size of
    # tag data, in at most 65535 tags of ~200 bytes.
    overhead += len(exif) + min(16 * len(exif), 16 * _MIB)
    if icc and len(icc) <= ICC_CONVERT_MAX_BYTES:
        overhead += 4 * len(icc) + _MIB  # littlecms' copy, its tags, the transform
    overhead += 256 * _KIB  # encoder state, Python objects, row buffers of small images
    return Header(
        format=fmt,
        width=im.width,
        height=im.height,
        mode=mode,
        bands=len(im.getbands()),
        frames=frames,
        orientation=orientation,
        file_size=file_size,
        working_mode=working,
        icc_size=len(icc),
        overhead_bytes=overhead,
    )


def read_header(data: bytes, max_pixels: int) -> Header:
    """Describe ``data`` from its header, without decoding any pixel.

    Raises :class:`~imgserver.errors.TooLarge` if width x height exceeds
    ``max_pixels`` (or PNG text exceeds Pillow's limit),
    :class:`~imgserver.errors.UnsupportedImage` for anything but JPEG, PNG
    and WebP (those other formats are not even parsed), and
    :class:`~imgserver.errors.CorruptImage` for a broken header.  Frames of
    animated files are counted from the header (APNG's ``acTL``, WebP's
    demuxer), not decoded.
    """
    im, chunks = _open(data, max_pixels)
    with im:
        return _header_from(im, data, chunks)


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """:func:`read_header`, summarised as an :class:`ImageInfo` (older callers)."""
    im, chunks = _open(data, max_pixels)
    with im:
        header = _header_from(im, data, chunks)
    return ImageInfo(header.width, header.height, header.format, header.mode, header.orientation)


def info(data: bytes, max_pixels: int | None = None) -> dict[str, object]:
    """The ``/info`` document: width, height, format, mode, bytes, orientation.

    ``width`` and ``height`` are the size as displayed, i.e. after the EXIF
    orientation is applied: that is what browsers show for the original and
    what transforms produce.  ``orientation`` (1 = none) tells clients the
    stored pixels are rotated or flipped.  Header only; ``max_pixels`` None
    means no limit of ours (Pillow's still applies).
    """
    im, chunks = _open(data, max_pixels)
    with im:
        return _header_from(im, data, chunks).as_info()


# ---------------------------------------------------------------------------
# Geometry


def plan(width: int, height: int, spec: TransformSpec) -> Plan:
    """Output size and source box for a ``width`` x ``height`` (oriented) source.

    * one side given: the other follows the aspect ratio (every fit);
      ``max`` keeps the original size rather than enlarge.
    * ``clip``: largest size inside w x h with the source's aspect ratio.
    * ``max``: like clip, but never larger than the source.
    * ``crop``: exactly w x h, from the largest centred box of that aspect.
    * ``scale``: exactly w x h, the whole source stretched.
    """
    full = (0.0, 0.0, float(width), float(height))
    w, h = spec.width, spec.height
    if w is None and h is None:
        return Plan(width, height, full)
    if w is None or h is None:
        if w is not None:
            out = (w, max(1, round(height * w / width)))
        else:
            assert h is not None
            out = (max(1, round(width * h / height)), h)
        if spec.fit == "max" and (out[0] > width or out[1] > height):
            return Plan(width, height, full)
        return Plan(out[0], out[1], full)
    if spec.fit == "scale":
        return Plan(w, h, full)
    if spec.fit == "crop":
        if width * h > height * w:  # source is wider than the target: trim the sides
            crop_w = height * w / h
            left = (width - crop_w) / 2
            return Plan(w, h, (left, 0.0, left + crop_w, float(height)))
        crop_h = width * h / w
        top = (height - crop_h) / 2
        return Plan(w, h, (0.0, top, float(width), top + crop_h))
    scale = min(w / width, h / height)
    if spec.fit == "max" and scale >= 1:
        return Plan(width, height, full)
    return Plan(
        min(w, max(1, round(width * scale))),
        min(h, max(1, round(height * scale))),
        full,
    )


@dataclass(frozen=True)
class _Geometry:
    """A plan expressed on the stored (not yet oriented) pixels.

    The pipeline resizes the stored pixels and orients the (smaller) result,
    so it needs the output size and the source box in stored coordinates.
    """

    plan: Plan  # as displayed
    size: tuple[int, int]  # output size before orienting
    box: tuple[float, float, float, float]  # source box on the stored pixels
    draft: tuple[int, int] | None  # what to ask JPEG draft() for, or None


def _stored_box(box, orientation: int, stored_w: int, stored_h: int):
    """Map a box on the displayed image back onto the stored pixels."""
    left, top, right, bottom = box
    w, h = stored_w, stored_h
    if orientation == 2:
        return (w - right, top, w - left, bottom)
    if orientation == 3:
        return (w - right, h - bottom, w - left, h - top)
    if orientation == 4:
        return (left, h - bottom, right, h - top)
    if orientation == 5:  # transpose: x = y', y = x'
        return (top, left, bottom, right)
    if orientation == 6:  # rotated 90 clockwise: x = y', y = h - x'
        return (top, h - right, bottom, h - left)
    if orientation == 7:  # transverse: x = w - y', y = h - x'
        return (w - bottom, h - right, w - top, h - left)
    if orientation == 8:  # rotated 90 counter-clockwise: x = w - y', y = x'
        return (w - bottom, left, w - top, right)
    return box


def _geometry(stored_w: int, stored_h: int, orientation: int, spec: TransformSpec,
              jpeg: bool) -> _Geometry:
    swapped = orientation in _SWAPPING_ORIENTATIONS
    src_w, src_h = (stored_h, stored_w) if swapped else (stored_w, stored_h)
    p = plan(src_w, src_h, spec)
    size = (p.height, p.width) if swapped else (p.width, p.height)
    box = _stored_box(p.box, orientation, stored_w, stored_h)
    draft = None
    if jpeg:
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        need_w = math.ceil(stored_w * size[0] / box_w * REDUCING_GAP)
        need_h = math.ceil(stored_h * size[1] / box_h * REDUCING_GAP)
        if need_w < stored_w and need_h < stored_h:
            draft = (need_w, need_h)
    return _Geometry(p, size, box, draft)


def _draft_scale(stored_w: int, stored_h: int, request: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) JpegImageFile.draft picks for ``request``."""
    scale = min(stored_w // request[0], stored_h // request[1])
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def _check_output(p: Plan, fmt: str, max_output_pixels: int) -> None:
    if p.width * p.height > max_output_pixels:
        raise TooLarge(
            f"output {p.width}x{p.height} would exceed the limit of {max_output_pixels} pixels"
        )
    if max(p.width, p.height) > _MAX_SIDE[fmt]:
        raise TooLarge(f"{fmt.upper()} output is limited to {_MAX_SIDE[fmt]} pixels per side")


# ---------------------------------------------------------------------------
# Memory estimate


def estimate_bytes(header: Header, spec: TransformSpec | None,
                   max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS) -> int:
    """Upper bound of the memory :func:`transform` needs at its peak (bytes).

    Computed from ``header`` alone (see *Memory model* in the module
    docstring for the formula); includes the file's own bytes.  ``spec``
    None is ``/info``: the file and its parsed header only.  Raises
    :class:`~imgserver.errors.TooLarge`, as :func:`transform` would, when
    the output exceeds ``max_output_pixels`` or the format's largest side.
    """
    if spec is None:
        return header.overhead_bytes
    out_fmt = spec.format or header.format
    geo = _geometry(header.width, header.height, header.orientation, spec,
                    header.format == "jpeg")
    _check_output(geo.plan, out_fmt, max_output_pixels)

    # Decoded source.
    src_w, src_h = header.width, header.height
    scale = 1
    if geo.draft is not None:
        scale = _draft_scale(src_w, src_h, geo.draft)
        src_w, src_h = -(-src_w // scale), -(-src_h // scale)
    source = src_w * src_h
    decoder = 12 if header.format == "webp" else 0
    mode, working = header.mode, header.working_mode
    total = header.overhead_bytes
    total += source * (_pixel_bytes(mode) + decoder + _convert_bytes(mode, working))

    work_bpp = _pixel_bytes(working)
    out_w, out_h = geo.size
    out_px = out_w * out_h
    alpha = working in ("LA", "RGBA")
    box = geo.box
    box_w, box_h = (box[2] - box[0]) / scale, (box[3] - box[1]) / scale
    resizes = (out_w, out_h) != (src_w, src_h) or (box_w, box_h) != (src_w, src_h)
    if resizes:
        if alpha:
            total += source * 4  # premultiplied copy of the whole source
            work_bpp = 4
        factor_x = int(box_w / out_w / REDUCING_GAP) or 1
        factor_y = int(box_h / out_h / REDUCING_GAP) or 1
        # Lanczos reads 3 source pixels (scaled) either side of the box.
        margin_x = 3 * box_w / out_w + 2
        margin_y = 3 * box_h / out_h + 2
        rows = math.ceil((box_h + 2 * margin_y) / factor_y) + 1
        cols = math.ceil((box_w + 2 * margin_x) / factor_x) + 1
        if factor_x > 1 or factor_y > 1:
            total += cols * rows * work_bpp  # reduce() result
        total += out_w * rows * work_bpp  # first (horizontal) resampling pass
        total += 64 * (cols + rows + out_w + out_h)  # filter coefficients

    # The output and the copies made of it, each alive with the one before:
    # straight alpha again, grey tone curve, flattened onto white or RGB for
    # the encoder, oriented.  (Without resizing, the first is the source.)
    final = _output_mode(working, out_fmt)
    current = work_bpp if resizes else 0
    peak = current

    def copy(new: int, extra: int = 0) -> None:
        nonlocal current, peak
        peak = max(peak, current + new + extra)
        current = new

    if resizes and alpha:
        copy(_pixel_bytes(working))
    if header.icc_size and working in ("L", "LA"):
        copy(_pixel_bytes(working))
    if final != working:
        flatten = working in ("LA", "RGBA") and out_fmt == "jpeg"
        copy(_pixel_bytes(final), extra=_pixel_bytes(final) + 1 if flatten else 0)
    if header.orientation in _TRANSPOSE:
        copy(_pixel_bytes(final))
    total += out_px * peak

    # Encoding: the encoded bytes twice (memfd, bytes read back), encoder state.
    channels = len(final)  # L, LA, RGB, RGBA
    if out_fmt == "png":
        encoded = out_px * channels + out_h + out_px * channels // 512
    elif out_fmt == "jpeg":
        encoded = out_px * channels
    else:
        encoded = out_px * 2
        # libwebp: ARGB and YUV pictures, token buffers (they grow with the
        # detail: 19 bytes a pixel for noise at q85, 27 at q100, 6 for a flat
        # image), and for alpha a lossless encoder's hash chains and
        # references (up to 45 bytes a pixel in all for a noisy alpha plane).
        total += out_px * (48 if final == "RGBA" else 28)
    # Row buffers of the encoders (libjpeg keeps 16 rows of every component,
    # before and after colour conversion): a 50000 x 1 JPEG costs 2.4 MB.
    total += 2 * (encoded + 64 * _KIB) + max(out_w, out_h) * 256
    return int(total)


# ---------------------------------------------------------------------------
# Modes


def _to_working_mode(im: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA: modes every step (resize, flatten, encode) handles well.

    Palette and bilevel images would be resized with NEAREST, 16-bit grey
    would be clipped by a plain convert, CMYK and others need RGB for the web.
    """
    mode = im.mode
    if mode in ("LA", "RGBA"):
        return im
    if mode in ("L", "RGB"):
        return im.convert("RGBA") if "transparency" in im.info else im
    if mode == "1":
        return im.convert("L")
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit samples: scale 0..65535 to 0..255 (convert("L") would clip).
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if mode in ("P", "PA"):
        return im.convert("RGBA" if im.has_transparency_data else "RGB")
    if mode == "La":
        return im.convert("LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _flatten(im: Image.Image) -> Image.Image:
    """Composite an LA/RGBA image onto white (JPEG has no alpha)."""
    base_mode = im.mode[:-1]
    background = Image.new(base_mode, im.size, 255 if base_mode == "L" else (255, 255, 255))
    background.paste(im.convert(base_mode), mask=im.getchannel("A"))
    return background


def _output_mode(working: str, fmt: str) -> str:
    """The mode :func:`_to_output_mode` gives a ``working``-mode image for ``fmt``."""
    if fmt == "jpeg" and working in ("LA", "RGBA"):
        return working[:-1]
    if fmt == "webp" and working in ("L", "LA"):
        return "RGBA" if working == "LA" else "RGB"
    return working


def _to_output_mode(im: Image.Image, fmt: str) -> Image.Image:
    if fmt == "jpeg" and im.mode in ("LA", "RGBA"):
        return _flatten(im)
    if fmt == "webp" and im.mode in ("L", "LA"):
        return im.convert("RGBA" if im.mode == "LA" else "RGB")
    return im


# ---------------------------------------------------------------------------
# ICC profiles

_srgb_profile = ImageCms.createProfile("sRGB")
_icc_lock = threading.Lock()
_icc_cache: OrderedDict[tuple[bytes, str], tuple[str, object]] = OrderedDict()

# 16 x 16 x 16 colours, to tell whether a profile is sRGB in disguise.
_PROBE_COLOURS = bytes(
    c for r in range(0, 256, 17) for g in range(0, 256, 17) for b in range(0, 256, 17)
    for c in (r, g, b)
)


def _icc_action(profile: bytes, space: str) -> tuple[str, object]:
    """What converting from ``profile`` takes: ("none", None), ("lut", table), ("cms", transform)."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    flags = ImageCms.Flags.NOCACHE  # a transform shared by threads must not cache
    if space == "L":
        transform = ImageCms.buildTransform(
            source, _srgb_profile, "L", "RGB", ImageCms.Intent.PERCEPTUAL, flags)
        ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
        out = ImageCms.applyTransform(ramp, transform)
        table = list(out.getchannel("G").tobytes())
        if all(abs(a - b) <= 2 for a, b in zip(table, range(256))):
            return "none", None
        return "lut", table
    transform = ImageCms.buildTransform(
        source, _srgb_profile, "RGB", "RGB", ImageCms.Intent.PERCEPTUAL, flags)
    probe_im = Image.frombytes("RGB", (len(_PROBE_COLOURS) // 3, 1), _PROBE_COLOURS)
    out = ImageCms.applyTransform(probe_im, transform).tobytes()
    if all(abs(a - b) <= 2 for a, b in zip(out, _PROBE_COLOURS)):
        return "none", None
    alpha = ImageCms.buildTransform(
        source, _srgb_profile, "RGBA", "RGBA", ImageCms.Intent.PERCEPTUAL, flags)
    return "cms", (transform, alpha)


def _icc_lookup(profile: bytes, space: str) -> tuple[str, object]:
    key = (hashlib.sha256(profile).digest(), space)
    with _icc_lock:
        found = _icc_cache.get(key)
        if found is not None:
            _icc_cache.move_to_end(key)
            return found
    try:
        action = _icc_action(profile, space)
    except Exception:  # littlecms rejects it: drop it
        action = ("drop", None)
    with _icc_lock:
        _icc_cache[key] = action
        while len(_icc_cache) > ICC_CACHE_SIZE:
            _icc_cache.popitem(last=False)
    return action


def _to_srgb(im: Image.Image, profile: bytes | None) -> Image.Image:
    """Apply ``profile`` to ``im`` (L, LA, RGB or RGBA) so its pixels are sRGB.

    May work in place: ``im`` must be ours.  See *ICC profiles*.
    """
    if not profile or len(profile) < 20 or len(profile) > ICC_CONVERT_MAX_BYTES:
        return im
    space = profile[16:20]
    if im.mode in ("RGB", "RGBA") and space == b"RGB ":
        kind, action = _icc_lookup(profile, "RGB")
        if kind == "cms":
            rgb, rgba = action  # type: ignore[misc]
            try:
                ImageCms.applyTransform(im, rgb if im.mode == "RGB" else rgba, inPlace=True)
            except Exception:
                pass  # leave the pixels as they are (taken as sRGB)
        return im
    if im.mode in ("L", "LA") and space == b"GRAY":
        kind, table = _icc_lookup(profile, "L")
        if kind == "lut":
            lut = list(table)  # type: ignore[call-overload]
            if im.mode == "LA":
                lut += list(range(256))
            return im.point(lut)
    return im


# ---------------------------------------------------------------------------
# Encoding

_memfd_usable = hasattr(os, "memfd_create")


def _scratch_fd() -> int:
    """A new anonymous in-memory file (memfd), or an unlinked temporary file."""
    global _memfd_usable
    if _memfd_usable:
        try:
            return os.memfd_create("imgserver-encode", os.MFD_CLOEXEC)
        except OSError:  # e.g. ENOSYS under some sandboxes: stop trying
            _memfd_usable = False
    fd, name = tempfile.mkstemp(prefix="imgserver-encode-")
    try:
        os.unlink(name)
    except OSError:
        os.close(fd)
        raise
    return fd


def _read_back(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise OSError("scratch file shrank while reading it back")
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _encode_to_fd(im: Image.Image, fmt: str, params: dict) -> bytes:
    """Encode through a real file descriptor.

    Pillow only uses its GIL-free ``encode_to_file`` path when the target
    has a working ``fileno()``; encoding into ``io.BytesIO`` holds the GIL
    and serialises threads.  A memfd keeps it all in memory.
    """
    fd = _scratch_fd()
    try:
        with open(fd, "wb", buffering=0, closefd=False) as scratch:
            im.save(scratch, format=_SAVE_FORMATS[fmt], **params)
        return _read_back(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _encode_to_bytesio(im: Image.Image, fmt: str, params: dict) -> bytes:
    """Encode into ``io.BytesIO``: holds the GIL (kept for the benchmark)."""
    out = io.BytesIO()
    im.save(out, format=_SAVE_FORMATS[fmt], **params)
    return out.getvalue()


def _save_params(fmt: str, quality: int) -> dict:
    if fmt == "jpeg":
        return {"quality": quality, "optimize": False, "progressive": False}
    if fmt == "webp":
        return {"quality": quality, "method": 4}
    return {"compress_level": 6}


# ---------------------------------------------------------------------------
# Transform


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("image has too many pixels") from None
    except MemoryError:
        raise
    except Exception as err:  # anything Pillow or a codec raises on hostile data
        if _is_metadata_limit(err):
            raise TooLarge("image metadata (PNG text) is too large") from None
        raise CorruptImage(
            f"{_SOURCE_FORMATS.get(im.format or '', 'image').upper()} data is truncated or corrupt"
        ) from None


def transform(data: bytes, spec: TransformSpec, max_pixels: int,
              max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS) -> Result:
    """Decode ``data``, apply ``spec`` and encode the result.

    Steps: header checks (format, ``max_pixels``, ``max_output_pixels`` and
    the encoder's largest side: all before decoding); JPEG DCT scaling via
    ``draft`` to no less than ``REDUCING_GAP`` x the needed size; decode;
    conversion to L, LA, RGB or RGBA; one ``resize`` (Lanczos,
    ``reducing_gap``) of the planned box of the stored pixels; colour
    profile to sRGB; mode for the output format (alpha flattened onto white
    for JPEG); EXIF orientation applied to the (small) result; encode with
    no metadata at all.  Each step drops what it no longer needs, so memory
    stays within :func:`estimate_bytes`.
    """
    return _transform(data, spec, max_pixels, _encode_to_fd, max_output_pixels)


def _transform(
    data: bytes,
    spec: TransformSpec,
    max_pixels: int,
    encode: Callable[[Image.Image, str, dict], bytes],
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
) -> Result:
    im, _ = _open(data, max_pixels)
    with im:
        out_fmt = spec.format or _SOURCE_FORMATS[im.format]
        stored_w, stored_h = im.size
        jpeg = im.format in ("JPEG", "MPO")
        orientation = _orientation(im)
        geo = _geometry(stored_w, stored_h, orientation, spec, jpeg)
        _check_output(geo.plan, out_fmt, max_output_pixels)

        # JPEG: let libjpeg scale by 1/2, 1/4 or 1/8 while decoding.
        scale = 1.0
        if geo.draft is not None:
            drafted = im.draft(None, geo.draft)
            if drafted is not None:
                scale = drafted[1][2] / stored_w

        _load(im)

        # A PNG's eXIf chunk may only be seen now; re-plan if it changes things.
        loaded_orientation = _orientation(im, loaded=True)
        if loaded_orientation != orientation:
            orientation = loaded_orientation
            geo = _geometry(stored_w, stored_h, orientation, spec, False)
            _check_output(geo.plan, out_fmt, max_output_pixels)

        icc = im.info.get("icc_profile")
        img = _to_working_mode(im)
        if img is not im:
            im.close()  # free the decoded source now (WebP's decoder and its
            # canvases go with ``im`` itself, at the end: counted in the estimate)

        box = tuple(min(c * scale, limit) for c, limit in zip(geo.box, (*img.size, *img.size)))
        if img.size != geo.size or box != (0.0, 0.0, *map(float, img.size)):
            alpha = img.mode in ("LA", "RGBA")
            if alpha:  # what resize() does, without keeping the straight-alpha copy
                img = img.convert("RGBa" if img.mode == "RGBA" else "La")
                im.close()
            img = img.resize(geo.size, Image.Resampling.LANCZOS, box=box,
                             reducing_gap=REDUCING_GAP)
            im.close()
            if alpha:
                img = img.convert("RGBA" if img.mode == "RGBa" else "LA")

        img = _to_srgb(img, icc)
        img = _to_output_mode(img, out_fmt)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        img.info = {}  # strip EXIF, XMP, ICC, comments, text chunks, dpi
        body = encode(img, out_fmt, _save_params(out_fmt, spec.quality))
        return Result(
            body=body,
            content_type=CONTENT_TYPES[out_fmt],
            width=img.width,
            height=img.height,
            format=out_fmt,
        )

