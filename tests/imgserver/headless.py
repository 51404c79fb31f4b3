"""A headless Chromium driven over the DevTools protocol, with the standard library only.

``--remote-debugging-pipe``: Chromium reads commands from its descriptor 3 and
writes answers and events to its descriptor 4, JSON messages each ended by a
NUL byte; no port, no WebSocket.  Blocking: run it in a thread when the server
under test runs in this process's reactor.

    with Browser() as browser:
        page = browser.new_page(1280, 800)
        page.navigate("http://127.0.0.1:8080/")
        images = page.evaluate("[...document.images].map(i => i.naturalWidth)")
        png = page.screenshot()

Every wait is bounded (``timeout``); the browser, its process group and its
profile directory are gone after ``close()``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

#: Debian's package, then the names other systems use.
EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--no-default-browser-check", "--remote-debugging-pipe",
)


#: Runs argv[3:] with descriptor argv[1] as 3 and argv[2] as 4.
_TRAMPOLINE = """\
import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
r3 = os.dup(r) if r == 4 else r  # dup2(r, 3) must not clobber w, nor dup2(w, 4) r
os.dup2(w, 4)
os.dup2(r3, 3)
for fd in {r, w, r3} - {3, 4}:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_chromium() -> str | None:
    """The path of a Chromium (``$CHROMIUM`` first), or None."""
    wanted = os.environ.get("CHROMIUM")
    if wanted:
        return shutil.which(wanted)
    for name in EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, executable: str | None = None, timeout: float = 30.0) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError("no chromium found")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="imgserver-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser wants the pipe on descriptors 3 and 4: a tiny Python
        # puts them there and execs it (no preexec_fn: this process has
        # threads; and dash's redirections take one-digit descriptors only).
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(to_browser_r), str(from_browser_w), executable,
             *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        try:
            self.version = self.call("Browser.getVersion")
        except BaseException:
            self.close()
            raise

    # -- the protocol ------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data):]

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser went away: {self._stderr_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Send a command; its result (events meanwhile are kept for ``wait_event``)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._send(message)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self._events.append(answer)

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in self._events:
                if event["method"] == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event.get("params", {})
            answer = self._receive(deadline)
            if "method" in answer:
                self._events.append(answer)

    def new_page(self, width: int, height: int, scale: float = 1.0) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False})
        return page

    # -- life ----------------------------------------------------------------------
    def _stderr_tail(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()[-2000:].decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._send({"id": self._next_id + 1, "method": "Browser.close"})
            except OSError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the browser and its helpers
            self.process.wait(5)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # helpers left behind, if any
            except (ProcessLookupError, PermissionError):
                pass
        if self.process.stderr is not None:
            self.process.stderr.close()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event (every eager image loaded or failed)."""
        self.browser._events = [e for e in self.browser._events if e.get("sessionId") != self.session]
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.browser.wait_event("Page.loadEventFired", session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if a promise), by value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluating: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
