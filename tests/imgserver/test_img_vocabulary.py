"""The image vocabulary of issue 12: every parameter's output size, format and
mode, crop regions, animation frame counts, errors for bad values, signing
of every parameter and of presets; auto=format with Vary over real HTTP.

Images are synthetic (Pillow): coloured quadrants tell which part of the
source an output came from.
"""

from __future__ import annotations

import io
import json
from urllib.parse import parse_qs, urlencode

import pytest
import pytest_twisted
from http_helpers import Servers, get_reactor
from img_helpers import encode, noisy
from PIL import Image, ImageCms, ImageStat

from imgserver import formats, params, processing
from imgserver.errors import BadRequest, Forbidden, TooLarge
from imgserver.params import PARAMETERS, TransformSpec, parse_presets, parse_transform
from imgserver.settings import Settings
from imgserver.signing import signed_url, verify

MAX = 50_000_000
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
SECRET = b"vocabulary-test-secret-0123456789"


def quadrants(size=(800, 200), mode="RGB") -> Image.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    w, h = size
    im = Image.new("RGB", size)
    for (x, y), colour in (((0, 0), RED), ((1, 0), GREEN), ((0, 1), BLUE), ((1, 1), YELLOW)):
        im.paste(colour, (x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
    return im.convert(mode)


def parse(query: str, **kwargs) -> TransformSpec | None:
    return parse_transform(parse_qs(query, keep_blank_values=True), **kwargs)


def run(data: bytes, query: str, **kwargs) -> tuple[processing.Result, Image.Image]:
    spec = parse(query)
    assert spec is not None
    result = processing.transform(data, spec, MAX, **kwargs)
    im = Image.open(io.BytesIO(result.body))
    im.load()
    assert im.size == (result.width, result.height)
    return result, im


def colours(im: Image.Image) -> set[tuple[int, int, int]]:
    """The quadrant colours present (each channel rounded to 0/255)."""
    found = set()
    for count, pixel in im.convert("RGB").getcolors(1 << 20):
        if count > 4:
            found.add(tuple(255 if c > 127 else 0 for c in pixel))
    return found


def near(a, b, tolerance=40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


QUAD_PNG = encode(quadrants(), "PNG")


# --- the table -----------------------------------------------------------------------------


def test_every_parameter_in_the_table_is_parsed_and_documented():
    assert params.PARAMS == {p.name for p in PARAMETERS}
    table = params.markdown_table()
    for p in PARAMETERS:
        assert f"| `{p.name}` |" in table
    # Every documented fm value is accepted, and formats come from one table.
    for fm, (name, progressive) in formats.FM_VALUES.items():
        spec = parse(f"fm={fm}")
        assert spec.format == name and spec.progressive == progressive
        assert formats.FORMATS[name].writable


# --- sizes and fits ------------------------------------------------------------------------


@pytest.mark.parametrize("query,size", [
    ("w=200", (200, 50)),
    ("h=100", (400, 100)),
    ("w=100&h=100", (100, 25)),  # clip
    ("w=100&h=100&fit=crop", (100, 100)),
    ("w=100&h=100&fit=scale", (100, 100)),
    ("w=100&h=100&fit=fill", (100, 100)),
    ("w=2000&h=1000&fit=max", (800, 200)),
    ("w=2000&h=1000&fit=min", (400, 200)),  # the 2:1 box of the source, not enlarged
    ("w=100&h=50&fit=min", (100, 50)),
    ("w=100&dpr=2", (200, 50)),
    ("w=100&h=100&dpr=1.5&fit=crop", (150, 150)),
    ("pad=10", (820, 220)),
    ("w=100&h=100&fit=crop&pad=10", (100, 100)),
    ("w=100&pad=10", (100, 40)),  # inner 80 x 20 + padding
    ("rot=90", (200, 800)),
    ("w=100&h=400&fit=crop&rot=90", (100, 400)),
    ("rect=400,0,400,100", (400, 100)),
    ("rect=700,150,500,500", (100, 50)),  # clipped to the image
])
def test_output_sizes(query, size):
    result, im = run(QUAD_PNG, query)
    assert im.size == size, query


def test_fill_pads_with_bg_and_centres_the_image():
    _, im = run(QUAD_PNG, "w=100&h=100&fit=fill&bg=00f&fm=png")
    assert im.size == (100, 100) and im.mode == "RGB"
    assert im.getpixel((50, 5)) == (0, 0, 255)  # padding above the 100x25 image
    assert near(im.getpixel((10, 44)), RED) and near(im.getpixel((90, 55)), YELLOW)
    _, clear = run(QUAD_PNG, "w=100&h=100&fit=fill&fm=png")  # no bg: transparent where possible
    assert clear.mode == "RGBA" and clear.getpixel((50, 5))[3] == 0
    _, jpeg = run(QUAD_PNG, "w=100&h=100&fit=fill&fm=jpg")  # no alpha: white
    assert near(jpeg.getpixel((50, 5)), (255, 255, 255), 8)


def test_pad_uses_bg():
    _, im = run(QUAD_PNG, "pad=5&bg=00ff00ff&fm=png")  # AARRGGBB: transparent magenta
    assert im.size == (810, 210) and im.mode == "RGBA"
    assert im.getpixel((0, 0)) == (255, 0, 255, 0)
    assert near(im.getpixel((10, 10))[:3], RED)


# --- crop regions ----------------------------------------------------------------------------

WIDE = encode(quadrants((800, 200)), "PNG")  # crops of a square cut across x
TALL = encode(quadrants((200, 800)), "PNG")  # ... across y


@pytest.mark.parametrize("data,crop,expected", [
    (WIDE, "left", {RED, BLUE}),
    (WIDE, "right", {GREEN, YELLOW}),
    (WIDE, "top,left", {RED, BLUE}),
    (WIDE, "bottom,right", {GREEN, YELLOW}),
    (TALL, "top", {RED, GREEN}),
    (TALL, "bottom", {BLUE, YELLOW}),
    (TALL, "top,left", {RED, GREEN}),
    (TALL, "left,bottom", {BLUE, YELLOW}),
])
def test_crop_sides_keep_their_quadrants(data, crop, expected):
    _, im = run(data, f"w=100&h=100&fit=crop&crop={crop}&fm=png")
    assert im.size == (100, 100)
    assert colours(im) == expected, crop


def test_crop_top_left_keeps_the_top_left_colour():
    _, im = run(WIDE, "w=100&h=100&fit=crop&crop=top,left&fm=png")
    assert near(im.getpixel((0, 0)), RED) and near(im.getpixel((99, 0)), RED)


@pytest.mark.parametrize("fx,fy,colour", [(0.1, 0.25, RED), (0.9, 0.25, GREEN), (0.1, 0.75, BLUE),
                                          (0.9, 0.75, YELLOW)])
def test_focal_point_in_a_quadrant_keeps_its_colour(fx, fy, colour):
    _, im = run(WIDE, f"w=100&h=100&fit=crop&crop=focalpoint&fp-x={fx}&fp-y={fy}&fp-z=2&fm=png")
    assert colours(im) == {colour}


def test_focal_point_without_zoom_moves_the_box():
    _, im = run(WIDE, "w=100&h=100&fit=crop&crop=focalpoint&fp-x=0.95&fp-y=0.5&fm=png")
    assert colours(im) == {GREEN, YELLOW}


def test_entropy_keeps_the_detailed_region():
    im = Image.new("RGB", (800, 200), (128, 128, 128))
    im.paste(noisy((200, 200)), (550, 0))
    data = encode(im, "PNG")
    _, out = run(data, "w=100&h=100&fit=crop&crop=entropy&fm=png")
    assert ImageStat.Stat(out.convert("L")).stddev[0] > 20  # the noise, not the flat grey
    _, centre = run(data, "w=100&h=100&fit=crop&fm=png")
    assert ImageStat.Stat(centre.convert("L")).stddev[0] < 1
    # Along y too, and through an EXIF rotation.
    tall = im.rotate(90, expand=True)
    _, out = run(encode(tall, "PNG"), "w=100&h=100&fit=crop&crop=entropy&fm=png")
    assert ImageStat.Stat(out.convert("L")).stddev[0] > 20


def test_rect_cuts_the_source_first():
    _, im = run(WIDE, "rect=400,0,400,100&fm=png")
    assert colours(im) == {GREEN}
    _, im = run(WIDE, "rect=0,100,400,100&w=50&fm=png")
    assert im.size == (50, 12) and colours(im) == {BLUE}


# --- orientation -----------------------------------------------------------------------------


def test_flip_and_rot():
    small = encode(quadrants((80, 40)), "PNG")
    _, im = run(small, "flip=h&fm=png")
    assert near(im.getpixel((5, 5)), GREEN) and near(im.getpixel((75, 5)), RED)
    _, im = run(small, "flip=v&fm=png")
    assert near(im.getpixel((5, 5)), BLUE)
    _, im = run(small, "flip=hv&fm=png")
    assert near(im.getpixel((5, 5)), YELLOW)
    _, im = run(small, "rot=90&fm=png")  # counter-clockwise: the top-right corner comes to the top-left
    assert im.size == (40, 80) and near(im.getpixel((5, 5)), GREEN)
    _, im = run(small, "rot=270&fm=png")
    assert near(im.getpixel((5, 5)), BLUE)
    _, im = run(small, "rot=180&fm=png")
    assert near(im.getpixel((5, 5)), YELLOW)
    _, im = run(small, "flip=h&rot=90&fm=png")  # flipped first, then rotated
    assert near(im.getpixel((5, 5)), RED)


def test_free_rotation_enlarges_the_canvas_with_bg():
    _, im = run(encode(quadrants((80, 40)), "PNG"), "rot=45&bg=0000ff&fm=png")
    assert im.width > 80 and im.height > 40 and im.mode == "RGB"
    assert im.getpixel((0, 0)) == (0, 0, 255)
    _, clear = run(encode(quadrants((80, 40)), "PNG"), "rot=30&fm=webp")
    assert clear.mode == "RGBA" and clear.getpixel((0, 0))[3] == 0


def test_orient_overrides_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(quadrants((80, 40)), "JPEG", exif=exif, quality=95)
    _, im = run(rotated, "fm=png")
    assert im.size == (40, 80)  # EXIF 6 applied
    _, im = run(rotated, "orient=0&fm=png")
    assert im.size == (80, 40)  # ignored
    _, im = run(rotated, "orient=1&fm=png")
    assert im.size == (80, 40)
    _, im = run(encode(quadrants((80, 40)), "PNG"), "orient=90&fm=png")  # = 6: clockwise
    assert im.size == (40, 80) and near(im.getpixel((5, 5)), BLUE)


# --- filters ---------------------------------------------------------------------------------


def test_blur_and_sharp():
    data = encode(noisy((200, 200)), "PNG")
    plain = ImageStat.Stat(run(data, "fm=png")[1].convert("L")).stddev[0]
    blurred = ImageStat.Stat(run(data, "blur=100&fm=png")[1].convert("L")).stddev[0]
    sharpened = ImageStat.Stat(run(data, "sharp=100&fm=png")[1].convert("L")).stddev[0]
    assert blurred < plain / 3 and sharpened > plain


def test_blur_keeps_transparent_pixels_clean():
    im = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (40, 40, 60, 60))
    _, out = run(encode(im, "PNG"), "blur=60&fm=png")
    r, g, b, a = out.getpixel((50, 42))
    assert r < 20 and b > 200  # no red bled in from the transparent pixels


def test_bg_flattens_transparency():
    im = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    im.paste((0, 255, 0, 255), (5, 5, 15, 15))
    data = encode(im, "PNG")
    _, out = run(data, "bg=f00&fm=png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((10, 10)) == (0, 255, 0)
    _, out = run(data, "bg=80ff0000&fm=png")  # half-transparent red
    assert out.mode == "RGBA" and out.getpixel((0, 0)) == (255, 0, 0, 128)
    _, out = run(data, "bg=00f&fm=jpg")
    assert near(out.getpixel((0, 0)), (0, 0, 255), 10)


# --- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fm,pillow,content_type", [
    ("avif", "AVIF", "image/avif"), ("gif", "GIF", "image/gif"), ("jpg", "JPEG", "image/jpeg"),
    ("pjpg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp"),
])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_output_formats_and_modes(fm, pillow, content_type, mode):
    source = quadrants((160, 80), mode)
    if mode == "RGBA":
        source.putalpha(Image.linear_gradient("L").resize(source.size))  # some transparency
    result, im = run(encode(source, "PNG"), f"w=80&fm={fm}")
    assert im.format == pillow and result.content_type == content_type and im.size == (80, 40)
    alpha = mode == "RGBA" and formats.FORMATS[result.format].alpha
    if fm == "gif":
        assert im.mode in ("P", "L")
    else:
        assert ("A" in im.mode) == alpha, (fm, mode, im.mode)
    if fm == "pjpg":
        assert im.info.get("progressive") or im.info.get("progression")
    if fm == "jpg":
        assert not (im.info.get("progressive") or im.info.get("progression"))
    if mode != "L":
        assert colours(im.convert("RGBA").convert("RGB")) >= {RED, GREEN} or mode == "RGBA"
    assert im.convert("RGB").getpixel((70, 30)) != im.convert("RGB").getpixel((10, 10))


def test_lossless_webp_keeps_every_pixel():
    source = noisy((64, 48))
    _, im = run(encode(source, "PNG"), "fm=webp&lossless=1")
    assert im.convert("RGB").tobytes() == source.tobytes()
    _, lossy = run(encode(source, "PNG"), "fm=webp")
    assert lossy.convert("RGB").tobytes() != source.tobytes()


@pytest.mark.parametrize("fmt", ["GIF", "AVIF", "WEBP"])
def test_new_input_formats(fmt):
    data = encode(quadrants((160, 80)).convert("P") if fmt == "GIF" else quadrants((160, 80)), fmt)
    result, im = run(data, "w=80")
    assert result.format == fmt.lower() and im.size == (80, 40)
    assert colours(im) == {RED, GREEN, BLUE, YELLOW}
    header = processing.read_header(data, MAX)
    assert header.format == fmt.lower() and (header.width, header.height) == (160, 80)
    assert processing.estimate_bytes(header, parse("w=80")) > 0


def test_heif_input_through_the_optional_plugin():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    data = encode(quadrants((160, 80)), "HEIF", quality=90)
    assert formats.sniff(data[:64]) == "heif"
    result, im = run(data, "w=80")
    assert result.format == "jpeg" and im.size == (80, 40)  # HEIF is never written
    assert colours(im) == {RED, GREEN, BLUE, YELLOW}


def test_metadata_is_stripped_unless_kept():
    exif = Image.Exif()
    exif[0x8298] = "(c) Someone"
    exif[0x013B] = "Someone"
    exif[0x010F] = "CameraMaker"
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(quadrants((80, 40)), "JPEG", exif=exif, icc_profile=profile)
    for fm in ("jpg", "png", "webp", "avif"):
        _, plain = run(data, f"w=40&fm={fm}")
        assert not plain.info.get("icc_profile") and not plain.info.get("exif"), fm
        _, kept = run(data, f"w=40&fm={fm}&cs=origin&meta=copyright")
        assert kept.info.get("icc_profile") == profile, fm
        tags = kept.getexif()
        assert tags.get(0x8298) == "(c) Someone" and tags.get(0x013B) == "Someone", fm
        assert 0x010F not in tags, fm


# --- animation -------------------------------------------------------------------------------

COLOURS = [RED, GREEN, BLUE, YELLOW, (0, 255, 255), (255, 0, 255)] * 2


def animation(fmt: str, n: int = 12, size=(60, 40)) -> bytes:
    frames = [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i in range(n)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)


def frame_count(im: Image.Image) -> int:
    return getattr(im, "n_frames", 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "AVIF"])
def test_first_frame_by_default_all_when_asked(fmt):
    data = animation(fmt)
    result, im = run(data, "w=30")
    assert frame_count(im) == 1 and result.frames == 1 and near(im.convert("RGB").getpixel((5, 5)), RED)
    result, im = run(data, "w=30&animated=true")
    assert result.frames == 12 and frame_count(im) == 12 and im.size == (30, 20)
    im.seek(2)
    assert near(im.convert("RGB").getpixel((5, 5)), BLUE)
    result, im = run(data, "w=30&frame=3-5")
    assert result.frames == 3 and frame_count(im) == 3
    assert near(im.convert("RGB").getpixel((5, 5)), BLUE)
    result, im = run(data, "frame=2&fm=png")
    assert result.frames == 1 and near(im.convert("RGB").getpixel((5, 5)), GREEN)
    result, im = run(data, "frame=10-")
    assert result.frames == 3
    result, im = run(data, "frame=-4")
    assert result.frames == 4


@pytest.mark.parametrize("fm", ["gif", "webp", "avif", "png"])
def test_animation_converts_between_formats(fm):
    result, im = run(animation("GIF", 6), f"w=30&animated=1&fm={fm}")
    assert result.format == fm and result.frames == 6 and frame_count(im) == 6 and im.size == (30, 20)


def test_frame_limits():
    data = animation("GIF", 12)
    with pytest.raises(TooLarge, match="limit of 5"):
        run(data, "animated=1", max_frames=5)
    run(data, "frame=5", max_frames=5)
    with pytest.raises(TooLarge, match="limit of 5"):
        run(data, "frame=6", max_frames=5)  # frame 6 needs the five before it
    spec = parse("animated=1")
    with pytest.raises(TooLarge, match="pixels"):  # 12 x 60 x 40 = 28,800 pixels
        processing.transform(data, spec, 20_000)
    header = processing.read_header(data, 20_000)
    with pytest.raises(TooLarge):  # refused from the header, before decoding
        processing.estimate_bytes(header, spec, max_pixels=20_000)
    with pytest.raises(TooLarge):
        processing.estimate_bytes(header, spec, max_frames=5)
    with pytest.raises(BadRequest, match="13"):
        run(data, "frame=13")
    assert processing.estimate_bytes(header, spec) > processing.estimate_bytes(header, parse("w=60"))


# --- parsing: canonical keys, bad values -------------------------------------------------------


def test_canonical_cache_keys():
    key = lambda q: parse(q).cache_key()  # noqa: E731
    assert key("w=100&dpr=2") == key("w=200")
    assert key("w=10&h=10&fit=crop&crop=top,left") == key("w=10&h=10&fit=crop&crop=left,top")
    assert key("auto=compress") == key("q=45")
    assert key("animated=1") == key("frame=1-")
    assert key("fm=gif&q=10") == key("fm=gif&q=90")
    assert key("fm=avif&q=10") != key("fm=avif&q=90")
    assert key("fm=pjpg") != key("fm=jpg")
    assert key("w=10&fit=fill") == key("w=10")
    assert key("w=10&h=10&fit=crop&crop=focalpoint&fp-x=0.5") == key("w=10&h=10&fit=crop&crop=focalpoint")
    keys = {key(q) for q in ("rot=90", "rot=91", "flip=h", "flip=v", "orient=3", "orient=0", "blur=5",
                             "sharp=5", "bg=fff", "pad=1", "cs=origin", "cs=strip", "meta=copyright",
                             "frame=2", "rect=0,0,10,10", "fm=webp&lossless=1", "fm=webp")}
    assert len(keys) == 17


def test_auto_format_negotiation():
    spec = parse("w=10&auto=format")
    assert spec.auto_format
    assert spec.negotiate("image/avif,image/webp,*/*").format == "avif"
    assert spec.negotiate("image/webp,*/*;q=0.8").format == "webp"
    assert spec.negotiate("image/avif;q=0,image/webp").format == "webp"
    assert spec.negotiate("image/*,*/*").format is None  # the source's
    assert parse("auto=format&fm=png").negotiate("text/html").format == "png"
    assert parse("auto=format&fm=pjpg").negotiate("image/webp").progressive is False
    assert spec.negotiate(None).format is None and not spec.negotiate(None).auto_format
    assert parse("auto=format,compress").quality == 45
    assert parse("auto=format&auto=compress&q=70").quality == 70  # auto may be repeated


@pytest.mark.parametrize("query,fragment", [
    ("dpr=2", "dpr needs w"), ("w=10&dpr=0.5", "between 1 and 5"), ("w=10&dpr=6", "between 1 and 5"),
    ("w=10&dpr=1.234", "decimals"), ("w=5000&dpr=2", "over the limit"), ("w=10&dpr=abc", "number"),
    ("fit=fill", "fit needs"), ("w=10&fit=clamp", "fit must be"),
    ("crop=top", "crop needs fit=crop"), ("w=1&h=1&fit=crop&crop=middle", "crop must be"),
    ("w=1&h=1&fit=crop&crop=top,bottom", "both top and bottom"),
    ("w=1&h=1&fit=crop&crop=entropy,top", "cannot be combined"),
    ("w=1&h=1&fit=crop&crop=faces", "not supported"), ("w=1&h=1&fit=crop&crop=edges", "not supported"),
    ("w=1&h=1&fit=crop&crop=top,top", "twice"),
    ("fp-x=0.5", "needs crop=focalpoint"), ("w=1&h=1&fit=crop&crop=focalpoint&fp-x=1.5", "between 0 and 1"),
    ("w=1&h=1&fit=crop&crop=focalpoint&fp-z=0.5", "between 1 and 100"),
    ("w=1&h=1&fit=crop&crop=focalpoint&fp-y=-0.1", "number"),
    ("rect=1,2,3", "x,y,w,h"), ("rect=0,0,0,10", "between 1"), ("rect=a,0,1,1", "whole number"),
    ("orient=9", "orient must be"), ("orient=45", "orient must be"), ("flip=x", "flip must be"),
    ("rot=360", "between 0 and 359"), ("rot=-90", "whole number"),
    ("blur=2001", "between 0 and 2000"), ("sharp=101", "between 0 and 100"),
    ("bg=12", "hex digits"), ("bg=ggg", "hex digits"), ("bg=%23fff", "hex digits"), ("bg=1234567", "hex digits"),
    ("pad=-1", "whole number"), ("w=10&h=10&pad=5", "no room"),
    ("fm=heif", "fm must be"), ("fm=tiff", "fm must be"), ("lossless=2", "0, 1, true or false"),
    ("lossless=1&fm=jpg", "lossless needs fm=webp"), ("auto=enhance", "auto must be"),
    ("cs=adobergb1998", "cs must be"), ("meta=all", "meta must be"),
    ("frame=0", "frame must"), ("frame=5-3", "frame must"), ("frame=a", "frame must"), ("frame=-", "frame must"),
    ("animated=yes", "0, 1, true or false"), ("animated=1&frame=2", "not both"),
    ("animated=1&fm=jpg", "cannot hold an animation"), ("frame=1-3&fm=pjpg", "cannot hold an animation"),
    ("preset=nope", "no preset"), ("q=0", "between 1 and 100"),
])
def test_bad_values(query, fragment):
    with pytest.raises(BadRequest, match=fragment) as info:
        spec = parse(query)
        if spec is not None:  # some errors need the image (pad, rect)
            processing.transform(QUAD_PNG, spec, MAX)
    assert info.value.status == 400


def test_rect_outside_the_image_is_a_bad_request():
    with pytest.raises(BadRequest, match="outside"):
        run(QUAD_PNG, "rect=900,0,10,10")
    header = processing.read_header(QUAD_PNG, MAX)
    with pytest.raises(BadRequest, match="outside"):
        processing.estimate_bytes(header, parse("rect=900,0,10,10"))


def test_presets():
    presets = parse_presets(["thumb:w=200&h=200&fit=crop", "hero:w=1200&fm=webp&q=70"])
    spec = parse("preset=thumb", presets=presets)
    assert spec == parse("w=200&h=200&fit=crop")
    assert parse("preset=thumb&w=100", presets=presets) == parse("w=100&h=200&fit=crop")  # explicit wins
    assert parse("preset=hero&fm=avif", presets=presets).format == "avif"
    for bad in (["bad name:w=1"], ["x:w=0"], ["x:preset=y"], ["x:"], ["x:w=1", "x:w=2"], ["x:s=abc"]):
        with pytest.raises(ValueError):
            parse_presets(bad)
    with pytest.raises(ValueError):
        Settings(presets=("x:w=9000",))  # over max_dimension


# --- signing covers every parameter ------------------------------------------------------------

#: Two valid values of every parameter.
VALUES = {
    "w": ("100", "101"), "h": ("100", "101"), "dpr": ("1", "2"), "fit": ("crop", "min"),
    "crop": ("top", "entropy"), "fp-x": ("0.5", "0.6"), "fp-y": ("0.5", "0.6"), "fp-z": ("1", "2"),
    "rect": ("0,0,10,10", "0,0,10,11"), "orient": ("1", "6"), "flip": ("h", "v"), "rot": ("0", "90"),
    "blur": ("1", "2"), "sharp": ("1", "2"), "bg": ("fff", "000"), "pad": ("1", "2"),
    "fm": ("webp", "avif"), "q": ("50", "51"), "lossless": ("0", "1"), "auto": ("format", "compress"),
    "cs": ("srgb", "origin"), "meta": ("copyright", "copyright"), "frame": ("1", "2"),
    "animated": ("0", "1"), "preset": ("a", "b"),
}


def test_the_signature_covers_every_parameter():
    assert set(VALUES) == params.PARAMS
    for name, (value, other) in VALUES.items():
        query = {name: value}
        url = signed_url(SECRET, "images", "a.jpg", query)
        args = parse_qs(url.split("?", 1)[1])
        verify(SECRET, "images", "a.jpg", args)
        changed = dict(args, **({name: [other]} if other != value else {name: [value, value]}))
        with pytest.raises(Forbidden):
            verify(SECRET, "images", "a.jpg", changed)
        added = dict(args, **{"w" if name != "w" else "h": ["5"]})
        with pytest.raises(Forbidden):
            verify(SECRET, "images", "a.jpg", added)


# --- over HTTP ---------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "quad.png").write_bytes(QUAD_PNG)
    (root / "anim.gif").write_bytes(animation("GIF", 8))
    (root / "photo.avif").write_bytes(encode(quadrants((160, 80)), "AVIF"))
    return root


def check_400(reply) -> dict:
    assert reply.code == 400, (reply.code, reply.body[:200])
    assert reply.header("content-type") == "application/json"
    body = json.loads(reply.body)
    assert body["error"] == "bad_request" and body["message"]
    return body


@pytest_twisted.ensureDeferred
async def test_http_auto_format_varies_with_accept(servers, root):
    server, client = await servers.start(root=str(root))
    url = "/images/quad.png?w=100&auto=format"
    answers = {}
    for accept, fmt in (("image/avif,image/webp,*/*", "image/avif"), ("image/webp,*/*", "image/webp"),
                        ("*/*", "image/png"), (None, "image/png")):
        reply = await client.get(url, headers={"Accept": accept} if accept else None)
        assert reply.code == 200 and reply.header("content-type") == fmt, (accept, reply.headers)
        assert reply.header("vary") == "Accept"
        answers[fmt] = reply.header("etag")
        again = await client.get(url, headers={"Accept": accept, "If-None-Match": reply.header("etag")}
                                 if accept else {"If-None-Match": reply.header("etag")})
        assert again.code == 304 and again.header("vary") == "Accept"
    assert len(set(answers.values())) == 3  # one ETag per representation
    plain = await client.get("/images/quad.png?w=100", headers={"Accept": "image/avif"})
    assert plain.header("content-type") == "image/png" and plain.header("vary") is None


@pytest_twisted.ensureDeferred
async def test_http_new_formats_and_animation(servers, root):
    server, client = await servers.start(root=str(root), max_frames=8)
    reply = await client.get("/images/photo.avif")  # originals of the new formats are served
    assert reply.code == 200 and reply.header("content-type") == "image/avif"
    reply = await client.get("/images/anim.gif")
    assert reply.code == 200 and reply.header("content-type") == "image/gif"
    reply = await client.get("/images/anim.gif?w=30&animated=1&fm=webp")
    assert reply.code == 200 and reply.image().n_frames == 8
    reply = await client.get("/images/anim.gif?w=30")
    assert reply.code == 200 and getattr(reply.image(), "n_frames", 1) == 1
    reply = await client.get("/images/photo.avif?w=40&fm=gif")
    assert reply.code == 200 and reply.image().size == (40, 20)
    info = (await client.get("/info/anim.gif")).json()
    assert info["format"] == "gif"


@pytest_twisted.ensureDeferred
async def test_http_frame_limits(servers, root):
    server, client = await servers.start(root=str(root), max_frames=4)
    reply = await client.get("/images/anim.gif?animated=1")
    assert reply.code == 413 and json.loads(reply.body)["error"] == "too_large"
    reply = await client.get("/images/anim.gif?frame=1-4")
    assert reply.code == 200


@pytest.mark.parametrize("query", [
    "w=10&dpr=9", "fit=fill", "w=1&h=1&fit=crop&crop=faces", "rot=400", "flip=x", "bg=xyz", "blur=-1",
    "fm=tiff", "auto=magic", "frame=0", "preset=missing", "w=10&h=10&pad=5", "rect=5000,0,1,1",
    "frame=99", "animated=1&fm=jpg", "cs=cmyk",
])
@pytest_twisted.ensureDeferred
async def test_http_bad_values_are_400_json(servers, root, query):
    server, client = await servers.start(root=str(root))
    check_400(await client.get(f"/images/quad.png?{query}"))


@pytest_twisted.ensureDeferred
async def test_http_presets_and_signing(servers, root):
    server, client = await servers.start(root=str(root), secret=SECRET,
                                         presets=("thumb:w=50&h=50&fit=crop&fm=webp",))
    url = signed_url(SECRET, "images", "quad.png", {"preset": "thumb"})
    reply = await client.get(url)
    assert reply.code == 200 and reply.image().size == (50, 50) and reply.header("content-type") == "image/webp"
    url = signed_url(SECRET, "images", "quad.png", {"preset": "thumb", "w": "40"})
    assert (await client.get(url)).image().size == (40, 50)  # explicit w overrides the preset's
    # The preset parameter is signed like any other: swap it and the signature fails.
    bad = signed_url(SECRET, "images", "quad.png", {"preset": "thumb"}).replace("preset=thumb", "preset=other")
    assert (await client.get(bad)).code == 403
    assert (await client.get("/images/quad.png?preset=thumb")).code == 403  # unsigned
    added = signed_url(SECRET, "images", "quad.png", {"preset": "thumb"}) + "&" + urlencode({"w": 10})
    assert (await client.get(added)).code == 403  # an added parameter
    unknown = signed_url(SECRET, "images", "quad.png", {"preset": "nope"})
    check_400(await client.get(unknown))
    for name, (value, _) in VALUES.items():
        if name in ("preset", "fp-x", "fp-y", "fp-z", "crop"):
            continue
        query = {name: value}
        if name in ("fit", "dpr"):
            query.update(w="40", h="40")
        url = signed_url(SECRET, "images", "quad.png", query)
        reply = await client.get(url)
        assert reply.code == 200, (name, reply.body[:200])
        assert (await client.get(url.replace(f"{name}=", f"{name}=9"))).code in (400, 403)
