"""The self-checking record the result store and memcached keep: whatever is
not a whole, intact record for the key asked for is refused, never served."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgserver import record
from imgserver.processing import Result
from imgserver.record import CorruptRecord, ResultKey

KEY = ResultKey(dev=2049, inode=1234, size=48634, mtime_ns=1_700_000_000_123_456_789, path="a/photo.jpg",
                variant="w=320")
RESULT = Result(body=bytes(range(256)) * 40, content_type="image/webp", width=320, height=213, format="webp")

results = st.builds(Result, body=st.binary(max_size=4096), content_type=st.sampled_from(["image/jpeg", "image/png"]),
                    width=st.integers(1, 65500), height=st.integers(1, 65500),
                    format=st.sampled_from(["jpeg", "png", "webp"]), frames=st.integers(1, 1000))


@given(results)
def test_round_trip(result):
    digest = KEY.local_digest()
    assert record.decode(record.encode(digest, result), digest) == result


def test_digests_name_what_they_promise():
    same_elsewhere = ResultKey(dev=7, inode=99, size=KEY.size, mtime_ns=KEY.mtime_ns, path=KEY.path,
                               variant=KEY.variant)
    # Another machine's copy (other device and inode, same path, size and mtime) shares memcached's key...
    assert same_elsewhere.shared_digest() == KEY.shared_digest()
    # ...but not the store's, which names this machine's file.
    assert same_elsewhere.local_digest() != KEY.local_digest()
    for change in ({"size": KEY.size + 1}, {"mtime_ns": KEY.mtime_ns + 1}, {"variant": "w=321"}):
        other = ResultKey(**{**KEY.__dict__, **change})
        assert other.shared_digest() != KEY.shared_digest()
        assert other.local_digest() != KEY.local_digest()
    assert ResultKey(**{**KEY.__dict__, "path": "b/photo.jpg"}).shared_digest() != KEY.shared_digest()
    assert KEY.local_digest() != KEY.shared_digest()
    assert len(KEY.local_digest()) == len(KEY.shared_digest()) == 16


def test_another_keys_record_is_refused():
    data = record.encode(KEY.local_digest(), RESULT)
    with pytest.raises(CorruptRecord, match="another key"):
        record.decode(data, KEY.shared_digest())


@settings(max_examples=300)
@given(st.data())
def test_any_truncation_or_extension_is_refused(data):
    digest = KEY.local_digest()
    whole = record.encode(digest, RESULT)
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(CorruptRecord):
        record.decode(whole[:cut], digest)
    extra = data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(CorruptRecord):
        record.decode(whole + extra, digest)


@settings(max_examples=500)
@given(st.data())
def test_any_flipped_byte_is_refused_or_harmless(data):
    """A changed byte anywhere is refused -- except in the meta JSON's
    insignificant parts, where it must still decode to a valid Result."""
    digest = KEY.local_digest()
    whole = bytearray(record.encode(digest, RESULT))
    at = data.draw(st.integers(0, len(whole) - 1))
    whole[at] ^= data.draw(st.integers(1, 255))
    try:
        got = record.decode(bytes(whole), digest)
    except CorruptRecord:
        return
    header = record.parse_header(bytes(whole), digest)
    assert record.FIXED_HEADER <= at < header.body_offset  # only the meta could change harmlessly
    assert got.body == RESULT.body


@given(st.binary(max_size=2048))
def test_garbage_is_refused(junk):
    with pytest.raises(CorruptRecord):
        record.decode(junk, KEY.local_digest())


@pytest.mark.parametrize("meta", [b"[]", b"{", b'{"content_type":"image/png"}', b"\xff\xfe",
                                  b'{"content_type":1,"width":1,"height":1,"format":"png","frames":1}',
                                  b'{"content_type":"x","width":true,"height":1,"format":"png","frames":1}'])
def test_bad_meta_is_refused(meta):
    digest = KEY.local_digest()
    body = b"body"
    data = record._FIXED.pack(record.MAGIC, digest, len(body), record.checksum(body), len(meta)) + meta + body
    with pytest.raises(CorruptRecord, match="meta"):
        record.decode(data, digest)


def test_header_alone_checks_the_length():
    """What the store does before loading a body: the header and the file's size."""
    digest = KEY.local_digest()
    whole = record.encode(digest, RESULT)
    header = record.parse_header(whole[:record.FIXED_HEADER + record.MAX_META], digest, total=len(whole))
    assert header.body_length == len(RESULT.body)
    with pytest.raises(CorruptRecord, match="bytes long"):
        record.parse_header(whole[:200], digest, total=len(whole) - 1)
    with pytest.raises(CorruptRecord, match="checksum"):
        header.result(bytes(len(RESULT.body)))


def test_digests_do_not_confuse_fields_nor_fail_on_any_path():
    """The fields are not joined with a separator they may contain: a path
    with ``|`` and a variant with ``|`` used to name another key's result
    (memcached and ETags would then answer another image); and any path a
    ``str`` can hold (a lone surrogate) names a result instead of raising."""
    a = ResultKey(dev=1, inode=2, size=3, mtime_ns=4, path="x|5|6", variant="v")
    b = ResultKey(dev=1, inode=2, size=5, mtime_ns=6, path="x", variant="3|4|v")
    assert a.shared_digest() != b.shared_digest()
    hard_link = ResultKey(**{**a.__dict__, "path": "another/name.jpg"})
    assert hard_link.local_digest() == a.local_digest()  # the store's key names the file, not the path
    odd = ResultKey(dev=1, inode=2, size=3, mtime_ns=4, path="bad\ud800name/é.jpg", variant="w=1")
    assert len(odd.shared_digest()) == len(odd.local_digest()) == 16
    assert odd.shared_digest() != ResultKey(**{**odd.__dict__, "path": "bad\ud801name/é.jpg"}).shared_digest()
