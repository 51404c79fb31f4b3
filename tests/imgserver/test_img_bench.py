"""The benchmarks stay importable and working: the baseline function, and bench/attack_soak.py end to end."""

import os
import subprocess
import sys

import pytest

from bench.pipeline import DEFAULT_SPEC, raw_pipeline_rate

from imgserver.settings import SAMPLES_DIR


def test_raw_pipeline_rate_runs():
    paths = [os.path.join(SAMPLES_DIR, n) for n in ("photo.jpg", "logo.png", "landscape.webp")]
    assert raw_pipeline_rate(paths, threads=2, seconds=0.05) > 0
    assert raw_pipeline_rate(paths[:1], 1, 0.05, DEFAULT_SPEC, encoder="bytesio") > 0


@pytest.mark.timeout(180)
def test_attack_soak_runs_and_its_checks_pass():
    """bench/attack_soak.py end to end, small: the soak's answers all as expected and
    counted alike by the generator and the server, attackers dropped, no descriptor left."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
    argv = [sys.executable, os.path.join(bench, "attack_soak.py"), SAMPLES_DIR, "--requests", "300",
            "--connections", "4", "--stalled", "40", "--slowloris", "5", "--probe-seconds", "0.5",
            "--attack-seconds", "3", "--send-timeout", "1", "--header-timeout", "1", "--idle-timeout", "2"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("-> PASS") == 2, out.stdout[-3000:]
    for heading in ("| server process ", "| status ", "| probe (one at a time", "| attackers "):
        assert heading in out.stdout
