"""Which file system a path or device lives on, from ``/proc/self/mountinfo``.

``open()`` and ``fstat()`` block on network and FUSE file systems (a round
trip each), so the engines must know where a path lives *before* opening it.
Parsing is a pure function; ``MountTable`` rereads the table only when the
kernel says it changed (``poll`` on mountinfo reports ``POLLPRI`` then), so
classification costs one non-blocking system call.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Mount", "parse_mountinfo", "MountTable", "shared_mount_table", "SLOW_OPEN", "MEMORY_BACKED"]

# Opening or stat-ing costs a network or user-space round trip.
SLOW_OPEN = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre",
     "gpfs", "virtiofs", "ncpfs", "coda", "davfs", "ocfs2", "gfs2", "beegfs", "orangefs"}
)
# How often to ask the kernel whether the mount table changed.
CHECK_INTERVAL = 0.005

# Always in memory: reads never wait for storage, but refuse RWF_NOWAIT.
MEMORY_BACKED = frozenset({"tmpfs", "ramfs"})


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    dev: int

    @property
    def slow_open(self) -> bool:
        return self.fstype in SLOW_OPEN or self.fstype.startswith("fuse")

    @property
    def memory_backed(self) -> bool:
        return self.fstype in MEMORY_BACKED


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(lines: Iterable[str]) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` lines (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], os.makedev(int(major), int(minor))))
        except (ValueError, IndexError):
            continue
    return mounts


class MountTable:
    """Classifies paths (longest mount-point prefix) and devices by file-system type."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self._path = path
        self._by_point: list[Mount] = []
        self._by_dev: dict[int, Mount] = {}
        self._by_dir: dict[str, Mount | None] = {}
        self.generation = 0  # bumped whenever the table is reread
        self.next_check = 0.0
        self._poller: select.poll | None = None
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # not Linux: every lookup answers None
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLPRI | select.POLLERR)
        self._reload()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._poller = None

    def _reload(self) -> None:
        chunks: list[bytes] = []
        while True:  # reread from the start of the same fd: that re-arms poll
            data = os.pread(self._fd, 1 << 16, sum(map(len, chunks)))
            if not data:
                break
            chunks.append(data)
        mounts = parse_mountinfo(b"".join(chunks).decode("utf-8", "surrogateescape").splitlines())
        # Later mounts hide earlier ones on the same point: keep the last.
        by_point = {m.mount_point: m for m in mounts}
        by_point_sorted = sorted(by_point.values(), key=lambda m: len(m.mount_point), reverse=True)
        if by_point_sorted == self._by_point:
            return  # nothing changed: keep caches (and their users') warm
        self._by_point = by_point_sorted
        self._by_dev = {m.dev: m for m in mounts}
        self._by_dir = {}
        self.generation += 1

    def refresh(self) -> None:
        """Reread the table if the kernel says it changed (checked at most
        every ``CHECK_INTERVAL`` seconds: the check is a system call)."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_INTERVAL
        if self._poller is not None and self._poller.poll(0):
            self._reload()

    def for_path(self, path: str) -> Mount | None:
        """The mount a path would be opened on (by prefix; symlinks are not followed)."""
        if self._poller is None:
            return None
        self.refresh()
        directory = os.path.dirname(path)
        try:
            return self._by_dir[directory]
        except KeyError:
            pass
        found = None
        path = os.path.abspath(path)
        for m in self._by_point:
            point = m.mount_point
            if path == point or path.startswith(point if point.endswith("/") else point + "/"):
                found = m
                break
        # A mount point's own path is the one name in its directory that
        # lives on another mount: never let it stand for the directory.
        if found is not None and found.mount_point == path:
            return found
        if os.path.isabs(directory) and len(self._by_dir) < 4096:
            self._by_dir[directory] = found
        return found

    def for_dev(self, dev: int) -> Mount | None:
        if self._poller is None:
            return None
        m = self._by_dev.get(dev)
        if m is None:
            self._reload()  # a device we have not seen: the table is stale
            m = self._by_dev.get(dev)
        return m


_shared: MountTable | None = None


def shared_mount_table() -> MountTable:
    """One table (and one descriptor on mountinfo) for the whole process."""
    global _shared
    if _shared is None:
        _shared = MountTable()
    return _shared
