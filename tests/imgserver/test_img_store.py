"""The on-disk result store (imgserver/store.py) on real directories.

Round trips and restarts, every kind of broken entry (a miss, and removed),
the size bound and its least-recently-used order, two stores ("processes")
sharing one directory, a read-only store, a slow disk (FUSE), cancellation in
every state and close() during a write: nothing raised, nothing left behind.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from asyncfile import FileLoader
from http_helpers import get_reactor, sleep, wait_for
from imgserver import record
from imgserver.processing import Result
from imgserver.record import ResultKey
from imgserver.store import EVICT_TO, LAYOUT, REFRESH_AFTER, ResultStore
from imgserver.tiers import IResultTier

pytestmark = pytest.mark.timeout(60)




def key(n: int, variant: str = "w=100") -> ResultKey:
    return ResultKey(dev=2049, inode=1000 + n, size=5000 + n, mtime_ns=1_700_000_000_000_000_000 + n,
                     path=f"photos/img{n}.jpg", variant=variant)


def result(n: int, size: int = 1000) -> Result:
    body = (n.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return Result(body=body, content_type="image/webp", width=10 + n, height=20, format="WEBP")


def entry_path(directory: Path, k: ResultKey) -> Path:
    h = k.local_digest().hex()
    return directory / LAYOUT / h[:2] / f"{h}.img"


def write_entry(directory: Path, k: ResultKey, r: Result, mtime: float | None = None) -> Path:
    """An entry as a store writes it (what another process left)."""
    path = entry_path(directory, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.encode(k.local_digest(), r))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def record_size(r: Result) -> int:
    return len(record.encode(b"\0" * 16, r))


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def entries(directory: Path) -> list[Path]:
    return sorted((directory / LAYOUT).glob("*/*.img"))


def store_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "imgserver-store" in t.name]


class Stores:
    """Makes loaders and stores; everything is closed after the test, and
    nothing may be left open then."""

    def __init__(self) -> None:
        self.reactor = get_reactor()
        self.loaders: list[FileLoader] = []
        self.stores: list[ResultStore] = []

    def loader(self) -> FileLoader:
        made = FileLoader(self.reactor)
        self.loaders.append(made)
        return made

    async def start(self, directory: Path | str, max_bytes: int = 1 << 20, loader: FileLoader | None = None,
                    **kwargs: Any) -> ResultStore:
        store = self.make(directory, max_bytes, loader, **kwargs)
        await store.start()
        return store

    def make(self, directory: Path | str, max_bytes: int = 1 << 20, loader: FileLoader | None = None,
             **kwargs: Any) -> ResultStore:
        store = ResultStore(self.reactor, loader or self.loader(), str(directory), max_bytes, **kwargs)
        self.stores.append(store)
        return store

    async def close(self) -> None:
        await defer.gatherResults([s.close() for s in self.stores]).addTimeout(20, self.reactor)
        for made in self.loaders:
            assert made.stats()["active"] == 0, made.stats()
        await defer.gatherResults([made.close() for made in self.loaders]).addTimeout(20, self.reactor)


@pytest_twisted.async_yield_fixture
async def stores():
    made = Stores()
    yield made
    await made.close()
    await wait_for(made.reactor, lambda: store_threads() == [], 5, "the store's threads to end")


async def idle(store: ResultStore) -> None:
    """Wait until the store's background steps (removals, refreshes, scans) ended."""
    await wait_for(get_reactor(), lambda: not store._background and not store._ops, 10, "the store to be idle")


# --- basics ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_put_get_round_trip_and_layout(stores, tmp_path):
    store = await stores.start(tmp_path / "store")
    assert IResultTier.providedBy(store) and store.name == "store"
    assert store.stats()["available"] is True
    r = result(1)
    assert await store.put(key(1), r) is True
    path = entry_path(tmp_path / "store", key(1))
    assert path.is_file() and path.stat().st_size == record_size(r)
    assert await store.get(key(1)) == r
    assert await store.get(key(2)) is None
    assert await store.get(key(1, variant="w=200")) is None
    assert await store.has(key(1)) is True
    assert await store.has(key(2)) is False
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["stored"]) == (1, 2, 1)
    assert (stats["entries"], stats["bytes"]) == (1, record_size(r))
    assert (stats["corrupt"], stats["errors"], stats["timeouts"], stats["declined"]) == (0, 0, 0, 0)
    assert temp_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_large_result_is_checked_off_thread_and_round_trips(stores, tmp_path):
    store = await stores.start(tmp_path, max_bytes=16 << 20)
    r = result(3, size=1 << 20)
    assert await store.put(key(3), r) is True
    assert await store.get(key(3)) == r


@pytest_twisted.ensureDeferred
async def test_a_new_store_on_the_same_directory_finds_what_was_stored(stores, tmp_path):
    first = await stores.start(tmp_path)
    for n in range(3):
        assert await first.put(key(n), result(n))
    await first.close()
    assert await first.get(key(0)) is None  # closed: misses, declines
    assert await first.put(key(9), result(9)) is False
    second = await stores.start(tmp_path)
    assert second.stats()["entries"] == 3
    assert second.stats()["bytes"] == sum(record_size(result(n)) for n in range(3))
    for n in range(3):
        assert await second.get(key(n)) == result(n)
    assert second.stats()["hits"] == 3


@pytest_twisted.ensureDeferred
async def test_get_before_start_has_ended_waits_for_it(stores, tmp_path):
    write_entry(tmp_path, key(1), result(1))
    store = stores.make(tmp_path)
    assert await store.get(key(1)) is None  # not started at all: a miss
    started = store.start()
    got = store.get(key(1))
    await started
    assert await got == result(1)


@pytest_twisted.ensureDeferred
async def test_too_large_and_duplicate_puts_are_declined(stores, tmp_path):
    store = await stores.start(tmp_path, max_bytes=40_000)
    assert await store.put(key(1), result(1, size=20_000)) is False  # over a quarter of the store
    first = store.put(key(2), result(2))
    second = store.put(key(2), result(2))  # the same key being written
    assert await second is False
    assert await first is True
    assert store.stats()["declined"] == 2 and store.stats()["stored"] == 1


# --- broken entries ------------------------------------------------------------------


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _foreign(path: Path) -> None:
    path.write_bytes(record.encode(key(77).local_digest(), result(1)))


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(2000))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _longer(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"tail")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link_outside(path: Path) -> None:
    outside = path.parents[3] / "outside.img"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)


BREAKAGES = {"truncated": _cut, "flipped": _flip, "foreign-key": _foreign, "garbage": _garbage,
             "zero-length": _empty, "longer": _longer, "directory": _directory, "fifo": _fifo,
             "link-outside": _link_outside}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest_twisted.ensureDeferred
async def test_broken_entry_is_a_miss_and_is_removed(stores, tmp_path, breakage):
    directory = tmp_path / "store"
    directory.mkdir()
    path = write_entry(directory, key(1), result(1))
    BREAKAGES[breakage](path)
    store = await stores.start(directory)
    assert await store.get(key(1)) is None
    await idle(store)
    assert not os.path.lexists(path), breakage
    stats = store.stats()
    assert (stats["misses"], stats["corrupt"], stats["hits"], stats["errors"]) == (1, 1, 0, 0)
    if breakage == "link-outside":
        assert (tmp_path / "outside.img").exists()  # the link went, not its target
    # The store heals: a new result is stored and served.
    assert await store.put(key(1), result(1)) is True
    assert await store.get(key(1)) == result(1)


@pytest.mark.parametrize("breakage", ["truncated", "foreign-key", "zero-length", "directory"])
@pytest_twisted.ensureDeferred
async def test_has_refuses_a_broken_entry_and_removes_it(stores, tmp_path, breakage):
    path = write_entry(tmp_path, key(1), result(1))
    BREAKAGES[breakage](path)
    store = await stores.start(tmp_path)
    assert await store.has(key(1)) is False
    await idle(store)
    assert not os.path.lexists(path)


@pytest_twisted.ensureDeferred
async def test_a_corrupt_entry_replaced_meanwhile_by_a_good_one_is_kept(stores, tmp_path):
    """The removal checks the file is still the one found corrupt (another
    process may have renamed a good record over it)."""
    path = write_entry(tmp_path, key(1), result(1))
    store = await stores.start(tmp_path)
    from imgserver.store import _remove

    stale_identity = (path.stat().st_dev, path.stat().st_ino)
    os.link(path, tmp_path / "old")  # keeps the old inode alive: its number is not reused
    fresh = tmp_path / "fresh"
    fresh.write_bytes(path.read_bytes())
    os.rename(fresh, path)  # what a store in another process does
    assert (path.stat().st_dev, path.stat().st_ino) != stale_identity
    freed = await store._in_thread(_remove, store._root, os.path.relpath(path, tmp_path), stale_identity)
    assert freed == 0 and path.exists()


@pytest_twisted.ensureDeferred
async def test_stale_temporary_files_of_a_killed_writer_are_removed_by_a_scan(stores, tmp_path):
    k = key(1)
    final = write_entry(tmp_path, k, result(1))
    stale = final.parent / f".{final.name}.0123456789ab.tmp"
    fresh = final.parent / f".{final.name}.ba9876543210.tmp"
    stale.write_bytes(b"half a record")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store = await stores.start(tmp_path)
    assert not stale.exists() and fresh.exists() and final.exists()
    assert store.stats()["entries"] == 1


# --- the size bound ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hit_refreshes_mtime_at_most_once_a_minute(stores, tmp_path):
    old = time.time() - 3600
    path = write_entry(tmp_path, key(1), result(1), mtime=old)
    store = await stores.start(tmp_path)
    assert await store.get(key(1)) == result(1)
    await idle(store)
    refreshed = path.stat().st_mtime
    assert refreshed > time.time() - 10
    recent = time.time() - REFRESH_AFTER / 2
    os.utime(path, (recent, recent))
    assert await store.get(key(1)) == result(1)
    await idle(store)
    assert path.stat().st_mtime == pytest.approx(recent)  # not refreshed again


@pytest_twisted.ensureDeferred
async def test_size_bound_evicts_least_recently_used_down_to_90_percent(stores, tmp_path):
    size = record_size(result(0))
    max_bytes = 10 * size + size // 2  # room for 10 entries
    base = time.time() - 3600
    for n in range(10):
        write_entry(tmp_path, key(n), result(n), mtime=base + n)  # 0 oldest ... 9 youngest
    store = await stores.start(tmp_path, max_bytes=max_bytes)
    assert store.stats()["entries"] == 10 and store.stats()["evictions"] == 0
    assert await store.get(key(0)) == result(0)  # used: now the youngest
    await idle(store)
    assert await store.put(key(10), result(10))  # 11 entries: over the bound
    await wait_for(stores.reactor, lambda: store.stats()["evictions"] == 1, 10, "an eviction")
    await idle(store)
    left = {p.name for p in entries(tmp_path)}
    kept = int(max_bytes * EVICT_TO) // size  # 9
    assert len(left) == kept
    gone = [n for n in range(11) if entry_path(tmp_path, key(n)).name not in left]
    assert gone == [1, 2], "the least recently used go first; the entry just read stays"
    stats = store.stats()
    assert (stats["evicted"], stats["entries"], stats["bytes"]) == (2, kept, kept * size)
    assert sum(p.stat().st_size for p in entries(tmp_path)) <= max_bytes * EVICT_TO


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_directory_evict_once_not_twice(stores, tmp_path):
    """Two "processes" start on an over-full directory at once: one evicts (the
    lock), the other only measures; together they remove exactly what one
    eviction would, and both end up knowing the real size."""
    size = record_size(result(0))
    max_bytes = 10 * size + size // 2
    base = time.time() - 3600
    for n in range(30):
        write_entry(tmp_path, key(n), result(n), mtime=base + n)
    a, b = stores.make(tmp_path, max_bytes), stores.make(tmp_path, max_bytes)
    await defer.gatherResults([a.start(), b.start()])
    await wait_for(stores.reactor, lambda: not a._scanning and not b._scanning, 10, "the scans")
    kept = int(max_bytes * EVICT_TO) // size
    left = entries(tmp_path)
    assert len(left) == kept
    assert {p.name for p in left} == {entry_path(tmp_path, key(n)).name for n in range(30 - kept, 30)}
    assert a.stats()["evicted"] + b.stats()["evicted"] == 30 - kept
    assert a.stats()["evictions"] + b.stats()["evictions"] == 1
    # Both keep writing: each one's eviction keeps the shared directory bounded.
    for n in range(30, 50):
        store = a if n % 2 else b
        assert await store.put(key(n), result(n))
        await idle(store)
    await wait_for(stores.reactor, lambda: not a._scanning and not b._scanning, 10, "the scans")
    # Approximate across processes: each counts only its own writes between
    # scans and scans after writing 10% of the bound: about 10% per process.
    total = sum(p.stat().st_size for p in entries(tmp_path))
    assert total <= max_bytes * 1.2 + size
    assert a.stats()["evictions"] + b.stats()["evictions"] >= 2
    assert entry_path(tmp_path, key(49)).exists() and entry_path(tmp_path, key(48)).exists()


CHILD = """
import json, sys
from twisted.internet import defer, reactor
from asyncfile import FileLoader
from imgserver.processing import Result
from imgserver.record import ResultKey
from imgserver.store import ResultStore

directory, max_bytes, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

async def main():
    loader = FileLoader(reactor)
    store = ResultStore(reactor, loader, directory, max_bytes)
    await store.start()
    for n in range(first, first + count):
        k = ResultKey(2049, 1000 + n, 5000 + n, 1_700_000_000_000_000_000 + n, f"photos/img{n}.jpg", "w=100")
        body = (n.to_bytes(4, "big") * 251)[:1000]
        assert await store.put(k, Result(body, "image/webp", 10 + n, 20, "WEBP"))
    await store.close()
    await loader.close()
    print(json.dumps(store.stats()))

def run():
    d = defer.ensureDeferred(main())
    d.addErrback(lambda f: (f.printTraceback(), setattr(run, "failed", True)))
    d.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(run)
reactor.run()
sys.exit(1 if getattr(run, "failed", False) else 0)
"""


@pytest_twisted.ensureDeferred
async def test_a_second_process_writing_and_evicting_at_the_same_time(stores, tmp_path):
    """A real second process and this one write into one store at once, each
    evicting: the directory stays near its bound, every entry left is whole,
    no temporary file is left."""
    import json
    import sys

    from twisted.internet import utils

    size = record_size(result(0))
    max_bytes = 12 * size + size // 2
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    args = ["-c", CHILD, str(tmp_path), str(max_bytes), "1000", "150"]
    child = utils.getProcessOutputAndValue(sys.executable, args, env=env, path=repo)
    child.addTimeout(60, stores.reactor)
    store = await stores.start(tmp_path, max_bytes=max_bytes)
    await wait_for(stores.reactor, lambda: child.called or bool(entries(tmp_path)), 30, "the child's first write")
    overlapped = not child.called
    for n in range(150):
        assert await store.put(key(n), result(n))
    out, err, code = await child
    assert code == 0, err.decode()
    theirs = json.loads(out)
    assert theirs["stored"] == 150 and theirs["errors"] == 0
    assert overlapped, "the child had finished before this process started writing"
    # Once both stopped writing, the store is back near its bound soon, without another write: a scan
    # put off while the other process evicted is retried on a timer.
    await wait_for(stores.reactor, lambda: sum(p.stat().st_size for p in entries(tmp_path)) <= max_bytes * 1.2 + size,
                   10, "the store back near its bound")
    await idle(store)
    left = entries(tmp_path)
    assert sum(p.stat().st_size for p in left) <= max_bytes * 1.2 + size  # see the two-store test
    assert theirs["evictions"] + store.stats()["evictions"] >= 2
    names = {entry_path(tmp_path, key(n)).name: n for n in [*range(150), *range(1000, 1150)]}
    for p in left:
        n = names[p.name]
        assert record.decode(p.read_bytes(), key(n).local_digest()) == result(n)
    assert temp_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_no_eviction_while_another_process_holds_the_lock(stores, tmp_path, monkeypatch):
    size = record_size(result(0))
    max_bytes = 8 * size + size // 2
    (tmp_path / LAYOUT).mkdir()
    lock = os.open(tmp_path / LAYOUT / ".evict.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" is evicting (for longer than a store waits)
        monkeypatch.setattr("imgserver.store.LOCK_PATIENCE", 0.05)
        store = await stores.start(tmp_path, max_bytes=max_bytes)
        for n in range(10):
            assert await store.put(key(n), result(n))
            await idle(store)
        assert len(entries(tmp_path)) == 10 and store.stats()["evictions"] == 0
        assert store.stats()["bytes"] == 10 * size  # it measured, though
    finally:
        os.close(lock)
    assert await store.put(key(10), result(10))  # the lock is free: this store evicts now
    await wait_for(stores.reactor, lambda: store.stats()["evictions"] == 1, 10, "an eviction")
    assert len(entries(tmp_path)) == int(max_bytes * EVICT_TO) // size


# --- bad storage ---------------------------------------------------------------------------


@pytest.mark.slowfs(read_delay=0.0, attr_timeout=0.0)
@pytest_twisted.ensureDeferred
async def test_read_only_store_serves_what_it_has_and_declines_writes(stores, slow_fs):
    write_entry(Path(slow_fs.source), key(1), result(1))
    store = await stores.start(slow_fs.mount)
    assert store.stats()["entries"] == 1  # measured, though the eviction lock cannot be made
    assert await store.get(key(1)) == result(1)
    assert await store.get(key(2)) is None
    assert await store.put(key(2), result(2)) is False
    assert await store.put(key(3), result(3)) is False  # declined at once now
    stats = store.stats()
    assert stats["declined"] == 2 and stats["stored"] == 0 and stats["hits"] == 1
    assert temp_files(Path(slow_fs.source)) == []


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_be_created_misses_and_declines(stores, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    store = await stores.start(blocker / "store")
    assert store.stats()["available"] is False
    assert await store.get(key(1)) is None
    assert await store.has(key(1)) is False
    assert await store.put(key(1), result(1)) is False


@pytest.mark.slowfs(read_delay=1.0, open_delay=1.0)
@pytest_twisted.ensureDeferred
async def test_slow_disk_get_misses_within_its_timeout(stores, slow_fs):
    write_entry(Path(slow_fs.source), key(1), result(1))
    loader = stores.loader()
    store = await stores.start(slow_fs.mount, loader=loader, timeout=0.2)
    for lookup, wanted in ((store.get, None), (store.has, False)):
        started = time.monotonic()
        assert await lookup(key(1)) is wanted
        assert time.monotonic() - started < 0.7
    stats = store.stats()
    assert stats["timeouts"] == 2 and stats["misses"] == 1 and stats["errors"] == 0
    # The abandoned opens end when the slow disk answers; nothing stays held.
    await wait_for(stores.reactor, lambda: loader.stats()["active"] == 0, 10, "the opens to end")


@pytest.mark.slowfs(read_delay=0.2, open_delay=0.2, getattr_delay=0.05, attr_timeout=0.0)
@pytest_twisted.ensureDeferred
async def test_slow_disk_never_stalls_the_reactor(stores, slow_fs):
    """Start (mkdir, root, scan), lookups and a declined write on storage whose
    every call is slow: the reactor keeps turning."""
    for n in range(5):
        write_entry(Path(slow_fs.source), key(n), result(n))
    reactor = stores.reactor
    lags: list[float] = []
    last = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        lags.append(now - last[0])
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.clock = reactor
    ticker.start(0.01)
    try:
        store = await stores.start(slow_fs.mount, timeout=3.0)
        assert store.stats()["entries"] == 5
        got = await defer.gatherResults([store.get(key(n)) for n in range(5)] + [store.has(key(9))])
        assert got == [result(n) for n in range(5)] + [False]
        assert await store.put(key(7), result(7)) is False
    finally:
        ticker.stop()
    assert max(lags) < 0.15, max(lags)  # one blocking open alone would take 0.2 s


# --- cancellation and close ------------------------------------------------------------------


def _fds() -> set[str]:
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def cancel_points() -> Any:
    """Reactor turns to cancel after: every one at first, then more sparsely."""
    turns = 0
    while True:
        yield turns
        turns = turns + 1 if turns < 8 else turns + turns // 4


@pytest.mark.parametrize("operation", ["get", "get-large", "has", "put", "put-large"])
@pytest_twisted.ensureDeferred
async def test_cancel_in_every_state_leaves_nothing_behind(stores, tmp_path, operation):
    """Cancel after 0, 1, 2, ... reactor turns, until the operation ends by
    itself: every state it passes through (waiting, opening, reading or
    writing in a thread, committing) gets cancelled."""
    reactor = stores.reactor
    loader = stores.loader()
    store = await stores.start(tmp_path, max_bytes=64 << 20, loader=loader)
    size = 1 << 20 if operation.endswith("-large") else 1000  # large: several reads, hashed off thread
    write_entry(tmp_path, key(0), result(0, size))
    await store.get(key(0))  # fan-out dirs, lazy imports: warmed up
    await idle(store)
    before = _fds()
    tried = 0
    seen: set[str] = set()  # what the loader held for the store when it was cancelled
    for n, turns in enumerate(cancel_points(), start=1):
        if operation.startswith("put"):
            d = store.put(key(n), result(n, size))
        elif operation.startswith("get"):
            write_entry(tmp_path, key(n), result(n, size))
            d = store.get(key(n))
        else:
            write_entry(tmp_path, key(n), result(n, size))
            d = store.has(key(n))
        got: list[Any] = []
        d.addBoth(got.append)
        for _ in range(turns):
            if got:
                break
            await task.deferLater(reactor, 0, lambda: None)
        finished = bool(got)
        seen |= {f"{type(h).__name__}:{h.state.value}" for h in loader._handles}
        d.cancel()
        assert len(got) == 1 and not isinstance(got[0], Exception), got  # never fails
        await idle(store)
        await wait_for(reactor, lambda: loader.stats()["active"] == 0, 10, "the loader's places")
        assert temp_files(tmp_path) == []
        assert _fds() <= before, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _fds() - before}
        path = entry_path(tmp_path, key(n))
        if path.exists():  # whole or not at all
            assert record.decode(path.read_bytes(), key(n).local_digest()) == result(n, size)
            path.unlink()
        if finished:
            break
        tried += 1
        assert turns < 10_000
    if operation not in ("get", "has"):  # a small cached entry is read in one turn
        assert tried >= 2, "cancelled in more than one state"
    if operation == "get-large":
        assert "FileHandle:open" in seen, seen


class Park:
    """Wraps a blocking step: its first call waits (in its thread) until released."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.reached = threading.Event()
        self.go = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.reached.is_set():
            self.reached.set()
            self.go.wait(20)
        return self.real(*args, **kwargs)


STEPS = {"fan-out mkdir": ("imgserver.store", "_make_fanout"), "temp open": ("asyncfile.writer", "_os_open"),
         "write": ("asyncfile.writer", "_os_write"), "rename": ("asyncfile.writer", "_os_rename")}


@pytest.mark.parametrize("action", ["cancel", "close"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest_twisted.ensureDeferred
async def test_put_cancelled_or_closed_while_each_step_runs(stores, tmp_path, monkeypatch, step, action):
    """The put answers at once; once the parked step ends, no temporary file,
    no place, no descriptor is left, and the entry is whole or absent."""
    import importlib

    reactor = stores.reactor
    loader = stores.loader()
    store = await stores.start(tmp_path, loader=loader)
    module, name = STEPS[step]
    park = Park(getattr(importlib.import_module(module), name))
    monkeypatch.setattr(importlib.import_module(module), name, park)
    before = _fds()
    d = store.put(key(1), result(1))
    got: list[Any] = []
    d.addBoth(got.append)
    await wait_for(reactor, park.reached.is_set, 10, f"the put to reach {step}")
    try:
        if action == "cancel":
            d.cancel()
            assert got == [False]
            closing = None
        else:
            closing = store.close()
            await sleep(reactor, 0.05)  # a negative check: nothing to await, close() must not fire yet
            assert got == [False]  # the put answered, though its step still runs
            assert not closing.called  # close() waits until it has released everything
    finally:
        park.go.set()
    if closing is not None:
        await closing.addTimeout(10, reactor)
        assert store_threads() == [] or await wait_for(reactor, lambda: store_threads() == [], 5) >= 0
    await idle(store)
    await wait_for(reactor, lambda: loader.stats()["active"] == 0, 10, "the loader's places")
    assert temp_files(tmp_path) == []
    assert _fds() <= before
    path = entry_path(tmp_path, key(1))
    if path.exists():  # a rename already under way completes
        assert step == "rename"
        assert record.decode(path.read_bytes(), key(1).local_digest()) == result(1)
    assert store.stats()["errors"] == 0


@pytest_twisted.ensureDeferred
async def test_close_during_puts_aborts_them_and_releases_everything(stores, tmp_path):
    loader = stores.loader()
    store = await stores.start(tmp_path, max_bytes=256 << 20, loader=loader)
    puts = [store.put(key(n), result(n, 8 << 20)) for n in range(4)]
    gets = [store.get(key(n)) for n in range(4)]
    await task.deferLater(stores.reactor, 0, lambda: None)
    await store.close().addTimeout(20, stores.reactor)
    outcomes = await defer.gatherResults(puts + gets)
    assert all(o in (True, False, None) for o in outcomes)
    assert temp_files(tmp_path) == []
    assert loader.stats()["active"] == 0
    await wait_for(stores.reactor, lambda: store_threads() == [], 5, "the store's threads to end")
    assert store._root is None
    for n in range(4):  # a write that committed before close is whole
        path = entry_path(tmp_path, key(n))
        if path.exists():
            assert record.decode(path.read_bytes(), key(n).local_digest()) == result(n, 8 << 20)


# --- regressions (review of issue 11) ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_link_to_another_entry_inside_the_store_is_a_miss_and_is_removed(stores, tmp_path):
    """A symlink in place of an entry, leading to another key's record beneath
    the store, is not a record for the key: a miss, and the link (only) is
    removed -- it used to stay forever (its removal compared the target's
    identity with the link's), costing an open and a read on every lookup."""
    other = write_entry(tmp_path, key(2), result(2))
    path = entry_path(tmp_path, key(1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(other, path.parent))  # relative: it stays beneath the root
    store = await stores.start(tmp_path)
    assert await store.get(key(1)) is None
    await idle(store)
    assert not os.path.lexists(path)
    assert other.exists() and await store.get(key(2)) == result(2)  # the target is untouched
    stats = store.stats()
    assert (stats["corrupt"], stats["errors"]) == (1, 0)


@pytest.mark.slowfs(read_delay=0.0, attr_timeout=0.0)
@pytest_twisted.ensureDeferred
async def test_read_only_store_serves_old_entries_without_counting_errors(stores, slow_fs):
    """A hit on an entry older than REFRESH_AFTER moves its mtime; on a read-only
    store that fails (EROFS): an expected state, like a declined write -- not an
    error counted (and logged with a traceback) on every such hit."""
    write_entry(Path(slow_fs.source), key(1), result(1), mtime=time.time() - 3600)
    store = await stores.start(slow_fs.mount)
    for _ in range(3):
        assert await store.get(key(1)) == result(1)
        await idle(store)
    stats = store.stats()
    assert (stats["hits"], stats["errors"]) == (3, 0)
