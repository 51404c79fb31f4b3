import dataclasses
import os

import pytest

from imgserver.settings import SAMPLES_DIR, Settings


def test_defaults():
    s = Settings()
    assert s.root is None
    assert s.image_root == SAMPLES_DIR
    assert s.workers == (os.cpu_count() or 1)
    assert s.max_queue == 100
    assert s.cache_mb == 64 and s.cache_bytes == 64 * 1024 * 1024
    assert s.secret is None and not s.signed
    assert s.max_pixels == 50_000_000
    assert s.max_file_mb == 50 and s.max_file_bytes == 50 * 1024 * 1024
    assert s.timeout == 30
    assert s.max_dimension == 8192
    assert s.default_quality == 85


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().workers = 3


def test_replace_revalidates():
    with pytest.raises(ValueError):
        dataclasses.replace(Settings(), workers=0)


def test_root_and_secret_are_normalised(tmp_path):
    s = Settings(root=tmp_path, secret="0123456789abcdef")
    assert s.root == str(tmp_path)
    assert s.image_root == str(tmp_path)
    assert s.secret == b"0123456789abcdef"
    assert s.signed


def test_secret_not_in_repr():
    assert "0123456789abcdef" not in repr(Settings(secret=b"0123456789abcdef"))


def test_zero_cache_is_allowed():
    assert Settings(cache_mb=0).cache_bytes == 0
    assert Settings(max_queue=0).max_queue == 0


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"root": ""}, "root"),
        ({"root": "a\0b"}, "root"),
        ({"workers": 0}, "workers"),
        ({"workers": 1.5}, "workers"),
        ({"workers": True}, "workers"),
        ({"max_queue": -1}, "max_queue"),
        ({"cache_mb": -1}, "cache_mb"),
        ({"cache_mb": float("nan")}, "cache_mb"),
        ({"cache_mb": "64"}, "cache_mb"),
        ({"secret": b"short"}, "secret"),
        ({"secret": b""}, "secret"),
        ({"secret": 12345}, "secret"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_file_mb": 0}, "max_file_mb"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"max_dimension": 0}, "max_dimension"),
        ({"max_dimension": 70000}, "max_dimension"),
        ({"default_quality": 0}, "default_quality"),
        ({"default_quality": 101}, "default_quality"),
    ],
)
def test_invalid_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings(**kwargs)


def test_help_describes_every_field():
    help_ = Settings.help()
    assert set(help_) == {f.name for f in dataclasses.fields(Settings)}
    assert all(help_.values())


@pytest.mark.parametrize("value, servers", [
    ("127.0.0.1:11211", (("127.0.0.1", 11211),)),
    (" a.example:1 , [::1]:2", (("a.example", 1), ("::1", 2))),
    (None, ()),
])
def test_memcached_servers_parse(value, servers):
    assert Settings(memcached=value).memcached_servers == servers


@pytest.mark.parametrize("value", ["", "host", "host:", ":11211", "host:0", "host:65536", "host:x", "a b:1",
                                   "h:1,h:1", "h:1,", "/tmp/sock:1"])
def test_memcached_servers_refused_with_the_entry_named(value):
    with pytest.raises(ValueError, match="memcached"):
        Settings(memcached=value)


@pytest.mark.parametrize("field, value", [("result_dir", ""), ("result_dir", "a\0b"), ("result_dir_max_mb", 0),
                                          ("memcached_timeout", 0), ("memcached_max_item_kb", 0)])
def test_result_tier_settings_validated(field, value):
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})
