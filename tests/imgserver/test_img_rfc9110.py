"""HTTP semantics per RFC 9110 against a real server on 127.0.0.1 (issue 9 items 3, 6, 8, 9):
preconditions (If-Match, If-Unmodified-Since → 412; the §13.2.2 order), the
three date formats as UTC, 416 as a JSON error, ``X-Content-Type-Options:
nosniff`` on every answer, errors never cacheable, no ``Vary`` (nothing
varies), decode-once paths and endpoint-bound signatures end to end.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import pytest_twisted
from http_helpers import Servers, get_reactor, port_of, raw_request

from imgserver.settings import SAMPLES_DIR
from imgserver.signing import signed_url

SECRET = b"0123456789abcdef-rfc9110-secret"


def sample_bytes(name: str) -> bytes:
    with open(os.path.join(SAMPLES_DIR, name), "rb") as f:
        return f.read()


PHOTO = sample_bytes("photo.jpg")
LOGO = sample_bytes("logo.png")


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


@pytest.fixture
def root(tmp_path):
    """Files whose Last-Modified is known (a fixed mtime, long ago) and names
    with percent signs."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("photo.jpg", "logo.png"):
        shutil.copy(os.path.join(SAMPLES_DIR, name), root / name)
    (root / "%41.jpg").write_bytes(PHOTO)  # the file literally named %41.jpg
    (root / "A.jpg").write_bytes(sample_bytes("landscape.webp"))  # a different image
    (root / "100%.png").write_bytes(LOGO)
    for path in root.iterdir():
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return root


#: 2023-11-14 22:13:20.750 UTC: a sub-second part, so "the same second" matters.
MTIME_NS = 1_700_000_000_750_000_000
LAST_MODIFIED = "Tue, 14 Nov 2023 22:13:20 GMT"
RFC850 = "Tuesday, 14-Nov-23 22:13:20 GMT"
ASCTIME = "Tue Nov 14 22:13:20 2023"
A_SECOND_EARLIER = ("Tue, 14 Nov 2023 22:13:19 GMT", "Tuesday, 14-Nov-23 22:13:19 GMT", "Tue Nov 14 22:13:19 2023")


def check_json_error(reply, status: int, code: str) -> dict:
    assert reply.code == status, (reply.code, reply.body[:200])
    assert reply.header("content-type") == "application/json"
    assert reply.header("cache-control") == "no-store"
    assert reply.header("x-content-type-options") == "nosniff"
    for name in ("etag", "last-modified", "accept-ranges"):
        assert reply.header(name) is None, name
    body = reply.json()
    assert body["error"] == code
    return body


# --- preconditions ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_if_match(servers, root):
    server, client = await servers.start(root=str(root))
    first = await client.get("/images/photo.jpg")
    etag = first.header("etag")
    assert not etag.startswith("W/")  # an original's tag is strong
    for value in (etag, f'"nope", {etag}', "*"):
        reply = await client.get("/images/photo.jpg", headers={"If-Match": value})
        assert reply.code == 200 and reply.body == PHOTO, value
    for value in ('"nope"', "W/" + etag, etag.strip('"'), ""):  # strong comparison: a weak tag never matches
        check_json_error(await client.get("/images/photo.jpg", headers={"If-Match": value}), 412,
                         "precondition_failed")
    # HEAD too.
    head = await client.get("/images/photo.jpg", method="HEAD", headers={"If-Match": '"nope"'})
    assert head.code == 412 and head.body == b""


@pytest_twisted.ensureDeferred
async def test_if_unmodified_since(servers, root):
    server, client = await servers.start(root=str(root))
    for value in (LAST_MODIFIED, RFC850, ASCTIME, "Fri, 01 Jan 2100 00:00:00 GMT", "garbage"):
        reply = await client.get("/images/photo.jpg", headers={"If-Unmodified-Since": value})
        assert reply.code == 200, value
    for value in A_SECOND_EARLIER:
        check_json_error(await client.get("/images/photo.jpg", headers={"If-Unmodified-Since": value}), 412,
                         "precondition_failed")
    # If-Match present: If-Unmodified-Since is not looked at (§13.1.4).
    etag = (await client.get("/images/photo.jpg")).header("etag")
    reply = await client.get("/images/photo.jpg",
                             headers={"If-Match": etag, "If-Unmodified-Since": A_SECOND_EARLIER[0]})
    assert reply.code == 200


@pytest_twisted.ensureDeferred
async def test_the_order_of_rfc_9110_13_2_2(servers, root):
    server, client = await servers.start(root=str(root))
    etag = (await client.get("/images/photo.jpg")).header("etag")
    # If-Match fails first, even when If-None-Match would say 304.
    reply = await client.get("/images/photo.jpg", headers={"If-Match": '"nope"', "If-None-Match": etag})
    assert reply.code == 412
    # If-Unmodified-Since fails before If-None-Match.
    reply = await client.get("/images/photo.jpg",
                             headers={"If-Unmodified-Since": A_SECOND_EARLIER[0], "If-None-Match": etag})
    assert reply.code == 412
    # If-None-Match decides over If-Modified-Since, both ways.
    reply = await client.get("/images/photo.jpg",
                             headers={"If-None-Match": etag, "If-Modified-Since": A_SECOND_EARLIER[0]})
    assert reply.code == 304
    reply = await client.get("/images/photo.jpg",
                             headers={"If-None-Match": '"nope"', "If-Modified-Since": LAST_MODIFIED})
    assert reply.code == 200
    # Preconditions that hold, then a 304.
    reply = await client.get("/images/photo.jpg", headers={"If-Match": etag, "If-None-Match": etag})
    assert reply.code == 304 and reply.body == b""
    assert reply.header("etag") == etag and reply.header("x-content-type-options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_transforms_have_weak_tags_compared_as_rfc_9110_says(servers, root):
    server, client = await servers.start(root=str(root))
    first = await client.get("/images/photo.jpg?w=40")
    assert first.code == 200
    etag = first.header("etag")
    assert etag.startswith('W/"')
    # If-None-Match: weak comparison, either spelling matches.
    for value in (etag, etag.removeprefix("W/")):
        assert (await client.get("/images/photo.jpg?w=40", headers={"If-None-Match": value})).code == 304
    # If-Match: strong comparison, a weak tag never matches.
    check_json_error(await client.get("/images/photo.jpg?w=40", headers={"If-Match": etag}), 412,
                     "precondition_failed")
    assert (await client.get("/images/photo.jpg?w=40", headers={"If-Match": "*"})).code == 200


# --- dates ------------------------------------------------------------------------------------


@pytest.fixture
def far_timezone(monkeypatch):
    """A local time zone far from UTC: a date parsed as local time is hours off."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest_twisted.ensureDeferred
async def test_all_three_date_formats_are_utc(servers, root, far_timezone):
    server, client = await servers.start(root=str(root))
    first = await client.get("/images/photo.jpg")
    assert first.header("last-modified") == LAST_MODIFIED
    for value in (LAST_MODIFIED, RFC850, ASCTIME):
        reply = await client.get("/images/photo.jpg", headers={"If-Modified-Since": value})
        assert reply.code == 304, value
    for value in A_SECOND_EARLIER:
        reply = await client.get("/images/photo.jpg", headers={"If-Modified-Since": value})
        assert reply.code == 200, value
    # If-Range with a date in each format: only the exact Last-Modified counts.
    for value in (LAST_MODIFIED, RFC850, ASCTIME):
        reply = await client.get("/images/photo.jpg", headers={"Range": "bytes=0-9", "If-Range": value})
        assert reply.code == 206 and reply.body == PHOTO[:10], value
    for value in A_SECOND_EARLIER:
        reply = await client.get("/images/photo.jpg", headers={"Range": "bytes=0-9", "If-Range": value})
        assert reply.code == 200 and reply.body == PHOTO, value


# --- ranges -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_416_is_a_json_error(servers, root):
    server, client = await servers.start(root=str(root))
    size = len(PHOTO)
    for header in (f"bytes={size}-", "bytes=-0", f"bytes={size + 5}-{size + 10}"):
        reply = await client.get("/images/photo.jpg", headers={"Range": header})
        body = check_json_error(reply, 416, "range_not_satisfiable")
        assert reply.header("content-range") == f"bytes */{size}"
        assert int(reply.header("content-length")) == len(reply.body)
        assert "message" in body
    # HEAD ignores Range (RFC 9110 §14.2): no 416 either.
    head = await client.get("/images/photo.jpg", method="HEAD", headers={"Range": f"bytes={size}-"})
    assert head.code == 200 and int(head.header("content-length")) == size


@pytest_twisted.ensureDeferred
async def test_if_range_with_a_strong_tag(servers, root):
    server, client = await servers.start(root=str(root))
    etag = (await client.get("/images/photo.jpg")).header("etag")
    same = await client.get("/images/photo.jpg", headers={"Range": "bytes=5-14", "If-Range": etag})
    assert same.code == 206 and same.body == PHOTO[5:15]
    assert same.header("content-range") == f"bytes 5-14/{len(PHOTO)}"
    for stale in ("W/" + etag, '"other"'):
        reply = await client.get("/images/photo.jpg", headers={"Range": "bytes=5-14", "If-Range": stale})
        assert reply.code == 200 and reply.body == PHOTO


# --- headers on every answer ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nosniff_on_every_answer_and_no_error_is_cacheable(servers, root):
    server, client = await servers.start(root=str(root), max_connections=50)
    etag = (await client.get("/images/photo.jpg")).header("etag")
    answers = {
        "/images/photo.jpg": 200,
        "/images/photo.jpg?w=20": 200,
        "/info/photo.jpg": 200,
        "/healthz": 200,
        "/metrics": 200,
        "/images/missing.jpg": 404,
        "/nope": 404,
        "/images/%2e%2e/x.jpg": 403,
        "/images/a%zz.jpg": 400,
        "/images/photo.jpg?w=0": 400,
    }
    for path, status in answers.items():
        reply = await client.get(path)
        assert reply.code == status, (path, reply.code, reply.body[:100])
        assert reply.header("x-content-type-options") == "nosniff", path
        if status >= 400:
            assert reply.header("cache-control") == "no-store", path
    for method, path, headers, status in (
        ("POST", "/images/photo.jpg", {}, 405),
        ("GET", "/images/photo.jpg", {"If-None-Match": etag}, 304),
        ("GET", "/images/photo.jpg", {"If-Match": '"x"'}, 412),
        ("GET", "/images/photo.jpg", {"Range": "bytes=999999-"}, 416),
        ("GET", "/images/photo.jpg", {"Range": "bytes=0-0"}, 206),
    ):
        reply = await client.get(path, method=method, headers=headers)
        assert reply.code == status, (method, path, headers)
        assert reply.header("x-content-type-options") == "nosniff"
        if status >= 400:
            assert reply.header("cache-control") == "no-store"
    # Answers twisted.web gives before any resource: a malformed request.
    raw = await raw_request(get_reactor(), port_of(server), b"GET /images/photo.jpg HTTP/1.1\r\nBad Header\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"X-Content-Type-Options: nosniff" in head and b"Cache-Control: no-store" in head
    assert body.startswith(b'{"error":"bad_request"')


@pytest_twisted.ensureDeferred
async def test_no_answer_varies_with_negotiation_headers(servers, root):
    """No content negotiation (the format is ``fm``, not Accept) and no content
    coding: the same bytes whatever Accept / Accept-Encoding say, hence no Vary."""
    server, client = await servers.start(root=str(root))
    for path in ("/images/photo.jpg", "/images/photo.jpg?w=30", "/info/photo.jpg"):
        plain = await client.get(path)
        assert plain.code == 200 and plain.header("vary") is None
        for headers in ({"Accept": "image/webp,image/avif"}, {"Accept-Encoding": "gzip, br"},
                        {"Accept": "application/json", "Accept-Language": "fr"}):
            other = await client.get(path, headers=headers)
            assert other.code == 200 and other.body == plain.body, (path, headers)
            assert other.header("content-type") == plain.header("content-type")
            assert other.header("content-encoding") is None and other.header("vary") is None


# --- paths decoded once, signatures bound to the endpoint --------------------------------------


@pytest_twisted.ensureDeferred
async def test_percent_names_are_decoded_once(servers, root):
    server, client = await servers.start(root=str(root))
    # %2541 is the file named "%41.jpg", never "A.jpg".
    reply = await client.get("/images/%2541.jpg")
    assert reply.code == 200 and reply.body == PHOTO
    assert (await client.get("/images/%41.jpg")).body == sample_bytes("landscape.webp")  # A.jpg
    assert (await client.get("/images/100%25.png")).body == LOGO
    assert (await client.get("/info/%2541.jpg")).json()["width"] == 1600
    # A lone "%" is a malformed URL, not a name.
    assert (await client.get("/images/100%.png")).code == 400


@pytest_twisted.ensureDeferred
async def test_signatures_are_for_one_endpoint_and_one_decoded_path(servers, root):
    server, client = await servers.start(root=str(root), secret=SECRET)
    images = signed_url(SECRET, "images", "%41.jpg")
    assert images.startswith("/images/%2541.jpg?s=")
    reply = await client.get(images)
    assert reply.code == 200 and reply.body == PHOTO  # the file named %41.jpg
    # The same signature does not serve A.jpg, nor /info.
    signature = images.split("s=", 1)[1]
    check_json_error(await client.get(f"/images/A.jpg?s={signature}"), 403, "forbidden")
    check_json_error(await client.get(f"/images/%41.jpg?s={signature}"), 403, "forbidden")
    check_json_error(await client.get(images.replace("/images/", "/info/", 1)), 403, "forbidden")
    info = signed_url(SECRET, "info", "%41.jpg")
    assert (await client.get(info)).json()["width"] == 1600
    check_json_error(await client.get(info.replace("/info/", "/images/", 1)), 403, "forbidden")
    assert (await client.get(signed_url(SECRET, "images", "100%.png", {"w": 16}))).image().width == 16
