from dataclasses import dataclass

import pytest

from imgserver.cache import ResultCache


@dataclass
class Value:
    body: bytes


def body_len(value) -> int:
    """Counts bodies only, so the LRU logic can be checked with round numbers
    (the real sizes, with overheads, are tested in test_img_service_hardening)."""
    return len(getattr(value, "body", value))


def make(max_bytes: int) -> ResultCache:
    return ResultCache(max_bytes, size_of=body_len)


def v(size: int) -> Value:
    return Value(b"x" * size)


def test_get_put_and_stats():
    cache = make(100)
    assert cache.get("a") is None
    assert cache.put("a", v(10))
    assert cache.get("a").body == b"x" * 10
    assert cache.get("b", "default") == "default"
    assert cache.stats() == {
        "hits": 1,
        "misses": 2,
        "evictions": 0,
        "entries": 1,
        "bytes": 10,
        "max_bytes": 100,
    }


def test_lru_eviction_order():
    cache = make(30)
    for key in "abc":
        cache.put(key, v(10))
    cache.get("a")  # a is now the most recently used; b the least
    cache.put("d", v(10))
    assert "b" not in cache
    assert all(key in cache for key in "acd")
    assert cache.evictions == 1
    assert cache.bytes == 30


def test_eviction_frees_enough_bytes():
    cache = make(100)
    for key in "abcde":
        cache.put(key, v(20))
    cache.put("big", v(70))  # needs 70: evicts a, b, c, d (20 each) -> 20 + 70
    assert [k for k in "abcde" if k in cache] == ["e"]
    assert cache.evictions == 4
    assert cache.bytes == 90
    assert len(cache) == 2


def test_contains_does_not_count_or_refresh():
    cache = make(20)
    cache.put("a", v(10))
    cache.put("b", v(10))
    assert "a" in cache
    cache.put("c", v(10))  # a is still least recently used
    assert "a" not in cache
    assert (cache.hits, cache.misses) == (0, 0)


def test_entry_larger_than_the_cache_is_not_stored():
    cache = make(50)
    cache.put("a", v(10))
    assert not cache.put("huge", v(51))
    assert "huge" not in cache
    assert "a" in cache  # nothing flushed for it
    assert cache.bytes == 10 and cache.evictions == 0


def test_entry_exactly_the_cache_size_is_stored():
    cache = make(50)
    cache.put("a", v(10))
    assert cache.put("full", v(50))
    assert cache.bytes == 50 and "a" not in cache


def test_zero_disables():
    cache = make(0)
    assert not cache.put("a", v(0))
    assert not cache.put("b", v(1))
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.get("a") is None


def test_replacing_a_key_updates_the_byte_count():
    cache = make(100)
    cache.put("a", v(10))
    cache.put("a", v(30))
    assert cache.bytes == 30 and len(cache) == 1
    assert not cache.put("a", v(500))  # too big: the old value is gone too
    assert "a" not in cache and cache.bytes == 0


def test_discard_and_clear():
    cache = make(100)
    cache.put("a", v(10))
    cache.put("b", v(20))
    cache.discard("a")
    cache.discard("missing")
    assert cache.bytes == 20 and len(cache) == 1
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_plain_bytes_values():
    cache = make(10)
    cache.put("a", b"12345")
    assert cache.bytes == 5


def test_byte_accounting_stays_exact():
    import random

    rng = random.Random(0)
    cache = make(1000)
    for i in range(2000):
        key = rng.randrange(50)
        if rng.random() < 0.1:
            cache.discard(key)
        else:
            cache.put(key, v(rng.randrange(0, 300)))
        assert cache.bytes == sum(len(cache._entries[k][0].body) for k in cache._entries)
        assert cache.bytes <= 1000


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_invalid_size(bad):
    with pytest.raises(ValueError):
        ResultCache(bad)
