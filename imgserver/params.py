"""Parse and validate the transform query parameters (imgix names).

========  ==========================================================  =========
name      meaning                                                     default
========  ==========================================================  =========
``w``     output width, pixels, 1..max_dimension                      (none)
``h``     output height, pixels, 1..max_dimension                     (none)
``fit``   ``clip``: fit inside w x h, keep aspect ratio, may enlarge  ``clip``
          ``max``: like ``clip`` but never enlarge
          ``crop``: fill w x h exactly, cropping the centre
          ``scale``: exactly w x h, distorting the aspect ratio
``fm``    output format: ``jpg``/``jpeg``, ``png``, ``webp``          source's
``q``     JPEG/WebP quality 1..100 (ignored for PNG)                  setting
========  ==========================================================  =========

When only one of ``w`` and ``h`` is given, the other side follows the source's
aspect ratio, for every ``fit``: ``crop`` and ``scale`` then have nothing to
crop or distort and give the same image as ``clip``; ``max`` still never
enlarges.  ``fit`` without ``w`` or ``h`` is an error (it would do nothing).

Input is what ``urllib.parse.parse_qs`` (``keep_blank_values=True``) or
``twisted.web``'s ``request.args`` give, already percent-decoded: a mapping of
name to list of values (``str`` or UTF-8 ``bytes``).  Strictness is deliberate
so that every result has exactly one cache key: repeated parameters, unknown
parameters, empty values, numbers with signs, spaces, decimals or non-ASCII
digits all raise :class:`~imgserver.errors.BadRequest`.  The signature
parameter ``s`` is left to :mod:`imgserver.signing`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from imgserver.errors import BadRequest

__all__ = [
    "FITS",
    "FORMATS",
    "PARAMS",
    "SIGNATURE_PARAM",
    "TransformSpec",
    "parse_transform",
]

#: Allowed values of ``fit``; the first is the default.
FITS = ("clip", "crop", "scale", "max")

#: ``fm`` value -> canonical format name used throughout imgserver.
FORMATS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}

#: The transform parameters.
PARAMS = frozenset({"w", "h", "fit", "fm", "q"})

#: The signature parameter: accepted here, checked by imgserver.signing.
SIGNATURE_PARAM = "s"

# ASCII digits only: int() would also accept "+5", " 5", "5_0" and "٥".
_DIGITS = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class TransformSpec:
    """What to do to a source image; built by :func:`parse_transform`.

    ``format`` is ``"jpeg"``, ``"png"``, ``"webp"``, or ``None`` for the
    source's format.  ``quality`` is always set (the default is filled in).
    """

    width: int | None = None
    height: int | None = None
    fit: str = "clip"
    format: str | None = None
    quality: int = 85

    def __post_init__(self) -> None:
        # Also guards specs built directly (e.g. by a PB caller) rather than parsed.
        for name, value in (("w", self.width), ("h", self.height)):
            if value is not None and (not _is_int(value) or value < 1):
                raise BadRequest(f"{name} must be a positive whole number")
        if self.fit not in FITS:
            raise BadRequest(f"fit must be one of {', '.join(FITS)}")
        if self.format is not None and self.format not in ("jpeg", "png", "webp"):
            raise BadRequest("fm must be one of jpg, jpeg, png, webp")
        if not _is_int(self.quality) or not 1 <= self.quality <= 100:
            raise BadRequest("q must be a whole number between 1 and 100")

    @property
    def resizes(self) -> bool:
        """Whether a size was asked for (otherwise only re-encoding)."""
        return self.width is not None or self.height is not None

    def cache_key(self) -> str:
        """A canonical string: equal for specs that give the same output.

        Combine it with the source's identity (path, size, mtime) for the
        result cache.  Equivalent requests share a key: ``crop``/``scale``
        with one side is ``clip``; PNG output ignores the quality.
        """
        fit = self.fit
        if fit in ("crop", "scale") and (self.width is None or self.height is None):
            fit = "clip"
        quality = "" if self.format == "png" else str(self.quality)
        return (
            f"w={self.width or ''}&h={self.height or ''}&fit={fit}"
            f"&fm={self.format or ''}&q={quality}"
        )


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
    """name -> its one value; rejects unknown, repeated and empty parameters."""
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
        values = list(raw_values)
        if len(values) > 1:
            raise BadRequest(f"{name} is given more than once")
        if name in result:  # e.g. both b"w" and "w" keys
            raise BadRequest(f"{name} is given more than once")
        value = _text(values[0], name) if values else ""
        if value == "":
            raise BadRequest(f"{name} is empty")
        result[name] = value
    return result


def _int_param(name: str, value: str, maximum: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise BadRequest(
            f"{name} must be a whole number between 1 and {maximum}, got {_show(value)}"
        )
    number = int(value)
    if not 1 <= number <= maximum:
        raise BadRequest(f"{name} must be between 1 and {maximum}, got {number}")
    return number


def parse_transform(
    args: Mapping,
    *,
    max_dimension: int = 8192,
    default_quality: int = 85,
) -> TransformSpec | None:
    """The :class:`TransformSpec` the query asks for, or None for the original file.

    Pass ``settings.max_dimension`` and ``settings.default_quality``.  Raises
    :class:`~imgserver.errors.BadRequest` with a message naming the parameter.
    """
    values = _single_values(args)
    if not values:
        return None

    width = height = None
    if "w" in values:
        width = _int_param("w", values["w"], max_dimension)
    if "h" in values:
        height = _int_param("h", values["h"], max_dimension)

    fit = FITS[0]
    if "fit" in values:
        fit = values["fit"]
        if fit not in FITS:
            raise BadRequest(f"fit must be one of {', '.join(FITS)}, got {_show(fit)}")
        if width is None and height is None:
            raise BadRequest("fit needs w, h or both")

    fmt = None
    if "fm" in values:
        fmt = FORMATS.get(values["fm"])
        if fmt is None:
            raise BadRequest(f"fm must be one of jpg, jpeg, png, webp, got {_show(values['fm'])}")

    quality = default_quality
    if "q" in values:
        quality = _int_param("q", values["q"], 100)

    return TransformSpec(width=width, height=height, fit=fit, format=fmt, quality=quality)
