"""Races with the file system (issue 9, item 7), against a real server on 127.0.0.1.

While originals, ranges, HEADs, conditionals, transforms and /info requests
are in flight in a loop, a thread changes the files they name as fast as it
can: atomic replacement by another image of another size (rename), truncation
in place, a swap for a symlink to a file outside the root (and back),
deletion and re-creation (a hard link into place).  Every state a name ever
had has a size no other state had, so the bytes of a state are known from its
size alone; the thread records each state (size -> bytes, size -> inode).

For every answer:

* the status is one of 200, 206, 304, 403, 404, 412, 415, 416, 422 (a
  connection cut short is allowed only for an original whose file shrank
  while it was sent: the promised length cannot be met);
* a 200 original is, in full, one state's bytes, and its ETag (dev, inode,
  size, mtime) names that state's inode and size, its Content-Length that
  size, its Content-Type the format those bytes start with;
* a 206 is the requested slice of the state its Content-Range's total
  length and its ETag name;
* a HEAD's Content-Length is the size in its ETag, a state's size;
* a transform decodes, is no wider than asked, and is not the outside image
  (pure green; every image inside is grey noise or has little green);
  /info never describes the outside image (its size is unique) and its byte
  count is a state's size;
* no body ever contains the outside file's bytes.

At the end the service holds no descriptor and the test process has no more
descriptors open than before the race.  Bounded: ``RACE_SECONDS`` of racing.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import threading
from collections import Counter
from typing import Any

import pytest_twisted
from http_helpers import Client, fd_count, get_reactor, port_of, start_server, wait_for
from img_helpers import encode, noisy
from PIL import Image, ImageStat
from twisted.internet import defer, threads

RACE_SECONDS = 3.0
#: Requests in flight at once.
IN_FLIGHT = 12
ALLOWED = {200, 206, 304, 403, 404, 412, 415, 416, 422}
NAMES = ("r0.jpg", "r1.png", "r2.jpg")
#: The one name that is deleted and re-created (a miss is remembered for a
#: second, so a name that is deleted often answers 404 most of the time).
DELETED = "r2.jpg"
#: The outside file: a size no image inside has, pure green.
OUTSIDE_SIZE = (77, 55)
_ETAG = re.compile(r'^"([0-9a-f]+)-([0-9a-f]+)-([0-9a-f]+)-([0-9a-f]+)"$')


def _bases() -> list[bytes]:
    """Images to write: noisy ones (over 64 KiB: streamed originals) and small
    flat ones, JPEG and PNG; none green."""
    rng = random.Random(7)
    out = []
    for size in ((180, 140), (260, 200), (320, 240)):
        out.append(encode(noisy(size), "JPEG", quality=95))
        out.append(encode(noisy(size), "PNG"))
    for colour in ((200, 30, 40), (40, 30, 200), (180, 60, 180)):
        size = (rng.randrange(20, 90), rng.randrange(20, 90))
        out.append(encode(Image.new("RGB", size, colour), "JPEG"))
        out.append(encode(Image.new("RGB", size, colour), "PNG"))
    return out


class Mutator(threading.Thread):
    """Changes the files under ``root`` until ``stop`` is set; records every
    state a name has had: ``states[size] = bytes``, ``inodes[size] = inode``."""

    def __init__(self, root: str, staging: str, outside: str, bases: list[bytes]) -> None:
        super().__init__(name="fs-mutator", daemon=True)
        self.root, self.staging, self.outside = root, staging, outside
        self.bases = bases
        self.rng = random.Random(1234)
        self.stop = threading.Event()
        self.states: dict[int, bytes] = {}
        self.inodes: dict[int, int] = {}
        self.current: dict[str, bytes | None] = {}
        self.kind: dict[str, str] = {}  # "file", "link", "missing"
        self.ops: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._n = itertools.count()

    # -- states -------------------------------------------------------------
    def _unique(self, base: bytes) -> bytes:
        """``base`` padded (trailing zeros, ignored by decoders) to a size no state had."""
        size = len(base)
        while size in self.states:
            size += 1
        return base + b"\0" * (size - len(base))

    def _staged(self, data: bytes) -> str:
        path = os.path.join(self.staging, f"v{next(self._n)}")
        with open(path, "wb") as f:
            f.write(data)
        st = os.stat(path)
        self.states[len(data)] = data
        self.inodes[len(data)] = st.st_ino
        return path

    def place(self, name: str) -> None:
        """A new version, renamed over whatever the name is (file, symlink, nothing)."""
        data = self._unique(self.rng.choice(self.bases))
        os.rename(self._staged(data), os.path.join(self.root, name))
        self.current[name], self.kind[name] = data, "file"

    # -- operations ---------------------------------------------------------
    def truncate(self, name: str) -> None:
        data = self.current[name]
        assert data is not None
        for _ in range(20):
            size = self.rng.randrange(16, len(data)) if len(data) > 17 else 0
            if size and size not in self.states:
                break
        else:
            return
        path = os.path.join(self.root, name)
        os.truncate(path, size)
        self.states[size] = data[:size]
        self.inodes[size] = os.stat(path).st_ino
        self.current[name] = data[:size]

    def to_symlink(self, name: str) -> None:
        link = os.path.join(self.staging, f"l{next(self._n)}")
        os.symlink(self.outside, link)
        os.rename(link, os.path.join(self.root, name))
        self.current[name], self.kind[name] = None, "link"

    def delete(self, name: str) -> None:
        os.unlink(os.path.join(self.root, name))
        self.current[name], self.kind[name] = None, "missing"

    def recreate(self, name: str) -> None:
        staged = self._staged(self._unique(self.rng.choice(self.bases)))
        os.link(staged, os.path.join(self.root, name))  # appears whole, like a new file
        os.unlink(staged)
        self.current[name] = self.states[os.path.getsize(os.path.join(self.root, name))]
        self.kind[name] = "file"

    def step(self) -> None:
        name = self.rng.choice(NAMES)
        kind = self.kind[name]
        if kind == "file" and name == DELETED:
            op = self.rng.choice(["replace", "truncate", "delete"])
        elif kind == "file":
            op = self.rng.choice(["replace", "replace", "truncate", "symlink"])
        elif kind == "link":
            op = "replace"  # back to a file inside the root
        else:
            op = "recreate"
        {"replace": self.place, "truncate": self.truncate, "symlink": self.to_symlink,
         "delete": self.delete, "recreate": self.recreate}[op](name)
        self.ops[op] += 1

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                # Let each state stand for a moment (up to 2 ms), so requests meet
                # every kind of state, not only the transitions.
                self.stop.wait(self.rng.random() * 0.002)
        except BaseException as e:  # reported by the test
            self.error = e


class Outcome:
    def __init__(self, kind: str, name: str, reply: Any = None, failure: Any = None, extra: Any = None) -> None:
        self.kind, self.name, self.reply, self.failure, self.extra = kind, name, reply, failure, extra


def _etag_fields(tag: str | None) -> tuple[int, int, int, int]:
    m = _ETAG.match(tag or "")
    assert m, f"not a strong ETag of dev, inode, size, mtime: {tag!r}"
    return tuple(int(g, 16) for g in m.groups())  # type: ignore[return-value]


def _sniffed(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


@pytest_twisted.ensureDeferred
async def test_answers_stay_consistent_while_files_are_replaced_truncated_swapped_and_deleted(tmp_path):
    reactor = get_reactor()
    root, staging, outside_dir = tmp_path / "root", tmp_path / "staging", tmp_path / "outside"
    for d in (root, staging, outside_dir):
        d.mkdir()
    outside_bytes = encode(Image.new("RGB", OUTSIDE_SIZE, (0, 255, 0)), "PNG")
    outside = outside_dir / "secret.png"
    outside.write_bytes(outside_bytes)
    mutator = Mutator(str(root), str(staging), str(outside), _bases())
    assert len(outside_bytes) not in {len(b) for b in mutator.bases}
    mutator.states[len(outside_bytes)] = b""  # reserved: no state inside has the outside file's size
    for name in NAMES:
        mutator.place(name)

    server = await start_server(reactor, root=str(root), workers=2, timeout=20)
    client = Client(reactor, port_of(server))
    rng = random.Random(99)
    seen_tags: list[str] = []
    outcomes: list[Outcome] = []
    try:
        # Warm-up outside the race: every kind of request once (one-time
        # descriptors, e.g. the mount table, are opened here).
        for path in ("/images/r0.jpg", "/images/r0.jpg?w=20&fm=png", "/info/r2.png", "/images/nope.jpg"):
            await client.get(path)
        await wait_for(reactor, lambda: server.service.loader.stats()["open"] == 0, what="warm-up finished")
        fds_before = fd_count()

        def request() -> defer.Deferred[Outcome]:
            name = rng.choice(NAMES)
            kind = rng.choice(["original", "original", "range", "suffix", "head", "transform", "transform",
                               "info", "if-none-match", "if-match"])
            headers: dict[str, str] = {}
            method, path, extra = "GET", f"/images/{name}", None
            if kind == "range":
                a = rng.randrange(0, 3000)
                headers["Range"] = f"bytes={a}-{a + rng.randrange(0, 90_000)}"
            elif kind == "suffix":
                headers["Range"] = f"bytes=-{rng.randrange(1, 5000)}"
            elif kind == "head":
                method = "HEAD"
            elif kind == "transform":
                extra = rng.randrange(8, 48)
                path += f"?w={extra}&fm=png"
            elif kind == "info":
                path = f"/info/{name}"
            elif kind in ("if-none-match", "if-match") and seen_tags:
                headers["If-None-Match" if kind == "if-none-match" else "If-Match"] = rng.choice(seen_tags[-20:])
            d = client.get(path, method=method, headers=headers)
            d.addCallbacks(lambda reply: Outcome(kind, name, reply, extra=extra),
                           lambda failure: Outcome(kind, name, failure=failure, extra=extra))
            return d

        async def loop() -> None:
            while reactor.seconds() < deadline and mutator.is_alive():
                o = await request()
                outcomes.append(o)
                if o.reply is not None and o.reply.code == 200 and o.kind in ("original", "head"):
                    seen_tags.append(o.reply.header("etag"))

        mutator.start()
        deadline = reactor.seconds() + RACE_SECONDS
        try:
            await defer.gatherResults([defer.Deferred.fromCoroutine(loop()) for _ in range(IN_FLIGHT)])
        finally:
            mutator.stop.set()
            await threads.deferToThread(mutator.join, 10)
        assert mutator.error is None, f"the mutator failed: {mutator.error!r}"

        await wait_for(reactor, lambda: server.service.loader.stats()["open"] == 0 and server.service.busy() == 0,
                       timeout=10, what="every descriptor of the service closed")
        await client.close()
        await wait_for(reactor, lambda: fd_count() <= fds_before, timeout=5,
                       what=f"descriptors back to {fds_before} (now {fd_count()})")
    finally:
        await client.close()
        await server.stop(grace=5)

    _check(outcomes, mutator, outside_bytes)


def _check(outcomes: list[Outcome], mutator: Mutator, outside_bytes: bytes) -> None:
    states, inodes = mutator.states, mutator.inodes
    statuses: Counter[Any] = Counter()
    cut_short = 0
    for o in outcomes:
        where = f"{o.kind} {o.name}"
        if o.failure is not None:
            # Only an original (whole or ranged) may be cut short: its file
            # shrank after the headers went out.
            assert o.kind in ("original", "range", "suffix", "if-none-match", "if-match"), (where, o.failure)
            cut_short += 1
            statuses["cut short"] += 1
            continue
        r = o.reply
        statuses[r.code] += 1
        assert r.code in ALLOWED, (where, r.code, r.body[:200])
        assert outside_bytes[:64] not in r.body, f"{where}: bytes of the file outside the root"
        if r.code >= 400:
            assert r.header("content-type") == "application/json", (where, r.code)
            assert r.header("etag") is None
            continue
        if r.code == 304:
            assert r.body == b""
            continue
        if o.kind == "transform":
            assert int(r.header("content-length")) == len(r.body), where
            im = Image.open(io.BytesIO(r.body))
            im.load()
            assert im.format == "PNG" and im.width <= o.extra, (where, im.format, im.size)
            red, green, blue = ImageStat.Stat(im.convert("RGB")).mean
            assert green - max(red, blue) < 100, f"{where}: a thumbnail of the green file outside the root"
            continue
        if o.kind == "info":
            doc = json.loads(r.body)
            assert (doc["width"], doc["height"]) != OUTSIDE_SIZE, f"{where}: /info of the file outside the root"
            assert doc["bytes"] in states and doc["bytes"] != len(outside_bytes), (where, doc)
            continue
        _, inode, size, _ = _etag_fields(r.header("etag"))
        assert size in states and size != len(outside_bytes), (where, r.header("etag"))
        assert inode == inodes[size], f"{where}: ETag names inode {inode}, but size {size} was inode {inodes[size]}"
        data = states[size]
        assert r.header("content-type") == _sniffed(data), (where, r.header("content-type"))
        if o.kind == "head":
            assert r.body == b"" and int(r.header("content-length")) == size, where
        elif r.code == 200:
            assert int(r.header("content-length")) == len(r.body) == size, (where, len(r.body), size)
            assert r.body == data, f"{where}: a 200 whose bytes are not those of the state its ETag names"
            assert r.header("content-range") is None
        else:
            assert r.code == 206, where
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.header("content-range") or "")
            assert m, (where, r.header("content-range"))
            first, last, total = map(int, m.groups())
            assert total == size, (where, r.header("content-range"), r.header("etag"))
            assert int(r.header("content-length")) == len(r.body) == last - first + 1, where
            assert r.body == data[first:last + 1], f"{where}: a 206 whose bytes are not its state's slice"

    # The race really happened: every kind of change, and answers of every kind.
    ops = mutator.ops
    if os.environ.get("FS_RACES_VERBOSE"):
        print(f"\nchanges: {dict(ops)}; answers: {dict(statuses)}; by kind: "
              f"{dict(Counter((o.kind, o.reply.code if o.reply else 'cut') for o in outcomes))}")
    assert min(ops[op] for op in ("replace", "truncate", "symlink", "delete", "recreate")) >= 5, ops
    assert len(outcomes) >= 100, statuses
    assert statuses[200] >= 20 and statuses[206] >= 5, statuses
    assert statuses[403] + statuses[404] >= 5, statuses  # a symlink out of the root, or nothing there
    assert cut_short <= len(outcomes) // 4, statuses
