"""The benchmark's baseline function stays importable and working."""

import os

from bench.pipeline import DEFAULT_SPEC, raw_pipeline_rate

from imgserver.settings import SAMPLES_DIR


def test_raw_pipeline_rate_runs():
    paths = [os.path.join(SAMPLES_DIR, n) for n in ("photo.jpg", "logo.png", "landscape.webp")]
    assert raw_pipeline_rate(paths, threads=2, seconds=0.05) > 0
    assert raw_pipeline_rate(paths[:1], 1, 0.05, DEFAULT_SPEC, encoder="bytesio") > 0
