"""Fixtures for tests that need slow storage (a FUSE mount)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from asyncfile.testing.slowfs import SlowFS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slowfs(**kwargs): SlowFS options for the slow_fs fixture "
        "(read_delay, open_delay, getattr_delay, attr_timeout, max_threads, max_background)",
    )


@pytest.fixture
def slow_fs(tmp_path, request: pytest.FixtureRequest) -> Iterator[SlowFS]:
    """A slow read-only mirror: write files into ``.source``, read them
    through ``.mount``.  Options from ``@pytest.mark.slowfs(...)``; skips
    with the reason where FUSE is unavailable."""
    from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    marker = request.node.get_closest_marker("slowfs")
    source = tmp_path / "slowfs-source"
    source.mkdir()
    fs = SlowFS(source, **(marker.kwargs if marker else {}))
    with fs:
        yield fs


# Hypothesis profiles for tests/asyncfile/test_model.py (registered here so that
# ``--hypothesis-profile=ci|long`` works; nothing is loaded by default).
try:
    from hypothesis import HealthCheck as _HealthCheck, Phase as _Phase, settings as _settings
except ImportError:  # pragma: no cover
    pass
else:
    _model_common = dict(
        deadline=None,
        suppress_health_check=[_HealthCheck.too_slow, _HealthCheck.data_too_large,
                               _HealthCheck.filter_too_much],
    )
    # ci: no shrinking, so a failure is reported (unshrunk) within the suite's time bound.
    _settings.register_profile("ci", max_examples=60, stateful_step_count=30,
                               phases=[_Phase.explicit, _Phase.reuse, _Phase.generate], **_model_common)
    _settings.register_profile("long", max_examples=3000, stateful_step_count=50, **_model_common)
