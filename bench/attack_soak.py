"""Soak and attack figures for imgserver (issue 9): flat memory and descriptors, bounded cost per client.

    python bench/attack_soak.py CORPUS [--requests 40000] [--connections 16]
                                       [--stalled 300] [--slowloris 100] [--attack-seconds 25]
                                       [--send-timeout 5] [--header-timeout 5] [--idle-timeout 10]
                                       [--retry-refused S] [--server-env NAME=VALUE]
                                       [--only soak|attack]

imgserver runs as one subprocess (this checkout) on 127.0.0.1 with
``--workers 2 --max-queue 100 --cache-mb 16 --send-timeout 5 --header-timeout 5
--idle-timeout 10`` (every other limit at its default; glibc's malloc at its
defaults unless ``--server-env`` says otherwise) over a
temporary root: hard links to the corpus images, 640 px copies of up to 12 of
them (cheap transforms), three small (< 64 KiB) images, a large original,
a file that is not an image, a truncated JPEG and a symlink leading out of
the root.  Its RSS (VmRSS), open descriptors (/proc/PID/fd) and threads are
sampled every second and at marked moments.  Everything it started is
stopped on exit, Ctrl-C included.

**Soak**: ``--requests`` requests from a closed-loop generator (asyncio, one
thread, ``--connections`` keep-alive connections, each sending its next
request when the last answer is in), a fixed shuffled mix: transforms of
distinct sizes (never cached, never shared) and of a small set of URLs (cache
hits), a few of full-size corpus images, /info, small and large originals,
HEAD, ranges (206), conditionals (304 on originals and transforms, 412),
errors (400, 403, 404, 415, 416, 422), clients that drop the connection
after 128 KiB of a large original, and clients that close right after
sending a transform request (499).  Every answer is checked: its status is
the one the request must get; originals and ranges byte for byte against
the file; transforms by Content-Length, Content-Type and (one in ten)
decoded size; 304s by ETag.  Printed: RSS, descriptors and threads at the
start, after the warm-up (the first 25 %) and after each quarter of the rest
(with the min / median / max of the once-a-second samples in between: RSS
swings by the size of the images being decoded), and idle again; answers by status from the generator next to the server's own
``imgserver_requests_total`` (difference of /metrics before and after); the
server's processing, cache and sharing counters.

**Attack**: a probe (blocking ``http.client`` in the main thread, one new
connection per request, one request at a time) measures four requests for
``--probe-seconds`` on the quiet server and then during the attack: a small
cached transform, an uncached transform (a new size each time), a small
original (< 64 KiB, needs no place in the streams lane) and a 1 MB-class
original (needs one).  The attack (another thread, asyncio): ``--stalled``
connections that ask for the large original and never read (16 KiB receive
buffer; the server's reset is seen through epoll without reading; one
answered 503 because the streams lane is full holds its connection, unread,
until the server closes it (``--idle-timeout``), or with ``--retry-refused S``
closes it and asks again after S seconds; one that is dropped reconnects at
once), and ``--slowloris`` connections that send a request's headers one byte
per ``--trickle`` seconds, never ending them (and reconnect when the server
closes).  The attackers' own counts are printed next to the server's
(``imgserver_connections_dropped_total`` by reason, streams refused,
requests by status), with RSS and descriptors before, during and after, and
what /healthz said during the attack.

Exit status 1 when a check fails: an answer other than the expected one, any
5xx in the soak, the server's counts differing from the generator's, a
probed transform not answered 200, no attacker dropped, or more descriptors
open once idle than before.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
from urllib.parse import quote

import _common  # noqa: F401  (puts the project on sys.path)
import _servers
from _common import table
from pipeline import corpus_files

HOST = _servers.HOST
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
#: Bytes a client that disconnects mid-body reads before it drops the connection.
DISCONNECT_AFTER = 128 * 1024
#: The server's own threshold for originals that need a place in the streams lane.
SMALL_ORIGINAL = 64 * 1024


# ---------------------------------------------------------------------------
# /proc sampling


@dataclass
class Sample:
    t: float
    label: str
    done: int
    rss_mb: float
    fds: int
    threads: int


def fd_targets(pid: int) -> Counter[str]:
    """What the process's descriptors point at (sockets and pipes without their inode)."""
    out: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out[re.sub(r":\[\d+\]$", "", os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
            except OSError:
                pass
    except OSError:
        pass
    return out


def fd_change(before: Counter[str], after: Counter[str]) -> str:
    more, fewer = after - before, before - after
    parts = [f"+{n} {k}" for k, n in more.items()] + [f"-{n} {k}" for k, n in fewer.items()]
    return ", ".join(parts) or "none"


def steady_fds(pid: int, timeout: float = 3.0) -> None:
    """Wait until the process's descriptor count stops changing (our own last
    /healthz or /metrics connection closed at the server), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last, same = -2, 0
    while time.monotonic() < deadline and same < 3:
        now = read_proc(pid)[1]
        same = same + 1 if now == last else 0
        last = now
        time.sleep(0.05)


def read_proc(pid: int) -> tuple[float, int, int]:
    """(VmRSS MiB, open descriptors, threads) of ``pid``."""
    rss = _servers.status_kb(pid, "VmRSS") / 1024
    threads = _servers.status_kb(pid, "Threads")  # not in kB, but the same "Key: N" line
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return rss, fds, threads


class Sampler:
    """Samples a process every ``interval`` seconds in a thread, and on demand (``mark``)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self.phase = "start"
        self.done: Callable[[], int] = lambda: 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._started = time.monotonic()

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def mark(self, label: str | None = None) -> Sample:
        rss, fds, threads = read_proc(self.pid)
        s = Sample(time.monotonic() - self._started, label or self.phase, self.done(), rss, fds, threads)
        with self._lock:
            self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.mark()

    def between(self, first: Sample, last: Sample) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if first.t <= s.t <= last.t]


# ---------------------------------------------------------------------------
# /metrics


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the server's /metrics: (name, labels) -> value."""
    status, body = _servers.http_get(port, "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def requests_by_status(before: dict[Any, float], after: dict[Any, float],
                       endpoints: Sequence[str] = ("images", "info")) -> Counter[str]:
    out: Counter[str] = Counter()
    for (name, labels), value in after.items():
        if name != "imgserver_requests_total":
            continue
        lab = dict(labels)
        if lab.get("endpoint") in endpoints:
            n = value - before.get((name, labels), 0.0)
            if n:
                out[lab["status"]] += int(round(n))
    return out


def diff(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        status, body = _servers.http_get(port, "/healthz", timeout=10)
        return status, json.loads(body)
    except (OSError, ValueError):
        return 0, {}


def wait_settled(port: int, timeout: float = 60.0, connections: int = 1) -> dict[str, Any]:
    """Until the server has no work and at most ``connections`` open (the asking one)."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, doc = healthz(port)
        if (doc.get("in_processing") == 0 and doc.get("queued") == 0 and doc.get("streams") == 0
                and doc.get("connections", 99) <= connections):
            return doc
        time.sleep(0.2)
    return doc


# ---------------------------------------------------------------------------
# The served tree


@dataclass
class Tree:
    root: str
    src: list[str]            # 640 px copies: cheap transforms (relative paths)
    small: list[str]          # originals under 64 KiB
    medium: list[str]         # originals over 64 KiB and up to ~1.6 MB (checked byte for byte)
    heavy: list[str]          # full-size corpus images (transforms)
    large: str                # the large original (stalled readers, disconnects)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # image -> (width, height)
    files: dict[str, bytes] = field(default_factory=dict)             # small/medium contents
    digests: dict[str, str] = field(default_factory=dict)

    def url(self, rel: str, query: str = "", endpoint: str = "images") -> str:
        return f"/{endpoint}/{quote(rel)}" + (f"?{query}" if query else "")


def prepare_tree(corpus: str, work: str) -> Tree:
    from PIL import Image

    images = corpus_files(corpus, IMAGE_EXTENSIONS)
    if not images:
        raise SystemExit(f"no images in {corpus}")
    root = os.path.join(work, "root")
    for sub in ("corpus", "src", "small"):
        os.makedirs(os.path.join(root, sub))
    linked = []
    for path in images:
        rel = os.path.join("corpus", os.path.basename(path))
        try:
            os.link(path, os.path.join(root, rel))
        except OSError:
            shutil.copyfile(path, os.path.join(root, rel))
        linked.append(rel)

    # Up to 12 images of mixed formats, scaled to 640 px: transforms that cost ~10 ms.
    by_format: dict[str, list[str]] = defaultdict(list)
    for rel in linked:
        by_format[os.path.splitext(rel)[1].lower().replace("jpeg", "jpg")].append(rel)
    picked: list[str] = []
    while len(picked) < 12 and any(by_format.values()):
        for ext in sorted(by_format):
            if by_format[ext] and len(picked) < 12:
                picked.append(by_format[ext].pop(0))
    tree = Tree(root=root, src=[], small=[], medium=[], heavy=[], large="")
    for i, rel in enumerate(picked):
        with Image.open(os.path.join(root, rel)) as im:
            fmt = im.format
            im.thumbnail((640, 640))
            if fmt == "JPEG" and im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
            out = os.path.join("src", f"s{i:02d}{ext}")
            im.save(os.path.join(root, out), fmt, **({"quality": 85} if fmt != "PNG" else {}))
            if i < 3:  # small originals, one per format if the corpus has them
                small = os.path.join("small", f"t{i:02d}{ext}")
                thumb = im.copy()
                thumb.thumbnail((200, 200))
                thumb.save(os.path.join(root, small), fmt)
                tree.small.append(small)
        tree.src.append(out)

    ordered = sorted(linked, key=lambda r: os.path.getsize(os.path.join(root, r)))
    tree.medium = [r for r in ordered if SMALL_ORIGINAL < os.path.getsize(os.path.join(root, r)) <= 1_700_000][:16]
    tree.heavy = [r for r in linked if r.lower().endswith((".jpg", ".jpeg", ".webp"))] or linked
    big = ordered[-1]
    if os.path.getsize(os.path.join(root, big)) >= 4 * 1024 * 1024:
        tree.large = big
    else:  # a corpus of small images (e.g. the built-in samples): a large file that sniffs as JPEG
        tree.large = "large.jpg"
        with open(os.path.join(root, tree.large), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0" + random.Random(1).randbytes(8 * 1024 * 1024))

    # Error cases.
    with open(os.path.join(root, "not-an-image.jpg"), "wb") as f:
        f.write(b"this is text, not a JPEG\n" * 40)
    jpeg_src = next((s for s in tree.src if s.endswith(".jpg")), None)
    if jpeg_src is None:  # no JPEG in the corpus: make one
        jpeg_src = os.path.join("src", "made.jpg")
        Image.new("RGB", (640, 480), (90, 120, 200)).save(os.path.join(root, jpeg_src), "JPEG")
    with open(os.path.join(root, jpeg_src), "rb") as f:
        data = f.read()
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) * 2 // 5])
    outside = os.path.join(work, "outside")
    os.makedirs(outside)
    shutil.copyfile(os.path.join(root, jpeg_src), os.path.join(outside, "secret.jpg"))
    os.symlink(os.path.join(outside, "secret.jpg"), os.path.join(root, "escape.jpg"))

    for rel in tree.src + tree.heavy + tree.small:
        with Image.open(os.path.join(root, rel)) as im:  # as /info reports it: EXIF orientation applied
            w, h = im.size
            tree.sizes[rel] = (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    for rel in tree.small + tree.medium:
        with open(os.path.join(root, rel), "rb") as f:
            tree.files[rel] = f.read()
        tree.digests[rel] = hashlib.sha1(tree.files[rel]).hexdigest()
    return tree


def prime(port: int, tree: Tree) -> None:
    """Reads from storage once, before any baseline: a file evicted from the page
    cache is served and transformed, so resources the server creates on first
    use (asyncfile's io_uring ring and its eventfd) exist before descriptors are
    counted, and later differences are leaks, not first uses."""
    for rel in (tree.large, tree.src[0]):
        fd = os.open(os.path.join(tree.root, rel), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for path in (tree.url(tree.large), tree.url(tree.src[0], "w=33"), tree.url(tree.src[0], endpoint="info")):
        status, _ = _servers.http_get(port, path, timeout=60)
        if status != 200:
            raise RuntimeError(f"{path} answered {status} while priming")


# ---------------------------------------------------------------------------
# The soak's requests


@dataclass
class Req:
    kind: str
    path: str
    expect: frozenset[str]
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    mode: str | None = None      # None, "disconnect" (mid-body), "abandon" (close after sending)
    check: Any = None            # what the body must be (see Soak.verify)
    check_rel: str = ""          # the file a 416 is about


#: Kinds of request and their share of the mix (per 1000).
MIX = {
    "transform, cached URL": 200,
    "transform, distinct size": 140,
    "transform, full-size corpus image": 5,
    "info": 50,
    "original, small": 100,
    "original, medium": 60,
    "HEAD original": 30,
    "range (206)": 80,
    "If-None-Match original (304)": 60,
    "If-Modified-Since original (304)": 20,
    "If-None-Match transform (304)": 20,
    "If-Match mismatch (412)": 20,
    "range past the end (416)": 30,
    "missing file (404)": 50,
    "bad parameters (400)": 40,
    "forbidden path (403)": 30,
    "not an image (415)": 10,
    "truncated image (422)": 10,
    "disconnect mid-body": 30,
    "close after sending (499)": 5,
}


class Plan:
    """The soak's requests, built from the tree and what a first look at the
    server said (ETags, Last-Modified): a fixed, shuffled list."""

    def __init__(self, tree: Tree, port: int, count: int, seed: int = 9) -> None:
        self.tree = tree
        self.rng = random.Random(seed)
        rng = self.rng
        self.validators: dict[str, tuple[str, str]] = {}
        for rel in tree.small + tree.medium:
            status, headers = head(port, tree.url(rel))
            if status != 200:
                raise RuntimeError(f"HEAD {rel} answered {status}")
            self.validators[rel] = (headers["etag"], headers["last-modified"])
        self.cached_urls = [tree.url(s, q) for s in tree.src
                            for q in ("w=64", "w=96&fm=webp", "w=128&h=128&fit=crop&fm=jpg", "h=100&fm=png")]
        self.transform_tags: list[tuple[str, str]] = []
        for url in self.cached_urls[::4][:6]:
            status, headers = head(port, url)
            if status == 200:
                self.transform_tags.append((url, headers["etag"]))
        # Distinct transforms: (source, width, format) never repeated.
        self._distinct = ((s, w, fm) for w in range(64, 100_000) for s in tree.src for fm in ("jpg", "webp"))
        self._heavy = ((s, w) for w in range(200, 100_000) for s in tree.heavy)
        self._missing = 0
        kinds, weights = zip(*MIX.items())
        self.requests = [self._make(k) for k in rng.choices(kinds, weights, k=count)]

    def _make(self, kind: str) -> Req:
        t, rng = self.tree, self.rng
        ok = frozenset({"200"})
        if kind == "transform, cached URL":
            return Req(kind, rng.choice(self.cached_urls), ok, check="image")
        if kind in ("transform, distinct size", "close after sending (499)"):
            src, w, fm = next(self._distinct)
            if kind == "transform, distinct size":
                return Req(kind, t.url(src, f"w={w}&fm={fm}&q=80"), ok, check=("image", w))
            return Req(kind, t.url(src, f"w={w}&fm={fm}&q=80"), frozenset({"abandoned"}), mode="abandon")
        if kind == "transform, full-size corpus image":
            src, w = next(self._heavy)
            return Req(kind, t.url(src, f"w={w}&fm=jpg&q=80"), ok, check=("image", w))
        if kind == "info":
            rel = rng.choice(t.src + t.heavy[:8])
            return Req(kind, t.url(rel, endpoint="info"), ok, check=("info", t.sizes[rel]))
        if kind == "original, small":
            rel = rng.choice(t.small)
            return Req(kind, t.url(rel), ok, check=("file", rel))
        if kind == "original, medium":
            rel = rng.choice(t.medium or t.small)
            return Req(kind, t.url(rel), ok, check=("file", rel))
        if kind == "HEAD original":
            rel = rng.choice(t.small + t.medium)
            return Req(kind, t.url(rel), ok, method="HEAD", check=("head", rel))
        if kind == "range (206)":
            rel = rng.choice(t.small + t.medium)
            size = len(t.files[rel])
            a = rng.randrange(0, size - 10)
            form = rng.randrange(3)
            if form == 0:
                b = min(size - 1, a + rng.randrange(1, 50_000))
                spec, (lo, hi) = f"bytes={a}-{b}", (a, b)
            elif form == 1:
                spec, (lo, hi) = f"bytes={a}-", (a, size - 1)
            else:
                n = rng.randrange(1, min(size, 20_000))
                spec, (lo, hi) = f"bytes=-{n}", (size - n, size - 1)
            return Req(kind, t.url(rel), frozenset({"206"}), headers={"Range": spec}, check=("range", rel, lo, hi))
        if kind == "If-None-Match original (304)":
            rel = rng.choice(t.small + t.medium)
            return Req(kind, t.url(rel), frozenset({"304"}), headers={"If-None-Match": self.validators[rel][0]},
                       check=("etag", self.validators[rel][0]))
        if kind == "If-Modified-Since original (304)":
            rel = rng.choice(t.small + t.medium)
            return Req(kind, t.url(rel), frozenset({"304"}),
                       headers={"If-Modified-Since": self.validators[rel][1]})
        if kind == "If-None-Match transform (304)":
            if not self.transform_tags:
                return self._make("transform, cached URL")
            url, tag = rng.choice(self.transform_tags)
            return Req(kind, url, frozenset({"304"}), headers={"If-None-Match": tag}, check=("etag", tag))
        if kind == "If-Match mismatch (412)":
            rel = rng.choice(t.small + t.medium)
            return Req(kind, t.url(rel), frozenset({"412"}), headers={"If-Match": '"not-this-one"'}, check="error")
        if kind == "range past the end (416)":
            rel = rng.choice(t.small + t.medium)
            return Req(kind, t.url(rel), frozenset({"416"}), headers={"Range": f"bytes={len(t.files[rel]) + 5}-"},
                       check="error", check_rel=rel)
        if kind == "missing file (404)":
            self._missing += 1
            # Half of them always the same name (remembered misses), half all different.
            name = "missing.jpg" if self._missing % 2 else f"missing-{self._missing}.jpg"
            return Req(kind, t.url(name, rng.choice(["", "w=100"])), frozenset({"404"}), check="error")
        if kind == "bad parameters (400)":
            query = rng.choice(["w=abc", "w=0", "fit=bogus&w=10", "fm=jp2&w=10", "q=101&w=10", "w=10&w=11",
                                "w=99999", "nope=1"])
            return Req(kind, t.url(rng.choice(t.src), query), frozenset({"400"}), check="error")
        if kind == "forbidden path (403)":
            path = rng.choice([t.url("escape.jpg"), t.url("escape.jpg", "w=50"), "/images/%2e%2e/outside/secret.jpg",
                               "/images/.hidden.jpg", "/info/escape.jpg"])
            return Req(kind, path, frozenset({"403"}), check="error")
        if kind == "not an image (415)":
            return Req(kind, t.url("not-an-image.jpg"), frozenset({"415"}), check="error")
        if kind == "truncated image (422)":
            return Req(kind, t.url("truncated.jpg", f"w={rng.randrange(20, 400)}"), frozenset({"422"}), check="error")
        if kind == "disconnect mid-body":
            return Req(kind, t.url(t.large), frozenset({"200"}), mode="disconnect")
        raise ValueError(kind)


def head(port: int, path: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("HEAD", path)
        r = conn.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# The closed-loop generator


class Answer:
    __slots__ = ("status", "headers", "body", "keep")

    def __init__(self, status: str, headers: dict[str, str], body: bytes, keep: bool) -> None:
        self.status, self.headers, self.body, self.keep = status, headers, body, keep


async def read_answer(reader: asyncio.StreamReader, method: str, stop_after: int | None = None) -> Answer:
    head_ = await reader.readuntil(b"\r\n\r\n")
    lines = head_.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)[1]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    keep = headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in ("204", "304") or status.startswith("1"):
        return Answer(status, headers, b"", keep)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        return Answer(status, headers, b"".join(parts), keep)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if stop_after is not None and length > stop_after:
            got = bytearray()
            while len(got) < stop_after:
                chunk = await reader.read(stop_after - len(got))
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(got), stop_after)
                got += chunk
            return Answer(status, headers, bytes(got), False)
        return Answer(status, headers, await reader.readexactly(length), keep)
    return Answer(status, headers, await reader.read(), False)


@dataclass
class Outcome:
    kind: str
    label: str          # the status, "disconnected", "abandoned", or "error: ..."
    ms: float
    problem: str | None = None


class Soak:
    def __init__(self, tree: Tree, port: int, plan: Plan, connections: int, sampler: Sampler,
                 checkpoints: Sequence[tuple[float, str]], timeout: float = 120.0) -> None:
        self.tree, self.port, self.plan = tree, port, plan
        self.connections = connections
        self.sampler = sampler
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self.next = 0
        self.done = 0
        self.decoded = 0
        self.stopping = False
        n = len(plan.requests)
        self._marks = sorted((max(1, int(f * n)), label) for f, label in checkpoints)
        self.marks: dict[str, Sample] = {}

    def verify(self, req: Req, a: Answer) -> str | None:
        """What is wrong with this answer (None: nothing)."""
        if a.status not in req.expect:
            return f"status {a.status}, expected {'/'.join(sorted(req.expect))}: {a.body[:120]!r}"
        if req.mode == "disconnect":
            return None
        cl = a.headers.get("content-length")
        if req.method != "HEAD" and a.status not in ("304",) and cl is not None and int(cl) != len(a.body):
            return f"Content-Length {cl} but {len(a.body)} bytes"
        if a.status.startswith("5"):
            return f"server error {a.status}"
        check = req.check
        if check is None:
            return None
        if check == "error":
            if a.headers.get("content-type") != "application/json" or b'"error"' not in a.body:
                return f"error answer is not a JSON error: {a.headers.get('content-type')} {a.body[:80]!r}"
            if "etag" in a.headers or "last-modified" in a.headers:
                return "error answer carries a representation's validators"
            if a.status == "416":  # RFC 9110 15.5.17: the current length, and nothing else
                rel = req.check_rel
                if a.headers.get("content-range") != f"bytes */{len(self.tree.files[rel])}":
                    return f"416 with Content-Range {a.headers.get('content-range')}"
            elif "content-range" in a.headers:
                return "error answer carries a Content-Range"
            return None
        if check == "image" or (isinstance(check, tuple) and check[0] == "image"):
            ctype = a.headers.get("content-type", "")
            if not ctype.startswith("image/"):
                return f"transform Content-Type {ctype}"
            want_w = check[1] if isinstance(check, tuple) else None
            self.decoded += 1
            if want_w is not None and self.decoded % 10 == 0:
                from PIL import Image

                with Image.open(io.BytesIO(a.body)) as im:
                    im.load()
                    if f"image/{im.format.lower()}" != ctype or im.width > want_w:
                        return f"transform is a {im.format} {im.size} for {ctype}, w={want_w}"
            return None
        what = check[0]
        if what == "file":
            rel = check[1]
            if hashlib.sha1(a.body).hexdigest() != self.tree.digests[rel]:
                return f"body of {rel} differs from the file ({len(a.body)} bytes)"
            if a.headers.get("etag") != self.plan.validators[rel][0]:
                return f"ETag {a.headers.get('etag')} for {rel}"
        elif what == "head":
            if int(cl or -1) != len(self.tree.files[check[1]]) or a.body:
                return "HEAD with a body or a wrong Content-Length"
        elif what == "range":
            rel, lo, hi = check[1:]
            data = self.tree.files[rel]
            if a.headers.get("content-range") != f"bytes {lo}-{hi}/{len(data)}" or a.body != data[lo:hi + 1]:
                return f"range {lo}-{hi} of {rel}: {a.headers.get('content-range')}, {len(a.body)} bytes"
        elif what == "etag":
            if a.headers.get("etag") != check[1] or a.body:
                return f"304 with ETag {a.headers.get('etag')} (sent {check[1]})"
        elif what == "info":
            doc = json.loads(a.body)
            if (doc.get("width"), doc.get("height")) != tuple(check[1]):
                return f"info {doc} for a {check[1]} image"
        return None

    def _advance(self) -> None:
        self.done += 1
        while self._marks and self.done >= self._marks[0][0]:
            _, label = self._marks.pop(0)
            self.marks[label] = self.sampler.mark(label)

    async def _worker(self) -> None:
        reader = writer = None
        reqs = self.plan.requests
        while self.next < len(reqs) and not self.stopping:
            req = reqs[self.next]
            self.next += 1
            extra = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
            raw = f"{req.method} {req.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n{extra}\r\n".encode()
            started = time.monotonic()
            problem = None
            try:
                if req.mode == "abandon":
                    # A new connection, the request, and gone before any answer.
                    _, w = await asyncio.open_connection(HOST, self.port)
                    w.write(raw)
                    await w.drain()
                    w.close()
                    label = "abandoned"
                else:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(HOST, self.port, limit=1 << 20), self.timeout)
                    writer.write(raw)
                    stop_after = DISCONNECT_AFTER if req.mode == "disconnect" else None
                    a = await asyncio.wait_for(read_answer(reader, req.method, stop_after), self.timeout)
                    label = a.status
                    problem = self.verify(req, a)
                    if req.mode == "disconnect":
                        label = "disconnected"
                        writer.transport.abort()
                        reader = writer = None
                    elif not a.keep:
                        writer.close()
                        reader = writer = None
            except asyncio.TimeoutError:
                label, problem = "client timeout", "no answer in time"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
                label, problem = f"error: {type(e).__name__}", f"{type(e).__name__}: {e}"
            if problem is None and label not in req.expect and label not in ("disconnected", "abandoned"):
                problem = f"{label}, expected {'/'.join(sorted(req.expect))}"
            if problem is not None and writer is not None:
                writer.transport.abort()
                reader = writer = None
            self.outcomes.append(Outcome(req.kind, label, 1000 * (time.monotonic() - started),
                                         f"{req.method} {req.path} {req.headers or ''}: {problem}" if problem else None))
            self._advance()
        if writer is not None:
            writer.close()

    async def run(self) -> float:
        """The whole load; Ctrl-C stops it (KeyboardInterrupt) at once.

        Not left to asyncio.run's own SIGINT handling, which cancels the main
        task: on Python 3.11 ``wait_for`` can swallow a cancellation that
        races with its answer, and that worker would then go on to the end.
        Here every worker also stops at its next request."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(self._worker()) for _ in range(self.connections)]

        def interrupted() -> None:
            self.stopping = True
            for t in tasks:
                t.cancel()

        handled = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # e.g. started with nohup ... &
        try:
            if handled:
                loop.add_signal_handler(signal.SIGINT, interrupted)
        except (NotImplementedError, RuntimeError, ValueError):
            handled = False  # not the main thread, or no signals here
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
        if self.stopping:
            raise KeyboardInterrupt
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return time.monotonic() - started


#: How each of the generator's labels shows in the server's imgserver_requests_total.
SERVER_STATUS = {"disconnected": "200", "abandoned": "499"}


def run_soak(args: argparse.Namespace, tree: Tree, server: _servers.Proc, port: int, sampler: Sampler) -> bool:
    print(f"## Soak: {args.requests:,} mixed requests, {args.connections} keep-alive connections (closed loop)\n")
    plan = Plan(tree, port, args.requests)
    wait_settled(port)
    before = scrape(port)
    steady_fds(server.pid)
    start = sampler.mark("started, before the load")
    fds_before = fd_targets(server.pid)
    # The warm-up, then four equal stretches.
    steps = [round(100 * (args.warmup + k * (1 - args.warmup) / 4)) for k in (1, 2, 3)]
    checkpoints = [(args.warmup, "after warm-up"), *((p / 100, f"{p} %") for p in steps)]
    soak = Soak(tree, port, plan, args.connections, sampler, checkpoints)
    sampler.done = lambda: soak.done
    sampler.phase = "soak"
    win = _servers.Window([server.pid])
    cpu0 = time.process_time()
    with win:
        wall = asyncio.run(soak.run())
    gen_cpu = time.process_time() - cpu0
    end = sampler.mark("end of the load")
    sampler.phase = "settling"
    settled = wait_settled(port)
    steady_fds(server.pid)
    idle = sampler.mark("idle again (connections closed)")
    fds_idle = fd_targets(server.pid)
    after = scrape(port)

    outs = soak.outcomes
    problems = [o.problem for o in outs if o.problem]
    labels = Counter(o.label for o in outs)
    warm = soak.marks.get("after warm-up", start)

    # RSS swings by the size of the images being decoded: each stretch of the
    # run is shown by its samples' min / median / max, not by one sample.
    order = [("started, before the load", start)]
    bounds = [(f"0-{round(100 * args.warmup)} % (warm-up)", warm)]
    previous = round(100 * args.warmup)
    for k in (f"{p} %" for p in steps):
        if k in soak.marks:
            bounds.append((f"{previous}-{k}", soak.marks[k]))
            previous = int(k.split()[0])
    bounds.append((f"{previous}-100 % (end of the load)", end))
    rows = [[order[0][0], 0, f"{start.rss_mb:.1f}", "-", start.fds, "-", start.threads]]
    segments = []
    prev = start
    for label, mark in bounds:
        span = sampler.between(prev, mark)
        rss = sorted(x.rss_mb for x in span) or [mark.rss_mb]
        fds = [x.fds for x in span] or [mark.fds]
        segments.append(rss)
        rows.append([label, mark.done, f"{mark.rss_mb:.1f}",
                     f"{rss[0]:.1f} / {_pct(rss, 50):.1f} / {rss[-1]:.1f}", mark.fds,
                     f"{min(fds)}-{max(fds)}", mark.threads])
        prev = mark
    rows.append([idle.label, idle.done, f"{idle.rss_mb:.1f}", "-", idle.fds, "-", idle.threads])
    print(table(["server process", "answers", "RSS MiB", "RSS min / median / max", "open fds",
                 "fds min-max", "threads"], rows))
    first, last = (segments[1], segments[-1]) if len(segments) > 2 else (segments[0], segments[-1])
    growth = _pct(last, 50) - _pct(first, 50)
    print(f"\nSamples once a second and at each mark. Median RSS of the last stretch minus that of the "
          f"stretch after the warm-up: {growth:+.1f} MiB ({100 * growth / _pct(first, 50):+.1f} %). "
          f"Idle fds {idle.fds} vs {start.fds} before the load (change: {fd_change(fds_before, fds_idle)}).")
    print(f"{len(outs):,} requests in {wall:.1f} s ({len(outs) / wall:,.0f}/s); server CPU "
          f"{win.cpu_per_s:.2f} s/s, generator (this process) {gen_cpu / wall:.2f} s/s, machine idle "
          f"{100 * win.idle:.0f} %.\n")

    # By kind.
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outs:
        by_kind[o.kind].append(o)
    rows = []
    for kind in MIX:
        group = by_kind.get(kind, [])
        if not group:
            continue
        ms = sorted(o.ms for o in group)
        statuses = Counter(o.label for o in group)
        rows.append([kind, len(group), ", ".join(f"{n:,} x {s}" for s, n in sorted(statuses.items())),
                     f"{_pct(ms, 50):.1f}", f"{_pct(ms, 99):.1f}", f"{ms[-1]:.1f}",
                     sum(1 for o in group if o.problem)])
    print(table(["request", "count", "answers", "p50 ms", "p99 ms", "max ms", "wrong"], rows))

    # Generator vs server.
    server_counts = requests_by_status(before, after)
    gen_counts: Counter[str] = Counter()
    for label, n in labels.items():
        gen_counts[SERVER_STATUS.get(label, label)] += n
    keys = sorted(set(server_counts) | set(gen_counts), key=lambda s: (not s.isdigit(), s))
    rows = []
    for k in keys:
        extra = ""
        if k == "200" and labels.get("disconnected"):
            extra = f" (incl. {labels['disconnected']:,} dropped mid-body)"
        if k == "499":
            extra = " (closed after sending)"
        rows.append([k, f"{gen_counts.get(k, 0):,}{extra}", f"{server_counts.get(k, 0):,}",
                     "yes" if gen_counts.get(k, 0) == server_counts.get(k, 0) else "NO"])
    print()
    print(table(["status", "generator", "server (imgserver_requests_total, images + info)", "same"], rows))

    processed = diff(before, after, "imgserver_processing_seconds_count")
    hits = diff(before, after, "imgserver_cache_hits_total")
    misses = diff(before, after, "imgserver_cache_misses_total")
    coalesced = diff(before, after, "imgserver_coalesced_total")
    distinct = sum(1 for r in plan.requests if r.kind in ("transform, distinct size", "transform, full-size corpus image"))
    abandoned = labels.get("abandoned", 0)
    ok_transforms = sum(1 for o in outs if o.label == "200" and (o.kind.startswith("transform") or o.kind == "info"))
    dropped = {lab: after[(n, l)] - before.get((n, l), 0) for (n, l), v in after.items()
               if n == "imgserver_connections_dropped_total" for lab in [dict(l).get("reason")]}
    rows = [
        ["transforms + /info answered 200", ok_transforms,
         f"{processed + hits + coalesced:,.0f} = processed {processed:,.0f} + cache hits {hits:,.0f} "
         f"+ shared {coalesced:,.0f}",
         f"the server may count up to the {abandoned} closed after sending more: their processing can finish"],
        ["distinct transforms (each must be processed)", distinct, f"processed {processed:,.0f}",
         "processed also counts first requests of cached URLs, /info, evictions, and closed-after-sending ones"],
        ["requests that shared another's processing", "-", f"{coalesced:,.0f}",
         "only identical requests in flight at once: first asks of the cached URLs and /info; never distinct sizes"],
        ["closed after sending", abandoned, f"{server_counts.get('499', 0):,} logged 499", ""],
        ["cache lookups (hits + misses)", "-", f"{hits + misses:,.0f}", ""],
        ["connections the server dropped", "-",
         ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(dropped.items()) if v) or "none", ""],
        ["files open in the loader, idle", "-", f"{metric(after, 'imgserver_open_descriptors'):.0f}", "must be 0"],
        ["/healthz once settled", "-", f"{settled.get('status')}, {settled.get('connections')} connection(s)", ""],
    ]
    print()
    print(table(["counter", "generator", "server", "note"], rows))

    fivexx = sum(n for s, n in gen_counts.items() if s.startswith("5")) + \
        sum(n for s, n in server_counts.items() if s.startswith("5"))
    counts_match = all(gen_counts.get(k, 0) == server_counts.get(k, 0) for k in keys)
    fd_leak = idle.fds > start.fds
    ok = not problems and not fivexx and counts_match and not fd_leak and \
        metric(after, "imgserver_open_descriptors") == 0
    print(f"\nChecks: wrong answers {len(problems)}; 5xx {fivexx}; generator and server counts "
          f"{'agree' if counts_match else 'DIFFER'}; idle descriptors {idle.fds} (before {start.fds}): "
          f"{'no leak' if not fd_leak else 'LEAK'} -> {'PASS' if ok else 'FAIL'}")
    for p in problems[:8]:
        print(f"  wrong: {p}")
    print()
    return ok


def _pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


# ---------------------------------------------------------------------------
# The attack


class Attack:
    """Stalled readers and slowloris connections, in a thread of their own (asyncio)."""

    def __init__(self, port: int, tree: Tree, stalled: int, slowloris: int, trickle: float,
                 retry_refused: float | None) -> None:
        self.port, self.tree = port, tree
        self.n_stalled, self.n_slowloris = stalled, slowloris
        self.trickle, self.retry_refused = trickle, retry_refused
        self.counts: Counter[str] = Counter()
        self.drop_times: list[float] = []       # stalled readers: request sent -> reset by the server
        self.slow_times: list[float] = []       # slowloris: connected -> closed by the server
        self.stalling = 0                        # stalled readers with a 200 not yet dropped
        self.peak_stalling = 0
        self.open_stalled = 0
        self.open_slow = 0
        self.started: set[str] = set()
        self.at_end = (0, 0, 0, 0)               # open stalled, streaming, open slowloris, unanswered           # attackers that have sent their first request
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="attack", daemon=True)
        self._ep = select.epoll()
        self._watch: dict[int, tuple[socket.socket, asyncio.Future[int], list[str | None]]] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop.add_reader(self._ep.fileno(), self._events)
        tasks = [asyncio.create_task(self._stalled(i)) for i in range(self.n_stalled)]
        tasks += [asyncio.create_task(self._slowloris(i)) for i in range(self.n_slowloris)]

        async def ramped() -> None:
            while len(self.started) < self.n_stalled + self.n_slowloris:
                await asyncio.sleep(0.05)
            self.ready.set()

        ramp = asyncio.create_task(ramped())
        await self._stop.wait()
        # What was held when the attack stopped (before the attackers leave).
        self.at_end = (self.open_stalled, self.stalling, self.open_slow,
                       sum(1 for _, _, st in self._watch.values() if st[0] is None))
        ramp.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.remove_reader(self._ep.fileno())
        for sock, _, _ in list(self._watch.values()):
            sock.close()
        self._ep.close()
        self.ready.set()

    def _events(self) -> None:
        for fd, ev in self._ep.poll(0, 1024):
            entry = self._watch.get(fd)
            if entry is None:
                continue
            sock, closed, status = entry
            if ev & select.EPOLLIN and status[0] is None:
                try:  # the status line, without taking anything off the socket
                    peek = sock.recv(16, socket.MSG_PEEK)
                    status[0] = peek.split(b" ")[1].decode() if peek.startswith(b"HTTP/") else "?"
                except (OSError, IndexError):
                    status[0] = "?"
                if status[0] == "200":
                    self.stalling += 1
                    self.peak_stalling = max(self.peak_stalling, self.stalling)
                else:
                    self.counts[f"stalled: answered {status[0]}"] += 1
                self._ep.modify(fd, select.EPOLLRDHUP)  # from now on only a reset or an end
                if status[0] != "200" and self.retry_refused is not None and not closed.done():
                    closed.set_result(0)  # a refusal: try again after retry_refused
            if ev & (select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP) and not closed.done():
                closed.set_result(ev)

    async def _stalled(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        request = (f"GET {self.tree.url(self.tree.large)} HTTP/1.1\r\nHost: {HOST}\r\n"
                   f"User-Agent: stalled-reader-{i}\r\n\r\n").encode()
        await asyncio.sleep(i * 0.003)  # spread the connects a little (300 in ~1 s)
        while True:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.setblocking(False)
            fd = sock.fileno()
            status: list[str | None] = [None]
            try:
                await loop.sock_connect(sock, (HOST, self.port))
                await loop.sock_sendall(sock, request)
            except OSError:
                self.counts["stalled: connect or send failed"] += 1
                sock.close()
                await asyncio.sleep(0.5)
                continue
            sent = time.monotonic()
            self.started.add(f"stalled-{i}")
            self.counts["stalled: requests sent"] += 1
            self.open_stalled += 1
            closed: asyncio.Future[int] = loop.create_future()
            self._watch[fd] = (sock, closed, status)
            self._ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            again = 0.0
            try:
                ev = await closed
                if status[0] == "200":
                    self.stalling -= 1
                    if ev & (select.EPOLLERR | select.EPOLLHUP):
                        self.counts["stalled: 200, then reset by the server"] += 1
                        self.drop_times.append(time.monotonic() - sent)
                    else:
                        self.counts["stalled: 200, then closed by the server"] += 1
                elif status[0] is None:
                    self.counts["stalled: closed before any answer"] += 1
                elif self.retry_refused is None:  # held open (unread) until the server closed it
                    self.counts[f"stalled: answered {status[0]}, held until closed by the server"] += 1
                else:
                    again = self.retry_refused
            finally:
                self._ep.unregister(fd)
                del self._watch[fd]
                sock.close()
                self.open_stalled -= 1
            await asyncio.sleep(again)

    async def _slowloris(self, i: int) -> None:
        await asyncio.sleep(i * 0.01)
        head_ = f"GET {self.tree.url(self.tree.small[0])} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: slowloris-{i}\r\n"
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                self.counts["slowloris: connect failed"] += 1
                await asyncio.sleep(0.5)
                continue
            self.counts["slowloris: connections"] += 1
            self.started.add(f"slowloris-{i}")
            self.open_slow += 1
            started = time.monotonic()

            async def trickle() -> None:
                n = 0
                data = head_.encode()
                while True:
                    for b in range(len(data)):
                        writer.write(data[b:b + 1])
                        await asyncio.sleep(self.trickle)
                    n += 1
                    data = f"X-Slow-{n}: a\r\n".encode()  # never the empty line that ends the headers

            sender = asyncio.create_task(trickle())
            try:
                answer = await reader.read()  # until the server closes
                took = time.monotonic() - started
                m = re.match(rb"HTTP/1\.1 (\d+)", answer)
                self.counts[f"slowloris: closed by the server with {m.group(1).decode() if m else 'no answer'}"] += 1
                self.slow_times.append(took)
            except OSError:
                self.counts["slowloris: reset by the server"] += 1
                self.slow_times.append(time.monotonic() - started)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
                writer.transport.abort()
                self.open_slow -= 1


class Probe:
    """Requests one at a time, a new connection each, timed from connect to the last byte."""

    def __init__(self, port: int, tree: Tree) -> None:
        self.port, self.tree = port, tree
        self.uncached = 0
        medium = tree.medium[len(tree.medium) // 2:] or [tree.large]
        self.kinds: list[tuple[str, Callable[[], str]]] = [
            ("cached transform", lambda: tree.url(tree.small[0], "w=48&fm=jpg")),
            ("uncached transform (new size each time)", self._uncached),
            (f"small original ({len(tree.files[tree.small[0]]) // 1024} KiB)", lambda: tree.url(tree.small[0])),
            (f"original over 64 KiB ({os.path.getsize(os.path.join(tree.root, medium[-1])) // 1024} KiB, "
             "needs a stream place)", lambda: tree.url(medium[-1])),
        ]

    def _uncached(self) -> str:
        self.uncached += 1
        src = self.tree.src[self.uncached % len(self.tree.src)]
        return self.tree.url(src, f"h={30 + self.uncached}&fm=jpg&q=80")

    def get(self, path: str) -> tuple[str, float]:
        started = time.monotonic()
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            status = str(r.status)
            cl = r.getheader("Content-Length")
            if cl is not None and int(cl) != len(body):
                status += " (short)"
        except (OSError, http.client.HTTPException) as e:
            status = f"error: {type(e).__name__}"
        finally:
            conn.close()
        return status, 1000 * (time.monotonic() - started)

    def run(self, seconds: float, phase: str, results: dict[tuple[str, str], list[tuple[str, float]]],
                healthz_seen: Counter[str] | None = None) -> None:
        deadline = time.monotonic() + seconds
        next_health = time.monotonic()
        while time.monotonic() < deadline:
            for name, path in self.kinds:
                results[(name, phase)].append(self.get(path()))
            if healthz_seen is not None and time.monotonic() >= next_health:
                status, doc = healthz(self.port)
                healthz_seen[f"{status} {doc.get('status')}: {', '.join(doc.get('reasons', [])) or '-'}"] += 1
                next_health = time.monotonic() + 1.0


def run_attack(args: argparse.Namespace, tree: Tree, server: _servers.Proc, port: int, sampler: Sampler) -> bool:
    print(f"## Attack: {args.stalled} stalled readers + {args.slowloris} slowloris connections, "
          f"server --send-timeout {args.send_timeout:g} --header-timeout {args.header_timeout:g} "
          f"--idle-timeout {args.idle_timeout:g}\n")
    probe = Probe(port, tree)
    for _, path in probe.kinds:  # warm: the cached transform is cached, the files are in the page cache
        probe.get(path())
    wait_settled(port)
    steady_fds(server.pid)
    results: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    sampler.phase = "quiet"
    quiet = sampler.mark("before the attack")
    fds_before = fd_targets(server.pid)
    probe.run(args.probe_seconds, "quiet", results)

    before = scrape(port)
    attack = Attack(port, tree, args.stalled, args.slowloris, args.trickle, args.retry_refused)
    sampler.phase = "attack"
    t0 = time.monotonic()
    attack.start()
    attack.ready.wait(60)
    ramp = time.monotonic() - t0
    seen: Counter[str] = Counter()
    start = sampler.mark("attack: all attackers connected")
    probe.run(args.attack_seconds, "attack", results, seen)
    during = sampler.mark("attack: end")
    attack.stop()
    sampler.phase = "after"
    settled = wait_settled(port)
    steady_fds(server.pid)
    after_s = sampler.mark("after the attack, settled")
    fds_after = fd_targets(server.pid)
    after = scrape(port)

    rows = []
    for name, _ in probe.kinds:
        for phase in ("quiet", "attack"):
            res = results[(name, phase)]
            ms = sorted(m for s, m in res if s == "200")
            statuses = Counter(s for s, _ in res)
            rows.append([name, "quiet server" if phase == "quiet" else "during the attack", len(res),
                         ", ".join(f"{n:,} x {s}" for s, n in sorted(statuses.items())),
                         f"{_pct(ms, 50):.1f}", f"{_pct(ms, 99):.1f}", f"{ms[-1]:.1f}" if ms else "-"])
    print(table(["probe (one at a time, new connection each)", "when", "requests", "answers",
                 "p50 ms", "p99 ms", "max ms"], rows))
    print(f"\n(200 answers only in the latency columns; probe {args.probe_seconds:g} s quiet, then "
          f"{args.attack_seconds:g} s of attack after the {ramp:.1f} s it took every attacker to connect.)\n")

    c = attack.counts
    send_drops = diff(before, after, "imgserver_connections_dropped_total", reason="send_timeout")
    header_drops = diff(before, after, "imgserver_connections_dropped_total", reason="header_timeout")
    idle_drops = diff(before, after, "imgserver_connections_dropped_total", reason="idle_timeout")
    streams_rejected = diff(before, after, "imgserver_streams_rejected_total")
    srv = requests_by_status(before, after)
    probe_counts: Counter[str] = Counter(s for (_, ph), res in results.items() if ph == "attack" for s, _ in res)
    open_stalled, streaming, open_slow, unanswered = attack.at_end
    stalled_200 = sum(v for k, v in c.items() if k.startswith("stalled: 200")) + streaming
    stalled_503 = c.get("stalled: answered 503", 0)
    held_503 = c.get("stalled: answered 503, held until closed by the server", 0)
    known = {"stalled: requests sent", "stalled: 200, then reset by the server", "stalled: answered 503",
             "stalled: answered 503, held until closed by the server",
             "slowloris: connections", "slowloris: closed by the server with 408"}
    others = {k: v for k, v in c.items() if k not in known}
    drop = sorted(attack.drop_times)
    slow = sorted(attack.slow_times)
    refused = ("held open unread until the server closed it" if args.retry_refused is None
               else f"closed and sent again after {args.retry_refused:g} s")
    rows = [
        ["stalled readers: requests for the large original", c.get("stalled: requests sent", 0), "-",
         f"{open_stalled} still connected at the end"],
        ["  answered 200, then never read", stalled_200, "-",
         f"at most {attack.peak_stalling} at once; {streaming} still streaming at the end"],
        ["  ... reset by the server", c.get("stalled: 200, then reset by the server", 0),
         f"{send_drops:,.0f} send_timeout drops",
         f"request -> reset: p50 {_pct(drop, 50):.1f} s, max {drop[-1] if drop else float('nan'):.1f} s"],
        ["  answered 503 (streams lane full)", stalled_503,
         f"{streams_rejected - probe_counts.get('503', 0):,.0f} streams_rejected (less the probe's)", refused],
        ["  ... closed by the server (idle timeout)", held_503, f"{idle_drops:,.0f} idle_timeout drops", ""],
        ["slowloris: connections", c.get("slowloris: connections", 0), "-",
         f"one byte every {args.trickle:g} s; {open_slow} still connected at the end"],
        ["  ... closed by the server with 408", c.get("slowloris: closed by the server with 408", 0),
         f"{header_drops:,.0f} header_timeout drops",
         f"connect -> closed: p50 {_pct(slow, 50):.1f} s, max {slow[-1] if slow else float('nan'):.1f} s"],
        ["other outcomes", sum(others.values()), "-", "; ".join(f"{k}: {v}" for k, v in others.items()) or "none"],
        ["/images answered 200 (stalled readers + probe)", stalled_200 + probe_counts.get("200", 0),
         f"{srv.get('200', 0):,}", "a stalled reader's 200 is logged when it is dropped or leaves"],
        ["/images answered 503 (stalled readers + probe)", stalled_503 + probe_counts.get("503", 0),
         f"{srv.get('503', 0):,}",
         f"{unanswered} stalled readers' answers were in flight at the end" if unanswered else ""],
    ]
    print(table(["attackers", "generator", "server", "note"], rows))

    span = sampler.between(start, during)
    rss = [s.rss_mb for s in span] or [start.rss_mb]
    fds = [s.fds for s in span] or [start.fds]
    rows = [
        [quiet.label, f"{quiet.rss_mb:.1f}", quiet.fds, quiet.threads],
        [f"during the attack (min-max, {len(span)} samples)", f"{min(rss):.1f}-{max(rss):.1f}",
         f"{min(fds)}-{max(fds)}", "-"],
        [after_s.label, f"{after_s.rss_mb:.1f}", after_s.fds, after_s.threads],
    ]
    print()
    print(table(["server process", "RSS MiB", "open fds", "threads"], rows))
    print("\n/healthz during the attack (once a second): "
          + "; ".join(f"{n} x {k}" for k, n in seen.most_common()))
    errors = sum(1 for res in results.values() for st, _ in res if not st[:1].isdigit()
                 or (st.startswith("5") and not st.startswith("503")))
    transforms_ok = all(s == "200" for (nm, ph), res in results.items() if "transform" in nm for s, _ in res)
    fd_leak = after_s.fds > quiet.fds
    ok = transforms_ok and not errors and not fd_leak and send_drops >= 1 and header_drops >= 1
    print(f"\nChecks: every probed transform answered 200: {'yes' if transforms_ok else 'NO'}; probe errors or "
          f"5xx other than 503: {errors}; stalled readers dropped: {send_drops:.0f}, slowloris dropped: "
          f"{header_drops:.0f}; descriptors after {after_s.fds} vs {quiet.fds} before "
          f"({'no leak' if not fd_leak else 'LEAK'}; change: {fd_change(fds_before, fds_after)}); settled: {settled.get('status')} -> "
          f"{'PASS' if ok else 'FAIL'}\n")
    return ok


# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="directory of images (JPEG, PNG, WebP)")
    parser.add_argument("--requests", type=int, default=40_000, help="soak requests (default 40000)")
    parser.add_argument("--connections", type=int, default=16, help="soak keep-alive connections (default 16)")
    parser.add_argument("--warmup", type=float, default=0.25,
                        help="share of the soak counted as warm-up (0.25: RSS reaches its plateau, malloc's "
                             "arenas their high-water mark, within the first ~10,000 requests)")
    parser.add_argument("--stalled", type=int, default=300, help="stalled readers (default 300)")
    parser.add_argument("--slowloris", type=int, default=100, help="slowloris connections (default 100)")
    parser.add_argument("--trickle", type=float, default=1.0, help="seconds between slowloris bytes (1)")
    parser.add_argument("--retry-refused", type=float, default=None, metavar="SECONDS",
                        help="a stalled reader answered 503 closes and asks again after SECONDS "
                             "(default: it holds the connection open, unread, until the server closes it)")
    parser.add_argument("--probe-seconds", type=float, default=10.0, help="probe on the quiet server (10)")
    parser.add_argument("--attack-seconds", type=float, default=25.0, help="probe during the attack (25)")
    parser.add_argument("--send-timeout", type=float, default=5.0, help="server --send-timeout (5)")
    parser.add_argument("--header-timeout", type=float, default=5.0, help="server --header-timeout (5)")
    parser.add_argument("--idle-timeout", type=float, default=10.0, help="server --idle-timeout (10)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the server (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--workers", type=int, default=2, help="server --workers (2)")
    parser.add_argument("--cache-mb", type=float, default=16, help="server --cache-mb (16)")
    parser.add_argument("--only", choices=("soak", "attack"), help="run one part only")
    args = parser.parse_args(argv)
    _servers.install_cleanup()
    _servers.raise_fd_limit(65536)

    corpus = os.path.abspath(args.corpus)
    work = tempfile.mkdtemp(prefix="bench-attack-soak-")
    server = None
    sampler = None
    try:
        tree = prepare_tree(corpus, work)
        extra = ["--send-timeout", f"{args.send_timeout:g}", "--header-timeout", f"{args.header_timeout:g}",
                 "--idle-timeout", f"{args.idle_timeout:g}"]
        for item in args.server_env:
            name, _, value = item.partition("=")
            os.environ[name] = value  # start_imgserver passes this process's environment on
        server, port = _servers.start_imgserver(tree.root, workers=args.workers, max_queue=100,
                                                cache_mb=args.cache_mb, backlog=1024, extra=extra, log_dir=work)
        sampler = Sampler(server.pid).start()
        print(f"imgserver (this checkout), pid {server.pid}: --workers {args.workers} --max-queue 100 "
              f"--cache-mb {args.cache_mb:g} {' '.join(extra)} --quiet (other limits at their defaults: "
              f"--max-streams 32, --max-connections 1024, --timeout 30); environment: "
              f"{' '.join(args.server_env) or 'glibc malloc at its defaults'}")
        prime(port, tree)
        print(f"root: {len(tree.heavy)} full-size corpus images of {len(corpus_files(corpus, IMAGE_EXTENSIONS))}, "
              f"{len(tree.src)} at 640 px, {len(tree.small)} small, large original "
              f"{os.path.getsize(os.path.join(tree.root, tree.large)) / 2**20:.1f} MiB; {os.cpu_count()} CPUs, "
              f"load average {_servers.load_average()}\n")
        ok = True
        if args.only in (None, "soak"):
            ok &= run_soak(args, tree, server, port, sampler)
        if args.only in (None, "attack"):
            ok &= run_attack(args, tree, server, port, sampler)
        if not server.alive():
            print(f"the server died:\n{server.tail()}")
            ok = False
        print(f"load average after: {_servers.load_average()}")
        return 0 if ok else 1
    finally:
        if sampler is not None:
            sampler.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    _servers.run_main(main)
