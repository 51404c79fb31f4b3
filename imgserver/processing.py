"""The Pillow pipeline: probe, transform and describe images held in memory.

Everything here is pure apart from CPU (and a scratch in-memory file for
encoding): no sockets, no reactor, no shared mutable state, so the Twisted
layer can run these functions in worker threads, several at once.  Pillow
releases the GIL while decoding, resizing, converting and encoding into a
real file, so N threads use N cores.

Supported sources: **JPEG** (including MPO, first picture), **PNG** and
**WebP** (first frame).  GIF, TIFF, BMP, HEIF/AVIF and everything else are
refused with :class:`~imgserver.errors.UnsupportedImage` (415): a smaller
decoder surface, and every output format handles what these three hold.  A
file that starts like one of the three but cannot be read is
:class:`~imgserver.errors.CorruptImage` (422).

Decompression bombs are refused from the header, before any pixel is decoded:
``Image.open`` only parses the header, and :func:`probe` / :func:`transform`
compare ``width * height`` with ``max_pixels`` themselves.  Pillow's own
``DecompressionBombError`` (and the warning, if a warnings filter turned it
into an exception, see :func:`configure_pillow`) also become
:class:`~imgserver.errors.TooLarge`.  We deliberately do not use
``warnings.catch_warnings()`` per call: on CPython 3.11 it swaps the
process-wide filter list, so concurrent worker threads would lose or leak
each other's filters.  Our own check is the authoritative one.

Output sizes are also bounded: the requested output may not exceed
``max_pixels`` either, nor the format's largest side (JPEG 65500, WebP 16383).
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from imgserver.errors import CorruptImage, TooLarge, UnsupportedImage
from imgserver.params import TransformSpec

__all__ = [
    "ImageInfo",
    "Result",
    "Plan",
    "CONTENT_TYPES",
    "probe",
    "plan",
    "transform",
    "info",
    "configure_pillow",
]

#: Canonical format name -> MIME type.
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

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

# What Pillow raises for data it cannot parse or decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)

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


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: stored size, canonical format, Pillow mode, EXIF orientation."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int = 1

    @property
    def display_size(self) -> tuple[int, int]:
        """Size once the EXIF orientation is applied (as browsers show it)."""
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
# Opening and probing


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


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open from the header only and enforce the format and pixel limits."""
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError:
        raise TooLarge("image has too many pixels") from None
    except Image.DecompressionBombWarning:  # only if a filter made it an error
        raise TooLarge("image has too many pixels") from None
    except UnidentifiedImageError:
        raise _not_opened(data) from None
    except _DECODE_ERRORS:
        raise _not_opened(data) from None
    try:
        if im.format not in _SOURCE_FORMATS:
            raise UnsupportedImage("unsupported image format")
        width, height = im.size
        if width < 1 or height < 1:
            raise CorruptImage("image header gives an empty size")
        if max_pixels is not None and width * height > max_pixels:
            raise TooLarge(
                f"image is {width}x{height} ({width * height} pixels), "
                f"over the limit of {max_pixels} pixels"
            )
    except BaseException:
        im.close()
        raise
    return im


def _orientation(im: Image.Image, loaded: bool = False) -> int:
    """The EXIF orientation (1..8), without decoding pixels.

    PNG keeps EXIF in an ``eXIf`` chunk that may follow the pixel data; Pillow
    would decode the whole image to find it, so before ``load()`` (``loaded``
    false) only an ``eXIf`` chunk seen in the header counts.
    """
    if im.format == "PNG" and not loaded and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # malformed EXIF: ignore it rather than refuse the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Describe ``data`` from its header, without decoding pixels.

    Raises TooLarge if width * height > ``max_pixels`` (None: no limit of ours),
    UnsupportedImage for non-images and other formats, CorruptImage for a
    broken header.
    """
    with _open(data, max_pixels) as im:
        return ImageInfo(
            width=im.width,
            height=im.height,
            format=_SOURCE_FORMATS[im.format],
            mode=im.mode,
            orientation=_orientation(im),
        )


def info(data: bytes) -> dict[str, object]:
    """The ``/info`` document: width, height, format, mode, bytes, orientation.

    ``width`` and ``height`` are the size as displayed, i.e. after the EXIF
    orientation is applied: that is what browsers show for the original and
    what transforms produce.  ``orientation`` (1 = none) tells clients the
    stored pixels are rotated or flipped.  Header only; no pixel limit (a
    size is worth reporting even when the image is too large to transform),
    apart from Pillow's own bomb error far above it.  A PNG whose ``eXIf``
    chunk comes after the pixel data reports orientation 1 here (finding it
    would mean decoding); :func:`transform` still applies it.
    """
    image = probe(data, max_pixels=None)
    width, height = image.display_size
    return {
        "width": width,
        "height": height,
        "format": image.format,
        "mode": image.mode,
        "bytes": len(data),
        "orientation": image.orientation,
    }


def configure_pillow(max_pixels: int) -> None:
    """Optional, once at start-up before worker threads: align Pillow's own bomb check.

    Sets ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` (so Pillow's hard error
    sits at 2 x ``max_pixels`` instead of 179 MP, which matters when
    ``max_pixels`` is raised above it) and turns ``DecompressionBombWarning``
    into an error process-wide, so no warning is logged per rejected image.
    Both are global state: call it from the main program, never per request.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


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


def _check_output(p: Plan, fmt: str, max_pixels: int) -> None:
    if p.width * p.height > max_pixels:
        raise TooLarge(
            f"output {p.width}x{p.height} would exceed the limit of {max_pixels} pixels"
        )
    if max(p.width, p.height) > _MAX_SIDE[fmt]:
        raise TooLarge(f"{fmt.upper()} output is limited to {_MAX_SIDE[fmt]} pixels per side")


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


def _to_output_mode(im: Image.Image, fmt: str) -> Image.Image:
    if fmt == "jpeg" and im.mode in ("LA", "RGBA"):
        return _flatten(im)
    if fmt == "webp" and im.mode in ("L", "LA"):
        return im.convert("RGBA" if im.mode == "LA" else "RGB")
    return im


def _icc_for(icc: bytes | None, mode: str) -> bytes | None:
    """Keep the ICC profile only if its colour space still matches the pixels.

    After CMYK -> RGB or grey -> RGB the old profile would describe the wrong
    data, so it is dropped (the pixels are then taken as sRGB).
    """
    if not icc or len(icc) < 20:
        return None
    space = icc[16:20]
    if mode in ("RGB", "RGBA") and space == b"RGB ":
        return icc
    if mode in ("L", "LA") and space == b"GRAY":
        return icc
    return None


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


def _save_params(fmt: str, quality: int, icc: bytes | None) -> dict:
    if fmt == "jpeg":
        params: dict = {"quality": quality, "optimize": False, "progressive": False}
    elif fmt == "webp":
        params = {"quality": quality, "method": 4}
    else:
        params = {"compress_level": 6}
    if icc:
        params["icc_profile"] = icc
    return params


# ---------------------------------------------------------------------------
# Transform


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Image.DecompressionBombError:
        raise TooLarge("image has too many pixels") from None
    except _DECODE_ERRORS:
        raise CorruptImage(
            f"{_SOURCE_FORMATS.get(im.format or '', 'image').upper()} data is truncated or corrupt"
        ) from None


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    """Rotate/flip upright (``ImageOps.exif_transpose``), tolerating odd EXIF.

    Not in place: if rewriting a malformed EXIF block fails half-way, ``im``
    is untouched and we transpose by the tag we read instead.
    """
    if orientation == 1:
        return im  # exif_transpose would return a needless copy
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im.transpose(_TRANSPOSE[orientation])


def transform(data: bytes, spec: TransformSpec, max_pixels: int) -> Result:
    """Decode ``data``, apply ``spec`` and encode the result.

    Steps: header checks (format, ``max_pixels``, output limits); JPEG DCT
    scaling via ``draft`` to no less than ``REDUCING_GAP`` x the needed size;
    decode; EXIF orientation; one ``resize`` (Lanczos, ``reducing_gap``) of
    the planned source box; mode conversion for the output format (alpha
    flattened onto white for JPEG); encode with only the ICC profile kept.
    """
    return _transform(data, spec, max_pixels, _encode_to_fd)


def _transform(
    data: bytes,
    spec: TransformSpec,
    max_pixels: int,
    encode: Callable[[Image.Image, str, dict], bytes],
) -> Result:
    with _open(data, max_pixels) as im:
        out_fmt = spec.format or _SOURCE_FORMATS[im.format]
        stored_w, stored_h = im.size
        orientation = _orientation(im)
        swapped = orientation in _SWAPPING_ORIENTATIONS
        src_w, src_h = (stored_h, stored_w) if swapped else (stored_w, stored_h)
        p = plan(src_w, src_h, spec)
        _check_output(p, out_fmt, max_pixels)

        # JPEG: let libjpeg scale by 1/2, 1/4 or 1/8 while decoding.
        scale = 1.0
        if im.format in ("JPEG", "MPO"):
            box_w = p.box[2] - p.box[0]
            box_h = p.box[3] - p.box[1]
            need_w = math.ceil(src_w * p.width / box_w * REDUCING_GAP)
            need_h = math.ceil(src_h * p.height / box_h * REDUCING_GAP)
            if need_w < src_w and need_h < src_h:
                request = (need_h, need_w) if swapped else (need_w, need_h)
                drafted = im.draft(None, request)
                if drafted is not None:
                    scale = drafted[1][2] / stored_w

        _load(im)

        # A PNG's eXIf chunk may only be seen now; re-plan if it changes things.
        loaded_orientation = _orientation(im, loaded=True)
        if loaded_orientation != orientation:
            orientation = loaded_orientation
            swapped = orientation in _SWAPPING_ORIENTATIONS
            src_w, src_h = (stored_h, stored_w) if swapped else (stored_w, stored_h)
            p = plan(src_w, src_h, spec)
            _check_output(p, out_fmt, max_pixels)

        icc = im.info.get("icc_profile")
        img = _apply_orientation(im, orientation)
        img = _to_working_mode(img)

        box = tuple(min(c * scale, limit) for c, limit in zip(p.box, (*img.size, *img.size)))
        if img.size != (p.width, p.height) or box != (0.0, 0.0, *map(float, img.size)):
            img = img.resize(
                (p.width, p.height),
                Image.Resampling.LANCZOS,
                box=box,
                reducing_gap=REDUCING_GAP,
            )

        img = _to_output_mode(img, out_fmt)
        img.info = {}  # strip EXIF, XMP, comments, text chunks, dpi
        body = encode(img, out_fmt, _save_params(out_fmt, spec.quality, _icc_for(icc, img.mode)))
        return Result(
            body=body,
            content_type=CONTENT_TYPES[out_fmt],
            width=img.width,
            height=img.height,
            format=out_fmt,
        )
