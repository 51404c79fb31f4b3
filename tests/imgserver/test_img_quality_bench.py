"""bench/quality.py: its SSIM, its pipelines and its plain-Pillow baseline work (small, bounded)."""

import os
import sys

import pytest
from PIL import Image, ImageFilter

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

pytest.importorskip("numpy")
import quality  # noqa: E402

from imgserver import processing  # noqa: E402
from imgserver.settings import SAMPLES_DIR  # noqa: E402


def test_ssim():
    im = Image.effect_noise((64, 64), 60).convert("RGB")
    assert quality.ssim(im, im) == pytest.approx(1.0)
    blurred = im.filter(ImageFilter.GaussianBlur(2))
    assert quality.ssim(im, blurred) < 0.5 < quality.ssim(im, im.filter(ImageFilter.GaussianBlur(0.3)))


def test_pipelines_give_the_reference_size():
    data = open(os.path.join(SAMPLES_DIR, "photo.jpg"), "rb").read()
    ref = quality.reference(data, 256, 256, True)
    for p in quality.PIPELINES:
        out = quality.resize(data, p, 256, 256, True)
        assert out.size == ref.size == (256, 256)
        assert quality.ssim(out, ref) > 0.9, p.name
    assert 0 < quality.encoded_loss(ref) < 0.2


def test_imgserver_uses_a_listed_pipeline_and_the_plain_loop_runs():
    chosen = (processing.RESAMPLE, processing.DRAFT_GAP, processing.REDUCING_GAP)
    assert chosen in {(p.resample, p.draft_gap, p.reducing_gap) for p in quality.PIPELINES}
    assert quality.plain_pillow_rate([os.path.join(SAMPLES_DIR, "photo.jpg")], 1, 0.05) > 0
