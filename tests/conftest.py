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
