import io
import os
import threading
import time
import warnings

import pytest
from img_helpers import (
    encode,
    halves,
    jpeg_claiming,
    noisy,
    png_claiming,
    png_with_late_exif,
    with_orientation,
)
from PIL import Image, ImageChops, ImageCms, ImageFile, ImageStat
from PIL.JpegImagePlugin import JpegImageFile

from imgserver import processing
from imgserver.errors import CorruptImage, TooLarge, UnsupportedImage
from imgserver.params import TransformSpec
from imgserver.processing import ImageInfo, configure_pillow, info, plan, probe, transform
from imgserver.settings import SAMPLES_DIR

MAX = 50_000_000


def decode(result) -> Image.Image:
    im = Image.open(io.BytesIO(result.body))
    im.load()
    return im


@pytest.fixture(scope="module")
def jpeg_1000x500() -> bytes:
    return encode(halves((1000, 500)), "JPEG", quality=90)


# --- fit modes ---------------------------------------------------------------

FIT_CASES = [
    # (w, h, fit) -> expected output size, for a 1000x500 source
    ((200, 200, "clip"), (200, 100)),
    ((200, 200, "crop"), (200, 200)),
    ((200, 200, "scale"), (200, 200)),
    ((200, 200, "max"), (200, 100)),
    ((2000, 2000, "max"), (1000, 500)),
    ((2000, 2000, "clip"), (2000, 1000)),
    ((2000, 2000, "crop"), (2000, 2000)),
    ((300, 50, "clip"), (100, 50)),
    ((300, 50, "crop"), (300, 50)),
    ((1000, 500, "clip"), (1000, 500)),
    # only w: the height follows the aspect ratio, whatever the fit
    ((200, None, "clip"), (200, 100)),
    ((200, None, "crop"), (200, 100)),
    ((200, None, "scale"), (200, 100)),
    ((200, None, "max"), (200, 100)),
    ((3000, None, "clip"), (3000, 1500)),
    ((3000, None, "max"), (1000, 500)),
    # only h
    ((None, 100, "clip"), (200, 100)),
    ((None, 100, "crop"), (200, 100)),
    ((None, 100, "scale"), (200, 100)),
    ((None, 1000, "clip"), (2000, 1000)),
    ((None, 1000, "max"), (1000, 500)),
]


@pytest.mark.parametrize("args,expected", FIT_CASES)
def test_fit_modes(jpeg_1000x500, args, expected):
    w, h, fit = args
    spec = TransformSpec(width=w, height=h, fit=fit)
    assert (plan(1000, 500, spec).width, plan(1000, 500, spec).height) == expected
    result = transform(jpeg_1000x500, spec, MAX)
    assert (result.width, result.height) == expected
    assert decode(result).size == expected
    assert result.content_type == "image/jpeg" and result.format == "jpeg"


def test_no_resize_keeps_the_size(jpeg_1000x500):
    result = transform(jpeg_1000x500, TransformSpec(format="png"), MAX)
    assert (result.width, result.height) == (1000, 500)


def test_crop_takes_the_centre():
    # Left third red, middle blue, right third red: a centred square crop is all blue.
    im = Image.new("RGB", (900, 300), (255, 0, 0))
    im.paste(Image.new("RGB", (300, 300), (0, 0, 255)), (300, 0))
    result = transform(encode(im, "PNG"), TransformSpec(100, 100, "crop"), MAX)
    out = decode(result).convert("RGB")
    r, g, b = ImageStat.Stat(out).mean
    assert b > 250 and r < 5


def test_scale_distorts_clip_does_not():
    im = halves((400, 200))
    scaled = decode(transform(encode(im, "PNG"), TransformSpec(100, 100, "scale"), MAX)).convert(
        "RGB"
    )
    # still left red / right blue, over the full width
    assert scaled.getpixel((10, 50))[0] > 200 and scaled.getpixel((90, 50))[2] > 200


def test_plan_crop_box():
    p = plan(1000, 500, TransformSpec(200, 200, "crop"))
    assert p.box == (250.0, 0.0, 750.0, 500.0)
    p = plan(500, 1000, TransformSpec(200, 100, "crop"))
    assert p.box == (0.0, 375.0, 500.0, 625.0)


def test_tiny_results_are_at_least_one_pixel():
    p = plan(10000, 10, TransformSpec(100, None, "clip"))
    assert (p.width, p.height) == (100, 1)


# --- formats and modes ---------------------------------------------------------


def rgba_png() -> bytes:
    im = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (100, 100), (255, 0, 0, 255)), (0, 0))
    return encode(im, "PNG")


def test_rgba_png_to_jpeg_flattens_onto_white():
    result = transform(rgba_png(), TransformSpec(format="jpeg"), MAX)
    out = decode(result)
    assert out.format == "JPEG" and out.mode == "RGB"
    assert result.content_type == "image/jpeg"
    assert all(abs(a - b) < 8 for a, b in zip(out.getpixel((150, 50)), (255, 255, 255)))
    assert all(abs(a - b) < 8 for a, b in zip(out.getpixel((50, 50)), (255, 0, 0)))


def test_rgba_png_to_webp_keeps_alpha():
    out = decode(transform(rgba_png(), TransformSpec(width=100, format="webp"), MAX))
    assert out.format == "WEBP" and out.mode == "RGBA"
    assert out.getpixel((75, 25))[3] == 0 and out.getpixel((25, 25))[3] == 255


def test_rgba_png_stays_png_with_alpha():
    result = transform(rgba_png(), TransformSpec(width=100), MAX)
    out = decode(result)
    assert result.content_type == "image/png" and out.format == "PNG" and out.mode == "RGBA"


@pytest.mark.parametrize("fm,pil", [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
@pytest.mark.parametrize("source", ["JPEG", "PNG", "WEBP"])
def test_every_conversion(source, fm, pil):
    data = encode(halves((120, 80)), source)
    result = transform(data, TransformSpec(width=60, format=fm), MAX)
    out = decode(result)
    assert out.format == pil and out.size == (60, 40)
    assert result.content_type == f"image/{fm}"


def test_default_output_format_is_the_source_format():
    for fmt, content_type in [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
    ]:
        result = transform(encode(halves((40, 20)), fmt), TransformSpec(width=20), MAX)
        assert result.content_type == content_type


def test_palette_with_transparency_to_jpeg():
    im = Image.new("P", (64, 64), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.info["transparency"] = 0
    out = decode(transform(encode(im, "PNG"), TransformSpec(width=32, format="jpeg"), MAX))
    assert out.mode == "RGB"
    assert all(c > 245 for c in out.getpixel((16, 16)))  # transparent -> white


def test_palette_is_resized_smoothly_not_nearest():
    im = Image.new("P", (100, 100), 0)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    for x in range(0, 100, 2):  # 1-pixel black/white stripes
        im.paste(1, (x, 0, x + 1, 100))
    out = decode(transform(encode(im, "PNG"), TransformSpec(width=50), MAX)).convert("L")
    assert 100 < ImageStat.Stat(out).mean[0] < 155  # grey, not all black or all white


def test_grey_alpha_to_jpeg_is_grey():
    im = Image.new("LA", (50, 50), (0, 0))
    out = decode(transform(encode(im, "PNG"), TransformSpec(format="jpeg"), MAX))
    assert out.mode == "L" and out.getpixel((25, 25)) > 245


def test_16bit_grey_png_is_scaled_not_clipped():
    im = Image.new("I;16", (40, 40), 30000)
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    for fm in ("png", "jpeg", "webp"):
        out = decode(transform(data, TransformSpec(width=20, format=fm), MAX)).convert("L")
        assert abs(out.getpixel((10, 10)) - 30000 / 257) <= 2


def test_bilevel_png():
    im = Image.new("1", (64, 64), 1)
    out = decode(transform(encode(im, "PNG"), TransformSpec(width=32), MAX))
    assert out.size == (32, 32) and out.mode == "L"


def test_cmyk_jpeg_becomes_rgb_and_drops_the_cmyk_profile():
    im = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red
    fake_cmyk_icc = bytes(16) + b"CMYK" + bytes(108)
    data = encode(im, "JPEG", icc_profile=fake_cmyk_icc)
    for fm in ("jpeg", "png", "webp"):
        out = decode(transform(data, TransformSpec(format=fm), MAX))
        assert out.mode in ("RGB", "RGBA")
        assert "icc_profile" not in out.info
        r, g, b = out.convert("RGB").getpixel((32, 32))
        assert r > 200 and g < 60 and b < 60


def test_icc_profile_is_kept_other_metadata_stripped():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    data = encode(halves((100, 50)), "JPEG", icc_profile=icc, exif=exif, comment=b"a comment")
    source = Image.open(io.BytesIO(data))
    assert "exif" in source.info and "comment" in source.info
    for fm in ("jpeg", "png", "webp"):
        out = decode(transform(data, TransformSpec(width=50, format=fm), MAX))
        assert out.info.get("icc_profile") == icc, fm
        assert "exif" not in out.info and "comment" not in out.info, fm
        assert not out.getexif(), fm


def test_quality_changes_the_size():
    data = encode(noisy((200, 200)), "PNG")
    low = transform(data, TransformSpec(format="jpeg", quality=10), MAX)
    high = transform(data, TransformSpec(format="jpeg", quality=95), MAX)
    assert len(low.body) < len(high.body)


# --- EXIF orientation --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_exif_orientation_is_applied(fmt):
    # stored 200x100, left half red, right half blue; orientation 6 = turn 90 degrees clockwise
    data = with_orientation(halves((200, 100)), fmt, 6)
    assert probe(data) == ImageInfo(200, 100, fmt.lower(), "RGB", 6)
    result = transform(data, TransformSpec(format="png"), MAX)
    assert (result.width, result.height) == (100, 200)
    out = decode(result).convert("RGB")
    top, bottom = out.getpixel((50, 20)), out.getpixel((50, 180))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_with_resize():
    data = with_orientation(halves((200, 100)), "JPEG", 6)
    assert transform(data, TransformSpec(width=50), MAX).height == 100
    assert transform(data, TransformSpec(100, 100, "crop"), MAX).width == 100
    result = transform(data, TransformSpec(50, 50, "clip"), MAX)
    assert (result.width, result.height) == (25, 50)


@pytest.mark.parametrize(
    "orientation,size",
    [
        (1, (200, 100)),
        (2, (200, 100)),
        (3, (200, 100)),
        (4, (200, 100)),
        (5, (100, 200)),
        (6, (100, 200)),
        (7, (100, 200)),
        (8, (100, 200)),
    ],
)
def test_every_orientation(orientation, size):
    data = with_orientation(halves((200, 100)), "JPEG", orientation)
    assert (info(data)["width"], info(data)["height"]) == size
    result = transform(data, TransformSpec(format="png"), MAX)
    assert (result.width, result.height) == size
    # no orientation tag is left in the output
    assert decode(transform(data, TransformSpec(format="jpeg"), MAX)).getexif().get(0x0112) is None


def test_large_rotated_jpeg_uses_draft_on_the_right_axes():
    data = with_orientation(noisy((1600, 800)), "JPEG", 6)
    result = transform(data, TransformSpec(100, 100, "crop"), MAX)
    assert (result.width, result.height) == (100, 100)
    result = transform(data, TransformSpec(width=100), MAX)
    assert (result.width, result.height) == (100, 200)


def test_png_exif_after_the_pixel_data_is_applied():
    data = png_with_late_exif(halves((200, 100)), 6)
    assert probe(data).orientation == 1  # not visible from the header
    result = transform(data, TransformSpec(width=50), MAX)
    assert (result.width, result.height) == (50, 100)
    top = decode(result).convert("RGB").getpixel((25, 10))
    assert top[0] > 200 and top[2] < 60


def test_orientation_applied_even_if_exif_cannot_be_rewritten(monkeypatch):
    from PIL import ImageOps

    monkeypatch.setattr(
        ImageOps, "exif_transpose", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad EXIF"))
    )
    data = with_orientation(halves((200, 100)), "JPEG", 6)
    result = transform(data, TransformSpec(format="png"), MAX)
    assert (result.width, result.height) == (100, 200)
    top = decode(result).convert("RGB").getpixel((50, 20))
    assert top[0] > 200 and top[2] < 60


def test_garbage_orientation_is_ignored():
    data = with_orientation(halves((200, 100)), "JPEG", 42)
    assert probe(data).orientation == 1
    assert transform(data, TransformSpec(format="png"), MAX).width == 200


# --- JPEG draft ---------------------------------------------------------------------


def test_jpeg_draft_is_used_with_margin(monkeypatch):
    requests = []
    real_draft = JpegImageFile.draft

    def spy(self, mode, size):
        requests.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    data = encode(noisy((2000, 1000)), "JPEG")
    result = transform(data, TransformSpec(width=200), MAX)
    assert (result.width, result.height) == (200, 100)
    assert requests == [(400, 200)]  # REDUCING_GAP x the target, never less


def test_no_draft_when_enlarging(monkeypatch):
    monkeypatch.setattr(JpegImageFile, "draft", lambda *a: pytest.fail("draft called"))
    data = encode(noisy((200, 100)), "JPEG")
    assert transform(data, TransformSpec(width=300), MAX).width == 300


def test_draft_keeps_quality():
    # Compare with a full decode + plain Lanczos resize.
    with Image.open(os.path.join(SAMPLES_DIR, "photo.jpg")) as sample:
        data = encode(sample.convert("RGB"), "JPEG", quality=95)  # 1067x1600, no EXIF
    ours = decode(transform(data, TransformSpec(width=200, format="png"), MAX)).convert("RGB")
    reference = (
        Image.open(io.BytesIO(data)).convert("RGB").resize(ours.size, Image.Resampling.LANCZOS)
    )
    diff = ImageStat.Stat(ImageChops.difference(ours, reference)).mean
    assert max(diff) < 1.0, diff


# --- limits and bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        png_claiming(100_000, 100_000),  # Pillow's own DecompressionBombError
        png_claiming(10_000, 6_000),  # 60 MP: only our check catches it
        jpeg_claiming(65_000, 65_000),
        jpeg_claiming(8_000, 8_000),
    ],
    ids=["png-10G", "png-60M", "jpeg-4G", "jpeg-64M"],
)
def test_pixel_bomb_is_refused_from_the_header(data):
    for call in (lambda: probe(data, MAX), lambda: transform(data, TransformSpec(width=10), MAX)):
        start = time.perf_counter()
        with pytest.raises(TooLarge) as info_:
            call()
        assert time.perf_counter() - start < 0.5
        assert info_.value.status == 413


def test_pixel_bomb_between_pillow_warning_and_error():
    data = png_claiming(10_000, 10_000)  # 100 MP: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(TooLarge):
            transform(data, TransformSpec(width=10), MAX)


def test_max_pixels_is_a_setting():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert probe(data, 10_000).width == 100
    with pytest.raises(TooLarge, match="100x100"):
        probe(data, 9_999)
    with pytest.raises(TooLarge):
        transform(data, TransformSpec(width=10), 9_999)


def test_bomb_warning_turned_into_an_error(monkeypatch):
    # What configure_pillow() sets up, done here without leaking global state.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 px: between 1x and 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(TooLarge):
            probe(data, None)


def test_configure_pillow(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with warnings.catch_warnings():
        configure_pillow(1000)
        assert Image.MAX_IMAGE_PIXELS == 1000
        with pytest.raises(TooLarge):
            probe(encode(Image.new("RGB", (40, 40)), "PNG"), None)


def test_output_pixel_limit(jpeg_1000x500):
    with pytest.raises(TooLarge, match="output"):
        transform(jpeg_1000x500, TransformSpec(8192, 8192, "scale"), MAX)


def test_webp_side_limit(jpeg_1000x500):
    with pytest.raises(TooLarge, match="WEBP"):
        transform(jpeg_1000x500, TransformSpec(20000, 10, "scale", "webp"), 10**9)


def test_truncated_jpeg_is_corrupt():
    data = encode(noisy((400, 300)), "JPEG", quality=90)
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(CorruptImage) as info_:
            transform(data[:cut], TransformSpec(width=100), MAX)
        assert info_.value.status == 422


def test_truncated_png_is_corrupt():
    data = encode(noisy((300, 300)), "PNG")
    with pytest.raises(CorruptImage):
        transform(data[: len(data) // 2], TransformSpec(width=100), MAX)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_header_is_corrupt(fmt):
    data = encode(noisy((64, 64)), fmt)
    with pytest.raises(CorruptImage):
        probe(data[:20])


def test_text_is_unsupported():
    with pytest.raises(UnsupportedImage) as info_:
        probe(b"hello, this is not an image\n" * 10)
    assert not isinstance(info_.value, CorruptImage)
    assert info_.value.status == 415
    with pytest.raises(UnsupportedImage):
        transform(b"<html></html>", TransformSpec(width=10), MAX)
    with pytest.raises(UnsupportedImage):
        info(b"")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_unsupported(fmt):
    data = encode(Image.new("RGB", (10, 10)), fmt)
    with pytest.raises(UnsupportedImage, match=fmt) as info_:
        probe(data)
    assert info_.value.status == 415


# --- probe / info ----------------------------------------------------------------------------


def test_probe_does_not_decode(monkeypatch):
    data = png_claiming(3000, 2000)  # the pixel data is broken: decoding would fail
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    assert probe(data, MAX) == ImageInfo(3000, 2000, "png", "RGB", 1)


def test_info_document():
    data = with_orientation(halves((200, 100)), "JPEG", 8)
    assert info(data) == {
        "width": 100,
        "height": 200,
        "format": "jpeg",
        "mode": "RGB",
        "bytes": len(data),
        "orientation": 8,
    }


# --- encoding ------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_encoding_closes_its_files():
    data = encode(halves((300, 200)), "PNG")
    transform(data, TransformSpec(width=10), MAX)  # warm up lazy imports
    before = open_fds()
    for fm in ("jpeg", "png", "webp"):
        for _ in range(20):
            transform(data, TransformSpec(width=100, format=fm), MAX)
    with pytest.raises(TooLarge):
        transform(data, TransformSpec(8000, 8000, "scale"), MAX)
    assert open_fds() == before


def test_encoding_closes_its_file_when_saving_fails(monkeypatch):
    closed = []
    real_close = os.close
    monkeypatch.setattr(processing.os, "close", lambda fd: (closed.append(fd), real_close(fd)))
    monkeypatch.setattr(
        Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        processing._encode_to_fd(Image.new("RGB", (10, 10)), "jpeg", {})
    assert len(closed) == 1


def test_tempfile_fallback_gives_the_same_bytes(monkeypatch):
    data = encode(halves((300, 200)), "PNG")
    spec = TransformSpec(width=120, format="jpeg")
    expected = transform(data, spec, MAX).body
    monkeypatch.setattr(processing, "_memfd_usable", False)
    assert transform(data, spec, MAX).body == expected
    assert processing._transform(data, spec, MAX, processing._encode_to_bytesio).body == expected


def test_threads_give_the_same_results():
    sources = [encode(noisy((800, 600)), fmt) for fmt in ("JPEG", "PNG", "WEBP")]
    spec = TransformSpec(256, 256, "crop", quality=80)
    expected = [transform(d, spec, MAX).body for d in sources]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results.setdefault(i, set()).add(transform(sources[i % 3], spec, MAX).body)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, bodies in results.items():
        assert bodies == {expected[i % 3]}
