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
**JPEG** (including MPO: first picture), **PNG** (and APNG), **WebP**,
**GIF**, **AVIF** (libavif with dav1d), and **HEIF/HEIC** when the optional
``pillow-heif`` plugin is installed; the table is :mod:`imgserver.formats`.
Animated files give their first frame unless ``frame``/``animated`` ask for
more (bounded by ``max_frames`` and, decoded frames x pixels, by
``max_pixels``).  TIFF, BMP and everything else are refused with
:class:`~imgserver.errors.UnsupportedImage` (415) without being parsed
(``Image.open(..., formats=...)``): a smaller decoder surface.  A file that
starts like a supported format but cannot be read is
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
``draft`` picks for ``DRAFT_GAP`` x the needed size), ``O`` the output
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

from PIL import AvifImagePlugin, Image, ImageCms, ImageFilter, PngImagePlugin

from imgserver import formats
from imgserver.errors import BadRequest, CorruptImage, TooLarge, UnsupportedImage
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

#: Canonical format name -> MIME type (from :mod:`imgserver.formats`).
CONTENT_TYPES = formats.CONTENT_TYPES

#: ``max_output_pixels`` when a caller gives none (``settings.max_output_pixels``' default).
DEFAULT_MAX_OUTPUT_PIXELS = 25_000_000

#: Largest ICC profile converted to sRGB; larger ones are dropped unparsed.
ICC_CONVERT_MAX_BYTES = 1 << 20

#: Distinct ICC profiles whose conversion is remembered.
ICC_CACHE_SIZE = 32

#: Decompressed PNG text (tEXt, zTXt, iTXt) Pillow may hold per image once
#: :func:`configure_pillow` ran (Pillow's default is 64 MiB).
PNG_TEXT_MEMORY = 8 << 20

#: ``max_frames`` when a caller gives none (``settings.max_frames``' default).
DEFAULT_MAX_FRAMES = 100

#: AVIF encoder speed (0 slowest .. 10 fastest); imgproxy's default is 9 too:
#: on 256-640 px photos here speed 9 encodes in about WebP's time, speed 6
#: takes 5-20x longer for files 5-25% smaller.
AVIF_SPEED = 9

# Largest side each encoder can write.
_MAX_SIDE = {name: f.max_side for name, f in formats.FORMATS.items() if f.writable}

#: The resampling filter of the one resize, and the margins below: chosen with
#: bench/quality.py.  Of the pipelines whose SSIM loss against a full-resolution
#: Lanczos resize stays under a quarter of JPEG q80's own loss on every
#: workload (the worst image under half of it), Lanczos after ``draft`` to
#: 1.5x with ``reducing_gap`` 2 is as cheap as any (within the 5% that runs
#: differ by) and the most faithful: 1.3x the JPEG thumbnails per CPU-second
#: of draft to 2x (libjpeg decodes a 2560-px photo at 1/4 instead of 1/2 for a
#: 256-px crop), SSIM 0.997.  Drafting to 1x (the cheapest plain loop) loses
#: too much on some images (worst SSIM 0.982 where libjpeg's 1/8 scaling lands
#: on the target size).
RESAMPLE = Image.Resampling.LANCZOS

#: JPEG ``draft`` decodes at no less than this multiple of the needed size
#: (DCT scaling by 1/2, 1/4, 1/8), and ``resize`` first shrinks by an integer
#: factor with ``reduce()`` while that leaves at least ``REDUCING_GAP`` x the
#: output (None: never).  Chosen with bench/quality.py (see there).
DRAFT_GAP = 1.5
REDUCING_GAP: float | None = 2.0

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
    frames: int = 1


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
    * libavif decodes with one thread (``AvifImagePlugin.DEFAULT_MAX_THREADS``):
      each worker is one core, as for every other format.

    Process-wide state, idempotent (warning filters are not duplicated).  The
    filters are process-wide on purpose: ``warnings.catch_warnings()`` per
    call would swap the global filter list under concurrent worker threads.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY
    AvifImagePlugin.DEFAULT_MAX_THREADS = 1  # one core per worker: workers are the parallelism
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    # Inserted in front of the line above, so it wins for this category.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# ---------------------------------------------------------------------------
# Opening


def _sniff(data: bytes) -> str | None:
    return formats.sniff(data[:64])


def _open_formats() -> tuple[str, ...]:
    """Pillow formats ``Image.open`` may try: ours, HEIF only with its plugin."""
    names = ["JPEG", "PNG", "WEBP", "GIF", "AVIF"]
    if formats.heif_available():
        _register_heif()
        names.append("HEIF")
    return tuple(names)


_heif_registered = False


def _register_heif() -> None:
    global _heif_registered
    if not _heif_registered:
        import pillow_heif

        pillow_heif.register_heif_opener(thumbnails=False)
        _heif_registered = True


def _not_opened(data: bytes) -> UnsupportedImage:
    """The error for data Pillow could not open: corrupt if it looks like ours."""
    kind = _sniff(data)
    if kind == "heif" and not formats.heif_available():
        return UnsupportedImage("HEIF images need the pillow-heif plugin on the server")
    if kind in formats.FORMATS:
        return CorruptImage(f"{kind.upper()} header is truncated or corrupt")
    if kind is not None:
        return UnsupportedImage(f"{kind} images are not supported (JPEG, PNG, WebP, GIF or AVIF only)")
    return UnsupportedImage("not an image (JPEG, PNG, WebP, GIF or AVIF expected)")


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
        im = Image.open(io.BytesIO(data), formats=_open_formats())
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
        if formats.by_pillow_name(im.format) is None:
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
    fmt = _format_name(im)
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
    elif fmt == "webp":  # Pillow and libwebp each keep a copy of the file
        overhead += 2 * file_size
    elif fmt in ("avif", "heif"):  # the decoder's copy of the file; its state
        overhead += file_size + 4 * _MIB
    else:  # gif: the LZW decoder's state; frames are scanned, not decoded
        overhead += 64 * _KIB
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
#
# Orientations are the eight symmetries of a rectangle, kept as 2x2 matrices
# (a, b, c, d) acting on coordinates centred on the image: (x, y) ->
# (a x + b y, c x + d y).  The EXIF orientation (or ``orient``), ``flip`` and
# the multiple-of-90 part of ``rot`` compose into one; the pipeline resizes the
# stored pixels and applies that one transposition to the small result.

_Matrix = tuple[int, int, int, int]
_IDENTITY: _Matrix = (1, 0, 0, 1)
_MATRICES: dict[Image.Transpose, _Matrix] = {
    Image.Transpose.FLIP_LEFT_RIGHT: (-1, 0, 0, 1),
    Image.Transpose.FLIP_TOP_BOTTOM: (1, 0, 0, -1),
    Image.Transpose.ROTATE_180: (-1, 0, 0, -1),
    Image.Transpose.TRANSPOSE: (0, 1, 1, 0),
    Image.Transpose.ROTATE_90: (0, 1, -1, 0),  # counter-clockwise
    Image.Transpose.ROTATE_270: (0, -1, 1, 0),
    Image.Transpose.TRANSVERSE: (0, -1, -1, 0),
}
_TRANSPOSE_OF = {m: t for t, m in _MATRICES.items()}
_FLIPS = {"": _IDENTITY, "h": (-1, 0, 0, 1), "v": (1, 0, 0, -1), "hv": (-1, 0, 0, -1)}
_ROTATIONS = {0: _IDENTITY, 1: (0, 1, -1, 0), 2: (-1, 0, 0, -1), 3: (0, -1, 1, 0)}


def _compose(after: _Matrix, before: _Matrix) -> _Matrix:
    a, b, c, d = after
    e, f, g, h = before
    return (a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h)


def _swaps(m: _Matrix) -> bool:
    return m[0] == 0


def _apply_size(m: _Matrix, w: float, h: float) -> tuple[float, float]:
    return (h, w) if _swaps(m) else (w, h)


def _box_before(m: _Matrix, box: tuple[float, float, float, float], w: float, h: float):
    """Map ``box`` on an image transformed by ``m`` back onto the image before
    it (``w`` x ``h``)."""
    big_w, big_h = _apply_size(m, w, h)
    a, b, c, d = m
    xs, ys = [], []
    for x, y in ((box[0], box[1]), (box[2], box[3])):
        cx, cy = x - big_w / 2, y - big_h / 2
        xs.append(a * cx + c * cy + w / 2)  # the inverse of an orthogonal matrix is its transpose
        ys.append(b * cx + d * cy + h / 2)
    return (min(xs), min(ys), max(xs), max(ys))


def _orientation_matrix(orientation: int) -> _Matrix:
    transpose = _TRANSPOSE.get(orientation)
    return _MATRICES[transpose] if transpose is not None else _IDENTITY


def plan(width: int, height: int, spec: TransformSpec) -> Plan:
    """Output size and source box for a ``width`` x ``height`` (oriented) source.

    * one side given: the other follows the aspect ratio (every fit);
      ``max`` and ``min`` keep the original size rather than enlarge.
    * ``clip``/``fill``: largest size inside w x h with the source's aspect
      ratio (``fill`` then pads to w x h: see :func:`_geometry`).
    * ``max``: like clip, but never larger than the source.
    * ``crop``: exactly w x h, from the largest box of that aspect, placed by
      ``crop`` (centre, sides, focal point with zoom; ``entropy`` is placed on
      the pixels later, centred here).
    * ``min``: like crop, but never larger than that box.
    * ``scale``: exactly w x h, the whole source stretched.

    ``w``/``h`` are the spec's less twice ``pad``.
    """
    full = (0.0, 0.0, float(width), float(height))
    w, h = spec.width, spec.height
    if w is None and h is None:
        return Plan(width, height, full)
    pad = spec.pad
    if w is not None:
        w -= 2 * pad
    if h is not None:
        h -= 2 * pad
    if (w is not None and w < 1) or (h is not None and h < 1):
        raise BadRequest(f"pad={pad} leaves no room for the image inside w x h")
    if w is None or h is None:
        if w is not None:
            out = (w, max(1, round(height * w / width)))
        else:
            assert h is not None
            out = (max(1, round(width * h / height)), h)
        if spec.fit in ("max", "min") and (out[0] > width or out[1] > height):
            return Plan(width, height, full)
        return Plan(out[0], out[1], full)
    if spec.fit == "scale":
        return Plan(w, h, full)
    if spec.fit in ("crop", "min"):
        if width * h > height * w:  # source is wider than the target: trim the sides
            crop_w, crop_h = height * w / h, float(height)
        else:
            crop_w, crop_h = float(width), width * h / w
        fx, fy, zoom = spec.focal if "focalpoint" in spec.crop else (0.5, 0.5, 1.0)
        crop_w, crop_h = crop_w / zoom, crop_h / zoom
        out_w, out_h = w, h
        if spec.fit == "min" and w > crop_w:
            out_w, out_h = max(1, round(crop_w)), max(1, round(crop_h))
        if "left" in spec.crop:
            left = 0.0
        elif "right" in spec.crop:
            left = width - crop_w
        else:
            left = min(max(0.0, fx * width - crop_w / 2), width - crop_w)
        if "top" in spec.crop:
            top = 0.0
        elif "bottom" in spec.crop:
            top = height - crop_h
        else:
            top = min(max(0.0, fy * height - crop_h / 2), height - crop_h)
        return Plan(out_w, out_h, (left, top, left + crop_w, top + crop_h))
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

    plan: Plan  # as displayed, before padding and free rotation
    size: tuple[int, int]  # resized size before orienting
    box: tuple[float, float, float, float]  # source box on the stored pixels
    draft: tuple[int, int] | None  # what to ask JPEG draft() for, or None
    transpose: Image.Transpose | None  # applied to the resized image
    canvas: tuple[int, int]  # after padding / fill
    offset: tuple[int, int]  # where the image sits on the canvas
    angle: int  # free rotation left after the multiples of 90
    final: tuple[int, int]  # the output size
    entropy_axis: int | None  # 0/1: the stored axis along which crop=entropy slides


def _rotated_size(w: int, h: int, angle: int) -> tuple[int, int]:
    """The canvas ``Image.rotate(angle, expand=True)`` gives a w x h image."""
    if not angle:
        return w, h
    rad = math.radians(angle)
    cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
    return math.ceil(w * cos + h * sin) + 1, math.ceil(w * sin + h * cos) + 1


def _geometry(stored_w: int, stored_h: int, orientation: int, spec: TransformSpec,
              jpeg: bool) -> _Geometry:
    """Where everything goes: rect, fit, crop, orientation, padding, rotation.

    Raises BadRequest for a ``rect`` outside the image or padding that
    leaves no room.
    """
    if spec.orient is not None:
        orientation = spec.orient or 1  # 0: ignore EXIF
    exif = _orientation_matrix(orientation)
    after = _compose(_ROTATIONS[spec.rot // 90], _FLIPS[spec.flip])  # flip, then rotate
    total = _compose(after, exif)
    ow, oh = _apply_size(exif, stored_w, stored_h)
    region = (0.0, 0.0, float(ow), float(oh))
    if spec.rect is not None:
        x, y, w, h = spec.rect
        if x >= ow or y >= oh:
            raise BadRequest(f"rect starts outside the {ow}x{oh} image")
        region = (float(x), float(y), float(min(ow, x + w)), float(min(oh, y + h)))
    rw, rh = region[2] - region[0], region[3] - region[1]
    fw, fh = _apply_size(after, rw, rh)
    p = plan(max(1, round(fw)), max(1, round(fh)), spec)
    box = _box_before(after, p.box, rw, rh)
    box = (box[0] + region[0], box[1] + region[1], box[2] + region[0], box[3] + region[1])
    box = _box_before(exif, box, stored_w, stored_h)
    size = (p.height, p.width) if _swaps(total) else (p.width, p.height)

    pad = spec.pad
    canvas = (p.width + 2 * pad, p.height + 2 * pad)
    if spec.fit == "fill" and spec.width is not None and spec.height is not None:
        canvas = (spec.width, spec.height)
    offset = ((canvas[0] - p.width) // 2, (canvas[1] - p.height) // 2)
    angle = spec.rot % 90
    final = _rotated_size(*canvas, angle)

    entropy_axis = None
    if "entropy" in spec.crop and spec.fit in ("crop", "min"):
        # The crop box slides along the frame's longer free side: x if it is
        # narrower than the frame, else y; on the stored pixels that axis is
        # swapped if the orientation swaps.
        frame_w, frame_h = max(1, round(fw)), max(1, round(fh))
        if p.box[2] - p.box[0] < frame_w - 1e-6:
            entropy_axis = 0 ^ int(_swaps(total))
        elif p.box[3] - p.box[1] < frame_h - 1e-6:
            entropy_axis = 1 ^ int(_swaps(total))

    draft = None
    if jpeg:
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        need_w = math.ceil(stored_w * size[0] / box_w * DRAFT_GAP)
        need_h = math.ceil(stored_h * size[1] / box_h * DRAFT_GAP)
        if need_w < stored_w and need_h < stored_h:
            draft = (need_w, need_h)
    transpose = _TRANSPOSE_OF.get(total)
    return _Geometry(p, size, box, draft, transpose, canvas, offset, angle, final, entropy_axis)


def _draft_scale(stored_w: int, stored_h: int, request: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) JpegImageFile.draft picks for ``request``."""
    scale = min(stored_w // request[0], stored_h // request[1])
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def _check_output(geo: _Geometry, fmt: str, max_output_pixels: int) -> None:
    width, height = geo.final
    for w, h in (geo.final, geo.size, geo.canvas):
        if w * h > max_output_pixels:
            raise TooLarge(f"output {w}x{h} would exceed the limit of {max_output_pixels} pixels")
    if max(width, height) > _MAX_SIDE[fmt]:
        raise TooLarge(f"{fmt.upper()} output is limited to {_MAX_SIDE[fmt]} pixels per side")


def _frame_range(frames: int, spec: TransformSpec, width: int, height: int, max_pixels: int,
                 max_frames: int) -> tuple[int, int]:
    """(first, last) frame indexes, from 0, that ``spec`` keeps of ``frames``.

    Every frame up to ``last`` is decoded (animations are built frame on
    frame): ``last + 1`` is bounded by ``max_frames`` and, times the pixels of
    a frame, by ``max_pixels``.
    """
    first, last = spec.frames
    if first > frames:
        raise BadRequest(f"frame {first} asked of an image with {frames} frame{'s' * (frames > 1)}")
    last = frames if last is None else min(last, frames)
    if last > max_frames:
        raise TooLarge(f"{last} frames would be decoded, over the limit of {max_frames}")
    if last * width * height > max_pixels:
        raise TooLarge(f"{last} frames of {width}x{height} are {last * width * height} pixels, "
                       f"over the limit of {max_pixels}")
    return first - 1, last - 1


# ---------------------------------------------------------------------------
# Memory estimate


def _output_format(spec: TransformSpec, source_format: str) -> str:
    """The format written: ``fm`` (or what ``auto=format`` chose), else the
    source's, JPEG for sources imgserver does not write (HEIF)."""
    if spec.format is not None:
        return spec.format
    source = formats.FORMATS.get(source_format)
    return source_format if source is not None and source.writable else "jpeg"


def _fill_colour(spec: TransformSpec, fmt: str) -> tuple[int, int, int, int]:
    """What padding, ``fit=fill`` and rotation corners are filled with."""
    if spec.bg is not None:
        return spec.bg
    return (0, 0, 0, 0) if formats.FORMATS[fmt].alpha else (255, 255, 255, 255)


def _is_grey(colour: tuple[int, int, int, int]) -> bool:
    return colour[0] == colour[1] == colour[2]


def _with_fill(mode: str, colour: tuple[int, int, int, int]) -> str:
    """The mode that holds pixels of ``mode`` and the colour ``colour``."""
    alpha = mode in ("LA", "RGBA") or colour[3] < 255
    base = "L" if mode in ("L", "LA") and _is_grey(colour) else "RGB"
    return base + ("A" if alpha else "")


def _modes(working: str, spec: TransformSpec, geo: _Geometry, fmt: str) -> list[str]:
    """The modes the output goes through after resizing: canvas (padding,
    fill, rotation), background, the output format's; the last is written."""
    modes = []
    mode = working
    if geo.canvas != (geo.plan.width, geo.plan.height) or geo.angle:
        mode = _with_fill(mode, _fill_colour(spec, fmt))
        modes.append(mode)
    if spec.bg is not None and mode in ("LA", "RGBA"):
        mode = "RGB" if spec.bg[3] == 255 else "RGBA"
        modes.append(mode)
    final = _output_mode(mode, fmt)
    if final != mode:
        modes.append(final)
    return modes or [working]


def estimate_bytes(header: Header, spec: TransformSpec | None,
                   max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS, *,
                   max_pixels: int | None = None, max_frames: int = DEFAULT_MAX_FRAMES) -> int:
    """Upper bound of the memory :func:`transform` needs at its peak (bytes).

    Computed from ``header`` alone (see *Memory model* in the module
    docstring for the formula); includes the file's own bytes.  ``spec``
    None is ``/info``: the file and its parsed header only.  Raises
    :class:`~imgserver.errors.TooLarge`, as :func:`transform` would, when
    the output exceeds ``max_output_pixels`` or the format's largest side,
    or the frames asked for exceed ``max_frames`` or (decoded frames x
    pixels) ``max_pixels``; BadRequest for a ``rect`` outside the image or
    a ``frame`` past the last.
    """
    if spec is None:
        return header.overhead_bytes
    out_fmt = _output_format(spec, header.format)
    geo = _geometry(header.width, header.height, header.orientation, spec,
                    header.format == "jpeg")
    _check_output(geo, out_fmt, max_output_pixels)
    first, last = _frame_range(header.frames, spec, header.width, header.height,
                               max_pixels if max_pixels is not None else 2**62, max_frames)
    kept = last - first + 1 if formats.FORMATS[out_fmt].animation else 1

    # Decoded source.
    src_w, src_h = header.width, header.height
    scale = 1
    if geo.draft is not None and first == 0:
        scale = _draft_scale(src_w, src_h, geo.draft)
        src_w, src_h = -(-src_w // scale), -(-src_h // scale)
    source = src_w * src_h
    # Decoders' own buffers per pixel: libwebp's two canvases and its frame,
    # libavif's YUV planes (up to 16 bits, 4:4:4) and the RGB it hands over,
    # Pillow's GIF canvas and previous frame once frames are composed.
    decoder = {"webp": 12, "avif": 20, "heif": 20}.get(header.format, 0)
    mode, working = header.mode, header.working_mode
    if header.format == "gif" and last > 0:
        decoder, mode, working = 9, "RGBA", "RGBA"  # frames after the first are RGB(A)
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
        factor_x = int(box_w / out_w / REDUCING_GAP) or 1 if REDUCING_GAP else 1
        factor_y = int(box_h / out_h / REDUCING_GAP) or 1 if REDUCING_GAP else 1
        # The filter reads up to 3 source pixels (scaled) either side of the box (Lanczos; bicubic 2).
        margin_x = 3 * box_w / out_w + 2
        margin_y = 3 * box_h / out_h + 2
        rows = math.ceil((box_h + 2 * margin_y) / factor_y) + 1
        cols = math.ceil((box_w + 2 * margin_x) / factor_x) + 1
        if factor_x > 1 or factor_y > 1:
            total += cols * rows * work_bpp  # reduce() result
        total += out_w * rows * work_bpp  # first (horizontal) resampling pass
        total += 64 * (cols + rows + out_w + out_h)  # filter coefficients
    if geo.entropy_axis is not None:
        total += 2 * 256 * 256 + 64 * _KIB  # the small grey copy it is measured on

    # The output and the copies made of it, each alive with the one before:
    # straight alpha again, grey tone curve, filters, oriented, padded,
    # rotated, on the background, in the output format's mode.  (Without
    # resizing, the first is the source.)
    canvas_px = geo.canvas[0] * geo.canvas[1]
    final_px = geo.final[0] * geo.final[1]
    current = out_px * work_bpp if resizes else 0
    peak = current

    def copy(new: int, extra: int = 0) -> None:
        nonlocal current, peak
        peak = max(peak, current + new + extra)
        current = new

    if resizes and alpha:
        copy(out_px * _pixel_bytes(working))
    if header.icc_size and working in ("L", "LA"):
        copy(out_px * _pixel_bytes(working))
    if spec.blur or spec.sharp:
        for _ in range((spec.blur > 0) + (spec.sharp > 0)):
            copy(out_px * 4, extra=out_px * 4 if alpha else 0)  # premultiplied copy
    if geo.transpose is not None:
        copy(out_px * 4)
    modes = _modes(working, spec, geo, out_fmt)
    if geo.canvas != (geo.plan.width, geo.plan.height):
        copy(canvas_px * 4, extra=out_px * 4)  # the canvas, and the image converted to its mode
    if geo.angle:
        copy(final_px * 4, extra=final_px * 4)  # the rotated image and its fill
    final = modes[-1]
    if len(modes) > 1 or modes[0] != working:
        flatten = final in ("L", "RGB") and (spec.bg is not None or out_fmt == "jpeg")
        copy(final_px * 4, extra=final_px * 4 + final_px if flatten else 0)
    total += peak
    if kept > 1:
        total += (kept - 1) * final_px * _pixel_bytes(final)  # the frames kept for the animation

    # Encoding: the encoded bytes twice (memfd, bytes read back), encoder state.
    channels = len(final)  # L, LA, RGB, RGBA
    fw, fh = geo.final
    if out_fmt == "png":
        encoded = final_px * channels + fh + final_px * channels // 512
    elif out_fmt == "jpeg":
        encoded = final_px * channels
        if spec.progressive:
            total += final_px * channels * 2  # libjpeg keeps every coefficient for a progressive file
    elif out_fmt == "gif":
        # Quantizing: a palette image, median cut's pixel list and its colour
        # histogram (one entry per distinct colour: up to one a pixel, measured
        # ~60 bytes a pixel for noise); Pillow keeps every frame's palette image.
        encoded = final_px * 2
        total += final_px * 64 + kept * final_px * 2
    elif out_fmt == "avif":
        # libaom: YUV pictures, its lookahead and the rate-control state,
        # measured at 21-28 bytes a pixel (flat picture to noise, speed 6 and
        # 9) plus ~10 MiB of tables the first time a process encodes.
        encoded = final_px * 2
        total += final_px * (28 + 4 * min(kept, 35)) + 12 * _MIB + final_px * 4  # and the frame's bytes
    else:
        encoded = final_px * 2
        # libwebp: ARGB and YUV pictures, token buffers (they grow with the
        # detail: 19 bytes a pixel for noise at q85, 27 at q100, 6 for a flat
        # image), and for alpha a lossless encoder's hash chains and
        # references (up to 45 bytes a pixel in all for a noisy alpha plane).
        total += final_px * (48 if final == "RGBA" or spec.lossless else 28)
        if kept > 1:
            total += final_px * 16  # the animation encoder's previous canvas and candidates
    encoded *= kept
    # Row buffers of the encoders (libjpeg keeps 16 rows of every component,
    # before and after colour conversion): a 50000 x 1 JPEG costs 2.4 MB.
    total += 2 * (encoded + 64 * _KIB) + max(fw, fh) * 256
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
    if fmt == "avif" and working == "LA":
        return "RGBA"
    return working


def _to_output_mode(im: Image.Image, fmt: str) -> Image.Image:
    if fmt == "jpeg" and im.mode in ("LA", "RGBA"):
        return _flatten(im)
    if fmt == "webp" and im.mode in ("L", "LA"):
        return im.convert("RGBA" if im.mode == "LA" else "RGB")
    if fmt == "avif" and im.mode == "LA":
        return im.convert("RGBA")
    return im


def _fill_for(mode: str, colour: tuple[int, int, int, int]) -> int | tuple[int, ...]:
    """``colour`` as a pixel value of ``mode`` (L, LA, RGB or RGBA)."""
    if mode == "L":
        return colour[0]
    if mode == "LA":
        return (colour[0], colour[3])
    return colour[:3] if mode == "RGB" else colour


def _on_canvas(img: Image.Image, geo: _Geometry, colour: tuple[int, int, int, int]) -> Image.Image:
    """``img`` at ``geo.offset`` on a ``geo.canvas`` filled with ``colour`` (pad, fit=fill)."""
    mode = _with_fill(img.mode, colour)
    canvas = Image.new(mode, geo.canvas, _fill_for(mode, colour))
    canvas.paste(img if img.mode == mode else img.convert(mode), geo.offset)
    return canvas


def _rotate(img: Image.Image, angle: int, colour: tuple[int, int, int, int]) -> Image.Image:
    """Counter-clockwise by ``angle`` degrees, the canvas enlarged to hold it all."""
    mode = _with_fill(img.mode, colour)
    if img.mode != mode:
        img = img.convert(mode)
    return img.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=_fill_for(mode, colour))


def _on_background(img: Image.Image, colour: tuple[int, int, int, int]) -> Image.Image:
    """Composite an LA/RGBA image over ``colour`` (``bg``): opaque if it is."""
    base = Image.new("RGBA", img.size, colour)
    base.alpha_composite(img.convert("RGBA"))
    return base.convert("RGB") if colour[3] == 255 else base


def _filtered(img: Image.Image, spec: TransformSpec) -> Image.Image:
    """``blur`` and ``sharp``, on premultiplied pixels when there is alpha
    (straight alpha would bleed the colour of transparent pixels)."""
    alpha = img.mode in ("LA", "RGBA")
    if alpha:
        img = img.convert("RGBa" if img.mode == "RGBA" else "La")
    if spec.blur:
        img = img.filter(ImageFilter.GaussianBlur(spec.blur / 20))
    if spec.sharp:
        img = img.filter(ImageFilter.UnsharpMask(radius=1, percent=2 * spec.sharp, threshold=0))
    if alpha:
        img = img.convert("RGBA" if img.mode == "RGBa" else "LA")
    return img


def _entropy_box(img: Image.Image, box: tuple[float, ...], region: tuple[float, ...],
                 axis: int) -> tuple[float, float, float, float]:
    """Slide ``box`` within ``region`` along ``axis`` to where a small grey
    copy has the most entropy (``crop=entropy``): 33 positions, ties to the
    middle."""
    length = box[axis + 2] - box[axis]
    low, high = region[axis], region[axis + 2] - length
    if high - low < 1:
        return tuple(box)  # type: ignore[return-value]
    clip = (max(0, math.floor(region[0])), max(0, math.floor(region[1])),
            min(img.width, math.ceil(region[2])), min(img.height, math.ceil(region[3])))
    factor = max(1, max(clip[2] - clip[0], clip[3] - clip[1]) // 256)
    small = img.reduce(factor, box=clip).convert("L")
    ratio = (small.width / (clip[2] - clip[0]), small.height / (clip[3] - clip[1]))
    steps = 32
    order = sorted(range(steps + 1), key=lambda i: abs(2 * i - steps))
    best, best_entropy = (low + high) / 2, -1.0
    for i in order:
        start = low + (high - low) * i / steps
        window = list(box)
        window[axis], window[axis + 2] = start, start + length
        cut = tuple(round((window[k] - clip[k % 2]) * ratio[k % 2]) for k in range(4))
        cut = (cut[0], cut[1], max(cut[2], cut[0] + 1), max(cut[3], cut[1] + 1))
        entropy = small.crop(cut).entropy()
        if entropy > best_entropy + 1e-9:
            best, best_entropy = start, entropy
    result = list(box)
    result[axis], result[axis + 2] = best, best + length
    return tuple(result)  # type: ignore[return-value]


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
            im.save(scratch, format=formats.FORMATS[fmt].pillow[0], **params)
        return _read_back(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _encode_to_bytesio(im: Image.Image, fmt: str, params: dict) -> bytes:
    """Encode into ``io.BytesIO``: holds the GIL (kept for the benchmark)."""
    out = io.BytesIO()
    im.save(out, format=formats.FORMATS[fmt].pillow[0], **params)
    return out.getvalue()


def _save_params(fmt: str, quality: int, spec: TransformSpec | None = None) -> dict:
    """Encoder settings for ``fmt`` (the pixels' metadata is added by the caller)."""
    if fmt == "jpeg":
        return {"quality": quality, "optimize": False,
                "progressive": bool(spec is not None and spec.progressive)}
    if fmt == "webp":
        return {"quality": quality, "method": 4, "lossless": bool(spec is not None and spec.lossless)}
    if fmt == "avif":
        return {"quality": quality, "speed": AVIF_SPEED, "max_threads": 1}
    if fmt == "gif":
        return {}
    return {"compress_level": 6}


#: EXIF tags ``meta=copyright`` keeps: Artist, Copyright.
_COPYRIGHT_TAGS = (0x013B, 0x8298)


def _metadata(spec: TransformSpec, fmt: str, mode: str, icc: bytes | None,
              exif: Image.Exif | None) -> dict:
    """Save parameters carrying the metadata asked for: the ICC profile
    (``cs=origin``, if it suits the output's colours) and copyright (``meta``)."""
    params: dict = {}
    if fmt == "gif":
        return params  # GIF holds neither
    if spec.colorspace == "origin" and icc and len(icc) <= ICC_CONVERT_MAX_BYTES and len(icc) >= 20:
        space = icc[16:20]
        if (space == b"RGB " and mode in ("RGB", "RGBA")) or (space == b"GRAY" and mode in ("L", "LA")):
            params["icc_profile"] = icc
    if spec.keep_copyright and exif is not None:
        kept = Image.Exif()
        for tag in _COPYRIGHT_TAGS:
            value = exif.get(tag)
            if isinstance(value, str) and value:
                kept[tag] = value[:1024]
        if len(kept):
            params["exif"] = kept.tobytes()
    return params


# ---------------------------------------------------------------------------
# Transform


def _format_name(im: Image.Image) -> str:
    found = formats.by_pillow_name(im.format)
    return found.name if found is not None else "image"


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
            f"{_format_name(im).upper()} data is truncated or corrupt"
        ) from None


def _seek(im: Image.Image, frame: int) -> None:
    try:
        im.seek(frame)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge("image has too many pixels") from None
    except MemoryError:
        raise
    except Exception:
        raise CorruptImage(f"{_format_name(im).upper()} frame {frame + 1} is truncated or corrupt") from None


def transform(data: bytes, spec: TransformSpec, max_pixels: int,
              max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS, *,
              max_frames: int = DEFAULT_MAX_FRAMES) -> Result:
    """Decode ``data``, apply ``spec`` and encode the result.

    Steps: header checks (format, ``max_pixels``, ``max_output_pixels``, the
    encoder's largest side, frames: all before decoding); JPEG DCT scaling
    via ``draft`` to no less than ``DRAFT_GAP`` x the needed size; decode;
    conversion to L, LA, RGB or RGBA; one ``resize`` of the planned box of
    the stored pixels (placed on the pixels for ``crop=entropy``); colour
    profile to sRGB (``cs``); blur and sharpen; one transposition for EXIF
    orientation (or ``orient``), ``flip`` and ``rot``; padding / ``fit=fill``
    canvas; free rotation; background; mode for the output format; encode
    with no metadata but what ``cs``/``meta`` keep.  For an animation, every
    frame up to the last kept is decoded, and each kept one goes through the
    same steps.  Each step drops what it no longer needs, so memory stays
    within :func:`estimate_bytes`.
    """
    return _transform(data, spec, max_pixels, _encode_to_fd, max_output_pixels, max_frames=max_frames)


def _transform(
    data: bytes,
    spec: TransformSpec,
    max_pixels: int,
    encode: Callable[[Image.Image, str, dict], bytes],
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Result:
    if spec.auto_format:
        spec = spec.negotiate(None)  # no Accept header known here: fm or the source's format
    im, _ = _open(data, max_pixels)
    with im:
        out_fmt = _output_format(spec, _format_name(im))
        stored_w, stored_h = im.size
        jpeg = im.format in ("JPEG", "MPO")
        orientation = _orientation(im)
        geo = _geometry(stored_w, stored_h, orientation, spec, jpeg)
        _check_output(geo, out_fmt, max_output_pixels)
        try:
            frames = max(1, int(getattr(im, "n_frames", 1)))
        except Exception:
            frames = 1
        first, last = _frame_range(frames, spec, stored_w, stored_h, max_pixels, max_frames)
        if not formats.FORMATS[out_fmt].animation:
            last = first

        # JPEG: let libjpeg scale by 1/2, 1/4 or 1/8 while decoding.
        scale = 1.0
        if geo.draft is not None and first == 0:  # (an MPO's later pictures: no draft)
            drafted = im.draft(None, geo.draft)
            if drafted is not None:
                scale = drafted[1][2] / stored_w

        for frame in range(first + 1):  # frames are built on the ones before
            if frame:
                _seek(im, frame)
            _load(im)

        # A PNG's eXIf chunk may only be seen now; re-plan if it changes things.
        loaded_orientation = _orientation(im, loaded=True)
        if loaded_orientation != orientation:
            orientation = loaded_orientation
            geo = _geometry(stored_w, stored_h, orientation, spec, False)
            _check_output(geo, out_fmt, max_output_pixels)

        icc = im.info.get("icc_profile")
        exif = None
        if spec.keep_copyright:
            try:
                exif = im.getexif()
            except Exception:
                exif = None
        loop = im.info.get("loop", 0)
        box = tuple(min(c * scale, limit) for c, limit in zip(geo.box, (*im.size, *im.size)))
        if geo.entropy_axis is not None:
            region = _box_before(_orientation_matrix(orientation if spec.orient is None
                                                     else spec.orient or 1),
                                 _rect_region(stored_w, stored_h, orientation, spec), stored_w, stored_h)
            region = tuple(min(c * scale, limit) for c, limit in zip(region, (*im.size, *im.size)))
            working = _to_working_mode(im)
            box = _entropy_box(working, box, region, geo.entropy_axis)
            if working is not im:
                working.close()

        rendered: list[Image.Image] = []
        durations: list[int] = []
        for frame in range(first, last + 1):
            if frame > first:
                _seek(im, frame)
                _load(im)
            durations.append(int(im.info.get("duration", 0) or 0))
            rendered.append(_render(im, geo, spec, out_fmt, box, icc, animated=last > first))
        img = rendered[0]
        params = _save_params(out_fmt, spec.quality, spec)
        params.update(_metadata(spec, out_fmt, img.mode, icc, exif))
        if len(rendered) > 1:
            params.update(save_all=True, append_images=rendered[1:], duration=durations, loop=loop)
            if out_fmt == "gif" and img.mode in ("LA", "RGBA"):
                params["disposal"] = 2  # each frame replaces the last, transparency included
        body = encode(img, out_fmt, params)
        return Result(
            body=body,
            content_type=CONTENT_TYPES[out_fmt],
            width=img.width,
            height=img.height,
            format=out_fmt,
            frames=len(rendered),
        )


def _rect_region(stored_w: int, stored_h: int, orientation: int,
                 spec: TransformSpec) -> tuple[float, float, float, float]:
    """``rect`` clipped to the oriented image (the whole of it without one)."""
    if spec.orient is not None:
        orientation = spec.orient or 1
    ow, oh = _apply_size(_orientation_matrix(orientation), stored_w, stored_h)
    if spec.rect is None:
        return (0.0, 0.0, float(ow), float(oh))
    x, y, w, h = spec.rect
    return (float(x), float(y), float(min(ow, x + w)), float(min(oh, y + h)))


def _render(im: Image.Image, geo: _Geometry, spec: TransformSpec, out_fmt: str,
            box: tuple[float, ...], icc: bytes | None, animated: bool) -> Image.Image:
    """One decoded frame through every step up to encoding.

    ``im`` itself is left as it is when ``animated`` (the next frame is
    built on it); otherwise it is closed as soon as a derived image exists.
    """
    img = _to_working_mode(im)
    if img is not im and not animated:
        im.close()  # free the decoded source now (WebP's decoder and its
        # canvases go with ``im`` itself, at the end: counted in the estimate)

    if img.size != geo.size or box != (0.0, 0.0, *map(float, img.size)):
        alpha = img.mode in ("LA", "RGBA")
        if alpha:  # what resize() does, without keeping the straight-alpha copy
            img = img.convert("RGBa" if img.mode == "RGBA" else "La")
            if not animated:
                im.close()
        img = img.resize(geo.size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        if not animated:
            im.close()
        if alpha:
            img = img.convert("RGBA" if img.mode == "RGBa" else "LA")
    elif img is im:
        img = im.copy() if animated else im

    if spec.colorspace == "srgb":
        img = _to_srgb(img, icc)
    if spec.blur or spec.sharp:
        img = _filtered(img, spec)
    if geo.transpose is not None:
        img = img.transpose(geo.transpose)
    colour = _fill_colour(spec, out_fmt)
    if geo.canvas != img.size:
        img = _on_canvas(img, geo, colour)
    if geo.angle:
        img = _rotate(img, geo.angle, colour)
    if spec.bg is not None and img.mode in ("LA", "RGBA"):
        img = _on_background(img, spec.bg)
    img = _to_output_mode(img, out_fmt)
    img.info = {}  # strip EXIF, XMP, ICC, comments, text chunks, dpi
    return img
