"""Parse and validate the transform query parameters (imgix's names and meanings).

:data:`PARAMETERS` is the one table of the parameters: their values, defaults,
meaning and imgix equivalent.  The parser below reads it for the names it
accepts, and ``python -m imgserver.params`` prints it as the README's
Markdown table.

Input is what ``urllib.parse.parse_qs`` (``keep_blank_values=True``) or
``twisted.web``'s ``request.args`` give, already percent-decoded: a mapping of
name to list of values (``str`` or UTF-8 ``bytes``).  Strictness is deliberate
so that every result has exactly one cache key: repeated parameters (but
``auto``, as imgix allows), unknown parameters, empty values, numbers with
signs, spaces or non-ASCII digits all raise :class:`~imgserver.errors.BadRequest`,
as do parameters that would do nothing (``fit`` without ``w``/``h``, ``crop``
without a cropping ``fit``, ``fp-x`` without ``crop=focalpoint``).  The
signature parameter ``s`` is left to :mod:`imgserver.signing`.

Equivalent requests share a cache key (:meth:`TransformSpec.cache_key`):
``dpr`` is folded into ``w``/``h``/``pad``, ``auto=compress`` into ``q``,
``animated=true`` into ``frame=1-``, presets into their parameters.
``auto=format`` is resolved from the request's ``Accept`` header
(:meth:`TransformSpec.negotiate`) before the key is taken, so the chosen
format is part of it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from imgserver.errors import BadRequest
from imgserver.formats import FM_VALUES, FORMATS

__all__ = [
    "FITS",
    "CROPS",
    "FORMATS",
    "PARAMETERS",
    "PARAMS",
    "SIGNATURE_PARAM",
    "Parameter",
    "TransformSpec",
    "parse_transform",
    "parse_presets",
    "markdown_table",
]

#: Allowed values of ``fit``; the first is the default.
FITS = ("clip", "crop", "scale", "max", "fill", "min")

#: Fits that cut the image to the w:h aspect ratio, where ``crop`` places the cut.
CROPPING_FITS = ("crop", "min")

#: ``crop`` values: sides (combinable, e.g. ``top,left``), or one of the others alone.
CROP_SIDES = ("top", "bottom", "left", "right")
CROPS = CROP_SIDES + ("focalpoint", "entropy")

#: ``cs`` values; the first is the default.
COLORSPACES = ("srgb", "origin", "strip")

#: The signature parameter: accepted here, checked by imgserver.signing.
SIGNATURE_PARAM = "s"

#: ``q`` when ``auto=compress`` is given without ``q`` (imgix's value).
COMPRESS_QUALITY = 45

# ASCII digits only: int() would also accept "+5", " 5", "5_0" and "٥".
_DIGITS = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,4}(\.[0-9]{1,6})?")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_PRESET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FRAMES = re.compile(r"([0-9]{1,6})?(-)?([0-9]{1,6})?")


@dataclass(frozen=True)
class Parameter:
    """One row of :data:`PARAMETERS` (documentation; the parser reads the names)."""

    name: str
    values: str
    default: str
    meaning: str
    imgix: str  # "same", or how imgix differs


#: The parameter table (the README's table is generated from it).
PARAMETERS: tuple[Parameter, ...] = (
    Parameter("w", "1..`--max-dimension`", "source", "output width in pixels", "same; no fractions of the source"),
    Parameter("h", "1..`--max-dimension`", "source", "output height in pixels", "same; no fractions of the source"),
    Parameter("dpr", "1..5, up to 2 decimals", "1", "multiplies `w`, `h` and `pad`; the products must stay "
              "within `--max-dimension`", "same range; needs `w` or `h`"),
    Parameter("fit", "`clip` `crop` `scale` `max` `fill` `min`", "`clip`",
              "`clip`: inside w×h, aspect kept; `max`: like clip, never enlarged; `crop`: fills w×h, cut "
              "where `crop` says; `scale`: exactly w×h, distorted; `fill`: inside w×h, the rest filled "
              "with `bg`; `min`: like crop, never enlarged", "no `clamp`, `facearea`, `fillmax`"),
    Parameter("crop", "`top` `bottom` `left` `right` (combinable: `top,left`), `focalpoint`, `entropy`",
              "centre", "where `fit=crop`/`min` cut; `entropy` keeps the most detailed region",
              "no `faces`, `edges`"),
    Parameter("fp-x", "0..1", "0.5", "focal point, fraction of the width (`crop=focalpoint`)", "same"),
    Parameter("fp-y", "0..1", "0.5", "focal point, fraction of the height (`crop=focalpoint`)", "same"),
    Parameter("fp-z", "1..100", "1", "zoom into the focal point (`crop=focalpoint`)", "same"),
    Parameter("rect", "`x,y,w,h` in pixels", "whole image", "source region, in the coordinates `/info` "
              "gives, cut before anything else; clipped to the image", "pixels only, no fractions"),
    Parameter("orient", "0..8, 90, 180, 270", "EXIF", "overrides the EXIF orientation (90 = 6, 180 = 3, "
              "270 = 8; 0 ignores EXIF)", "same"),
    Parameter("flip", "`h` `v` `hv`", "none", "mirror horizontally, vertically or both", "same"),
    Parameter("rot", "0..359", "0", "counter-clockwise degrees after `flip`; multiples of 90 are "
              "lossless and w×h is the rotated image's size; other angles turn the finished image "
              "and enlarge the canvas, filled with `bg`", "imgix zooms instead of enlarging"),
    Parameter("blur", "0..2000", "0", "Gaussian blur, sigma = blur / 20 output pixels",
              "imgix does not document its scale in pixels"),
    Parameter("sharp", "0..100", "0", "unsharp mask, radius 1 px, amount 2 × sharp %", "same range"),
    Parameter("bg", "hex `RGB` `ARGB` `RRGGBB` `AARRGGBB`", "transparent, or white without alpha",
              "background of padding, `fit=fill`, rotation corners and transparent pixels", "no colour names"),
    Parameter("pad", "0..`--max-dimension`", "0", "padding on every side, filled with `bg`; inside w×h "
              "when they are given", "no `pad-left` etc."),
    Parameter("fm", "`avif` `gif` `jpg` `jpeg` `pjpg` `png` `webp`", "source's (JPEG for HEIF)",
              "output format; `pjpg` is progressive JPEG", "no `jp2` `json` `mp4` `png8` `png32` `webm`"),
    Parameter("q", "1..100", "`--default-quality`", "JPEG, WebP and AVIF quality", "same"),
    Parameter("lossless", "`0` `1` `true` `false`", "0", "lossless WebP", "WebP only"),
    Parameter("auto", "`format`, `compress` (combinable)", "none", "`format`: AVIF if the `Accept` header "
              "allows it, else WebP, else `fm` or the source's format (`Vary: Accept`); `compress`: `q` "
              "defaults to 45", "same; no `enhance`, `redeye`"),
    Parameter("cs", "`srgb` `origin` `strip`", "`srgb`", "`srgb`: colours converted to sRGB, no profile; "
              "`origin`: the source's ICC profile kept, colours untouched; `strip`: profile dropped, "
              "colours untouched", "`origin` keeps profiles up to 1 MiB; no `adobergb1998`, `tinysrgb`"),
    Parameter("meta", "`copyright`", "none", "keep the EXIF Artist and Copyright tags (all other "
              "metadata is always dropped)", "not in imgix"),
    Parameter("frame", "`N`, `M-N`, `M-`, `-N` (from 1)", "1", "frames of an animated image to keep; "
              "more than one are all resized and written as an animation", "imgix keeps every frame "
              "by default"),
    Parameter("animated", "`0` `1` `true` `false`", "0", "`1`: every frame (`frame=1-`)",
              "not in imgix"),
    Parameter("preset", "a name given with `--preset NAME:QUERY`", "none", "the preset's parameters; "
              "explicit ones override them", "not in imgix"),
)

#: The transform parameter names.
PARAMS = frozenset(p.name for p in PARAMETERS)


@dataclass(frozen=True)
class TransformSpec:
    """What to do to a source image; built by :func:`parse_transform`.

    ``format`` is a name from :data:`imgserver.formats.FORMATS` or None for
    the source's format; ``quality`` is always set.  ``width``/``height``/
    ``pad`` already include ``dpr``.  ``frames`` is (first, last) counted from
    1, ``last`` None for "to the end".  ``bg`` is (r, g, b, a) or None.
    ``auto_format`` is True until :meth:`negotiate` replaced it by a format.
    """

    width: int | None = None
    height: int | None = None
    fit: str = "clip"
    format: str | None = None
    quality: int = 85
    progressive: bool = False
    crop: tuple[str, ...] = ()
    focal: tuple[float, float, float] = (0.5, 0.5, 1.0)
    rect: tuple[int, int, int, int] | None = None
    orient: int | None = None
    flip: str = ""
    rot: int = 0
    blur: int = 0
    sharp: int = 0
    bg: tuple[int, int, int, int] | None = None
    pad: int = 0
    lossless: bool = False
    auto_format: bool = False
    colorspace: str = "srgb"
    keep_copyright: bool = False
    frames: tuple[int, int | None] = (1, 1)

    def __post_init__(self) -> None:
        # Also guards specs built directly (e.g. by a PB caller) rather than parsed.
        for name, value in (("w", self.width), ("h", self.height)):
            if value is not None and (not _is_int(value) or value < 1):
                raise BadRequest(f"{name} must be a positive whole number")
        if self.fit not in FITS:
            raise BadRequest(f"fit must be one of {', '.join(FITS)}")
        if self.format is not None and (self.format not in FORMATS or not FORMATS[self.format].writable):
            raise BadRequest(f"fm must be one of {', '.join(FM_VALUES)}")
        if not _is_int(self.quality) or not 1 <= self.quality <= 100:
            raise BadRequest("q must be a whole number between 1 and 100")
        if self.progressive and self.format != "jpeg":
            raise BadRequest("progressive output is JPEG only (fm=pjpg)")
        if any(c not in CROPS for c in self.crop):
            raise BadRequest(f"crop must be made of {', '.join(CROPS)}")
        if self.rect is not None and (len(self.rect) != 4 or not all(_is_int(v) for v in self.rect)
                                      or min(self.rect) < 0 or min(self.rect[2:]) < 1):
            raise BadRequest("rect must be x,y,w,h with w and h of at least 1")
        if self.orient is not None and self.orient not in range(0, 9):
            raise BadRequest("orient must be 0..8")
        if self.flip not in ("", "h", "v", "hv"):
            raise BadRequest("flip must be h, v or hv")
        if not _is_int(self.rot) or not 0 <= self.rot < 360:
            raise BadRequest("rot must be 0..359")
        if not _is_int(self.blur) or not 0 <= self.blur <= 2000:
            raise BadRequest("blur must be 0..2000")
        if not _is_int(self.sharp) or not 0 <= self.sharp <= 100:
            raise BadRequest("sharp must be 0..100")
        if not _is_int(self.pad) or self.pad < 0:
            raise BadRequest("pad must be a whole number of pixels")
        if self.colorspace not in COLORSPACES:
            raise BadRequest(f"cs must be one of {', '.join(COLORSPACES)}")
        first, last = self.frames
        if not _is_int(first) or first < 1 or (last is not None and (not _is_int(last) or last < first)):
            raise BadRequest("frame must be N, M-N, M- or -N with frames counted from 1")

    @property
    def resizes(self) -> bool:
        """Whether a size was asked for (otherwise only re-encoding)."""
        return self.width is not None or self.height is not None

    @property
    def animated(self) -> bool:
        """Whether more than one frame may be kept."""
        first, last = self.frames
        return last is None or last > first

    def negotiate(self, accept: str | bytes | None) -> "TransformSpec":
        """Resolve ``auto=format`` from an ``Accept`` header: AVIF if it is
        accepted, else WebP, else the explicit ``fm`` (or the source's format).

        A spec without ``auto=format`` is returned as it is.
        """
        if not self.auto_format:
            return self
        accepted = accepted_types(accept)
        fmt = self.format
        for candidate in ("avif", "webp"):
            if FORMATS[candidate].content_type in accepted:
                fmt = candidate
                break
        progressive = self.progressive and fmt == "jpeg"
        return replace(self, auto_format=False, format=fmt, progressive=progressive)

    def cache_key(self) -> str:
        """A canonical string: equal for specs that give the same output.

        Combine it with the source's identity (path, size, mtime) for the
        result cache.  Equivalent requests share a key: ``crop``/``scale``/
        ``fill``/``min`` with one side are ``clip``/``max``; quality is left
        out where it does not apply; defaults are left out.
        """
        fit = self.fit
        one_side = self.width is None or self.height is None
        if one_side and fit in ("crop", "scale", "fill"):
            fit = "clip"
        elif one_side and fit == "min":
            fit = "max"
        fmt = self.format
        lossy = fmt is None or FORMATS[fmt].quality
        lossless = self.lossless and fmt in (None, "webp")
        parts = [f"w={self.width or ''}", f"h={self.height or ''}", f"fit={fit}",
                 f"fm={fmt or ''}", f"q={self.quality if lossy else ''}"]
        default = TransformSpec()
        for f in fields(self):
            if f.name in ("width", "height", "fit", "format", "quality"):
                continue
            value = getattr(self, f.name)
            if f.name == "lossless":
                value = lossless
            if f.name in ("crop", "focal") and fit not in CROPPING_FITS:
                continue
            if f.name == "focal" and "focalpoint" not in self.crop:
                continue
            if value != getattr(default, f.name):
                parts.append(f"{f.name}={value!r}")
        return "&".join(parts)


def accepted_types(accept: str | bytes | None) -> frozenset[str]:
    """Media types an ``Accept`` header accepts with q > 0 (exact types only:
    ``image/*`` does not promise AVIF)."""
    if accept is None:
        return frozenset()
    if isinstance(accept, (bytes, bytearray)):
        accept = bytes(accept).decode("latin-1")
    found = set()
    for item in accept.split(",")[:64]:
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            found.add(kind.lower())
    return frozenset(found)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: str) -> str:
    """A short, safe rendering of client input for error messages."""
    return repr(value if len(value) <= 20 else value[:20] + "...")


def _text(value: object, what: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    if _is_int(value):  # convenient for PB callers passing {"w": 200}
        return str(value)
    raise BadRequest(f"{what} must be text")


def _single_values(args: Mapping) -> dict[str, str]:
    """name -> its one value; rejects unknown, repeated and empty parameters.

    ``auto`` may be repeated (imgix allows it): its values are joined with commas.
    """
    result: dict[str, str] = {}
    for raw_name, raw_values in args.items():
        name = _text(raw_name, "a parameter name")
        if name == SIGNATURE_PARAM:
            continue
        if name not in PARAMS:
            raise BadRequest(
                f"unknown parameter {_show(name)} (allowed: {', '.join(sorted(PARAMS))})"
            )
        if isinstance(raw_values, (str, bytes, bytearray, int)):
            raw_values = [raw_values]
        elif not isinstance(raw_values, (list, tuple)):
            # A float, None or any other object from a programmatic caller:
            # a bad request, not a TypeError deep inside.
            raise BadRequest(f"{name} must be a whole number or text, not {type(raw_values).__name__}")
        values = [_text(v, name) for v in raw_values]
        if len(values) > 1 and name != "auto":
            raise BadRequest(f"{name} is given more than once")
        if name in result:  # e.g. both b"w" and "w" keys
            raise BadRequest(f"{name} is given more than once")
        if not values or any(v == "" for v in values):
            raise BadRequest(f"{name} is empty")
        result[name] = ",".join(values)
    return result


def _int_param(name: str, value: str, maximum: int, minimum: int = 1) -> int:
    if not _DIGITS.fullmatch(value):
        raise BadRequest(
            f"{name} must be a whole number between {minimum} and {maximum}, got {_show(value)}"
        )
    number = int(value)
    if not minimum <= number <= maximum:
        raise BadRequest(f"{name} must be between {minimum} and {maximum}, got {number}")
    return number


def _decimal_param(name: str, value: str, minimum: float, maximum: float, decimals: int = 6) -> float:
    if not _DECIMAL.fullmatch(value) or len(value.partition(".")[2]) > decimals:
        raise BadRequest(f"{name} must be a number between {minimum:g} and {maximum:g} "
                         f"(at most {decimals} decimals), got {_show(value)}")
    number = float(value)
    if not minimum <= number <= maximum:
        raise BadRequest(f"{name} must be between {minimum:g} and {maximum:g}, got {value}")
    return number


def _bool_param(name: str, value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise BadRequest(f"{name} must be 0, 1, true or false, got {_show(value)}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}, got {_show(value)}")
    return value


def _color(value: str) -> tuple[int, int, int, int]:
    """imgix's hex colours: RGB, ARGB, RRGGBB, AARRGGBB -> (r, g, b, a)."""
    if not _HEX.fullmatch(value) or len(value) not in (3, 4, 6, 8):
        raise BadRequest(f"bg must be 3, 4, 6 or 8 hex digits (RGB, ARGB, RRGGBB, AARRGGBB), got {_show(value)}")
    if len(value) in (3, 4):
        value = "".join(c * 2 for c in value)
    if len(value) == 6:
        value = "ff" + value
    a, r, g, b = (int(value[i : i + 2], 16) for i in range(0, 8, 2))
    return (r, g, b, a)


def _crop(value: str) -> tuple[str, ...]:
    parts = value.split(",")
    for part in parts:
        if part in ("faces", "edges"):
            raise BadRequest(f"crop={part} is not supported (face and edge detection are out of scope)")
        if part not in CROPS:
            raise BadRequest(f"crop must be made of {', '.join(CROPS)}, got {_show(part)}")
    if len(set(parts)) != len(parts):
        raise BadRequest("crop names a value twice")
    special = [p for p in parts if p not in CROP_SIDES]
    if special and len(parts) > 1:
        raise BadRequest(f"crop={special[0]} cannot be combined with other crop values")
    if "top" in parts and "bottom" in parts or "left" in parts and "right" in parts:
        raise BadRequest("crop cannot be both top and bottom, or both left and right")
    # Canonical order, so that top,left and left,top share a cache key.
    return tuple(c for c in CROPS if c in parts)


def _rect(value: str) -> tuple[int, int, int, int]:
    parts = value.split(",")
    if len(parts) != 4:
        raise BadRequest(f"rect must be x,y,w,h, got {_show(value)}")
    x, y = (_int_param("rect x/y", p, 65500, minimum=0) for p in parts[:2])
    w, h = (_int_param("rect w/h", p, 65500) for p in parts[2:])
    return (x, y, w, h)


def _frames(value: str) -> tuple[int, int | None]:
    match = _FRAMES.fullmatch(value)
    if not match or not (match.group(1) or match.group(3)):
        raise BadRequest(f"frame must be N, M-N, M- or -N, got {_show(value)}")
    start, dash, end = match.groups()
    first = int(start) if start else 1
    last: int | None = first
    if dash:
        last = int(end) if end else None
    if first < 1 or (last is not None and last < first):
        raise BadRequest(f"frame must count from 1 with M <= N, got {_show(value)}")
    return (first, last)


_ORIENT_ALIASES = {90: 6, 180: 3, 270: 8}


def parse_presets(presets: Mapping[str, str] | tuple[str, ...] | list[str] | None,
                  max_dimension: int = 65500) -> dict[str, dict[str, str]]:
    """``NAME:QUERY`` strings (or a name -> query mapping) -> name -> parameters.

    Raises ``ValueError`` (a configuration error, at start-up) for a bad name,
    a query that does not parse, or one that names ``preset`` or ``s``.
    """
    from urllib.parse import parse_qs

    if not presets:
        return {}
    items = presets.items() if isinstance(presets, Mapping) else [p.partition(":")[::2] for p in presets]
    result: dict[str, dict[str, str]] = {}
    for name, query in items:
        if not _PRESET_NAME.fullmatch(name or ""):
            raise ValueError(f"preset names are 1-64 letters, digits, '_' or '-': {name!r}")
        if name in result:
            raise ValueError(f"preset {name!r} is defined twice")
        args = parse_qs(query, keep_blank_values=True)
        if not args:
            raise ValueError(f"preset {name!r} has no parameters (write NAME:QUERY, e.g. thumb:w=200&h=200)")
        if "preset" in args or SIGNATURE_PARAM in args:
            raise ValueError(f"preset {name!r} may not contain preset= or s=")
        try:
            values = _single_values(args)
            parse_transform(values, max_dimension=max_dimension)
        except BadRequest as e:
            raise ValueError(f"preset {name!r}: {e}") from None
        result[name] = values
    return result


def parse_transform(
    args: Mapping,
    *,
    max_dimension: int = 8192,
    default_quality: int = 85,
    presets: Mapping[str, Mapping[str, str]] | None = None,
) -> TransformSpec | None:
    """The :class:`TransformSpec` the query asks for, or None for the original file.

    Pass ``settings.max_dimension``, ``settings.default_quality`` and
    ``settings.preset_params``.  Raises :class:`~imgserver.errors.BadRequest`
    with a message naming the parameter.
    """
    values = _single_values(args)
    if "preset" in values:
        name = values.pop("preset")
        preset = (presets or {}).get(name)
        if preset is None:
            raise BadRequest(f"no preset named {_show(name)}")
        values = {**preset, **values}  # explicit parameters override the preset's
    if not values:
        return None
    spec: dict[str, object] = {}

    dpr = 1.0
    if "dpr" in values:
        dpr = _decimal_param("dpr", values["dpr"], 1, 5, decimals=2)
        if "w" not in values and "h" not in values:
            raise BadRequest("dpr needs w, h or both")

    def scaled(name: str, maximum: int, minimum: int = 1) -> int:
        number = _int_param(name, values[name], maximum, minimum)
        result = round(number * dpr)
        if result > maximum:
            raise BadRequest(f"{name} x dpr = {result} is over the limit of {maximum}")
        return result

    if "w" in values:
        spec["width"] = scaled("w", max_dimension)
    if "h" in values:
        spec["height"] = scaled("h", max_dimension)
    sized = "w" in values or "h" in values
    if "pad" in values:
        spec["pad"] = scaled("pad", max_dimension, minimum=0)

    fit = FITS[0]
    if "fit" in values:
        fit = _choice("fit", values["fit"], FITS)
        if not sized:
            raise BadRequest("fit needs w, h or both")
    spec["fit"] = fit

    if "crop" in values:
        crop = _crop(values["crop"])
        if fit not in CROPPING_FITS:
            raise BadRequest("crop needs fit=crop or fit=min (it says where they cut)")
        spec["crop"] = crop
    focal = [0.5, 0.5, 1.0]
    for i, (name, low, high) in enumerate((("fp-x", 0, 1), ("fp-y", 0, 1), ("fp-z", 1, 100))):
        if name in values:
            if "focalpoint" not in spec.get("crop", ()):
                raise BadRequest(f"{name} needs crop=focalpoint (and fit=crop or fit=min)")
            focal[i] = _decimal_param(name, values[name], low, high)
    spec["focal"] = tuple(focal)

    if "rect" in values:
        spec["rect"] = _rect(values["rect"])
    if "orient" in values:
        value = values["orient"]
        number = int(value) if _DIGITS.fullmatch(value) else -1
        number = _ORIENT_ALIASES.get(number, number)
        if not 0 <= number <= 8:
            raise BadRequest(f"orient must be 0..8, 90, 180 or 270, got {_show(value)}")
        spec["orient"] = number
    if "flip" in values:
        spec["flip"] = _choice("flip", values["flip"], ("h", "v", "hv"))
    if "rot" in values:
        spec["rot"] = _int_param("rot", values["rot"], 359, minimum=0)
    if "blur" in values:
        spec["blur"] = _int_param("blur", values["blur"], 2000, minimum=0)
    if "sharp" in values:
        spec["sharp"] = _int_param("sharp", values["sharp"], 100, minimum=0)
    if "bg" in values:
        spec["bg"] = _color(values["bg"])

    fmt, progressive = None, False
    if "fm" in values:
        found = FM_VALUES.get(values["fm"])
        if found is None:
            raise BadRequest(f"fm must be one of {', '.join(FM_VALUES)}, got {_show(values['fm'])}")
        fmt, progressive = found
    spec["format"], spec["progressive"] = fmt, progressive

    auto: set[str] = set()
    if "auto" in values:
        for part in values["auto"].split(","):
            if part not in ("format", "compress"):
                raise BadRequest(f"auto must be format and/or compress, got {_show(part)}")
            auto.add(part)
    spec["auto_format"] = "format" in auto

    quality = COMPRESS_QUALITY if "compress" in auto else default_quality
    if "q" in values:
        quality = _int_param("q", values["q"], 100)
    spec["quality"] = quality

    if "lossless" in values:
        spec["lossless"] = _bool_param("lossless", values["lossless"])
        if spec["lossless"] and fmt not in ("webp", None) and not spec["auto_format"]:
            raise BadRequest("lossless needs fm=webp (or auto=format, or a WebP source)")
    if "cs" in values:
        spec["colorspace"] = _choice("cs", values["cs"], COLORSPACES)
    if "meta" in values:
        spec["keep_copyright"] = _choice("meta", values["meta"], ("copyright",)) == "copyright"

    frames: tuple[int, int | None] = (1, 1)
    if "frame" in values:
        frames = _frames(values["frame"])
    if "animated" in values:
        if _bool_param("animated", values["animated"]):
            if "frame" in values:
                raise BadRequest("give frame or animated, not both")
            frames = (1, None)
    spec["frames"] = frames
    if frames != (1, 1) and (frames[1] is None or frames[1] > frames[0]):
        out = fmt
        if out is not None and not FORMATS[out].animation and not spec["auto_format"]:
            raise BadRequest(f"fm={values['fm']} cannot hold an animation (use gif, webp, png or avif)")

    return TransformSpec(**spec)  # type: ignore[arg-type]


def markdown_table() -> str:
    """:data:`PARAMETERS` as a Markdown table (the README's)."""
    rows = ["| parameter | values | default | meaning | imgix |", "|---|---|---|---|---|"]
    for p in PARAMETERS:
        rows.append(f"| `{p.name}` | {p.values} | {p.default} | {p.meaning} | {p.imgix} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
