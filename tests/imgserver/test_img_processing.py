import io
import os
import struct
import threading
import time
import warnings
import zlib

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
from PIL import Image, ImageChops, ImageCms, ImageFile, ImageOps, ImageStat, PngImagePlugin
from PIL.JpegImagePlugin import JpegImageFile

from imgserver import processing
from imgserver.errors import CorruptImage, TooLarge, UnsupportedImage
from imgserver.params import TransformSpec
from imgserver.processing import (
    Header,
    ImageInfo,
    configure_pillow,
    estimate_bytes,
    info,
    plan,
    probe,
    read_header,
    transform,
)
from imgserver.settings import SAMPLES_DIR, Settings

MAX = 50_000_000


@pytest.fixture(autouse=True)
def pillow_state(monkeypatch):
    """Whatever a test (or another module's server) does to Pillow's globals stays in it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 64 * 1024 * 1024)
    with warnings.catch_warnings():
        yield


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


def test_metadata_and_profiles_are_stripped():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    data = encode(halves((100, 50)), "JPEG", icc_profile=icc, exif=exif, comment=b"a comment")
    source = Image.open(io.BytesIO(data))
    assert "exif" in source.info and "comment" in source.info and "icc_profile" in source.info
    for fm in ("jpeg", "png", "webp"):
        out = decode(transform(data, TransformSpec(width=50, format=fm), MAX))
        assert "icc_profile" not in out.info, fm  # output is untagged sRGB
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


def test_png_exif_after_the_pixel_data_is_applied(monkeypatch):
    data = png_with_late_exif(halves((200, 100)), 6)
    assert "exif" not in Image.open(io.BytesIO(data)).info  # Pillow only finds it by decoding
    with monkeypatch.context() as m:  # read_header finds it by walking the chunks
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
        assert read_header(data, MAX).orientation == 6
        assert info(data)["width"] == 100
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
    assert requests == [(round(200 * processing.DRAFT_GAP), round(100 * processing.DRAFT_GAP))]  # never less


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


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
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


# --- read_header ---------------------------------------------------------------------------


def sample(name: str) -> bytes:
    with open(os.path.join(SAMPLES_DIR, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name,expected", [
    ("photo.jpg", ("jpeg", 1067, 1600, "RGB", 3, 1, 6)),
    ("logo.png", ("png", 512, 512, "RGBA", 4, 1, 1)),
    ("landscape.webp", ("webp", 1200, 800, "RGB", 3, 1, 1)),
])
def test_read_header_of_the_samples(name, expected):
    data = sample(name)
    header = read_header(data, MAX)
    assert isinstance(header, Header)
    got = (header.format, header.width, header.height, header.mode, header.bands,
           header.frames, header.orientation)
    assert got == expected
    assert header.file_size == len(data)
    assert header.as_info() == info(data)
    with pytest.raises(Exception):
        header.width = 1  # frozen


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_read_header_counts_frames_without_decoding(monkeypatch, fmt):
    frames = [Image.new("RGB", (32, 24), (i * 5, 0, 255 - i * 5)) for i in range(50)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=20)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    header = read_header(data, MAX)
    assert header.frames == 50 and (header.width, header.height) == (32, 24)


def test_read_header_does_not_decode(monkeypatch):
    data = png_claiming(3000, 2000)  # the pixel data is broken: decoding would fail
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    header = read_header(data, MAX)
    assert (header.width, header.height, header.mode) == (3000, 2000, "RGB")


def test_read_header_refuses_what_transform_refuses():
    for data, error in [
        (b"<html></html>", UnsupportedImage),
        (encode(Image.new("RGB", (10, 10)), "BMP"), UnsupportedImage),
        (encode(noisy((64, 64)), "PNG")[:30], CorruptImage),
        (png_claiming(10_000, 6_000), TooLarge),
        (jpeg_claiming(8_000, 8_000), TooLarge),
    ]:
        with pytest.raises(error):
            read_header(data, MAX)
        with pytest.raises(error):
            transform(data, TransformSpec(width=10), MAX)


def test_webp_canvas_is_checked_before_pillow_allocates_it(monkeypatch):
    # Pillow's WebP decoder allocates two canvases of the declared size when it
    # opens a file: a declared 16383x16383 must be refused before that.
    data = bytearray(encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    data[21:25] = (16382 | (16382 << 14) | (data[24] & 0xF0) << 24).to_bytes(4, "little")
    monkeypatch.setattr(processing.Image, "open", lambda *a, **k: pytest.fail("opened"))
    with pytest.raises(TooLarge, match="16383x16383"):
        read_header(bytes(data), MAX)


# --- estimate_bytes ----------------------------------------------------------------------


def test_estimate_for_info_is_the_header_only():
    data = sample("photo.jpg")
    header = read_header(data, MAX)
    small = estimate_bytes(header, None, 25_000_000)
    assert small == header.overhead_bytes
    assert len(data) < small < 2 * 1024 * 1024
    assert small < estimate_bytes(header, TransformSpec(width=200), 25_000_000)


def test_estimate_refuses_a_large_output_from_the_header():
    header = read_header(sample("logo.png"), MAX)  # the 4.6 KB PNG
    spec = TransformSpec(7000, 7000, "scale", "png")
    with pytest.raises(TooLarge, match="output 7000x7000"):
        estimate_bytes(header, spec, Settings().max_output_pixels)
    # Allowed with a higher limit: and then the estimate says what it costs
    # (two 4-byte RGBA copies of 49 MP, the encoded PNG twice: ~600+ MiB).
    assert estimate_bytes(header, spec, 50_000_000) > 600 * 2**20
    with pytest.raises(TooLarge, match="WEBP"):
        estimate_bytes(header, TransformSpec(20000, 10, "scale", "webp"), 10**9)


def test_estimate_follows_the_jpeg_draft_scale():
    header = read_header(jpeg_claiming(4000, 3000), MAX)  # the header is all it reads
    full = estimate_bytes(header, TransformSpec(format="jpeg"), 25_000_000)
    thumb = estimate_bytes(header, TransformSpec(256, 256, "crop"), 25_000_000)
    assert full > 4000 * 3000 * 4  # decoded at full size, 4 bytes a pixel
    # draft picks 1/4 for a 256 crop (512 rows needed of 3000): 1000x750 decoded
    assert 1000 * 750 * 4 < thumb < 1000 * 750 * 4 + 4 * 2**20
    assert thumb < full / 8


def test_estimate_counts_the_progressive_coefficient_buffer():
    im = noisy((800, 600))
    baseline = read_header(encode(im, "JPEG"), MAX)
    progressive = read_header(encode(im, "JPEG", progressive=True), MAX)
    spec = TransformSpec(100, 100, "crop")
    extra = estimate_bytes(progressive, spec) - estimate_bytes(baseline, spec)
    extra -= progressive.file_size - baseline.file_size
    # 4:2:0: 1 + 1/4 + 1/4 coefficients a pixel, 2 bytes each, at full size
    assert 2.9 * 800 * 600 < extra < 3.3 * 800 * 600


def test_estimate_counts_coefficients_when_the_first_scan_lacks_components():
    # A baseline JPEG whose first scan holds one component of three (written
    # by e.g. jpegtran -scans) also needs libjpeg's whole-image buffer.
    data = encode(noisy((800, 600)), "JPEG")
    sos = data.index(b"\xff\xda")
    assert data[sos + 4] == 3  # Ns: components in this scan
    one = data[: sos + 4] + b"\x01" + data[sos + 5 :]
    extra = read_header(one, MAX).overhead_bytes - read_header(data, MAX).overhead_bytes
    assert 2.9 * 800 * 600 < extra < 3.3 * 800 * 600


def test_estimate_grows_with_the_output():
    header = read_header(sample("landscape.webp"), MAX)
    sizes = [estimate_bytes(header, TransformSpec(width=w, format="png")) for w in (100, 1000, 4000)]
    assert sizes == sorted(sizes) and sizes[2] > sizes[0] + 4000 * 2667 * 4


# --- output bound ----------------------------------------------------------------------------


def test_output_bound_is_max_output_pixels_and_is_checked_first(monkeypatch):
    data = sample("logo.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    start = time.perf_counter()
    with pytest.raises(TooLarge, match="output 7000x7000"):
        transform(data, TransformSpec(7000, 7000, "scale", "png"), MAX)  # 49 MP < max_pixels
    assert time.perf_counter() - start < 0.5
    with pytest.raises(TooLarge):
        transform(data, TransformSpec(format="jpeg"), MAX, max_output_pixels=512 * 512 - 1)


def test_output_exactly_at_the_bound_is_served():
    data = encode(halves((100, 100)), "PNG")
    assert transform(data, TransformSpec(format="png"), MAX, max_output_pixels=10_000).width == 100
    assert transform(data, TransformSpec(50, 200, "scale"), MAX, max_output_pixels=10_000).height == 200


# --- orientation: resized as stored, oriented last ------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("spec", [
    TransformSpec(60, 40, "crop", "png"),
    TransformSpec(width=70, format="png"),
    TransformSpec(30, 90, "scale", "png"),
])
def test_orientation_gives_what_transposing_first_gives(orientation, spec):
    im = Image.new("RGB", (240, 160))
    im.paste((255, 0, 0), (0, 0, 120, 80))
    im.paste((0, 255, 0), (120, 0, 240, 80))
    im.paste((0, 0, 255), (0, 80, 120, 160))
    im.paste((255, 255, 0), (150, 100, 200, 140))
    data = with_orientation(im, "PNG", orientation)
    ours = decode(transform(data, spec, MAX)).convert("RGB")
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    p = plan(*upright.size, spec)
    reference = upright.resize((p.width, p.height), Image.Resampling.LANCZOS, box=p.box)
    assert ours.size == reference.size
    diff = ImageStat.Stat(ImageChops.difference(ours, reference)).mean
    assert max(diff) < 1.0, (orientation, diff)


# --- ICC profiles --------------------------------------------------------------------------


def icc_profile(trc, space: str = "RGB", pad: int = 0) -> bytes:
    """An ICC v2 display profile: sRGB's primaries (or grey) with tone curve ``trc``.

    ``trc``: a gamma (1.0 = linear light), or "srgb" for sRGB's own curve (a
    1024-entry table).  ``pad``: bytes of an extra private tag, to make a
    large but valid profile.
    """
    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    if trc == "srgb":
        table = [round(65535 * (v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4))
                 for v in (i / 1023 for i in range(1024))]
        curve = b"curv\0\0\0\0" + struct.pack(">I1024H", 1024, *table)
    else:
        curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(trc * 256)) + b"\0\0"
    text = b"imgserver test profile\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    if space == "RGB":
        tags += [(b"rXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
                 (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
                 (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    else:
        tags += [(b"kTRC", curve)]
    if pad:
        tags.append((b"zzzz", b"data\0\0\0\0" + struct.pack(">I", 1) + bytes(pad)))
    start = 128 + 4 + 12 * len(tags)
    entries, body = [], b""
    for signature, tag in tags:
        body += bytes(-(start + len(body)) % 4)
        entries.append(struct.pack(">4sII", signature, start + len(body), len(tag)))
        body += tag
    size = start + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntr"
              + (b"RGB " if space == "RGB" else b"GRAY") + b"XYZ " + bytes(12) + b"acsp"
              + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + body


def srgb_encode(value: int) -> int:
    """A linear-light value (0..255) encoded with sRGB's curve."""
    v = value / 255
    return round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055))


def close_to(actual, expected, tolerance=3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


@pytest.fixture
def fresh_icc_cache(monkeypatch):
    monkeypatch.setattr(processing, "_icc_cache", type(processing._icc_cache)())


@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP"])
def test_rgb_profile_is_converted_to_srgb(fresh_icc_cache, source):
    linear = icc_profile(1.0)
    colour = (128, 64, 200)
    params = {"quality": 100, "subsampling": 0} if source == "JPEG" else {}
    if source == "WEBP":
        params = {"lossless": True}
    data = encode(Image.new("RGB", (64, 48), colour), source, icc_profile=linear, **params)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == linear
    expected = tuple(srgb_encode(c) for c in colour)  # same primaries: only the curve differs
    for fm in ("png", "jpeg", "webp"):
        out = decode(transform(data, TransformSpec(width=32, format=fm), MAX))
        assert "icc_profile" not in out.info
        assert close_to(out.convert("RGB").getpixel((16, 12)), expected, 4), (fm, expected)


def test_rgba_profile_conversion_keeps_alpha(fresh_icc_cache):
    data = encode(Image.new("RGBA", (40, 40), (64, 128, 192, 100)), "PNG", icc_profile=icc_profile(1.0))
    out = decode(transform(data, TransformSpec(width=20), MAX))
    assert out.mode == "RGBA"
    r, g, b, a = out.getpixel((10, 10))
    assert close_to((r, g, b), tuple(srgb_encode(c) for c in (64, 128, 192))) and a == 100


def test_grey_profile_tone_curve_is_applied(fresh_icc_cache):
    data = encode(Image.new("L", (40, 40), 128), "PNG", icc_profile=icc_profile(1.0, "GRAY"))
    for fm in ("png", "jpeg"):
        out = decode(transform(data, TransformSpec(width=20, format=fm), MAX))
        assert out.mode == "L" and abs(out.getpixel((10, 10)) - srgb_encode(128)) <= 2
    data = encode(Image.new("LA", (40, 40), (64, 200)), "PNG", icc_profile=icc_profile(1.0, "GRAY"))
    grey, alpha = decode(transform(data, TransformSpec(width=20), MAX)).getpixel((10, 10))
    assert abs(grey - srgb_encode(64)) <= 2 and alpha == 200


def test_srgb_profiles_change_nothing(fresh_icc_cache):
    im = noisy((120, 80))
    plain = transform(encode(im, "PNG"), TransformSpec(width=60, format="png"), MAX).body
    for profile in (ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
                    icc_profile("srgb")):
        tagged = encode(im, "PNG", icc_profile=profile)
        assert transform(tagged, TransformSpec(width=60, format="png"), MAX).body == plain


def test_a_profile_is_parsed_once(fresh_icc_cache, monkeypatch):
    calls = []
    real = processing._icc_action
    monkeypatch.setattr(processing, "_icc_action", lambda *a: calls.append(a) or real(*a))
    data = encode(Image.new("RGB", (40, 40), (10, 200, 30)), "PNG", icc_profile=icc_profile(1.8))
    first = transform(data, TransformSpec(width=20), MAX).body
    for _ in range(3):
        assert transform(data, TransformSpec(width=20), MAX).body == first
    assert len(calls) == 1


def test_huge_profile_is_dropped_not_copied(fresh_icc_cache, monkeypatch):
    # The JPEG with an 8 MB ICC profile: an 8-pixel thumbnail was 8 MB.
    big = icc_profile("srgb", pad=8 * 1024 * 1024)
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(big)))  # valid
    colour = (200, 120, 40)
    data = encode(Image.new("RGB", (64, 64), colour), "JPEG", quality=95, icc_profile=big)
    assert len(data) > 8 * 1024 * 1024
    monkeypatch.setattr(processing, "_icc_action", lambda *a: pytest.fail("parsed"))
    for fm in ("jpeg", "png", "webp"):
        result = transform(data, TransformSpec(width=8, format=fm), MAX)
        assert len(result.body) < 4096, fm
        out = decode(result)
        assert "icc_profile" not in out.info
        assert close_to(out.convert("RGB").getpixel((4, 4)), colour, 6), fm  # taken as sRGB
    header = read_header(data, MAX)
    assert header.icc_size == len(big)
    assert estimate_bytes(header, TransformSpec(width=8)) < 8 * len(data)


def test_profile_of_another_colour_space_is_dropped(fresh_icc_cache):
    data = encode(Image.new("L", (40, 40), 100), "JPEG", quality=100, icc_profile=icc_profile(1.0))
    out = decode(transform(data, TransformSpec(width=20, format="png"), MAX))
    assert abs(out.getpixel((10, 10)) - 100) <= 1  # an RGB profile says nothing about grey


def test_broken_profile_is_dropped(fresh_icc_cache):
    broken = icc_profile(1.0)[:200]
    data = encode(Image.new("RGB", (40, 40), (90, 90, 90)), "PNG", icc_profile=broken)
    out = decode(transform(data, TransformSpec(width=20, format="png"), MAX))
    assert close_to(out.getpixel((10, 10)), (90, 90, 90), 1)


# --- configure_pillow --------------------------------------------------------------------------


def test_configure_pillow_lifts_pillows_limit_to_ours():
    data = png_claiming(20_000, 10_000)  # 200 MP: Pillow's default refuses it (179 MP)
    with pytest.raises(TooLarge):
        read_header(data, 300_000_000)
    configure_pillow(300_000_000)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    assert read_header(data, 300_000_000).width == 20_000
    with pytest.raises(TooLarge):
        read_header(png_claiming(20_000, 15_001), 300_000_000)


def test_configure_pillow_makes_the_bomb_warning_an_error():
    configure_pillow(1000)
    data = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 px: only Pillow's check sees it
    with pytest.raises(TooLarge):
        info(data)
    with pytest.raises(Image.DecompressionBombWarning):
        warnings.warn("bomb", Image.DecompressionBombWarning)


def test_configure_pillow_keeps_pillows_warnings_quiet():
    # An APNG whose acTL says 0 frames: Pillow warns "Invalid APNG" on every open.
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    actl = struct.pack(">II", 0, 0)
    chunk = struct.pack(">I", 8) + b"acTL" + actl + struct.pack(">I", zlib.crc32(b"acTL" + actl))
    data = bytes(data[:33]) + chunk + bytes(data[33:])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_header(data, MAX).frames == 1
        assert seen  # the test can fail: Pillow does warn here
        seen.clear()
        configure_pillow(MAX)
        assert read_header(data, MAX).frames == 1
        assert transform(data, TransformSpec(width=4), MAX).width == 4
        assert seen == []


def test_configure_pillow_is_idempotent():
    configure_pillow(MAX)
    filters = list(warnings.filters)
    configure_pillow(MAX)
    assert warnings.filters == filters
    assert Image.MAX_IMAGE_PIXELS == MAX
    assert PngImagePlugin.MAX_TEXT_MEMORY == processing.PNG_TEXT_MEMORY


def test_png_text_is_limited_once_configured():
    base = encode(Image.new("RGB", (8, 8)), "PNG")
    text = zlib.compress(b"t" * 1024 * 1024, 9)

    def with_text(mib: int) -> bytes:
        chunk = b"".join(
            struct.pack(">I", len(body)) + b"zTXt" + body
            + struct.pack(">I", zlib.crc32(b"zTXt" + body))
            for body in (b"k%d\0\0" % i + text for i in range(mib)))
        return base[:33] + chunk + base[33:]

    configure_pillow(MAX)
    header = read_header(with_text(6), MAX)  # 6 MiB of text from 6 KB: allowed, counted
    assert header.overhead_bytes > 6 * 11 * 1024 * 1024
    with pytest.raises(TooLarge, match="metadata"):
        read_header(with_text(9), MAX)


def test_large_uncompressed_png_text_is_refused_before_pillow_reads_it(monkeypatch):
    base = encode(Image.new("RGB", (8, 8)), "PNG")
    body = b"XML:com.adobe.xmp\0\0\0\0\0" + "\U0001F600".encode() + b"x" * (9 * 1024 * 1024)
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    configure_pillow(MAX)
    monkeypatch.setattr(processing.Image, "open", lambda *a, **k: pytest.fail("opened"))
    for data in (base[:33] + chunk + base[33:], base[:-12] + chunk + base[-12:]):
        with pytest.raises(TooLarge, match="metadata"):
            read_header(data, MAX)
        with pytest.raises(TooLarge, match="metadata"):
            transform(data, TransformSpec(width=4), MAX)
