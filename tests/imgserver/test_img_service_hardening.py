"""The service against changing files and hostile load (issue 9): one descriptor
per request, result-cache keys with the inode, overload as 503 + Retry-After,
memory-aware admission, real cache sizes, shared bodies for slow clients.

Real servers on 127.0.0.1 (``http_helpers``), real files in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import tracemalloc

import pytest
import pytest_twisted
from http_helpers import Servers, get_reactor, port_of, sleep, slow_reader, wait_for
from img_helpers import encode
from PIL import Image
from twisted.internet import defer, threads

from asyncfile import FileLoader
from imgserver import processing
from imgserver.cache import ResultCache, entry_size
from imgserver.params import TransformSpec
from imgserver.service import BodyProducer, ImageService, MemoryBudget
from imgserver.settings import SAMPLES_DIR, Settings


def sample_bytes(name: str) -> bytes:
    with open(os.path.join(SAMPLES_DIR, name), "rb") as f:
        return f.read()


def stored_png(colour, size=(64, 64)) -> bytes:
    """An uncompressed PNG: its length depends on the size only, not the colour."""
    return encode(Image.new("RGB", size, colour), "PNG", compress_level=0)


def etag_of(path) -> str:
    st = os.stat(path)
    return f'"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def replace(path, data: bytes, mtime_ns: int | None = None) -> str:
    """Atomically replace ``path`` (write a sibling, rename over it); its new ETag."""
    tmp = str(path) + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    tag = etag_of(tmp)
    os.rename(tmp, path)
    return tag


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("photo.jpg", "logo.png"):
        shutil.copy(os.path.join(SAMPLES_DIR, name), root / name)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(sample_bytes("photo.jpg"))
    return root


# --- one descriptor per request --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_atomic_replace_between_requests_each_answer_matches_its_own_headers(servers, root):
    server, client = await servers.start(root=str(root))
    first_tag = etag_of(root / "photo.jpg")
    first = await client.get("/images/photo.jpg")
    assert first.code == 200 and first.header("etag") == first_tag
    assert first.body == sample_bytes("photo.jpg")
    new = sample_bytes("logo.png")  # another size, another type
    new_tag = replace(root / "photo.jpg", new)
    second = await client.get("/images/photo.jpg")
    assert second.code == 200
    assert second.header("etag") == new_tag != first_tag
    assert int(second.header("content-length")) == len(new) and second.body == new
    assert second.header("content-type") == "image/png"  # sniffed through the same descriptor


@pytest_twisted.ensureDeferred
async def test_replacements_while_requests_are_in_flight_never_mix_versions(servers, root, tmp_path):
    """A thread renames new versions over the file as fast as it can while
    requests (whole and ranged) are served: every 200/206 carries exactly the
    bytes its own ETag and Content-Length/Content-Range name."""
    reactor = get_reactor()
    server, client = await servers.start(root=str(root))
    target = root / "race.jpg"
    staging = root / "staging"
    staging.mkdir()
    versions, names = {}, []
    for i in range(1500):  # each a distinct inode and size, made before the race starts
        data = b"\xff\xd8\xff\xe0" + os.urandom(5000 + i)
        name = staging / f"v{i}"
        name.write_bytes(data)
        versions[etag_of(name)] = data
        names.append(name)
    os.rename(names[0], target)
    stop = threading.Event()

    def renamer() -> None:
        for name in names[1:]:
            if stop.is_set():
                return
            os.rename(name, target)
            time.sleep(0.0002)

    thread = threading.Thread(target=renamer, daemon=True)
    thread.start()
    try:
        replies = []
        while thread.is_alive() and len(replies) < 2000:
            batch = [client.get("/images/race.jpg"),
                     client.get("/images/race.jpg", headers={"Range": "bytes=100-4099"})]
            replies.extend(await defer.gatherResults(batch))
    finally:
        stop.set()
        await threads.deferToThread(thread.join, 10)
    assert len(replies) >= 20
    assert len({r.header("etag") for r in replies}) > 2, "no replacement happened during the requests"
    for reply in replies:
        assert reply.code in (200, 206), reply.code
        data = versions[reply.header("etag")]
        if reply.code == 200:
            assert reply.body == data
            assert int(reply.header("content-length")) == len(data)
        else:
            assert reply.body == data[100:4100]
            assert reply.header("content-range") == f"bytes 100-4099/{len(data)}"
    assert server.service.loader.stats()["open"] == 0


@pytest_twisted.ensureDeferred
async def test_if_range_with_the_old_etag_after_a_replacement_gets_the_whole_new_file(servers, root):
    server, client = await servers.start(root=str(root))
    old_tag = (await client.get("/images/photo.jpg", method="HEAD")).header("etag")
    new = sample_bytes("landscape.webp")
    replace(root / "photo.jpg", new)
    reply = await client.get("/images/photo.jpg", headers={"Range": "bytes=0-9", "If-Range": old_tag})
    assert reply.code == 200
    assert reply.body == new and reply.header("content-range") is None
    assert reply.header("etag") == etag_of(root / "photo.jpg") != old_tag


@pytest_twisted.ensureDeferred
async def test_a_file_swapped_for_a_symlink_out_of_the_root_is_refused_at_once(servers, root, tmp_path):
    server, client = await servers.start(root=str(root))
    assert (await client.get("/images/photo.jpg")).code == 200
    assert (await client.get("/images/photo.jpg?w=20")).code == 200
    link = root / "photo.jpg.tmp"
    link.symlink_to(tmp_path / "outside" / "secret.jpg")
    os.rename(link, root / "photo.jpg")  # atomic swap: the name is now a symlink leading out
    for path in ("/images/photo.jpg", "/images/photo.jpg?w=20", "/images/photo.jpg?w=21", "/info/photo.jpg"):
        reply = await client.get(path)
        assert reply.code == 403, (path, reply.code)
        assert reply.json()["error"] == "forbidden"
        assert sample_bytes("photo.jpg")[:100] not in reply.body


@pytest_twisted.ensureDeferred
async def test_same_size_and_mtime_but_another_inode_gets_a_new_thumbnail(servers, root):
    """``cp -p`` / ``rsync -a``: same size, same mtime, another inode."""
    red, blue = stored_png((255, 0, 0)), stored_png((0, 0, 255))
    assert len(red) == len(blue)
    target = root / "flag.png"
    target.write_bytes(red)
    st = os.stat(target)
    server, client = await servers.start(root=str(root))
    first = await client.get("/images/flag.png?w=8&fm=png")
    assert first.image().convert("RGB").getpixel((4, 4)) == (255, 0, 0)
    replace(target, blue, mtime_ns=st.st_mtime_ns)
    st2 = os.stat(target)
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and st2.st_ino != st.st_ino
    second = await client.get("/images/flag.png?w=8&fm=png")
    assert second.code == 200
    assert second.image().convert("RGB").getpixel((4, 4)) == (0, 0, 255)
    assert second.header("etag") != first.header("etag")
    assert server.service.stats()["processed"] == 2
    info = (await client.get("/info/flag.png")).json()
    assert info["bytes"] == len(blue)


@pytest_twisted.ensureDeferred
async def test_transformed_images_have_weak_etags_and_originals_strong_ones(servers, root):
    server, client = await servers.start(root=str(root))
    transformed = await client.get("/images/photo.jpg?w=30")
    assert transformed.header("etag").startswith('W/"')
    assert transformed.header("cache-control") == server.settings.cache_control
    assert not (await client.get("/images/photo.jpg")).header("etag").startswith("W/")
    again = await client.get("/images/photo.jpg?w=30", headers={"If-None-Match": transformed.header("etag")})
    assert again.code == 304 and again.header("etag") == transformed.header("etag")
    # A weak tag never satisfies If-Match (a strong comparison).
    refused = await client.get("/images/photo.jpg?w=30", headers={"If-Match": transformed.header("etag")})
    assert refused.code == 412 and refused.header("content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_cache_control_setting_and_no_descriptor_kept(servers, root):
    server, client = await servers.start(root=str(root), cache_control="private, max-age=60")
    for path in ("/images/photo.jpg", "/images/photo.jpg?w=40"):
        assert (await client.get(path)).header("cache-control") == "private, max-age=60"
    not_modified = await client.get("/images/photo.jpg", headers={"If-None-Match": "*"})
    assert not_modified.code == 304 and not_modified.header("cache-control") == "private, max-age=60"
    files = server.service.loader.stats()
    assert files["open"] == 0 and files["active"] == 0


# --- names: decoded once ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_percent_in_file_names_is_decoded_exactly_once(servers, root):
    (root / "%41.jpg").write_bytes(sample_bytes("photo.jpg"))
    (root / "A.jpg").write_bytes(sample_bytes("logo.png"))
    (root / "100%.png").write_bytes(sample_bytes("logo.png"))
    server, client = await servers.start(root=str(root))
    literal = await client.get("/images/%2541.jpg")
    assert literal.code == 200 and literal.body == sample_bytes("photo.jpg")
    assert (await client.get("/images/%41.jpg")).body == sample_bytes("logo.png")  # A.jpg
    percent = await client.get("/images/100%25.png")
    assert percent.code == 200 and percent.body == sample_bytes("logo.png")
    assert (await client.get("/images/100%25.png?w=10")).image().width == 10
    assert (await client.get("/info/100%25.png")).json()["width"] == 512


@pytest_twisted.ensureDeferred
async def test_service_paths_are_never_decoded(root):
    (root / "%41.jpg").write_bytes(sample_bytes("photo.jpg"))
    service = ImageService(Settings(root=str(root), workers=1), get_reactor())
    await service.start()
    try:
        located = await service.open_image("%41.jpg")
        try:
            assert located.content_type == "image/jpeg" and located.size == len(sample_bytes("photo.jpg"))
        finally:
            located.close()
        with pytest.raises(Exception) as e:
            await service.open_image("%2541.jpg")
        assert e.value.status == 404
        assert (await service.info("%41.jpg"))["format"] == "jpeg"
    finally:
        await service.stop()


# --- errors ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_loader_overload_is_503_with_retry_after(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root))
    service = server.service
    tiny = FileLoader(reactor, max_open=1, max_waiting=0)
    old, service.loader = service.loader, tiny
    await old.close()
    holder = await tiny.open("logo.png", root=service._root)  # the one place
    try:
        for path in ("/images/photo.jpg", "/images/photo.jpg?w=10", "/info/photo.jpg"):
            reply = await client.get(path)
            assert reply.code == 503, (path, reply.code, reply.body)
            assert reply.json()["error"] == "overloaded"
            assert 1 <= int(reply.header("retry-after")) <= 60
            assert reply.json()["retry_after"] == int(reply.header("retry-after"))
    finally:
        await holder.close()
    assert (await client.get("/images/photo.jpg")).code == 200
    assert service.stats()["files_rejected"] == 3


@pytest_twisted.ensureDeferred
async def test_non_regular_files_and_directories_are_404_without_blocking(servers, root):
    os.mkfifo(root / "pipe.jpg")
    (root / "dir.jpg").mkdir()
    server, client = await servers.start(root=str(root))
    for path in ("/images/pipe.jpg", "/images/pipe.jpg?w=5", "/info/pipe.jpg", "/images/dir.jpg",
                 "/images/dir.jpg?w=5", "/images/photo.jpg/x.jpg"):
        reply = await client.get(path)
        assert reply.code == 404, (path, reply.code)
    assert (await client.get("/images/photo.jpg")).code == 200


@pytest_twisted.ensureDeferred
async def test_misses_are_remembered_briefly(servers, root):
    reactor = get_reactor()
    server, client = await servers.start(root=str(root))
    service = server.service
    opens_before = service.loader.stats()["errors"]
    replies = await defer.gatherResults([client.get("/images/later.jpg") for _ in range(20)])
    assert {r.code for r in replies} == {404}
    # The first miss reached the file system; the rest were answered from memory.
    assert service.stats()["misses_answered"] >= 10
    assert service.loader.stats()["errors"] - opens_before <= 10
    (root / "later.jpg").write_bytes(sample_bytes("photo.jpg"))

    async def found() -> bool:
        return (await client.get("/images/later.jpg")).code == 200

    waited = 0.0
    while not await found():
        assert waited < 3.0, "a remembered miss outlived its TTL"
        await sleep(reactor, 0.1)
        waited += 0.1


def test_misses_remembered_are_bounded():
    from imgserver import service as service_module

    service = ImageService(Settings(workers=1), get_reactor())
    for i in range(service_module.MAX_MISSES + 50):
        service._remember_miss(f"missing-{i}.jpg")
    assert len(service._misses) == service_module.MAX_MISSES
    assert service._known_missing(f"missing-{service_module.MAX_MISSES + 49}.jpg")
    assert not service._known_missing("missing-0.jpg")


# --- lanes and Retry-After --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_streams_lane_is_bounded_and_small_originals_need_no_place(servers, tmp_path):
    reactor = get_reactor()
    root = tmp_path / "r"
    root.mkdir()
    big = b"\xff\xd8\xff\xe0" + os.urandom(16 * 1024 * 1024)  # sniffed as JPEG, never decoded
    (root / "big.jpg").write_bytes(big)
    shutil.copy(os.path.join(SAMPLES_DIR, "logo.png"), root / "logo.png")
    small = b"\x89PNG\r\n\x1a\n" + os.urandom(8000)
    (root / "small.png").write_bytes(small)
    server, client = await servers.start(root=str(root), max_streams=1)
    service = server.service
    reader = await slow_reader(reactor, port_of(server),
                               b"GET /images/big.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 64 * 1024)
    await wait_for(reactor, lambda: service.stats()["streams"] == 1, what="the stream holds its place")
    refused = await client.get("/images/big.jpg")
    assert refused.code == 503 and refused.json()["error"] == "overloaded"
    assert refused.header("retry-after") is not None
    assert refused.header("content-type") == "application/json"
    assert refused.header("etag") is None
    # Small originals, transforms and ranges that fit in one write keep answering.
    assert (await client.get("/images/small.png")).body == small
    assert (await client.get("/images/big.jpg", headers={"Range": "bytes=0-999"})).body == big[:1000]
    assert (await client.get("/images/logo.png?w=16")).code == 200
    health = service.health()
    assert health["status"] == "degraded" and "streams lane full" in health["reasons"]
    reader.transport.abortConnection()
    await reader.done
    await wait_for(reactor, lambda: service.stats()["streams"] == 0, what="the place given back")
    await wait_for(reactor, lambda: service.loader.stats()["open"] == 0, what="the descriptor closed")
    assert service.health()["status"] == "ok"
    assert (await client.get("/images/big.jpg")).body == big


def test_retry_after_follows_queue_depth_and_processing_times():
    reactor = get_reactor()
    service = ImageService(Settings(workers=2, max_queue=100), reactor)
    assert service.retry_after() == 1  # idle
    slots = [service.heavy.acquire() for _ in range(42)]  # 2 running + 40 queued
    service.processing_seconds.extend([0.5] * 10)
    assert service.retry_after() == 11  # ceil(42 * 0.5 / 2)
    service.processing_seconds.extend([10.0] * 64)
    assert service.retry_after() == 60  # bounded
    for d in slots:
        d.cancel()
    slots[0].addErrback(lambda _: None)


# --- memory-aware admission --------------------------------------------------------------


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """1400x1000 random pixels: about 4 MiB of PNG that stays as large when re-encoded."""
    return encode(Image.frombytes("RGB", (1400, 1000), os.urandom(1400 * 1000 * 3)), "PNG", compress_level=1)


@pytest_twisted.ensureDeferred
async def test_an_image_over_the_whole_memory_budget_is_413(servers, root):
    server, client = await servers.start(root=str(root), max_memory_mb=16)
    spec = TransformSpec(width=3000, height=3000, fit="scale", format="png")
    header = processing.read_header(sample_bytes("photo.jpg"), 50_000_000)
    assert processing.estimate_bytes(header, spec, 25_000_000) > 16 * 2**20
    reply = await client.get("/images/photo.jpg?w=3000&h=3000&fit=scale&fm=png")
    assert reply.code == 413 and reply.json()["error"] == "too_large"
    assert "memory" in reply.json()["message"]
    assert server.service.stats()["memory_in_use"] == 0
    assert (await client.get("/images/photo.jpg?w=50")).code == 200


@pytest_twisted.ensureDeferred
async def test_transforms_wait_for_memory_and_never_exceed_the_budget(servers, root, big_png):
    reactor = get_reactor()
    (root / "noise.png").write_bytes(big_png)
    header = processing.read_header(big_png, 50_000_000)
    specs = [TransformSpec(width=1400 - i, format="png") for i in range(4)]
    need = max(processing.estimate_bytes(header, s, 25_000_000) for s in specs)
    budget_mb = max(16, (need * 3 // 2) // 2**20 + 1)  # one at a time fits, two never do
    assert 2 * need > budget_mb * 2**20
    server, client = await servers.start(root=str(root), workers=2, max_memory_mb=budget_mb)
    service = server.service
    pending = [client.get(f"/images/noise.png?w={s.width}&fm=png") for s in specs]
    await wait_for(reactor, lambda: service.stats()["memory_waiting"] >= 1, timeout=20,
                   what="a transform waiting for memory")
    replies = await defer.gatherResults(pending)
    assert [r.code for r in replies] == [200] * 4
    assert [r.image().width for r in replies] == [s.width for s in specs]
    stats = service.stats()
    assert stats["memory_peak"] <= budget_mb * 2**20
    assert stats["memory_in_use"] == 0 and stats["memory_waiting"] == 0


def test_memory_budget_is_fifo_and_cancellable():
    budget = MemoryBudget(100)
    a = budget.acquire(60)
    b = budget.acquire(50)  # waits: 60 + 50 > 100
    c = budget.acquire(10)  # waits behind b (FIFO), though it would fit
    assert a.called and not b.called and not c.called
    b.cancel()
    b.addErrback(lambda _: None)
    assert c.called  # b left: c fits now
    grant_a = a.result
    grant_c = c.result
    d = budget.acquire(40)
    assert not d.called
    grant_a.release()
    grant_a.release()  # idempotent
    assert d.called and budget.in_use == 50
    grant_c.release()
    d.result.release()
    assert budget.in_use == 0 and budget.peak == 70
    with pytest.raises(ValueError):
        budget.acquire(101)


@pytest_twisted.ensureDeferred
async def test_a_504_keeps_its_place_until_the_work_really_stopped(servers, root, big_png):
    reactor = get_reactor()
    (root / "noise.png").write_bytes(big_png)
    server, client = await servers.start(root=str(root), workers=1, timeout=0.05)
    service = server.service
    reply = await client.get("/images/noise.png?w=1300&fm=webp")
    assert reply.code == 504
    # The decode cannot be interrupted: it still holds the worker and its memory.
    stats = service.stats()
    assert stats["in_processing"] == 1 and stats["heavy_active"] == 1 and stats["abandoned"] == 1
    assert stats["memory_in_use"] > 0
    assert service.health()["in_processing"] == 1
    await wait_for(reactor, lambda: service.stats()["heavy_active"] == 0, timeout=20, what="work done")
    stats = service.stats()
    assert stats["in_processing"] == 0 and stats["memory_in_use"] == 0 and stats["abandoned"] == 0
    assert service.loader.stats()["open"] == 0


# --- the result cache ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cache_counts_info_documents_at_their_real_size(servers, root):
    for i in range(20):
        shutil.copy(root / "logo.png", root / f"logo{i}.png")
    server, client = await servers.start(root=str(root))
    for i in range(20):
        assert (await client.get(f"/info/logo{i}.png")).code == 200
    cache = server.service.cache.stats()
    assert cache["entries"] == 20
    per_entry = cache["bytes"] / cache["entries"]
    document = json.loads((await client.get("/info/logo0.png")).body)
    assert per_entry >= sys.getsizeof(document) + 200  # not "6 keys = 6 bytes"


def test_counted_sizes_cover_what_entries_really_cost():
    """Filled with /info-like documents under realistic keys, the cache never
    counts less than tracemalloc measures."""
    cache = ResultCache(10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            key = ((64768 + i, 5_000_000 + i, 100_000 + i, 1_700_000_000_000_000_000 + i), ("info",))
            cache.put(key, {"width": 1000 + i, "height": 700 + i, "format": "jpeg", "mode": "RGB",
                            "bytes": 100_000 + i, "orientation": 1})
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.bytes >= real, (cache.bytes, real)
    assert cache.bytes <= 3 * real  # and not wildly more
    body = processing.Result(body=b"x" * 10_000, content_type="image/png", width=1, height=1, format="png")
    assert 10_000 < entry_size(body) < 11_000


class _Consumer:
    """A consumer that pauses its producer after every ``window`` bytes."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.chunks: list[bytes] = []
        self.producer = None
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered = True

    def write(self, data):
        self.chunks.append(data)
        if sum(map(len, self.chunks)) % self.window == 0:
            self.producer.pauseProducing()


def test_body_producer_writes_slices_only_as_the_consumer_asks():
    body = os.urandom(5 * 65536 + 123)
    consumer = _Consumer(window=2 * 65536)
    done = BodyProducer(consumer, body).start()
    assert [len(c) for c in consumer.chunks] == [65536, 65536] and not done.called
    consumer.producer.resumeProducing()
    assert len(consumer.chunks) == 4 and not done.called
    consumer.producer.resumeProducing()
    assert done.called and done.result == len(body) and consumer.unregistered
    assert b"".join(consumer.chunks) == body


def test_body_producer_stopped_by_its_consumer():
    from asyncfile import ConsumerStopped

    consumer = _Consumer(window=65536)
    done = BodyProducer(consumer, os.urandom(4 * 65536)).start()
    consumer.producer.stopProducing()
    failures = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ConsumerStopped)
    consumer.producer.resumeProducing()  # after the end: nothing more
    assert len(consumer.chunks) == 1


@pytest_twisted.ensureDeferred
async def test_slow_clients_of_one_cached_body_do_not_copy_it(servers, root):
    reactor = get_reactor()
    # Random pixels: a ~10 MiB PNG, larger than what the kernel buffers for a
    # connection whose client does not read (up to 4 MiB sent + its receive window).
    noise = Image.frombytes("RGB", (1900, 1800), os.urandom(1900 * 1800 * 3))
    (root / "huge.png").write_bytes(encode(noise, "PNG", compress_level=0))
    server, client = await servers.start(root=str(root))
    url = "/images/huge.png?w=1900&fm=png"
    first = await client.get(url)
    size = len(first.body)
    assert first.code == 200 and size > 9 * 2**20
    request = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        readers = [await slow_reader(reactor, port_of(server), request, 1) for _ in range(50)]

        def buffered() -> list[int]:
            return [len(t.dataBuffer) - t.offset + t._tempDataLen for t in server.site.channels.values()]

        # Every answer has stalled: the kernel's buffers are full, the rest
        # waits in (or for) the server's transport.
        await wait_for(reactor, lambda: sum(1 for b in buffered() if b > 0) == 50,
                       timeout=20, what="50 stalled answers")
        grown = tracemalloc.get_traced_memory()[0] - before
        held = sum(buffered())
    finally:
        tracemalloc.stop()
    assert server.service.stats()["processed"] == 1  # one body, from the cache
    assert held <= 50 * 256 * 1024, held
    assert grown < 24 * 2**20, grown  # a copy each would be 50 x (several MiB)
    for reader in readers:
        reader.transport.abortConnection()
    for reader in readers:
        await reader.done
    await wait_for(reactor, lambda: not server.site.requests and not server.site.channels, what="all closed")
