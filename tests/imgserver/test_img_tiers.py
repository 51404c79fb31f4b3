"""Result tiers in the service (issue 11): a kept result is answered without
processing and without a place in the heavy lane, a processed one is offered
to every tier in the background, and a tier that fails, hangs or is slow
never fails or holds up a request.

Tiers of this file (``RecordTier`` and its misbehaving cousins) are small real
tiers: they keep self-checking records (:mod:`imgserver.record`) in a dict
that several services can share, as processes share a store or machines a
memcached.  The real tiers run too: the result store in a real directory
(``imgserver.store``) and memcached, a real server started on 127.0.0.1
(``memcached_helpers``); those tests skip, with the reason, where the module
or the memcached binary is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from typing import Any

import pytest
import pytest_twisted
from http_helpers import Servers, get_reactor, sleep, wait_for
from memcached_helpers import memcached, memcached_factory  # noqa: F401  (pytest fixtures)
from twisted.internet import defer
from zope.interface import implementer

from imgserver import record, service as service_module
from imgserver.errors import Overloaded
from imgserver.params import TransformSpec
from imgserver.processing import Result
from imgserver.record import ResultKey
from imgserver.service import ImageService
from imgserver.settings import SAMPLES_DIR, Settings
from imgserver.tiers import IResultTier

SPEC = TransformSpec(width=40, format="png")
QUERY = "?w=40&fm=png"


# --- small real tiers ------------------------------------------------------------------------------


@implementer(IResultTier)
class RecordTier:
    """Records in a dict (``shared``: several tiers, one "store"), keyed by the local or shared digest."""

    def __init__(self, name: str = "store", shared: dict[bytes, bytes] | None = None, *, digest: str = "local",
                 timeout: float = 0.5) -> None:
        self.name = name
        self.data: dict[bytes, bytes] = {} if shared is None else shared
        self.digest = digest
        self.timeout = timeout
        self.gets = self.puts = self.hits = self.closed = 0
        self.keys: list[ResultKey] = []

    def _digest(self, key: ResultKey) -> bytes:
        return key.local_digest() if self.digest == "local" else key.shared_digest()

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        self.gets += 1
        raw = self.data.get(self._digest(key))
        if raw is None:
            return defer.succeed(None)
        try:
            found = record.decode(raw, self._digest(key))
        except record.CorruptRecord:
            del self.data[self._digest(key)]
            return defer.succeed(None)
        self.hits += 1
        return defer.succeed(found)

    def put(self, key: ResultKey, result: Result) -> defer.Deferred[bool]:
        self.puts += 1
        self.keys.append(key)
        self.data[self._digest(key)] = record.encode(self._digest(key), result)
        return defer.succeed(True)

    def stats(self) -> dict[str, Any]:
        return {"gets": self.gets, "hits": self.hits, "stored": self.puts, "entries": len(self.data)}

    def close(self) -> defer.Deferred[None]:
        self.closed += 1
        return defer.succeed(None)


class HangingTier(RecordTier):
    """Never answers a get (unless ``gets_hang`` is False: then a plain miss) nor a put
    (no canceller: it ignores cancellation too)."""

    def __init__(self, gets_hang: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gets_hang = gets_hang
        self.pending: list[defer.Deferred[Any]] = []

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        if not self.gets_hang:
            return super().get(key)
        self.gets += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d

    def put(self, key: ResultKey, result: Result) -> defer.Deferred[bool]:
        self.puts += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d


class RaisingTier(RecordTier):
    """A buggy tier: raises (not an OSError) on get, fails its put, raises in stats and close."""

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        self.gets += 1
        raise KeyError("a bug in the tier")

    def put(self, key: ResultKey, result: Result) -> defer.Deferred[bool]:
        self.puts += 1
        return defer.fail(ZeroDivisionError("another bug"))

    def stats(self) -> dict[str, Any]:
        raise RuntimeError("stats broken")

    def close(self) -> defer.Deferred[None]:
        raise RuntimeError("close broken")


class GatedTier(RecordTier):
    """Answers a get only when the test says so; records whether it was cancelled."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waiting: list[defer.Deferred[Any]] = []
        self.cancelled = 0

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        self.gets += 1

        def cancel(d: defer.Deferred[Any]) -> None:
            self.cancelled += 1
            self.waiting.remove(d)
            d.callback(None)  # the contract: a cancelled lookup is a miss; the service must still stop

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.waiting.append(d)
        return d

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class StartingTier(RecordTier):
    """A tier with a ``start()`` (as the result store has) that the test finishes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        return self.started


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("photo.jpg", "logo.png"):
        shutil.copy(os.path.join(SAMPLES_DIR, name), root / name)
    return root


class Services:
    """Starts services (each stopped after the test, then checked for leftovers)."""

    def __init__(self, root) -> None:
        self.root = root
        self.made: list[ImageService] = []

    async def start(self, tiers: Any = None, **settings: Any) -> ImageService:
        settings.setdefault("root", str(self.root))
        settings.setdefault("workers", 1)
        service = ImageService(Settings(**settings), get_reactor(), tiers=tiers)
        self.made.append(service)
        await service.start()
        return service

    async def close(self) -> None:
        for service in self.made:
            await service.stop()
            assert service.busy() == 0
            assert not service._puts


@pytest_twisted.async_yield_fixture
async def services(root):
    made = Services(root)
    yield made
    await made.close()


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


def quiet(service: ImageService) -> bool:
    """Nothing in flight: no flight, no put, no open descriptor."""
    return not service._flights and not service._puts and service.loader.stats()["active"] == 0


# --- tiers answer before processing -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_kept_result_is_served_without_processing_and_lands_in_the_memory_cache(services):
    shared: dict[bytes, bytes] = {}
    first = await services.start([RecordTier(shared=shared)])
    made = await first.transform("photo.jpg", SPEC)
    await first.wait_for_puts(timeout=5)
    assert not first._puts
    assert first.stats()["processed"] == 1 and len(shared) == 1
    assert first.stats()["tier_hits"] == {"store": 0}

    tier = RecordTier(shared=shared)  # another process on the same "store"
    second = await services.start([tier])
    got = await second.transform("photo.jpg", SPEC)
    assert got == made
    stats = second.stats()
    assert stats["processed"] == 0 and stats["tier_hits"] == {"store": 1}
    assert stats["heavy_active"] == 0 and stats["rejected"] == 0
    assert stats["tiers"] == {"store": tier.stats()}
    again = await second.transform("photo.jpg", SPEC)  # from the memory cache: the tier is not asked
    assert again == made and tier.gets == 1 and second.stats()["cache"]["hits"] == 1
    assert tier.puts == 0  # a hit is not written back to where it came from
    assert quiet(second)


@pytest_twisted.ensureDeferred
async def test_info_does_not_use_the_tiers(services):
    tier = RecordTier()
    service = await services.start([tier])
    assert (await service.info("photo.jpg"))["format"] == "jpeg"
    assert tier.gets == 0 and tier.puts == 0


@pytest_twisted.ensureDeferred
async def test_the_key_names_the_file_version_and_the_canonical_transform(services, root):
    tier = RecordTier()
    service = await services.start([tier])
    await service.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: tier.puts == 1, timeout=5, what="the put")
    st = os.stat(root / "photo.jpg")
    assert tier.keys == [ResultKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, "photo.jpg",
                                   SPEC.cache_key())]


@pytest_twisted.ensureDeferred
async def test_a_later_tier_hit_is_put_to_the_tiers_before_it(services):
    near, far = RecordTier(name="store"), RecordTier(name="memcached", digest="shared")
    maker = await services.start([RecordTier(name="memcached", shared=far.data, digest="shared")])
    made = await maker.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: len(far.data) == 1, timeout=5, what="the put")

    service = await services.start([near, far])
    assert await service.transform("photo.jpg", SPEC) == made
    await wait_for(get_reactor(), lambda: near.puts == 1, timeout=5, what="the put to the store")
    assert service.stats()["tier_hits"] == {"store": 0, "memcached": 1}
    assert service.stats()["processed"] == 0 and far.puts == 0

    fresh = await services.start([RecordTier(name="store", shared=near.data), HangingTier(name="memcached")])
    assert await fresh.transform("photo.jpg", SPEC) == made  # the store answers: memcached is not asked
    assert fresh.tiers[1].gets == 0 and fresh.stats()["tier_hits"]["store"] == 1


@pytest_twisted.ensureDeferred
async def test_a_processed_result_is_offered_to_every_tier_without_delaying_the_answer(services):
    slow = HangingTier(name="memcached", gets_hang=False)  # a miss; its puts never end
    store = RecordTier()
    service = await services.start([store, slow])
    started = time.monotonic()
    await service.transform("photo.jpg", SPEC)
    assert time.monotonic() - started < 5
    assert store.puts == 1 and slow.puts == 1
    assert service.stats()["tier_puts_pending"] == 1  # tracked: stop() ends it
    await service.wait_for_puts(timeout=0.05)  # bounded even when a put never ends
    assert service.stats()["tier_puts_pending"] == 1
    stopping = time.monotonic()
    await service.stop(grace=0.1)
    assert time.monotonic() - stopping < 2
    assert not service._puts and store.closed == 1 and slow.closed == 1
    assert service.stats()["tier_failures"] == {"store": 0, "memcached": 0}  # a cancel at stop is no failure


@pytest_twisted.ensureDeferred
async def test_puts_in_the_background_are_bounded(services, monkeypatch):
    monkeypatch.setattr(service_module, "MAX_PENDING_PUTS", 1)
    slow = HangingTier(gets_hang=False)
    service = await services.start([slow])
    pending = await service.transform("photo.jpg", SPEC)
    await service.transform("logo.png", SPEC)
    assert slow.puts == 1 and service.stats()["tier_puts_skipped"] == 1
    assert service.stats()["tier_puts_pending_bytes"] == len(pending.body)

    monkeypatch.setattr(service_module, "MAX_PENDING_PUTS", 100)
    monkeypatch.setattr(service_module, "MAX_PENDING_PUT_BYTES", len(pending.body) + 10)
    await service.transform("photo.jpg", TransformSpec(width=30, format="png"))  # over the bytes bound
    assert slow.puts == 1 and service.stats()["tier_puts_skipped"] == 2


@pytest_twisted.ensureDeferred
async def test_a_full_heavy_lane_does_not_refuse_a_kept_result(services):
    tier = RecordTier()
    maker = await services.start([RecordTier(shared=tier.data)])
    made = await maker.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: not maker._puts, timeout=5, what="the put")

    service = await services.start([tier], workers=1, max_queue=0)
    slot = service.heavy.try_acquire()  # the one place: processing is full
    assert slot is not None
    try:
        with pytest.raises(Overloaded):
            await service.transform("logo.png", SPEC)  # not kept: needs processing -> 503
        assert await service.transform("photo.jpg", SPEC) == made  # kept: 200
    finally:
        slot.release()
    stats = service.stats()
    assert stats["rejected"] == 1 and stats["processed"] == 0 and stats["tier_hits"]["store"] == 1


@pytest_twisted.ensureDeferred
async def test_a_full_heavy_lane_over_http_is_200_for_a_kept_result_and_503_otherwise(servers, root, tmp_path):
    try:
        import imgserver.store  # noqa: F401
    except ImportError:
        pytest.skip("imgserver.store (the result store) is not there yet")
    store = tmp_path / "store"
    first, client = await servers.start(root=str(root), result_dir=str(store))
    assert (await client.get("/images/photo.jpg" + QUERY)).code == 200
    await wait_for(get_reactor(), lambda: not first.service._puts, timeout=5, what="the put")

    second, client2 = await servers.start(root=str(root), result_dir=str(store), workers=1, max_queue=0)
    await second.service.start()
    slot = second.service.heavy.try_acquire()
    try:
        assert (await client2.get("/images/logo.png" + QUERY)).code == 503
        reply = await client2.get("/images/photo.jpg" + QUERY)
        assert reply.code == 200 and reply.header("content-type") == "image/png"
    finally:
        slot.release()
    assert second.service.stats()["processed"] == 0


# --- tiers that misbehave -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_tier_that_raises_is_a_miss_and_is_counted(services):
    broken, store = RaisingTier(name="broken"), RecordTier()
    service = await services.start([broken, store])
    result = await service.transform("photo.jpg", SPEC)
    assert result.content_type == "image/png"
    await wait_for(get_reactor(), lambda: store.puts == 1, timeout=5, what="the put")
    stats = service.stats()
    assert stats["processed"] == 1
    assert stats["tier_failures"] == {"broken": 2, "store": 0}  # its get and its put
    assert stats["tiers"]["broken"] == {} and stats["tiers"]["store"]["stored"] == 1
    await service.stop()  # its close raises too: stop() still ends
    assert service.stats()["tier_failures"]["broken"] == 3


@pytest_twisted.ensureDeferred
async def test_a_hanging_tier_is_a_miss_within_the_services_guard(services):
    hanging = HangingTier(name="memcached", timeout=0.1)  # its own deadline is not kept
    service = await services.start([hanging])
    deadline = service._tier_deadline(hanging)
    assert deadline == pytest.approx(0.1 * service_module.TIER_SLACK + service_module.TIER_MARGIN)
    started = time.monotonic()
    result = await service.transform("photo.jpg", SPEC)
    elapsed = time.monotonic() - started
    assert result.content_type == "image/png"
    assert deadline <= elapsed < deadline + 3  # waited for the guard, then processed
    stats = service.stats()
    assert stats["processed"] == 1 and stats["tier_failures"] == {"memcached": 1}
    assert hanging.pending[0].called  # the service cancelled the lookup it gave up on


@pytest_twisted.ensureDeferred
async def test_a_slow_tier_within_its_deadline_is_waited_for(services):
    tier = RecordTier(timeout=0.5)
    maker = await services.start([RecordTier(shared=tier.data)])
    made = await maker.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: not maker._puts, timeout=5, what="the put")

    reactor = get_reactor()
    get = tier.get

    def slow_get(key):
        d: defer.Deferred[Any] = defer.Deferred()
        call = reactor.callLater(0.2, lambda: get(key).chainDeferred(d))
        d.addErrback(lambda f: (call.cancel() if call.active() else None, f)[1])
        return d

    tier.get = slow_get
    service = await services.start([tier])
    assert await service.transform("photo.jpg", SPEC) == made
    assert service.stats()["processed"] == 0 and service.stats()["tier_hits"]["store"] == 1


@pytest_twisted.ensureDeferred
async def test_a_caller_leaving_while_a_tier_answers_releases_everything(services):
    gated = GatedTier()
    service = await services.start([gated])
    pending = service.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: gated.waiting, timeout=5, what="the lookup")
    assert service.loader.stats()["active"] == 1  # the source's descriptor, for after a miss
    assert service.busy() == 1 and service.stats()["in_tiers"] == 1  # a graceful stop waits for it
    pending.cancel()
    with pytest.raises(defer.CancelledError):
        await pending
    await wait_for(get_reactor(), lambda: quiet(service), timeout=5, what="everything released")
    stats = service.stats()
    assert gated.cancelled == 1 and not gated.waiting
    assert stats["heavy_active"] == 0 and stats["queued"] == 0 and stats["processed"] == 0
    assert stats["tier_failures"] == {"store": 0}
    assert gated.puts == 0

    # The same again, through a service whose tier ignores cancellation (it answers a miss later).
    hanging = HangingTier(timeout=30)
    service2 = await services.start([hanging])
    pending = service2.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: hanging.pending, timeout=5, what="the lookup")
    pending.cancel()
    with pytest.raises(defer.CancelledError):
        await pending
    await wait_for(get_reactor(), lambda: quiet(service2), timeout=5, what="everything released")
    assert service2.stats()["processed"] == 0 and service2.heavy.active == 0


@pytest_twisted.ensureDeferred
async def test_a_client_gone_while_a_tier_answers_releases_everything(servers, root, monkeypatch):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    gated = GatedTier()
    monkeypatch.setattr(ImageService, "_default_tiers", lambda self: [gated])
    server, client = await servers.start(root=str(root))
    reactor = get_reactor()
    proto = Protocol()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.http_port.getHost().port), proto)
    proto.transport.write(b"GET /images/photo.jpg" + QUERY.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(reactor, lambda: gated.waiting, timeout=5, what="the lookup")
    proto.transport.abortConnection()  # the client is gone
    service = server.service
    await wait_for(reactor, lambda: quiet(service) and service.busy() == 0, timeout=5, what="everything released")
    assert gated.cancelled == 1 and service.stats()["processed"] == 0 and gated.puts == 0
    following = client.get("/images/photo.jpg" + QUERY)  # the next client is served as usual
    await wait_for(reactor, lambda: gated.waiting, timeout=5, what="the second lookup")
    gated.release()
    assert (await following).code == 200
    assert service.stats()["processed"] == 1 and gated.cancelled == 1


@pytest_twisted.ensureDeferred
async def test_callers_arriving_during_a_lookup_share_it(services):
    gated = GatedTier()
    service = await services.start([gated])
    first = service.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: gated.waiting, timeout=5, what="the lookup")
    second = service.transform("photo.jpg", SPEC)
    await sleep(get_reactor(), 0.01)
    gated.release()
    assert await first == await second
    assert gated.gets == 1 and service.stats()["processed"] == 1 and service.stats()["coalesced"] == 1


@pytest_twisted.ensureDeferred
async def test_a_tier_still_starting_is_passed_over(services):
    starting = StartingTier()
    service = ImageService(Settings(root=str(services.root), workers=1), get_reactor(), tiers=[starting])
    services.made.append(service)
    ready = service.start()
    await service.transform("photo.jpg", SPEC)
    assert starting.gets == 0 and starting.puts == 0
    assert not ready.called
    starting.started.callback(None)
    await ready
    await service.transform("logo.png", SPEC)
    assert starting.gets == 1 and starting.puts == 1


@pytest_twisted.ensureDeferred
async def test_a_file_changed_during_its_load_is_not_put(services, root):
    tier = RecordTier()
    service = await services.start([tier])
    located = await service.open_image("logo.png")
    try:
        with open(root / "logo.png", "ab") as f:  # changed in place after its fstat
            f.write(b"\0" * 100)
        result = await service.transform_located(located, SPEC)
    finally:
        located.close()
    assert result.content_type == "image/png"
    await sleep(get_reactor(), 0.05)
    assert tier.gets == 1 and tier.puts == 0 and not tier.data
    assert service.stats()["processed"] == 1 and service.stats()["cache"]["entries"] == 0


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_tiers_once(services):
    tier = RecordTier()
    service = await services.start([tier])
    await service.stop()
    await service.stop()
    assert tier.closed == 1
    never_started = ImageService(Settings(root=str(services.root)), get_reactor(), tiers=[RecordTier()])
    await never_started.stop()
    assert never_started.tiers[0].closed == 1


def test_no_tiers_without_settings(root):
    service = ImageService(Settings(root=str(root)), get_reactor())
    assert service.tiers == [] and service.stats()["tiers"] == {}


# --- the real result store --------------------------------------------------------------------------


def needs_store() -> None:
    try:
        import imgserver.store  # noqa: F401
    except ImportError:
        pytest.skip("imgserver.store (the result store) is not there yet")


def entries(store_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(str(store_dir), "v1", "*", "*.img")))


@pytest_twisted.ensureDeferred
async def test_a_restarted_service_serves_from_the_store_without_processing(services, tmp_path):
    needs_store()
    store_dir = tmp_path / "store"
    first = await services.start(result_dir=str(store_dir))
    assert [t.name for t in first.tiers] == ["store"]
    made = await first.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: not first._puts, timeout=5, what="the put")
    await first.stop()
    assert len(entries(store_dir)) == 1

    second = await services.start(result_dir=str(store_dir))
    assert await second.transform("photo.jpg", SPEC) == made
    stats = second.stats()
    assert stats["processed"] == 0 and stats["tier_hits"] == {"store": 1}
    assert stats["tiers"]["store"]["hits"] == 1


@pytest_twisted.ensureDeferred
async def test_a_corrupt_store_entry_is_reprocessed_and_replaced(services, tmp_path):
    needs_store()
    store_dir = tmp_path / "store"
    first = await services.start(result_dir=str(store_dir))
    made = await first.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: not first._puts, timeout=5, what="the put")
    await first.stop()
    [path] = entries(store_dir)
    good = open(path, "rb").read()
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF  # a flipped bit in the body
    with open(path, "wb") as f:
        f.write(damaged)

    second = await services.start(result_dir=str(store_dir))
    assert await second.transform("photo.jpg", SPEC) == made  # never the damaged bytes
    stats = second.stats()
    assert stats["processed"] == 1 and stats["tier_hits"] == {"store": 0}
    assert stats["tiers"]["store"]["corrupt"] == 1

    def replaced() -> bool:
        try:
            return open(path, "rb").read() == good
        except OSError:
            return False

    await wait_for(get_reactor(), replaced, timeout=5, what="the entry replaced")
    third = await services.start(result_dir=str(store_dir))
    assert await third.transform("photo.jpg", SPEC) == made
    assert third.stats()["processed"] == 0


# --- real memcached ---------------------------------------------------------------------------------


def needs_memcached_tier() -> None:
    try:
        import imgserver.memcached  # noqa: F401
    except ImportError:
        pytest.skip("imgserver.memcached (the memcached tier) is not there yet")


@pytest_twisted.ensureDeferred
async def test_a_second_machine_answers_from_memcached_without_processing(servers, root, tmp_path, memcached):
    needs_memcached_tier()
    a, client_a = await servers.start(root=str(root), memcached=memcached.address)
    reply = await client_a.get("/images/photo.jpg" + QUERY)
    assert reply.code == 200
    await wait_for(get_reactor(), lambda: not a.service._puts, timeout=5, what="the put")
    assert a.service.stats()["tiers"]["memcached"]["stored"] == 1

    # Another "machine": its own copy of the files (other inodes, same path, size and mtime).
    other = tmp_path / "other-root"
    shutil.copytree(root, other)
    b, client_b = await servers.start(root=str(other), memcached=memcached.address)
    reply_b = await client_b.get("/images/photo.jpg" + QUERY)
    assert reply_b.code == 200 and reply_b.body == reply.body
    stats = b.service.stats()
    assert stats["processed"] == 0 and stats["tier_hits"] == {"memcached": 1}


@pytest_twisted.ensureDeferred
async def test_memcached_hit_is_put_to_the_store(services, tmp_path, memcached):
    needs_store()
    needs_memcached_tier()
    a = await services.start(memcached=memcached.address)
    made = await a.transform("photo.jpg", SPEC)
    await wait_for(get_reactor(), lambda: not a._puts, timeout=5, what="the put")

    store_dir = tmp_path / "store"
    b = await services.start(result_dir=str(store_dir), memcached=memcached.address)
    assert [t.name for t in b.tiers] == ["store", "memcached"]
    assert await b.transform("photo.jpg", SPEC) == made
    await wait_for(get_reactor(), lambda: not b._puts, timeout=5, what="the put to the store")
    assert b.stats()["tier_hits"] == {"store": 0, "memcached": 1} and b.stats()["processed"] == 0
    assert len(entries(store_dir)) == 1


@pytest_twisted.ensureDeferred
async def test_a_hung_or_dead_memcached_never_fails_a_request(services, memcached):
    needs_memcached_tier()
    service = await services.start(memcached=memcached.address, memcached_timeout=0.05)
    memcached.pause()  # SIGSTOP: connections accepted, nothing answered
    try:
        started = time.monotonic()
        result = await service.transform("photo.jpg", SPEC)
        assert result.content_type == "image/png"
        assert time.monotonic() - started < 5
    finally:
        memcached.resume()
    memcached.stop()
    started = time.monotonic()
    await service.transform("logo.png", SPEC)
    assert time.monotonic() - started < 5
    stats = service.stats()
    assert stats["processed"] == 2 and stats["tier_hits"] == {"memcached": 0}
    assert stats["tier_failures"] == {"memcached": 0}  # the tier kept its own deadline: a plain miss


# --- regressions (review of issue 11) ------------------------------------------------------------


class CancelledTier(RecordTier):
    """A buggy tier whose get fails with CancelledError although no one cancelled it
    (an internal Deferred of the tier cancelled, say)."""

    def get(self, key: ResultKey) -> defer.Deferred[Result | None]:
        self.gets += 1
        return defer.fail(defer.CancelledError("cancelled inside the tier"))


@pytest_twisted.ensureDeferred
async def test_a_tier_failing_with_cancelled_error_of_its_own_is_a_miss(services):
    """Only the caller leaving cancels the request: a CancelledError that the
    tier itself produced is a failure of the tier (a miss, counted), and the
    image is processed -- it used to fail the request with CancelledError."""
    broken, store = CancelledTier(name="broken"), RecordTier()
    service = await services.start([broken, store])
    result = await service.transform("photo.jpg", SPEC)
    assert result.content_type == "image/png"
    stats = service.stats()
    assert stats["processed"] == 1
    assert stats["tier_failures"] == {"broken": 1, "store": 0}
    await wait_for(get_reactor(), lambda: quiet(service), timeout=5, what="the puts")
