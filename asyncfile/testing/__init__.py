"""Test helpers for code built on asyncfile.

* ``MemoryLoader``: the ``IFileLoader`` API over a dict, with a fake latency on
  a ``Clock`` — test your code without a disk, deterministically.
* ``slowfs.SlowFS``: a real FUSE file system whose reads sleep, to test
  against slow storage (needs Debian's fuse3 and mfusepy).
"""

from .memory import MemoryLoader

__all__ = ["MemoryLoader"]
