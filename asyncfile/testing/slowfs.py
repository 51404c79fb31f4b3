"""A slow-storage FUSE file system for tests and benchmarks.

``SlowFS`` mounts a read-only passthrough of a source directory whose every
``read`` (and optionally ``open`` / ``getattr``) sleeps, so code that must not
block its event loop on file I/O can be tested against storage that is
really slow, the way a loaded disk or an NFS server is.

The file system runs in a separate process (``python -m
asyncfile.testing.slowfs SRC MOUNTPOINT --read-delay 0.05``) so it shares no
GIL with the process under test, and it is multi-threaded so concurrent reads
overlap the way a real server serves them.  Files are opened with direct I/O:
the kernel page cache never answers a read, so the second read of a file is
as slow as the first, and ``read()`` calls reach the daemon whole (up to the
kernel's FUSE request limit, 1 MiB with libfuse3) instead of as 4 KiB pages.

Counters of the daemon's calls are readable from the mount root as the
extended attribute ``user.slowfs.stats`` (JSON); see ``SlowFS.stats``.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

try:
    import mfusepy as mfusepy  # re-exported (asyncfile.testing.faultfs)
except (ImportError, OSError) as _exc:  # OSError: libfuse not found.
    mfusepy = None
    _MFUSEPY_ERROR: BaseException | None = _exc
else:
    _MFUSEPY_ERROR = None

__all__ = ["SlowFS", "fuse_unavailable_reason", "STATS_XATTR"]

STATS_XATTR = "user.slowfs.stats"
FUSERMOUNT = "fusermount3"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# The daemon side: runs in the subprocess.
# --------------------------------------------------------------------------

_OperationsBase: Any = mfusepy.Operations if mfusepy is not None else object


class SlowPassthrough(_OperationsBase):  # type: ignore[misc]  # mfusepy has no types
    """Read-only passthrough whose calls sleep to imitate slow storage."""

    use_ns = True  # Timestamps as integer nanoseconds (mfusepy >= 3).

    def __init__(
        self,
        source: str,
        read_delay: float = 0.05,
        open_delay: float = 0.0,
        getattr_delay: float = 0.0,
        max_background: int = 0,
    ) -> None:
        self.source = os.path.realpath(source)
        self.max_background = max_background
        self.read_delay = read_delay
        self.open_delay = open_delay
        self.getattr_delay = getattr_delay
        self._lock = threading.Lock()
        self._reads_in_flight = 0
        self._stats: dict[str, int] = {
            "read": 0,
            "read_bytes": 0,
            "max_read_size": 0,
            "max_concurrent_reads": 0,
            "open": 0,
            "getattr": 0,
        }

    def _path(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def init_with_config(self, conn: Any, config: Any) -> None:
        # The kernel sends asynchronous requests (io_uring and AIO direct
        # I/O, readahead) as "background" ones, at most max_background at
        # a time (libfuse's default: 12); further ones wait for a slot.
        if self.max_background and conn is not None:
            conn.max_background = self.max_background
            conn.congestion_threshold = max(1, self.max_background * 3 // 4)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._count("getattr")
        if self.getattr_delay:
            time.sleep(self.getattr_delay)
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        attrs = {
            key: getattr(st, key)
            for key in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_ino", "st_blocks", "st_blksize", "st_rdev",
            )
        }
        attrs["st_atime"] = st.st_atime_ns
        attrs["st_mtime"] = st.st_mtime_ns
        attrs["st_ctime"] = st.st_ctime_ns
        return attrs

    def open(self, path: str, flags: int) -> int:
        self._count("open")
        if self.open_delay:
            time.sleep(self.open_delay)
        return os.open(self._path(path), os.O_RDONLY | os.O_CLOEXEC)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            self._reads_in_flight += 1
            stats = self._stats
            stats["read"] += 1
            stats["max_read_size"] = max(stats["max_read_size"], size)
            stats["max_concurrent_reads"] = max(
                stats["max_concurrent_reads"], self._reads_in_flight
            )
        try:
            if self.read_delay:
                time.sleep(self.read_delay)
            data = os.pread(fh, size, offset)
        finally:
            with self._lock:
                self._reads_in_flight -= 1
        with self._lock:
            self._stats["read_bytes"] += len(data)
        return data

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def opendir(self, path: str) -> int:
        if not os.path.isdir(self._path(path)):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return 0

    def readdir(self, path: str, fh: int) -> list[Any]:
        entries: list[Any] = [".", ".."]
        with os.scandir(self._path(path)) as it:
            for entry in it:
                mode = entry.stat(follow_symlinks=False).st_mode
                entries.append((entry.name, {"st_mode": mode}, 0))
        return entries

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def statfs(self, path: str) -> dict[str, int]:
        stv = os.statvfs(self._path(path))
        return {
            key: getattr(stv, key)
            for key in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax",
            )
        }

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if path == "/" and name == STATS_XATTR:
            with self._lock:
                return json.dumps(self._stats).encode()
        return os.getxattr(self._path(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._path(path), follow_symlinks=False)


def _watch_parent(pipe_fd: int, mountpoint: str) -> None:
    """Unmount when the parent process dies without cleaning up.

    The parent holds the write end of a pipe; end-of-file on the read end
    means it is gone (even after SIGKILL or ``os._exit``).  A lazy unmount
    makes the FUSE loop return, and the process then exits normally.
    """
    # Leave SIGTERM/SIGINT to the main thread, where libfuse's handler
    # interrupts the loop; here it would only set a flag nobody looks at.
    signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    )
    while os.read(pipe_fd, 1):
        pass
    subprocess.run(
        [FUSERMOUNT, "-uz", mountpoint],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
    )
    time.sleep(5.0)
    os._exit(1)  # The loop did not end: do not linger as an orphan.


def start_parent_watch(parent_fd: int, mountpoint: str, name: str) -> None:
    """Run ``_watch_parent`` in a daemon thread (shared with faultfs)."""
    threading.Thread(
        target=_watch_parent, args=(parent_fd, mountpoint),
        name=name, daemon=True,
    ).start()


def run_fuse(
    operations: Any,
    mountpoint: str,
    *,
    fsname: str,
    attr_timeout: float,
    max_threads: int,
    debug: bool,
) -> None:
    """Serve *operations* read-only at *mountpoint* until unmounted.

    The mount options every daemon here needs: libfuse's multi-threaded
    loop, direct I/O, and an automatic unmount should the process die.
    """
    options: dict[str, Any] = {}
    if (mfusepy.fuse_version_major, mfusepy.fuse_version_minor) >= (3, 12):
        # libfuse >= 3.12 caps the multi-threaded loop at 10 threads.
        options["max_threads"] = max_threads
    mfusepy.FUSE(
        operations,
        mountpoint,
        foreground=True,
        nothreads=False,  # libfuse's multi-threaded loop.
        debug=debug,
        ro=True,
        fsname=fsname,
        subtype=fsname,
        direct_io=True,  # Bypass the page cache; reads arrive whole.
        attr_timeout=attr_timeout,
        entry_timeout=attr_timeout,
        negative_timeout=0,  # Files created in the source show up at once.
        auto_unmount=True,  # fusermount3 unmounts if this process dies.
        **options,
    )


def serve(
    source: str,
    mountpoint: str,
    read_delay: float = 0.05,
    open_delay: float = 0.0,
    getattr_delay: float = 0.0,
    attr_timeout: float = 1.0,
    max_threads: int = 64,
    parent_fd: int | None = None,
    debug: bool = False,
    max_background: int = 0,
) -> None:
    """Mount and serve in the foreground until unmounted (blocks)."""
    if mfusepy is None:
        raise RuntimeError(f"mfusepy is not usable: {_MFUSEPY_ERROR}")
    if parent_fd is not None:
        start_parent_watch(parent_fd, mountpoint, "slowfs-parent-watch")
    operations = SlowPassthrough(source, read_delay, open_delay, getattr_delay, max_background)
    run_fuse(
        operations, mountpoint, fsname="slowfs", attr_timeout=attr_timeout,
        max_threads=max_threads, debug=debug,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m asyncfile.testing.slowfs``."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncfile.testing.slowfs",
        description="Mount a read-only passthrough of SRC at MOUNTPOINT whose "
        "reads sleep, to simulate slow storage. Runs until unmounted "
        f"({FUSERMOUNT} -u MOUNTPOINT) or SIGTERM/SIGINT.",
    )
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--read-delay", type=float, default=0.05,
                        help="seconds each read call sleeps (default 0.05)")
    parser.add_argument("--open-delay", type=float, default=0.0,
                        help="seconds each open call sleeps (default 0)")
    parser.add_argument("--getattr-delay", type=float, default=0.0,
                        help="seconds each getattr/lookup sleeps (default 0)")
    parser.add_argument("--attr-timeout", type=float, default=1.0,
                        help="seconds the kernel caches names and "
                        "attributes (default 1; 0 asks every time)")
    parser.add_argument("--max-threads", type=int, default=64,
                        help="most requests served at once (default 64)")
    parser.add_argument("--max-background", type=int, default=0,
                        help="asynchronous requests the kernel sends at "
                        "once (default 0: libfuse's 12)")
    parser.add_argument("--parent-fd", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="libfuse debug output on stderr")
    args = parser.parse_args(argv)
    for name in ("source", "mountpoint"):
        if not os.path.isdir(getattr(args, name)):
            parser.error(f"{name} {getattr(args, name)!r} is not a directory")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    serve(
        args.source, args.mountpoint, args.read_delay, args.open_delay,
        args.getattr_delay, args.attr_timeout, args.max_threads,
        args.parent_fd, args.debug, args.max_background,
    )
    return 0


# --------------------------------------------------------------------------
# The test side: runs in the process under test.
# --------------------------------------------------------------------------

def _unescape_mount_field(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether *path* is a mount point, per ``/proc/self/mounts``.

    Unlike ``os.path.ismount`` this never touches the file system, so it
    does not block on a hung daemon and sees a dead FUSE mount
    ("Transport endpoint is not connected") too.
    """
    target = os.path.abspath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount_field(fields[1]) == target:
                return True
    return False


def _fusermount(mountpoint: str, *flags: str) -> bool:
    try:
        result = subprocess.run(
            [FUSERMOUNT, *flags, mountpoint],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s %s %s: %s", FUSERMOUNT, " ".join(flags), mountpoint,
                    exc)
        return False
    if result.returncode:
        log.debug("%s: %s", FUSERMOUNT, result.stderr.decode(errors="replace"))
    return result.returncode == 0


class FuseProcess:
    """A FUSE daemon of this package, mounted by a child process.

    The life cycle shared by ``SlowFS`` and ``faultfs.FaultFS``: ``start``
    runs ``python -m <_module> SOURCE MOUNT <_daemon_args()> --parent-fd
    N`` on a fresh temporary mount point and waits until the mount serves;
    ``stop`` unmounts, stops the child and removes the mount point, whether
    or not files are still open.  Subclasses set ``_module`` and ``_label``
    and add their options in ``_daemon_args`` (and descriptors the child
    inherits in ``_pass_fds``).
    """

    _module = ""
    _label = ""

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        mount_timeout: float = 10.0,
        debug: bool = False,
    ) -> None:
        self.source = os.path.realpath(source)
        self.mount_timeout = mount_timeout
        self.debug = debug
        self.mount: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._log_path: str | None = None
        self._parent_pipe_w: int | None = None

    def _daemon_args(self) -> list[str]:
        """Command line options of the daemon, after SOURCE and MOUNT."""
        return []

    def _pass_fds(self) -> tuple[int, ...]:
        """Descriptors (besides the parent pipe) the child inherits."""
        return ()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Mount and return the mount directory once it serves requests."""
        if self.process is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        if not os.path.isdir(self.source):
            raise NotADirectoryError(self.source)
        self._workdir = tempfile.mkdtemp(prefix=f"{self._label}-")
        self.mount = os.path.join(self._workdir, "mnt")
        os.mkdir(self.mount)
        self._log_path = os.path.join(self._workdir, f"{self._label}.log")
        read_fd, self._parent_pipe_w = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p
        )
        cmd = [
            sys.executable, "-m", self._module,
            self.source, self.mount,
            *self._daemon_args(),
            "--parent-fd", str(read_fd),
        ]
        if self.debug:
            cmd.append("--debug")
        try:
            with open(self._log_path, "wb") as log_file:
                self.process = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(read_fd, *self._pass_fds()), env=env,
                    start_new_session=True,  # Keep Ctrl-C to the parent.
                )
        except BaseException:
            os.close(read_fd)
            self.stop()
            raise
        os.close(read_fd)
        try:
            self._wait_mounted()
        except BaseException:
            self.stop()
            raise
        return self.mount

    def _wait_mounted(self) -> None:
        assert self.process is not None and self.mount is not None
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.mount):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self._label} exited with status "
                    f"{self.process.returncode} before mounting: "
                    f"{self.log_text().strip()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self._label} did not mount within "
                    f"{self.mount_timeout} s: {self.log_text().strip()}"
                )
            time.sleep(0.01)
        # The mount table lists it once mount(2) is done; a stat answered
        # by the daemon (st_dev differs from the parent's) proves it serves.
        if not os.path.ismount(self.mount):
            raise RuntimeError(
                f"{self._label} mount is not live: {self.log_text()}"
            )

    def log_text(self) -> str:
        """What the daemon wrote to stdout/stderr so far (for diagnostics)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Unmount, stop the daemon, remove the mount point; idempotent."""
        mount, process = self.mount, self.process
        lazy = False
        if mount is not None and is_mounted(mount):
            # A plain unmount fails while files are open (EBUSY).  A lazy one
            # detaches at once, but the daemon keeps serving those open files
            # until told to stop, hence SIGTERM right away below.
            if not _fusermount(mount, "-u"):
                _fusermount(mount, "-uz")
                lazy = True
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=0.0 if lazy else 5.0)
            except subprocess.TimeoutExpired:
                process.terminate()  # libfuse's handler ends the loop.
                try:
                    process.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if mount is not None and is_mounted(mount):
            _fusermount(mount, "-uz")  # A dead daemon's leftover mount.
        if self._parent_pipe_w is not None:
            os.close(self._parent_pipe_w)
            self._parent_pipe_w = None
        if self._workdir is not None:
            # Never rmtree: should the mount still be there, it must not be
            # walked into.  rmdir fails on a mount point instead.
            for remove, path in ((os.rmdir, mount),
                                 (os.unlink, self._log_path),
                                 (os.rmdir, self._workdir)):
                try:
                    remove(path)  # type: ignore[arg-type]  # all three set by start()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("%s: cannot remove %s: %s", self._label,
                                path, exc)
            self._workdir = None


class SlowFS(FuseProcess):
    """A slow read-only mirror of *source*, served by a child process.

    ``with SlowFS(src, read_delay=0.05) as mount_dir:`` mounts on a fresh
    temporary directory, waits until the mount is live, and on exit
    unmounts, stops the child and removes the mount point, whether or not
    the body raised.  The object also carries ``.source`` and ``.mount``
    (absolute paths) and ``stats()``; it mounts once (no restart).

    The kernel caches names and attributes for *attr_timeout* seconds, as
    an NFS client does: a file rewritten in the source with a new size may
    show the old size that long.  ``attr_timeout=0`` asks the daemon (and
    pays *getattr_delay*) on every lookup.
    """

    _module = "asyncfile.testing.slowfs"
    _label = "slowfs"

    def __init__(
        self,
        source: str | os.PathLike[str],
        read_delay: float = 0.05,
        open_delay: float = 0.0,
        getattr_delay: float = 0.0,
        *,
        attr_timeout: float = 1.0,
        max_threads: int = 64,
        max_background: int = 0,
        mount_timeout: float = 10.0,
        debug: bool = False,
    ) -> None:
        super().__init__(source, mount_timeout=mount_timeout, debug=debug)
        self.read_delay = read_delay
        self.open_delay = open_delay
        self.getattr_delay = getattr_delay
        self.attr_timeout = attr_timeout
        self.max_threads = max_threads
        self.max_background = max_background

    def _daemon_args(self) -> list[str]:
        return [
            "--read-delay", repr(self.read_delay),
            "--open-delay", repr(self.open_delay),
            "--getattr-delay", repr(self.getattr_delay),
            "--attr-timeout", repr(self.attr_timeout),
            "--max-threads", str(self.max_threads),
            "--max-background", str(self.max_background),
        ]

    def stats(self) -> dict[str, int]:
        """The daemon's counters: calls of read/open/getattr, read_bytes,
        max_read_size, max_concurrent_reads (cumulative since mount)."""
        if self.mount is None:
            raise RuntimeError("SlowFS not started")
        stats: dict[str, int] = json.loads(os.getxattr(self.mount, STATS_XATTR))
        return stats


@functools.lru_cache(maxsize=None)
def fuse_unavailable_reason() -> str | None:
    """Why a SlowFS cannot be mounted here, or None if it can.

    Checks the cheap things first, then mounts an empty directory once (the
    answer is cached per process), so tests can ``pytest.skip(reason)``.
    """
    if not sys.platform.startswith("linux"):
        return f"slowfs needs Linux FUSE, not {sys.platform}"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    os.close(fd)
    if shutil.which(FUSERMOUNT) is None:
        return f"{FUSERMOUNT} not found on PATH (install fuse3)"
    if mfusepy is None:
        return (f"mfusepy is not usable (pip install mfusepy; needs "
                f"libfuse3): {_MFUSEPY_ERROR}")
    if getattr(mfusepy, "fuse_version_major", 3) != 3:
        return "mfusepy loaded libfuse 2; slowfs needs libfuse3"
    with tempfile.TemporaryDirectory(prefix="slowfs-probe-") as src:
        try:
            with SlowFS(src, read_delay=0.0) as mount:
                os.listdir(mount)
        except Exception as exc:  # noqa: BLE001 - any failure is the reason
            return f"mounting a FUSE file system failed: {exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
