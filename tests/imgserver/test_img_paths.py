import os

import pytest

from imgserver.errors import BadRequest, Forbidden, NotFound
from imgserver.paths import check_inside, confine, join, resolve, split_decoded, split_url_path

ROOT = "/srv/images"


@pytest.mark.parametrize(
    "url_path,expected",
    [
        ("/a.jpg", ("a.jpg",)),
        ("a.jpg", ("a.jpg",)),
        ("/dir/sub/a.jpg", ("dir", "sub", "a.jpg")),
        ("/a%20b.jpg", ("a b.jpg",)),
        ("/caf%C3%A9.jpg", ("café.jpg",)),
        (b"/caf\xc3\xa9.jpg", ("café.jpg",)),
        ("/a..b.jpg", ("a..b.jpg",)),
        ("/a.b.c", ("a.b.c",)),
        ("/a%2e%2e", ("a..",)),
    ],
)
def test_plain_names(url_path, expected):
    assert split_url_path(url_path) == expected
    assert resolve(ROOT, url_path) == os.path.join(ROOT, *expected)


def test_single_decode_only():
    # %252e%252e decodes once to the literal name "%2e%2e", never to "..".
    assert split_url_path("/%252e%252e/x.jpg") == ("%2e%2e", "x.jpg")
    assert resolve(ROOT, "/%252e%252e/x.jpg") == ROOT + "/%2e%2e/x.jpg"
    assert split_url_path("/a%252Fb") == ("a%2Fb",)


FORBIDDEN = [
    # dot segments
    "/../etc/passwd",
    "/a/../../etc/passwd",
    "/a/..",
    "/..",
    "/./a.jpg",
    "/a/./b.jpg",
    # percent-encoded traversal
    "/%2e%2e/etc/passwd",
    "/%2E%2E/etc/passwd",
    "/%2e./etc/passwd",
    "/.%2e/etc/passwd",
    "/a/%2e%2e/%2e%2e/etc/passwd",
    "/%2e",
    # encoded separators
    "/a%2Fb.jpg",
    "/a%2fb.jpg",
    "/..%2f..%2fetc%2fpasswd",
    "/%2Fetc%2Fpasswd",
    "/a%5Cb.jpg",
    "/..%5c..%5cwindows",
    # absolute paths / empty segments
    "//etc/passwd",
    "///etc/passwd",
    "/a//b.jpg",
    "/a/",
    # NUL and control characters
    "/a.jpg\0.png",
    "/a%00.jpg",
    "/a%0a.jpg",
    "/a%7f.jpg",
    # backslashes
    "/a\\b.jpg",
    "/..\\..\\etc\\passwd",
    # dot-files and dot-directories
    "/.htaccess",
    "/.git/config",
    "/a/.hidden/b.jpg",
    "/%2egit/config",
    "/..a",
]


@pytest.mark.parametrize("url_path", FORBIDDEN)
def test_attacks_are_forbidden(url_path):
    with pytest.raises(Forbidden) as info:
        resolve(ROOT, url_path)
    assert info.value.status == 403
    assert ROOT not in str(info.value)


@pytest.mark.parametrize("url_path", FORBIDDEN)
def test_attacks_are_forbidden_as_bytes(url_path):
    with pytest.raises(Forbidden):
        split_url_path(url_path.encode("utf-8"))


@pytest.mark.parametrize("url_path", ["", "/"])
def test_empty_path_is_not_found(url_path):
    with pytest.raises(NotFound):
        resolve(ROOT, url_path)


def test_overlong_names_are_not_found():
    with pytest.raises(NotFound):
        split_url_path("/" + "x" * 256)
    with pytest.raises(NotFound):
        split_url_path("/" + "/".join(["d" * 200] * 25))
    assert split_url_path("/" + "x" * 255) == ("x" * 255,)


@pytest.mark.parametrize("url_path", ["/a%zz.jpg", "/a%2.jpg", "/a%.jpg", "/a%"])
def test_malformed_escapes_are_bad_requests(url_path):
    with pytest.raises(BadRequest):
        split_url_path(url_path)


@pytest.mark.parametrize("url_path", ["/%ff.jpg", "/%c3.jpg", b"/\xff.jpg"])
def test_invalid_utf8_is_a_bad_request(url_path):
    with pytest.raises(BadRequest):
        split_url_path(url_path)


def test_resolve_does_not_touch_the_file_system(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("file system touched")

    for name in ("stat", "lstat", "readlink", "open", "listdir", "scandir"):
        monkeypatch.setattr(os, name, boom)
    monkeypatch.setattr(os.path, "realpath", boom)
    assert resolve(ROOT, "/a/b.jpg") == ROOT + "/a/b.jpg"


# --- check_inside (pure) ----------------------------------------------------


@pytest.mark.parametrize(
    "real_path",
    ["/srv/images/a.jpg", "/srv/images/d/e/f.jpg", "/srv/images/a..jpg"],
)
def test_check_inside_accepts(real_path):
    check_inside("/srv/images", real_path)


@pytest.mark.parametrize(
    "real_path",
    [
        "/srv/images",  # the root itself is not an image
        "/srv/images-private/a.jpg",  # a sibling sharing the prefix
        "/srv/imagesX",
        "/srv/a.jpg",
        "/etc/passwd",
        "/srv/images/.git/config",  # hidden, reached through a symlink
        "/srv/images/d/.secret.jpg",
    ],
)
def test_check_inside_refuses(real_path):
    with pytest.raises(Forbidden) as info:
        check_inside("/srv/images", real_path)
    assert "/srv" not in str(info.value)


def test_check_inside_root_slash():
    check_inside("/", "/etc/passwd")
    with pytest.raises(Forbidden):
        check_inside("/", "/")


def test_check_inside_needs_absolute_paths():
    with pytest.raises(ValueError):
        check_inside("srv", "srv/a.jpg")


# --- confine (realpath, real symlinks) ----------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.jpg").write_bytes(b"b")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "c.jpg").write_bytes(b"c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"s")
    # symlinks
    (root / "inside-link.jpg").symlink_to(root / "sub" / "b.jpg")
    (root / "relative-link.jpg").symlink_to("sub/b.jpg")
    (root / "dir-link").symlink_to(root / "sub")
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape-dir").symlink_to(outside)
    (root / "escape-relative.jpg").symlink_to("../outside/secret.jpg")
    (root / "to-hidden.jpg").symlink_to(root / ".hidden" / "c.jpg")
    (root / "sub" / "up").symlink_to("..")
    return root


def test_confine_plain_file(tree):
    assert confine(str(tree), "/a.jpg") == os.path.realpath(tree / "a.jpg")
    assert confine(str(tree), "/sub/b.jpg") == os.path.realpath(tree / "sub" / "b.jpg")


@pytest.mark.parametrize("name", ["/inside-link.jpg", "/relative-link.jpg", "/dir-link/b.jpg"])
def test_confine_follows_symlinks_inside_the_root(tree, name):
    assert confine(str(tree), name) == os.path.realpath(tree / "sub" / "b.jpg")


def test_confine_symlink_back_to_an_allowed_place(tree):
    # sub/up -> .. stays inside the root, so it is fine.
    assert confine(str(tree), "/sub/up/a.jpg") == os.path.realpath(tree / "a.jpg")


@pytest.mark.parametrize(
    "name",
    [
        "/escape.jpg",
        "/escape-dir/secret.jpg",
        "/escape-relative.jpg",
        "/to-hidden.jpg",
        "/sub/up",  # resolves to the root directory itself
    ],
)
def test_confine_refuses_symlinks_out_of_the_root(tree, name):
    with pytest.raises(Forbidden) as info:
        confine(str(tree), name)
    assert str(tree) not in str(info.value)
    assert str(tree.parent) not in str(info.value)


def test_confine_root_given_through_a_symlink(tree, tmp_path):
    link = tmp_path / "root-link"
    link.symlink_to(tree)
    assert confine(str(link), "/a.jpg") == os.path.realpath(tree / "a.jpg")
    with pytest.raises(Forbidden):
        confine(str(link), "/escape.jpg")


def test_confine_missing_file_is_left_to_open(tree):
    path = confine(str(tree), "/missing.jpg")
    assert path == os.path.join(os.path.realpath(tree), "missing.jpg")
    assert not os.path.exists(path)


@pytest.mark.parametrize(
    "url_path", ["/../outside/secret.jpg", "/%2e%2e/outside/secret.jpg", "/.hidden/c.jpg"]
)
def test_confine_applies_the_name_rules_first(tree, url_path):
    with pytest.raises(Forbidden):
        confine(str(tree), url_path)


# --- split_decoded: the same policy for a path that is already decoded -------------------


@pytest.mark.parametrize(
    "path,expected",
    [
        ("a.jpg", ("a.jpg",)),
        ("/a.jpg", ("a.jpg",)),
        ("dir/sub/a b.jpg", ("dir", "sub", "a b.jpg")),
        ("café.jpg", ("café.jpg",)),
        # Never decoded: a "%" is part of the name.
        ("%41.jpg", ("%41.jpg",)),
        ("100%.png", ("100%.png",)),
        ("%2e%2e/x.jpg", ("%2e%2e", "x.jpg")),
        ("a%2Fb", ("a%2Fb",)),
    ],
)
def test_split_decoded(path, expected):
    assert split_decoded(path) == expected
    assert join(split_decoded(path)) == "/".join(expected)


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "a/../../b", "..", ".", "./a.jpg", "a//b.jpg", "//etc/passwd", "a/", "a\\b.jpg",
     "a\0b.jpg", "a\nb.jpg", "a\x7f.jpg", ".htaccess", "a/.git/config"],
)
def test_split_decoded_refuses_what_split_url_path_refuses(path):
    with pytest.raises(Forbidden):
        split_decoded(path)


@pytest.mark.parametrize("path", ["", "/", "x" * 256, "/".join(["d" * 200] * 25)])
def test_split_decoded_not_found(path):
    with pytest.raises(NotFound):
        split_decoded(path)


@pytest.mark.parametrize("path", [b"a.jpg", None, 5, "\ud800.jpg"])
def test_split_decoded_refuses_what_is_not_text(path):
    with pytest.raises(BadRequest):
        split_decoded(path)


@pytest.mark.parametrize("name", ["%41.jpg", "100%.png", "a b.jpg", "café.jpg", "%2e%2e", "dir/%252F"])
def test_decoded_exactly_once(name):
    """Issue 9: the URL of the file ``%41.jpg`` is ``%2541.jpg``; decoding it
    once gives ``%41.jpg`` back, never ``A.jpg``."""
    from urllib.parse import quote

    assert split_url_path(quote(name)) == split_decoded(name)
    assert split_url_path(quote(quote(name))) == split_decoded(quote(name))  # the literal escaped name
