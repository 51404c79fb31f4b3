import os

from PIL import Image

from imgserver.params import TransformSpec
from imgserver.paths import confine
from imgserver.processing import info, transform
from imgserver.settings import SAMPLES_DIR, Settings

SAMPLES = {"photo.jpg": "jpeg", "logo.png": "png", "landscape.webp": "webp"}


def read(name: str) -> bytes:
    with open(os.path.join(SAMPLES_DIR, name), "rb") as f:
        return f.read()


def test_samples_are_the_default_root():
    assert Settings().image_root == SAMPLES_DIR
    assert os.path.isdir(SAMPLES_DIR)


def test_samples_exist_and_are_small():
    total = sum(os.path.getsize(os.path.join(SAMPLES_DIR, name)) for name in SAMPLES)
    assert total < 600 * 1024
    assert os.path.exists(os.path.join(SAMPLES_DIR, "README"))


def test_sample_formats():
    for name, fmt in SAMPLES.items():
        assert info(read(name))["format"] == fmt


def test_photo_needs_its_exif_orientation():
    data = read("photo.jpg")
    with Image.open(os.path.join(SAMPLES_DIR, "photo.jpg")) as stored:
        assert stored.size == (1067, 1600)
    described = info(data)
    assert (described["width"], described["height"], described["orientation"]) == (1600, 1067, 6)
    result = transform(data, TransformSpec(width=400), Settings().max_pixels)
    assert (result.width, result.height) == (400, 267)


def test_logo_has_alpha():
    assert info(read("logo.png"))["mode"] == "RGBA"


def test_samples_are_reachable_through_confine():
    for name in SAMPLES:
        assert confine(SAMPLES_DIR, "/" + name) == os.path.realpath(
            os.path.join(SAMPLES_DIR, name)
        )
