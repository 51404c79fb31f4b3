"""imgserver: an image server over HTTP and Perspective Broker, built on asyncfile.

Its dependencies come with the ``imgserver`` extra; without them, say so
plainly instead of failing deep inside an import.
"""

try:
    import PIL  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by tests/test_packaging.py
    raise ImportError(
        f"imgserver needs {e.name!r}: install the imgserver extra, "
        "python3 -m pip install 'asyncfile-imgserver[imgserver]'") from e
