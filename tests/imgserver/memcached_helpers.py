"""Real memcached servers for the tests: started on 127.0.0.1, a free port, stopped after.

Use the ``memcached`` fixture (one server) or ``memcached_factory`` (call it
for each server a test needs); import them into a test module::

    from memcached_helpers import memcached, memcached_factory  # noqa: F401  (pytest fixtures)

Both skip the test, with the reason, where ``memcached`` is not installed
(Debian/Ubuntu: ``apt-get install memcached``).  A server can be stopped and
started again on the same port (a restart), or paused with SIGSTOP (a hung
server: connections are accepted by the kernel, nothing is answered).

``start()``/``stop()`` and the raw client methods block the calling thread,
each bounded by a short deadline (a local memcached answers in well under a
millisecond): fine in a test, not something to copy into the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable, Iterator

import pytest

__all__ = ["MemcachedServer", "memcached", "memcached_factory", "memcached_binary", "free_port"]

#: Where the tests look first; else the PATH.
DEFAULT_BINARY = "/usr/bin/memcached"


def memcached_binary() -> str | None:
    """The memcached executable, or None where it is not installed."""
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("memcached")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it
    before memcached binds it: :meth:`MemcachedServer.start` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MemcachedServer:
    """One memcached process on 127.0.0.1 (``-U 0``: no UDP).

    ``max_item`` is memcached's ``-I`` (e.g. ``"1m"``, ``"2m"``), None for its
    default (1 MiB).  The port is chosen on the first :meth:`start` and kept
    afterwards, so ``stop(); start()`` is a restart at the same address (with
    an empty cache, as a real restart).
    """

    def __init__(self, *, memory_mb: int = 64, max_item: str | None = "1m", binary: str | None = None,
                 port: int | None = None) -> None:
        found = binary or memcached_binary()
        if found is None:
            raise FileNotFoundError("memcached is not installed")
        self.binary = found
        self.memory_mb = memory_mb
        self.max_item = max_item
        self.host = "127.0.0.1"
        self.port: int | None = port
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._log = tempfile.TemporaryFile()

    # -- addresses ---------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``: what ``--memcached`` and ``Settings(memcached=...)`` take."""
        if self.port is None:
            raise RuntimeError("not started yet")
        return f"{self.host}:{self.port}"

    @property
    def hostport(self) -> tuple[str, int]:
        """``("127.0.0.1", PORT)``: one entry of ``settings.memcached_servers``."""
        if self.port is None:
            raise RuntimeError("not started yet")
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- life cycle --------------------------------------------------------------------------------------------

    def _argv(self, port: int) -> list[str]:
        argv = [self.binary, "-l", self.host, "-p", str(port), "-U", "0", "-m", str(self.memory_mb)]
        if self.max_item is not None:
            argv += ["-I", self.max_item]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # memcached refuses to run as root without -u
        return argv

    def start(self, timeout: float = 10.0) -> "MemcachedServer":
        """Start memcached and return once it answers ``version`` (within
        ``timeout`` seconds, else RuntimeError with its output).  The first start
        picks a free port (retrying if another process took it first); later
        starts reuse it."""
        if self.running:
            raise RuntimeError("already running")
        deadline = time.monotonic() + timeout
        pinned = self.port is not None
        attempts = 0
        while True:
            attempts += 1
            port = self.port if self.port is not None else free_port()
            self._log.seek(0)
            self._log.truncate()
            self.process = subprocess.Popen(self._argv(port), stdin=subprocess.DEVNULL, stdout=self._log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            self.paused = False
            if self._wait_ready(port, deadline):
                self.port = port
                return self
            if self.process.poll() is None:
                self._kill()
                raise RuntimeError(f"memcached on port {port} did not answer within {timeout} s: {self.log()!r}")
            # It exited: most likely the port was taken (a race with another test); try another one.
            if pinned or attempts >= 5 or time.monotonic() >= deadline:
                out = self.log()
                self.process = None
                raise RuntimeError(f"memcached could not start on port {port}: {out!r}")
            self.process = None

    def _wait_ready(self, port: int, deadline: float) -> bool:
        """Poll ``version`` until memcached answers (True), exits or the deadline passes (False)."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, port), timeout=0.5) as s:
                    s.sendall(b"version\r\n")
                    if _read_line(s, time.monotonic() + 0.5).startswith(b"VERSION "):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def stop(self, timeout: float = 5.0, graceful: bool = False) -> None:
        """Stop memcached: SIGKILL by default (a dead server: its connections are
        reset; immediate), or with ``graceful`` SIGTERM (memcached then takes about
        a second to exit; SIGKILL after ``timeout``).  Stopping a stopped server
        does nothing."""
        if self.process is None:
            return
        if not graceful:
            self.kill()
            return
        if self.process.poll() is None:
            if self.paused:
                self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self.process = None
        self.paused = False

    def kill(self) -> None:
        """SIGKILL (a crash): nothing is flushed, connections are reset."""
        if self.process is not None and self.process.poll() is None:
            self._kill()
        self.process = None
        self.paused = False

    def _kill(self) -> None:
        assert self.process is not None
        self._signal(signal.SIGKILL)
        self.process.wait(5.0)

    def restart(self, timeout: float = 10.0) -> "MemcachedServer":
        """Stop (SIGKILL), then start on the same port (an empty cache)."""
        self.stop()
        return self.start(timeout)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the server hangs (the kernel still accepts connections and
        buffers requests; nothing is answered until :meth:`resume`).  Returns once
        every thread of memcached is stopped (a signal is delivered asynchronously:
        a thread still running could otherwise answer one more request)."""
        if not self.running:
            raise RuntimeError("not running")
        assert self.process is not None
        self._signal(signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(self.process.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"memcached (pid {self.process.pid}) did not stop within {timeout} s")
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT: a paused server answers again (requests sent meanwhile too)."""
        if self.running and self.paused:
            self._signal(signal.SIGCONT)
        self.paused = False

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.kill(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        """What memcached wrote to stdout/stderr (for failure messages)."""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def close(self) -> None:
        """Stop and release the log file."""
        self.stop()
        self._log.close()

    def __enter__(self) -> "MemcachedServer":
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<MemcachedServer {self.host}:{self.port} {state}>"

    # -- a raw, blocking client (tests only: to plant values, read counters) -------------------------------------

    def command(self, line: bytes, timeout: float = 2.0) -> bytes:
        """Send one raw command (``line`` with its ``\\r\\n`` and data block) and
        return the reply up to its terminating line (``END``, ``STORED``, ...)."""
        deadline = time.monotonic() + timeout
        with socket.create_connection(self.hostport, timeout=timeout) as s:
            s.sendall(line)
            return _read_reply(s, deadline)

    def set(self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> bool:
        """``set`` a raw value (e.g. a corrupt record under a tier's key)."""
        reply = self.command(b"set %s %d %d %d\r\n%s\r\n" % (key, flags, exptime, len(value), value))
        return reply == b"STORED\r\n"

    def get(self, key: bytes) -> bytes | None:
        """The raw value stored under ``key``, or None."""
        reply = self.command(b"get %s\r\n" % key)
        if reply == b"END\r\n":
            return None
        header, _, rest = reply.partition(b"\r\n")
        length = int(header.split()[3])
        return rest[:length]

    def delete(self, key: bytes) -> bool:
        return self.command(b"delete %s\r\n" % key) == b"DELETED\r\n"

    def flush_all(self) -> None:
        self.command(b"flush_all\r\n")

    def stats(self) -> dict[str, str]:
        """memcached's ``stats`` (e.g. ``curr_items``, ``get_hits``, ``curr_connections``)."""
        reply = self.command(b"stats\r\n")
        out: dict[str, str] = {}
        for line in reply.split(b"\r\n"):
            parts = line.split(b" ", 2)
            if len(parts) == 3 and parts[0] == b"STAT":
                out[parts[1].decode()] = parts[2].decode()
        return out

    def keys(self) -> list[bytes]:
        """Every key stored now (``lru_crawler metadump all``; fine for a test's few keys)."""
        reply = self.command(b"lru_crawler metadump all\r\n")
        keys = []
        for line in reply.split(b"\r\n"):
            if line.startswith(b"key="):
                from urllib.parse import unquote_to_bytes

                keys.append(unquote_to_bytes(line.split(b" ", 1)[0][4:]))
        return keys


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in the stopped state (Linux /proc; True where unknown)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True  # no /proc (not Linux) or the process is gone: nothing more to wait for
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in (b"T", b"t"):
            return False
    return True


_TERMINATORS = (b"END\r\n", b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n", b"DELETED\r\n",
                b"OK\r\n", b"ERROR\r\n", b"TOUCHED\r\n")


def _read_line(s: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        s.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_reply(s: socket.socket, deadline: float) -> bytes:
    data = b""
    while True:
        if data.endswith(_TERMINATORS) or data.startswith((b"CLIENT_ERROR", b"SERVER_ERROR")) \
                and data.endswith(b"\r\n"):
            # A value's data block could end with one of these too: check the framing for gets.
            if not data.startswith(b"VALUE ") or _complete_values(data):
                return data
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"memcached did not finish its reply: {data[:200]!r}")
        s.settimeout(remaining)
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def _complete_values(data: bytes) -> bool:
    """Whether ``data`` (a reply to get) is a whole sequence of VALUE blocks then END."""
    pos = 0
    while True:
        if data[pos:] == b"END\r\n":
            return True
        end = data.find(b"\r\n", pos)
        if end < 0 or not data.startswith(b"VALUE ", pos):
            return False
        length = int(data[pos:end].split()[3])
        pos = end + 2 + length + 2
        if pos > len(data):
            return False


# -- pytest fixtures ---------------------------------------------------------------------------------------------

def _skip_reason() -> str | None:
    if memcached_binary() is None:
        return "memcached is not installed (apt-get install memcached); the memcached tests need a real server"
    return None


@pytest.fixture
def memcached_factory() -> Iterator[Callable[..., MemcachedServer]]:
    """Call it to start a memcached (keyword arguments: ``memory_mb``,
    ``max_item``); every server started is stopped after the test."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    servers: list[MemcachedServer] = []

    def make(**kwargs: object) -> MemcachedServer:
        server = MemcachedServer(**kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def memcached(memcached_factory: Callable[..., MemcachedServer]) -> MemcachedServer:
    """One running memcached on 127.0.0.1 (64 MB, items up to 1 MiB), stopped after the test."""
    return memcached_factory()
