"""A fault-injecting FUSE file system for tests.

``FaultFS`` mounts a read-only mirror of a source directory on which a test
can make chosen files misbehave, and change that while the mount is in use:
reads that fail with EIO (or any errno) at a given offset, opens that fail
or take long, files that shrink, grow or vanish under an open handle, and
gates that hold a read or an open inside the daemon until the test lets it
go.  Gates make races deterministic: the test waits until the call is
parked (``wait_blocked`` / ``when_blocked``), does what it wants to happen
"meanwhile", then releases it; no sleeps.

Like ``slowfs`` (whose helpers it reuses) the file system runs in a separate
process (``python -m asyncfile.testing.faultfs SRC MOUNTPOINT``), with
libfuse's multi-threaded loop and direct I/O, so every ``read()`` reaches the
daemon.  The test process talks to it over a socket pair inherited by the
child: each ``set_fault``/``release_*``/``stats`` call is one request and
one answer, so when it returns the daemon has applied it.  The channel does
not go through the mount, so it keeps answering while every FUSE thread is
parked at a gate.

Faults are per file, named by the path relative to the mount root (``"a.bin"``,
``"sub/c.bin"``); see ``FaultFS.set_fault``.  Names and attributes are not
cached by the kernel (``attr_timeout=0``), so a size change or a vanish is
seen by the next ``stat``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import posixpath
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence, TypeVar

from .slowfs import (
    FuseProcess,
    SlowPassthrough,
    _MFUSEPY_ERROR,
    fuse_unavailable_reason,
    is_mounted,
    mfusepy,
    run_fuse,
    start_parent_watch,
)

__all__ = ["FaultFS", "fuse_unavailable_reason", "filler", "is_mounted"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

KINDS = ("read", "open")

#: Fault names ``FaultFS.clear`` accepts (``set_fault``'s keywords).
CLEARABLE = frozenset({
    "read_error_at", "read_errno", "open_error", "open_delay", "read_delay",
    "read_gate", "open_gate", "shrink_to", "grow_by", "size_after_reads",
    "vanish", "vanish_after_open",
})

#: The bytes a grown file reads back beyond the source's data: the byte at
#: offset ``i`` is ``FILL_PATTERN[i % 256]``, i.e. ``i % 256``.
FILL_PATTERN = bytes(range(256))


def filler(offset: int, length: int) -> bytes:
    """The filler bytes a grown file holds at ``[offset, offset+length)``."""
    if length <= 0:
        return b""
    start = offset % len(FILL_PATTERN)
    repeats = (start + length) // len(FILL_PATTERN) + 1
    return (FILL_PATTERN * repeats)[start:start + length]


# --------------------------------------------------------------------------
# The daemon side: runs in the subprocess.
# --------------------------------------------------------------------------

_FILE_COUNTERS = (
    "opens", "reads", "releases", "read_bytes", "errors_injected",
    "open_handles", "opens_in_flight", "reads_in_flight",
)

# Fault settings as the daemon stores them (shrink_to, grow_by and
# size_after_reads arrive translated into resize_after/size/grow_by).
_FAULT_KEYS = frozenset({
    "read_error_at", "read_errno", "open_error", "open_delay",
    "read_delay", "vanish", "vanish_after_open", "resize_after", "size",
    "grow_by",
})


class _Gate:
    """Parks calls until released; FIFO, with permits for later arrivals.

    Only touched with the file system's lock held; each parked call waits
    on its own Event, so releasing *n* wakes exactly the *n* oldest.
    """

    def __init__(self) -> None:
        self.closed = False
        self.permits = 0
        self.waiters: deque[threading.Event] = deque()

    def close(self) -> None:
        self.closed = True
        self.permits = 0

    def release(self, count: int | None) -> int:
        """Let *count* calls through (None: open the gate); return how many
        parked calls that woke."""
        if count is None:
            self.closed = False
            self.permits = 0
            count = len(self.waiters)
        woken = min(count, len(self.waiters))
        for _ in range(woken):
            self.waiters.popleft().set()
        if self.closed:
            self.permits += count - woken
        return woken


class _FileState:
    """Faults, gates and counters of one path."""

    def __init__(self) -> None:
        self.fault: dict[str, Any] = {}
        self.gates = {kind: _Gate() for kind in KINDS}
        self.counters = dict.fromkeys(_FILE_COUNTERS, 0)
        self.reads_served = 0  # Since the size fault was set.
        self.stale = False  # Handles fail with ESTALE (vanish_after_open).


def _apparent_size(
    fault: dict[str, Any], real_size: int, reads_served: int
) -> int | None:
    """The size a resize fault makes a file report, None before it fires."""
    after = fault.get("resize_after")
    if after is None or reads_served < after:
        return None
    if fault.get("size") is not None:
        size: int = fault["size"]
        return size
    grown: int = real_size + fault.get("grow_by", 0)
    return grown


class FaultPassthrough(SlowPassthrough):
    """Read-only passthrough whose files fail on command (daemon side)."""

    def __init__(
        self, source: str, gate_timeout: float = 60.0, max_background: int = 0
    ) -> None:
        super().__init__(source, read_delay=0.0,
                         max_background=max_background)
        self.gate_timeout = gate_timeout
        self._files: dict[str, _FileState] = {}
        self._handles: dict[int, str] = {}  # fh -> path key
        self._stopping = threading.Event()
        self._counters: dict[str, int] = dict.fromkeys(_FILE_COUNTERS, 0)
        self._counters.update(max_reads_in_flight=0, gate_timeouts=0)

    # -- helpers (call with self._lock held where noted) -------------------

    def _state(self, key: str) -> _FileState:
        # Lock held.
        state = self._files.get(key)
        if state is None:
            state = self._files[key] = _FileState()
        return state

    def _add(self, state: _FileState, name: str, value: int = 1) -> None:
        # Lock held.
        state.counters[name] += value
        self._counters[name] += value

    def _inject(self, state: _FileState, err: int) -> OSError:
        with self._lock:
            self._add(state, "errors_injected")
        return OSError(err, os.strerror(err))

    def _sleep(self, seconds: float) -> None:
        # Cut short by shutdown, so stop() never waits for a long delay.
        if seconds > 0:
            self._stopping.wait(seconds)

    def _pass_gate(self, state: _FileState, kind: str) -> None:
        """Return once the gate lets this call through; raise if stopping
        (EIO) or parked longer than gate_timeout (ETIMEDOUT)."""
        with self._lock:
            gate = state.gates[kind]
            if not gate.closed or self._stopping.is_set():
                return
            if gate.permits:
                gate.permits -= 1
                return
            event = threading.Event()
            gate.waiters.append(event)
        released = event.wait(self.gate_timeout)
        if not released:
            with self._lock:
                try:
                    gate.waiters.remove(event)
                except ValueError:
                    released = True  # Released just as the wait timed out.
                else:
                    self._counters["gate_timeouts"] += 1
        if self._stopping.is_set():
            raise self._inject(state, errno.EIO)
        if not released:
            log.warning("faultfs: a %s was parked longer than %s s", kind,
                        self.gate_timeout)
            raise self._inject(state, errno.ETIMEDOUT)

    # -- file system operations ---------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        key = path.lstrip("/")
        with self._lock:
            state = self._files.get(key)
            vanished = state is not None and state.fault.get("vanish")
        if vanished:
            # Lookups of a missing name are routine, not injected errors.
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        attrs = super().getattr(path, fh)
        if state is not None:
            with self._lock:
                size = _apparent_size(state.fault, attrs["st_size"],
                                      state.reads_served)
            if size is not None:
                attrs["st_size"] = size
                attrs["st_blocks"] = (size + 511) // 512
        return attrs

    def open(self, path: str, flags: int) -> int:
        key = path.lstrip("/")
        with self._lock:
            state = self._state(key)
            self._add(state, "opens")
            self._add(state, "opens_in_flight")
        try:
            self._pass_gate(state, "open")
            with self._lock:
                delay = state.fault.get("open_delay", 0.0)
            self._sleep(delay)
            with self._lock:
                fault = dict(state.fault)
            if fault.get("vanish"):
                raise self._inject(state, errno.ENOENT)
            if fault.get("open_error"):
                raise self._inject(state, fault["open_error"])
            fd = os.open(self._path(path), os.O_RDONLY | os.O_CLOEXEC)
            with self._lock:
                self._handles[fd] = key
                self._add(state, "open_handles")
                if state.fault.pop("vanish_after_open", False):
                    state.fault["vanish"] = True
                    state.stale = True
            return fd
        finally:
            with self._lock:
                self._add(state, "opens_in_flight", -1)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            key = self._handles.get(fh, path.lstrip("/"))
            state = self._state(key)
            self._add(state, "reads")
            self._add(state, "reads_in_flight")
            self._counters["max_reads_in_flight"] = max(
                self._counters["max_reads_in_flight"],
                self._counters["reads_in_flight"],
            )
        try:
            self._pass_gate(state, "read")
            with self._lock:
                delay = state.fault.get("read_delay", 0.0)
            self._sleep(delay)
            with self._lock:
                fault = dict(state.fault)
                stale = state.stale
            if stale:
                raise self._inject(state, errno.ESTALE)
            error_at = fault.get("read_error_at")
            if error_at is not None and offset <= error_at < offset + size:
                raise self._inject(state, fault.get("read_errno", errno.EIO))
            with self._lock:
                served = state.reads_served
                state.reads_served += 1
            apparent = None
            if fault.get("resize_after") is not None:
                apparent = _apparent_size(fault, os.fstat(fh).st_size, served)
            if apparent is None:
                data = os.pread(fh, size, offset)
            else:
                end = min(offset + size, apparent)
                data = (os.pread(fh, end - offset, offset)
                        if end > offset else b"")
                data += filler(offset + len(data), end - offset - len(data))
            with self._lock:
                self._add(state, "read_bytes", len(data))
            return data
        finally:
            with self._lock:
                self._add(state, "reads_in_flight", -1)

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            key = self._handles.pop(fh, None)
            if key is not None:
                state = self._state(key)
                self._add(state, "releases")
                self._add(state, "open_handles", -1)
        os.close(fh)
        return 0

    def readdir(self, path: str, fh: int) -> list[Any]:
        prefix = path.strip("/")
        with self._lock:
            gone = {
                key for key, state in self._files.items()
                if state.fault.get("vanish")
            }
        return [
            entry for entry in super().readdir(path, fh)
            if not isinstance(entry, tuple)
            or posixpath.join(prefix, entry[0]) not in gone
        ]

    # -- control (from the control thread) ---------------------------------

    def control(self, request: dict[str, Any]) -> Any:
        """Apply one request from the test process; return its answer."""
        op = request["op"]
        key: Any = request.get("path")  # None for the mount-wide ops
        with self._lock:
            if op == "set":
                self._set(key, request["fault"])
                return None
            if op == "clear":
                self._clear(key, request.get("faults") or None)
                return None
            if op == "clear_all":
                for each in list(self._files):
                    self._clear(each, None)
                return None
            if op == "release":
                return self._state(key).gates[request["kind"]].release(
                    request.get("count"))
            if op == "blocked":
                return self._blocked(key, request["kind"])
            if op == "stats":
                return self._stats_of(key)
            if op == "faults":
                return {
                    k: self._describe(s) for k, s in self._files.items()
                    if self._describe(s)
                }
        if op == "shutdown":
            self.shutdown()
            return None
        raise ValueError(f"unknown control request {op!r}")

    def _set(self, key: str, fault: dict[str, Any]) -> None:
        # Lock held.
        gates = {kind: fault.pop(f"{kind}_gate", None) for kind in KINDS}
        unknown = set(fault) - _FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        state = self._state(key)
        for kind, gate in gates.items():
            if gate is True:
                state.gates[kind].close()
            elif gate is False:
                state.gates[kind].release(None)
        if "resize_after" in fault:
            state.fault.pop("size", None)
            state.fault.pop("grow_by", None)
            state.reads_served = 0
        if fault.get("vanish") is False:
            state.stale = False
        for name, value in fault.items():
            off = value is None or value is False or (
                value == 0 and name in ("open_delay", "read_delay",
                                        "open_error"))
            if off:
                state.fault.pop(name, None)
            else:
                state.fault[name] = value

    def _clear(self, key: str, names: list[str] | None) -> None:
        # Lock held.
        unknown = set(names or ()) - CLEARABLE
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        state = self._files.get(key)
        if state is None:
            return
        for name in names or CLEARABLE:
            if name in ("read_gate", "open_gate"):
                state.gates[name[:-len("_gate")]].release(None)
            elif name in ("shrink_to", "grow_by", "size_after_reads"):
                for each in ("resize_after", "size", "grow_by"):
                    state.fault.pop(each, None)
                state.reads_served = 0
            elif name == "read_error_at":
                state.fault.pop("read_error_at", None)
                state.fault.pop("read_errno", None)
            else:
                state.fault.pop(name, None)
        if "vanish" not in state.fault:
            state.stale = False

    def _describe(self, state: _FileState) -> dict[str, Any]:
        # Lock held.
        out = dict(state.fault)
        for kind in KINDS:
            if state.gates[kind].closed:
                out[f"{kind}_gate"] = True
        if state.stale:
            out["stale"] = True
        return out

    def _blocked(self, key: str | None, kind: str) -> int:
        # Lock held.
        states = (
            self._files.values() if key is None
            else [self._files[key]] if key in self._files else []
        )
        return sum(len(s.gates[kind].waiters) for s in states)

    def _stats_of(self, key: str | None) -> dict[str, int]:
        # Lock held.
        if key is None:
            stats = dict(self._counters)
            stats["getattrs"] = self._stats["getattr"]
        else:
            state = self._files.get(key)
            stats = dict(state.counters if state else
                         dict.fromkeys(_FILE_COUNTERS, 0))
        for kind in KINDS:
            stats[f"blocked_{kind}s"] = self._blocked(key, kind)
        return stats

    def shutdown(self) -> None:
        """Fail every parked call with EIO and stop delaying or parking."""
        self._stopping.set()
        with self._lock:
            for state in self._files.values():
                for gate in state.gates.values():
                    gate.release(None)


def _serve_control(operations: FaultPassthrough, fd: int) -> None:
    """Answer the test process's requests, one JSON line each way.

    End of file means the test process closed the channel or died: parked
    calls are let go so the daemon can exit.
    """
    signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    )
    sock = socket.socket(fileno=fd)
    try:
        with sock.makefile("rb") as lines:
            for line in lines:
                try:
                    reply = {"ok": True,
                             "value": operations.control(json.loads(line))}
                except Exception as exc:  # noqa: BLE001 - reported back
                    reply = {"ok": False, "type": type(exc).__name__,
                             "error": str(exc)}
                sock.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass
    finally:
        operations.shutdown()
        sock.close()


def serve(
    source: str,
    mountpoint: str,
    attr_timeout: float = 0.0,
    max_threads: int = 64,
    gate_timeout: float = 60.0,
    control_fd: int | None = None,
    parent_fd: int | None = None,
    debug: bool = False,
    max_background: int = 0,
) -> None:
    """Mount and serve in the foreground until unmounted (blocks)."""
    if mfusepy is None:
        raise RuntimeError(f"mfusepy is not usable: {_MFUSEPY_ERROR}")
    if parent_fd is not None:
        start_parent_watch(parent_fd, mountpoint, "faultfs-parent-watch")
    operations = FaultPassthrough(source, gate_timeout, max_background)
    if control_fd is not None:
        threading.Thread(
            target=_serve_control, args=(operations, control_fd),
            name="faultfs-control", daemon=True,
        ).start()
    try:
        run_fuse(
            operations, mountpoint, fsname="faultfs",
            attr_timeout=attr_timeout, max_threads=max_threads, debug=debug,
        )
    finally:
        operations.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m asyncfile.testing.faultfs``."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncfile.testing.faultfs",
        description="Mount a read-only mirror of SRC at MOUNTPOINT whose "
        "files fail on command. Faults are set at run time by the FaultFS "
        "object that started the process (through --control-fd); run by "
        "hand it is a plain passthrough. Runs until unmounted "
        "(fusermount3 -u MOUNTPOINT) or SIGTERM/SIGINT.",
    )
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--attr-timeout", type=float, default=0.0,
                        help="seconds the kernel caches names and "
                        "attributes (default 0: ask every time)")
    parser.add_argument("--max-threads", type=int, default=64,
                        help="most requests served at once, parked ones "
                        "included (default 64)")
    parser.add_argument("--gate-timeout", type=float, default=60.0,
                        help="seconds a call may stay parked at a gate "
                        "before it fails with ETIMEDOUT (default 60)")
    parser.add_argument("--max-background", type=int, default=0,
                        help="asynchronous requests the kernel sends at "
                        "once (default 0: libfuse's 12)")
    parser.add_argument("--control-fd", type=int, default=None,
                        help=argparse.SUPPRESS)
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
        args.source, args.mountpoint, args.attr_timeout, args.max_threads,
        args.gate_timeout, args.control_fd, args.parent_fd, args.debug,
        args.max_background,
    )
    return 0


# --------------------------------------------------------------------------
# The test side: runs in the process under test.
# --------------------------------------------------------------------------

_ERRORS = {"ValueError": ValueError, "KeyError": KeyError,
           "TypeError": TypeError}


class FaultFS(FuseProcess):
    """A read-only mirror of *source* whose files fail on command.

    ``with fs as mount_dir:`` (``fs = FaultFS(src)``) mounts on a fresh
    temporary directory and returns it (also ``fs.mountpoint``); on exit it
    lets every parked call go (they fail with EIO), unmounts, stops the
    child and removes the mount point, even with calls parked or files open.
    Mounts once (no restart).

    Every control method is one round trip to the daemon (tens of
    microseconds) and safe from any thread, the reactor's included;
    ``wait_*`` block the calling thread up to their timeout, so in the
    reactor thread, when what they wait for needs the reactor to run, use
    ``when_*``, which poll with ``reactor.callLater`` instead.
    """

    _module = "asyncfile.testing.faultfs"
    _label = "faultfs"

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        attr_timeout: float = 0.0,
        max_threads: int = 64,
        max_background: int = 0,
        gate_timeout: float = 60.0,
        control_timeout: float = 10.0,
        mount_timeout: float = 10.0,
        debug: bool = False,
    ) -> None:
        super().__init__(source, mount_timeout=mount_timeout, debug=debug)
        self.attr_timeout = attr_timeout
        self.max_threads = max_threads
        self.max_background = max_background
        self.gate_timeout = gate_timeout
        self.control_timeout = control_timeout
        self._control: socket.socket | None = None
        self._control_child: socket.socket | None = None
        self._replies: Any = None
        self._control_lock = threading.Lock()

    @property
    def mountpoint(self) -> str | None:
        """The mount directory while mounted (same as ``.mount``)."""
        return self.mount

    # -- life cycle ----------------------------------------------------------

    def _daemon_args(self) -> list[str]:
        assert self._control_child is not None
        return [
            "--attr-timeout", repr(self.attr_timeout),
            "--max-threads", str(self.max_threads),
            "--max-background", str(self.max_background),
            "--gate-timeout", repr(self.gate_timeout),
            "--control-fd", str(self._control_child.fileno()),
        ]

    def _pass_fds(self) -> tuple[int, ...]:
        assert self._control_child is not None
        return (self._control_child.fileno(),)

    def start(self) -> str:
        """Mount and return the mount directory once it serves requests."""
        if self.process is not None:
            raise RuntimeError("FaultFS already started")
        self._control, self._control_child = socket.socketpair()
        self._control.settimeout(self.control_timeout)
        self._replies = self._control.makefile("rb")
        try:
            return super().start()
        finally:
            # The child has its copy; ours would hide the child's death.
            self._control_child.close()
            self._control_child = None

    def stop(self) -> None:
        """Let parked calls go (with EIO), unmount, stop the daemon, remove
        the mount point; idempotent."""
        try:
            if (self._control is not None and self.process is not None
                    and self.process.poll() is None):
                try:
                    self._call("shutdown")
                except (OSError, RuntimeError) as exc:
                    log.debug("faultfs: shutdown request failed: %s", exc)
            super().stop()
        finally:
            if self._replies is not None:
                self._replies.close()
                self._replies = None
            if self._control is not None:
                self._control.close()
                self._control = None

    # -- control channel ---------------------------------------------------

    def _call(self, op: str, **args: Any) -> Any:
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        with self._control_lock:
            if self._control is None:
                raise RuntimeError("FaultFS is not running")
            try:
                self._control.sendall(request)
                line = self._replies.readline()
            except OSError as exc:
                # After a timeout a late answer would pair with the next
                # request: the channel is unusable from here on.
                self._replies.close()
                self._control.close()
                self._replies = self._control = None
                raise RuntimeError(
                    f"faultfs control channel failed ({exc}): "
                    f"{self.log_text().strip()}") from exc
        if not line:
            raise RuntimeError(
                f"faultfs daemon is gone: {self.log_text().strip()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise _ERRORS.get(reply["type"], RuntimeError)(reply["error"])
        return reply["value"]

    def _key(self, name: str | os.PathLike[str]) -> str:
        """*name* relative to the mount root, normalised; a path inside the
        mount is accepted too."""
        name = os.fspath(name)
        if os.path.isabs(name):
            mount = self.mount
            if mount is None or not (name + "/").startswith(mount + "/"):
                raise ValueError(f"{name!r} is not inside the mount")
            name = os.path.relpath(name, mount)
        key = posixpath.normpath(name)
        if key in (".", "..") or key.startswith("../"):
            raise ValueError(f"{name!r} does not name a file in the mount")
        return key

    @staticmethod
    def _kind(kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        return kind

    # -- faults ------------------------------------------------------------

    def set_fault(
        self,
        name: str | os.PathLike[str],
        *,
        read_error_at: int | None = None,
        read_errno: int | None = None,
        open_error: int | None = None,
        open_delay: float | None = None,
        read_delay: float | None = None,
        read_gate: bool | None = None,
        open_gate: bool | None = None,
        shrink_to: int | None = None,
        grow_by: int | None = None,
        size_after_reads: tuple[int, int] | None = None,
        vanish: bool | None = None,
        vanish_after_open: bool | None = None,
    ) -> None:
        """Add or change faults of file *name*; the others stay as they are.

        Applied in the daemon when this returns.  Arguments left at None
        are unchanged; ``clear`` removes faults.  Reads and opens count
        FUSE requests (a ``read()`` larger than the kernel's request size,
        or Python's read-to-end loop, may make several).

        - ``read_error_at=OFFSET``: a read whose requested range
          ``[offset, offset+size)`` contains OFFSET fails with
          ``read_errno`` (default EIO), even where that range passes the
          end of file; reads wholly before or after it succeed.
        - ``open_error=ERRNO``: open fails with ERRNO (0 removes it).
        - ``open_delay`` / ``read_delay`` (seconds): every open / read
          sleeps that long in the daemon (after its gate).
        - ``read_gate=True`` / ``open_gate=True``: reads / opens of the
          file park in the daemon until ``release_reads`` /
          ``release_opens``; faults are checked after the gate, so a fault
          set while a call is parked applies to it.  ``False`` opens the
          gate (as ``release_*(name)``).
        - ``size_after_reads=(k, N)``: once k reads of the file were served
          (counted from this call; failed reads do not count), it reports
          and holds N bytes; ``shrink_to=N`` is ``(1, N)``; ``grow_by=N``
          makes it the source's size plus N after one read.  Bytes past
          the source's end read back as ``filler(offset, length)``.
          Plain reads are not cut at the size; asynchronous (io_uring/AIO)
          reads of a file opened with O_DIRECT are, by Linux, at the size
          it last saw from a stat.
        - ``vanish=True``: the name is gone (stat, open: ENOENT; not
          listed); handles opened before keep reading (as after unlink on a
          local disk), though ``fstat`` on them gives ENOENT (FUSE asks by
          path).  ``False`` brings it back.
        - ``vanish_after_open=True``: the next open succeeds, then the file
          vanishes as with ``vanish`` and every read through any handle of
          it fails with ESTALE (what NFS gives for a file deleted on the
          server), until ``clear``.
        """
        fault: dict[str, Any] = {}
        for key, value in (
            ("read_error_at", read_error_at), ("read_errno", read_errno),
            ("open_error", open_error), ("open_delay", open_delay),
            ("read_delay", read_delay), ("vanish", vanish),
            ("vanish_after_open", vanish_after_open),
            ("read_gate", read_gate), ("open_gate", open_gate),
        ):
            if value is not None:
                fault[key] = value
        for key in ("read_error_at", "read_errno", "open_error"):
            value = fault.get(key)
            if value is not None and (
                    not isinstance(value, int) or value < 0
                    or key == "read_errno" and value == 0):
                raise ValueError(f"{key} must be a non-negative int")
        for key in ("open_delay", "read_delay"):
            if key in fault and not fault[key] >= 0:
                raise ValueError(f"{key} must be >= 0 seconds")
        resizes: list[tuple[str, Any]] = [(k, v) for k, v in (
            ("shrink_to", shrink_to), ("grow_by", grow_by),
            ("size_after_reads", size_after_reads)) if v is not None]
        if len(resizes) > 1:
            raise ValueError("give one of shrink_to, grow_by, "
                             "size_after_reads")
        if resizes:
            kind, value = resizes[0]
            after, amount = (value if kind == "size_after_reads"
                             else (1, value))
            if not (isinstance(after, int) and isinstance(amount, int)
                    and after >= 0 and amount >= 0):
                raise ValueError(f"{kind} needs non-negative ints")
            fault["resize_after"] = after
            fault["grow_by" if kind == "grow_by" else "size"] = amount
        self._call("set", path=self._key(name), fault=fault)

    def clear(self, name: str | os.PathLike[str], *faults: str) -> None:
        """Remove the named faults of *name* (all if none named), letting
        any parked call of it through; counters stay."""
        self._call("clear", path=self._key(name), faults=list(faults))

    def clear_all(self) -> None:
        """Remove every fault of every file, letting parked calls through."""
        self._call("clear_all")

    def faults(self) -> dict[str, dict[str, Any]]:
        """The faults in force, per file (as the daemon stores them)."""
        faults: dict[str, dict[str, Any]] = self._call("faults")
        return faults

    # -- gates -------------------------------------------------------------

    def release_reads(
        self, name: str | os.PathLike[str], count: int | None = None
    ) -> int:
        """Let reads of *name* through its gate; return how many parked
        reads that woke.

        ``count=None`` opens the gate: parked reads and all later ones go
        (``set_fault(name, read_gate=True)`` closes it again).  ``count=k``
        lets k reads go, the oldest parked first; what is left of k lets
        later reads through without parking; the gate stays closed.
        """
        return self._release(name, "read", count)

    def release_opens(
        self, name: str | os.PathLike[str], count: int | None = None
    ) -> int:
        """As ``release_reads``, for opens of *name*."""
        return self._release(name, "open", count)

    def _release(self, name: str | os.PathLike[str], kind: str,
                 count: int | None) -> int:
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError("count must be a non-negative int or None")
        woken: int = self._call("release", path=self._key(name), kind=kind,
                                count=count)
        return woken

    def blocked(self, name: str | os.PathLike[str] | None = None,
                kind: str = "read") -> int:
        """How many *kind* calls of *name* (of any file if None) are parked
        at a gate now."""
        key = None if name is None else self._key(name)
        parked: int = self._call("blocked", path=key, kind=self._kind(kind))
        return parked

    def wait_blocked(
        self,
        name: str | os.PathLike[str] | None,
        kind: str = "read",
        timeout: float = 10.0,
        count: int = 1,
    ) -> int:
        """Block until at least *count* *kind* calls of *name* are parked
        at its gate; return how many are.  Raises TimeoutError after
        *timeout* seconds."""
        return self._wait(lambda: self.blocked(name, kind),
                          lambda n: n >= count, timeout,
                          f"{count} {kind}(s) of {name!r} parked")

    def when_blocked(
        self,
        reactor: Any,
        name: str | os.PathLike[str] | None,
        kind: str = "read",
        timeout: float = 10.0,
        count: int = 1,
        interval: float = 0.002,
    ) -> Any:
        """``wait_blocked`` for the reactor thread: a Deferred firing with
        the number parked, polled every *interval* seconds with
        ``reactor.callLater``; it fails with TimeoutError after *timeout*
        and can be cancelled."""
        return self._when(reactor, lambda: self.blocked(name, kind),
                          lambda n: n >= count, timeout, interval,
                          f"{count} {kind}(s) of {name!r} parked")

    # -- counters ----------------------------------------------------------

    def stats(self, name: str | os.PathLike[str] | None = None
              ) -> dict[str, int]:
        """Counters of the daemon, or of file *name*.

        Cumulative: ``opens``, ``reads``, ``releases`` (calls arrived,
        failed ones included), ``read_bytes``, ``errors_injected`` (failed
        by a fault; ENOENT from looking up a vanished name is not
        counted); now: ``open_handles`` (opens that succeeded minus
        releases), ``opens_in_flight``, ``reads_in_flight`` (parked ones
        included), ``blocked_opens``, ``blocked_reads``.  Whole mount only:
        ``max_reads_in_flight``, ``gate_timeouts``, ``getattrs``.
        Linux sends release after ``close()`` returns, so right after a
        close ``open_handles`` may still count it: use ``wait_closed``.
        """
        key = None if name is None else self._key(name)
        stats: dict[str, int] = self._call("stats", path=key)
        return stats

    def wait_closed(self, name: str | os.PathLike[str] | None = None,
                    timeout: float = 10.0) -> dict[str, int]:
        """Block until the daemon holds no open handle (of *name*, or at
        all); return the stats then.  Raises TimeoutError."""
        return self._wait(lambda: self.stats(name),
                          lambda s: s["open_handles"] == 0, timeout,
                          f"no open handles of {name or 'the mount'}")

    def when_closed(self, reactor: Any,
                    name: str | os.PathLike[str] | None = None,
                    timeout: float = 10.0,
                    interval: float = 0.002) -> Any:
        """``wait_closed`` as a Deferred polled with ``reactor.callLater``."""
        what = f"no open handles of {name or 'the mount'}"
        return self._when(reactor, lambda: self.stats(name),
                          lambda s: s["open_handles"] == 0, timeout,
                          interval, what)

    # -- polling -----------------------------------------------------------

    def _wait(self, probe: Callable[[], _T], done: Callable[[_T], bool],
              timeout: float, what: str) -> _T:
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while True:
            value = probe()
            if done(value):
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"faultfs: no {what} within {timeout} s "
                                   f"(last: {value})")
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.005)

    def _when(self, reactor: Any, probe: Callable[[], Any],
              done: Callable[[Any], bool], timeout: float, interval: float,
              what: str) -> Any:
        from twisted.internet import defer

        pending: list[Any] = []

        def cancel(_: defer.Deferred[Any]) -> None:
            while pending:
                call = pending.pop()
                if call.active():
                    call.cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)
        deadline = reactor.seconds() + timeout

        def poll() -> None:
            pending.clear()
            try:
                value = probe()
            except Exception:  # noqa: BLE001 - handed to the Deferred
                result.errback()
                return
            if done(value):
                result.callback(value)
            elif reactor.seconds() >= deadline:
                result.errback(TimeoutError(
                    f"faultfs: no {what} within {timeout} s (last: {value})"))
            else:
                pending.append(reactor.callLater(interval, poll))

        poll()
        return result


if __name__ == "__main__":
    sys.exit(main())
