"""The HTTP server end to end: real servers on 127.0.0.1 (port 0), real requests.

Every test starts its own servers through the ``servers`` fixture, which stops
their ports and services (and closes the clients) afterwards.  Big, slow
images are generated once per module.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import pytest_twisted
from http_helpers import Servers, fd_count, get_reactor, port_of, raw_request, sleep, slow_reader, wait_for
from img_helpers import encode, noisy
from PIL import Image, ImageChops, ImageOps, ImageStat
from twisted.internet.defer import CancelledError
from twisted.web.client import ResponseNeverReceived

from imgserver.settings import SAMPLES_DIR
from imgserver.signing import signed_url

SECRET = b"0123456789abcdef-test-secret"

#: What an HTTP request the client cancelled fails with.
ABORTED = (CancelledError, ResponseNeverReceived)

#: A transform of the big image that takes a worker about half a second here.
SLOW = "fm=webp&w={w}"


def sample_bytes(name: str) -> bytes:
    with open(os.path.join(SAMPLES_DIR, name), "rb") as f:
        return f.read()


def slow(w: int = 1500) -> str:
    return "/images/big.jpg?" + SLOW.format(w=w)


# --- fixtures ----------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


@pytest_twisted.async_yield_fixture
async def samples(servers):
    """A server on the built-in samples, and a client for it."""
    server, client = await servers.start(workers=2)
    yield server, client


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """3000x2000 random pixels: slow to decode, resize and encode as WebP."""
    im = Image.frombytes("RGB", (3000, 2000), os.urandom(3000 * 2000 * 3))
    return encode(im, "JPEG", quality=85)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, big_jpeg):
    """An image root with good, bad and forbidden files, and a secret outside it."""
    base = tmp_path_factory.mktemp("zoo")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    for name in ("photo.jpg", "logo.png", "landscape.webp"):
        shutil.copy(os.path.join(SAMPLES_DIR, name), root / name)
    shutil.copy(os.path.join(SAMPLES_DIR, "photo.jpg"), root / "sub" / "nested.jpg")
    (root / "big.jpg").write_bytes(big_jpeg)
    (root / "notes.txt").write_text("just some text, not an image\n")
    (root / "fake.jpg").write_text("text in a file named like an image\n")
    whole = encode(noisy((400, 300)), "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / ".hidden.jpg").write_bytes(sample_bytes("photo.jpg"))
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(sample_bytes("photo.jpg"))
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape-dir").symlink_to(outside)
    (root / "alias.jpg").symlink_to("photo.jpg")  # relative, inside the root: followed
    # Absolute, even into the root: the kernel's RESOLVE_BENEATH refuses it
    # (an absolute symlink is a jump to "/", which is not beneath the root).
    (root / "absolute-alias.jpg").symlink_to(root / "photo.jpg")
    return root


def check_error(reply, status: int, code: str | None = None, root=None) -> dict:
    """A short JSON error: no path, no traceback."""
    assert reply.code == status, (reply.code, reply.body[:300])
    assert reply.header("content-type") == "application/json"
    assert reply.header("cache-control") == "no-store"
    assert len(reply.body) < 400
    assert b"Traceback" not in reply.body and b"File \"" not in reply.body
    if root is not None:
        assert str(root).encode() not in reply.body
    assert SAMPLES_DIR.encode() not in reply.body
    assert b"/tmp" not in reply.body and b"site-packages" not in reply.body
    body = reply.json()
    assert set(body) <= {"error", "message", "retry_after"}
    if code is not None:
        assert body["error"] == code, body
    assert int(reply.header("content-length")) == len(reply.body)
    for name in ("etag", "last-modified", "content-range", "accept-ranges"):
        assert reply.header(name) is None, name  # no representation metadata on an error
    return body


# --- originals ---------------------------------------------------------------

ORIGINALS = [("photo.jpg", "image/jpeg"), ("logo.png", "image/png"), ("landscape.webp", "image/webp")]


@pytest.mark.parametrize("name,content_type", ORIGINALS)
@pytest_twisted.ensureDeferred
async def test_original_is_sent_as_it_is(samples, name, content_type):
    server, client = samples
    reply = await client.get(f"/images/{name}")
    data = sample_bytes(name)
    assert reply.code == 200
    assert reply.body == data
    assert reply.header("content-type") == content_type
    assert int(reply.header("content-length")) == len(data)
    assert reply.header("accept-ranges") == "bytes"
    assert reply.header("cache-control") == "public, max-age=86400"
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+"', reply.header("etag"))  # dev-ino-size-mtime
    assert reply.header("last-modified").endswith(" GMT")
    assert server.service.stats()["processed"] == 0  # streamed, never decoded


@pytest_twisted.ensureDeferred
async def test_original_in_a_subdirectory_and_through_a_symlink_inside_the_root(servers, zoo):
    server, client = await servers.start(root=str(zoo))
    nested = await client.get("/images/sub/nested.jpg")
    alias = await client.get("/images/alias.jpg")
    assert nested.code == alias.code == 200
    assert nested.body == alias.body == sample_bytes("photo.jpg")


@pytest_twisted.ensureDeferred
async def test_percent_encoded_endpoint_names(servers, zoo):
    """``%69`` is ``i``: twisted.web picks the resource from the decoded segment,
    and the image path must be what follows that segment, however it was spelt."""
    server, client = await servers.start(root=str(zoo))
    assert (await client.get("/%69mages/photo.jpg")).body == sample_bytes("photo.jpg")
    assert (await client.get("/%69%6D%61%67%65%73/sub/nested.jpg?w=10")).image().width == 10
    assert (await client.get("/%69nfo/logo.png")).json()["width"] == 512
    check_error(await client.get("/%69mages/missing.jpg"), 404, "not_found", root=zoo)
    check_error(await client.get("/%69mages/%2e%2e/photo.jpg"), 403, "forbidden", root=zoo)


@pytest_twisted.ensureDeferred
async def test_percent_encoded_endpoint_names_with_signatures(servers, zoo):
    server, client = await servers.start(root=str(zoo), secret=SECRET)
    url = signed_url(SECRET, "images", "photo.jpg", {"w": 40})
    assert (await client.get(url.replace("/images/", "/%69mages/", 1))).image().width == 40


@pytest_twisted.ensureDeferred
async def test_original_with_percent_encoded_name(servers, tmp_path):
    (tmp_path / "a b é.png").write_bytes(sample_bytes("logo.png"))
    server, client = await servers.start(root=str(tmp_path))
    reply = await client.get("/images/a%20b%20%C3%A9.png")
    assert reply.code == 200
    assert reply.body == sample_bytes("logo.png")


# --- transforms ----------------------------------------------------------------

FITS = [
    # query on photo.jpg (1600x1067 as displayed) -> output size
    ("w=320", (320, 213)),
    ("w=320&fit=clip", (320, 213)),
    ("w=200&h=200", (200, 133)),
    ("w=200&h=200&fit=crop", (200, 200)),
    ("w=300&h=100&fit=scale", (300, 100)),
    ("w=200&h=200&fit=max", (200, 133)),
    ("w=5000&fit=max", (1600, 1067)),
    ("w=5000&h=5000&fit=max", (1600, 1067)),
    ("w=3200", (3200, 2134)),  # clip enlarges (1067 * 2)
    ("h=100", (150, 100)),
    ("h=100&fit=crop", (150, 100)),
    ("h=100&fit=scale", (150, 100)),
    ("w=100&h=300&fit=crop", (100, 300)),
]


@pytest.mark.parametrize("query,size", FITS)
@pytest_twisted.ensureDeferred
async def test_fit_modes(samples, query, size):
    server, client = samples
    reply = await client.get(f"/images/photo.jpg?{query}")
    assert reply.code == 200, reply.body[:200]
    assert reply.header("content-type") == "image/jpeg"
    assert int(reply.header("content-length")) == len(reply.body)
    im = reply.image()
    assert im.format == "JPEG"
    assert im.size == size


CONVERSIONS = [
    ("photo.jpg", "fm=webp&w=100", "WEBP", "image/webp"),
    ("photo.jpg", "fm=png&w=100", "PNG", "image/png"),
    ("photo.jpg", "fm=jpeg&w=100", "JPEG", "image/jpeg"),
    ("logo.png", "fm=jpg&w=64", "JPEG", "image/jpeg"),
    ("logo.png", "fm=webp&w=64", "WEBP", "image/webp"),
    ("logo.png", "w=64", "PNG", "image/png"),
    ("landscape.webp", "fm=jpg&h=80", "JPEG", "image/jpeg"),
    ("landscape.webp", "fm=png&h=80", "PNG", "image/png"),
    ("landscape.webp", "h=80", "WEBP", "image/webp"),
]


@pytest.mark.parametrize("name,query,pil_format,content_type", CONVERSIONS)
@pytest_twisted.ensureDeferred
async def test_format_conversions(samples, name, query, pil_format, content_type):
    server, client = samples
    reply = await client.get(f"/images/{name}?{query}")
    assert reply.code == 200, reply.body[:200]
    assert reply.header("content-type") == content_type
    assert reply.image().format == pil_format


@pytest_twisted.ensureDeferred
async def test_rgba_png_to_jpeg_is_flattened_onto_white(samples):
    server, client = samples
    reply = await client.get("/images/logo.png?fm=jpg&w=128")
    im = reply.image()
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (128, 128))
    corner = im.getpixel((2, 2))  # transparent in the source
    assert min(corner) > 240, corner


@pytest_twisted.ensureDeferred
async def test_quality_changes_the_size(samples):
    server, client = samples
    low = await client.get("/images/photo.jpg?w=800&q=20")
    high = await client.get("/images/photo.jpg?w=800&q=95")
    webp_low = await client.get("/images/photo.jpg?w=800&q=20&fm=webp")
    webp_high = await client.get("/images/photo.jpg?w=800&q=95&fm=webp")
    assert low.code == high.code == webp_low.code == webp_high.code == 200
    assert len(low.body) * 2 < len(high.body)
    assert len(webp_low.body) * 2 < len(webp_high.body)
    assert low.image().size == high.image().size == (800, 534)


@pytest_twisted.ensureDeferred
async def test_exif_orientation_is_applied(samples):
    server, client = samples
    reply = await client.get("/images/photo.jpg?w=320&fm=png")
    got = reply.image().convert("RGB")
    assert got.size == (320, 213)
    with Image.open(os.path.join(SAMPLES_DIR, "photo.jpg")) as stored:
        assert stored.size == (1067, 1600)
        upright = ImageOps.exif_transpose(stored).convert("RGB").resize(got.size)
        sideways = stored.convert("RGB").resize(got.size)  # as if orientation were ignored

    def distance(a, b):
        return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3

    assert distance(got, upright) < 5
    assert distance(got, sideways) > 4 * distance(got, upright) + 10
    # The orientation is baked in: no EXIF orientation left in the output.
    jpeg = (await client.get("/images/photo.jpg?w=320")).image()
    assert jpeg.getexif().get(0x0112) in (None, 1)


@pytest_twisted.ensureDeferred
async def test_transforms_are_cached(samples):
    server, client = samples
    first = await client.get("/images/photo.jpg?w=120")
    second = await client.get("/images/photo.jpg?w=120")
    assert first.body == second.body
    assert first.header("etag") == second.header("etag")
    stats = server.service.stats()
    assert stats["processed"] == 1
    assert stats["cache"]["hits"] >= 1


# --- /info, /healthz -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_info(samples):
    server, client = samples
    photo = await client.get("/info/photo.jpg")
    assert photo.code == 200
    assert photo.json() == {"width": 1600, "height": 1067, "format": "jpeg", "mode": "RGB",
                            "bytes": len(sample_bytes("photo.jpg")), "orientation": 6}
    assert int(photo.header("content-length")) == len(photo.body)
    logo = (await client.get("/info/logo.png")).json()
    assert (logo["width"], logo["height"], logo["format"], logo["mode"]) == (512, 512, "png", "RGBA")
    webp = (await client.get("/info/landscape.webp")).json()
    assert (webp["width"], webp["height"], webp["format"]) == (1200, 800, "webp")
    head = await client.get("/info/photo.jpg", method="HEAD")
    assert head.code == 200 and head.body == b""
    assert int(head.header("content-length")) == len(photo.body)


@pytest_twisted.ensureDeferred
async def test_healthz(servers):
    server, client = await servers.start(workers=3, max_queue=7)
    reply = await client.get("/healthz")
    assert reply.code == 200
    assert reply.header("cache-control") == "no-store"
    health = reply.json()
    assert {k: health[k] for k in ("status", "reasons", "in_processing", "queued", "max_queue")} == \
        {"status": "ok", "reasons": [], "in_processing": 0, "queued": 0, "max_queue": 7}
    assert health["connections"] >= 1 and health["max_connections"] == 1024
    assert 0 <= health["reactor_lag"] < 0.5
    head = await client.get("/healthz", method="HEAD")
    assert head.code == 200 and head.body == b""
    assert int(head.header("content-length")) == len(reply.body)


# --- conditional requests ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_original_304_by_etag(samples):
    server, client = samples
    first = await client.get("/images/photo.jpg")
    etag = first.header("etag")
    for value in (etag, f'"nope", {etag}', "*", "W/" + etag):
        again = await client.get("/images/photo.jpg", headers={"If-None-Match": value})
        assert again.code == 304, value
        assert again.body == b""
        assert again.header("etag") == etag
    other = await client.get("/images/photo.jpg", headers={"If-None-Match": '"nope"'})
    assert other.code == 200 and other.body == first.body


@pytest_twisted.ensureDeferred
async def test_original_304_by_date(samples):
    server, client = samples
    first = await client.get("/images/photo.jpg")
    last_modified = first.header("last-modified")
    same = await client.get("/images/photo.jpg", headers={"If-Modified-Since": last_modified})
    assert same.code == 304 and same.body == b""
    later = await client.get("/images/photo.jpg", headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert later.code == 304
    older = await client.get("/images/photo.jpg", headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert older.code == 200 and older.body == first.body
    garbage = await client.get("/images/photo.jpg", headers={"If-Modified-Since": "yesterday"})
    assert garbage.code == 200
    # If-None-Match wins over If-Modified-Since.
    both = await client.get("/images/photo.jpg",
                            headers={"If-None-Match": '"nope"', "If-Modified-Since": last_modified})
    assert both.code == 200


@pytest_twisted.ensureDeferred
async def test_transformed_304_by_etag_and_date_without_processing(samples):
    server, client = samples
    first = await client.get("/images/photo.jpg?w=90")
    etag = first.header("etag")
    assert etag and etag != (await client.get("/images/photo.jpg?w=91")).header("etag")
    assert etag != (await client.get("/images/photo.jpg")).header("etag")
    processed = server.service.stats()["processed"]
    by_tag = await client.get("/images/photo.jpg?w=90", headers={"If-None-Match": etag})
    assert by_tag.code == 304 and by_tag.body == b""
    last_modified = first.header("last-modified")
    assert last_modified
    by_date = await client.get("/images/photo.jpg?w=90&fm=webp", headers={"If-Modified-Since": last_modified})
    assert by_date.code == 304 and by_date.body == b""
    assert server.service.stats()["processed"] == processed
    stale = await client.get("/images/photo.jpg?w=90", headers={"If-None-Match": '"old"'})
    assert stale.code == 200 and stale.body == first.body


# --- ranges --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ranges(samples):
    server, client = samples
    data = sample_bytes("photo.jpg")
    size = len(data)
    cases = [
        ("bytes=0-99", 0, 100),
        ("bytes=100-", 100, size - 100),
        ("bytes=-500", size - 500, 500),
        ("bytes=10-10", 10, 1),
        (f"bytes={size - 10}-{size + 1000}", size - 10, 10),  # clamped to the end
        (f"bytes=-{size + 5}", 0, size),  # suffix longer than the file: all of it
    ]
    for header, offset, length in cases:
        reply = await client.get("/images/photo.jpg", headers={"Range": header})
        assert reply.code == 206, header
        assert reply.body == data[offset:offset + length], header
        assert reply.header("content-range") == f"bytes {offset}-{offset + length - 1}/{size}"
        assert int(reply.header("content-length")) == length
        assert reply.header("content-type") == "image/jpeg"


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_and_ignored_ranges(samples):
    server, client = samples
    data = sample_bytes("photo.jpg")
    size = len(data)
    for header in (f"bytes={size}-", f"bytes={size + 100}-{size + 200}", "bytes=-0"):
        reply = await client.get("/images/photo.jpg", headers={"Range": header})
        assert reply.code == 416, header
        assert reply.header("content-range") == f"bytes */{size}"
        # An error like the others: JSON, no image type, no public caching.
        assert reply.json()["error"] == "range_not_satisfiable"
        assert reply.header("cache-control") == "no-store"
        assert reply.header("etag") is None and reply.header("last-modified") is None
    # Several ranges, other units, malformed: the whole file is a valid answer.
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=5-1"):
        reply = await client.get("/images/photo.jpg", headers={"Range": header})
        assert reply.code == 200, header
        assert reply.body == data


@pytest_twisted.ensureDeferred
async def test_if_range(samples):
    server, client = samples
    data = sample_bytes("photo.jpg")
    first = await client.get("/images/photo.jpg")
    etag, last_modified = first.header("etag"), first.header("last-modified")
    same = await client.get("/images/photo.jpg", headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.code == 206 and same.body == data[:10]
    by_date = await client.get("/images/photo.jpg", headers={"Range": "bytes=0-9", "If-Range": last_modified})
    assert by_date.code == 206 and by_date.body == data[:10]
    for stale in ('"something-else"', "W/" + etag, "Thu, 01 Jan 1970 00:00:00 GMT", "garbage"):
        for wanted in ("bytes=0-9", f"bytes={len(data) + 10}-"):  # even an unsatisfiable one
            reply = await client.get("/images/photo.jpg", headers={"Range": wanted, "If-Range": stale})
            assert reply.code == 200, (stale, wanted)
            assert reply.body == data
            assert reply.header("content-range") is None


@pytest_twisted.ensureDeferred
async def test_range_is_ignored_for_transforms(samples):
    server, client = samples
    full = await client.get("/images/photo.jpg?w=50")
    ranged = await client.get("/images/photo.jpg?w=50", headers={"Range": "bytes=0-9"})
    assert ranged.code == 200 and ranged.body == full.body


# --- HEAD ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_head(samples):
    server, client = samples
    data = sample_bytes("photo.jpg")
    head = await client.get("/images/photo.jpg", method="HEAD")
    assert head.code == 200 and head.body == b""
    assert int(head.header("content-length")) == len(data)
    assert head.header("content-type") == "image/jpeg"
    assert head.header("etag") == (await client.get("/images/photo.jpg")).header("etag")
    # Range is defined for GET only (RFC 9110 §14.2): a HEAD describes the whole file.
    ranged = await client.get("/images/photo.jpg", method="HEAD", headers={"Range": "bytes=0-99"})
    assert ranged.code == 200 and ranged.body == b""
    assert int(ranged.header("content-length")) == len(data)
    transformed = await client.get("/images/photo.jpg?w=77&fm=png", method="HEAD")
    body = (await client.get("/images/photo.jpg?w=77&fm=png")).body
    assert transformed.code == 200 and transformed.body == b""
    assert transformed.header("content-type") == "image/png"
    assert int(transformed.header("content-length")) == len(body)
    missing = await client.get("/images/missing.jpg", method="HEAD")
    assert missing.code == 404 and missing.body == b""
    assert missing.header("content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_raw_head_response_has_no_body(samples):
    """Checked on the wire: a HEAD answer carries headers only."""
    server, client = samples
    reactor = get_reactor()
    raw = await raw_request(reactor, port_of(server),
                            b"HEAD /images/logo.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"Content-Length: {len(sample_bytes('logo.png'))}".encode() in head
    assert rest == b""


# --- errors ------------------------------------------------------------------------

BAD_QUERIES = [
    "w=abc", "w=0", "w=-5", "w=1.5", "w=99999", "h=0", "q=0", "q=101", "fit=crop", "fit=bogus&w=10",
    "fm=jp2", "w=10&w=20", "w=", "zoom=2", "w=%20%2010",
]


@pytest.mark.parametrize("query", BAD_QUERIES)
@pytest_twisted.ensureDeferred
async def test_400_bad_parameters(samples, query):
    server, client = samples
    reply = await client.get(f"/images/photo.jpg?{query}")
    body = check_error(reply, 400, "bad_request")
    assert body["message"]


@pytest_twisted.ensureDeferred
async def test_400_malformed_path(samples):
    server, client = samples
    check_error(await client.get("/images/bad%zzname.jpg"), 400, "bad_request")
    check_error(await client.get("/images/%ff%fe.jpg"), 400, "bad_request")


FORBIDDEN = [
    b"/images/../photo.jpg",
    b"/images/sub/../photo.jpg",
    b"/images/%2e%2e/photo.jpg",
    b"/images/%2E%2E/%2E%2E/etc/passwd",
    b"/images/sub%2Fnested.jpg",
    b"/images/sub%2fnested.jpg",
    b"/images/sub%5Cnested.jpg",
    b"/images/.hidden.jpg",
    b"/images/%2ehidden.jpg",
    b"/images/escape.jpg",
    b"/images/escape-dir/secret.jpg",
    b"/images/escape.jpg?w=10",
    b"/images/absolute-alias.jpg",
    b"/info/escape.jpg",
    b"/info/../photo.jpg",
    b"/images/sub//nested.jpg",
    b"/images/a%00.jpg",
]


@pytest.mark.parametrize("path", FORBIDDEN, ids=lambda p: p.decode())
@pytest_twisted.ensureDeferred
async def test_403_forbidden_paths(servers, zoo, path):
    server, client = await servers.start(root=str(zoo))
    check_error(await client.get(path), 403, "forbidden", root=zoo)


NOT_FOUND = [
    "/images/missing.jpg",
    "/images/missing.jpg?w=10",
    "/images/sub/missing.png",
    "/images/sub",  # a directory
    "/images/sub?w=10",
    "/images/",
    "/images",
    "/info/missing.jpg",
    "/nope",
    "/",
    "/images.jpg",
]


@pytest.mark.parametrize("path", NOT_FOUND)
@pytest_twisted.ensureDeferred
async def test_404(servers, zoo, path):
    server, client = await servers.start(root=str(zoo))
    check_error(await client.get(path), 404, "not_found", root=zoo)


@pytest_twisted.ensureDeferred
async def test_413_file_too_large(servers, zoo):
    server, client = await servers.start(root=str(zoo), max_file_mb=0.01)  # 10 KiB
    for path in ("/images/photo.jpg", "/images/photo.jpg?w=10", "/info/photo.jpg"):
        check_error(await client.get(path), 413, "too_large", root=zoo)
    assert server.service.stats()["processed"] == 0


@pytest_twisted.ensureDeferred
async def test_413_too_many_pixels_from_the_header(servers, zoo):
    server, client = await servers.start(root=str(zoo), max_pixels=10_000)
    for path in ("/images/photo.jpg?w=10", "/info/big.jpg", "/images/big.jpg?w=10"):
        body = check_error(await client.get(path), 413, "too_large", root=zoo)
        assert "pixels" in body["message"]
    # The original is not decoded, so it is still served.
    assert (await client.get("/images/photo.jpg")).code == 200


@pytest_twisted.ensureDeferred
async def test_413_output_too_large(servers, zoo):
    # The output's own bound (--max-output-pixels), apart from the source's (--max-pixels).
    server, client = await servers.start(root=str(zoo), max_output_pixels=2_000_000)
    check_error(await client.get("/images/photo.jpg?w=4000"), 413, "too_large", root=zoo)


@pytest.mark.parametrize("path", [
    "/images/notes.txt", "/images/notes.txt?w=10", "/info/notes.txt",
    "/images/fake.jpg", "/images/fake.jpg?w=10&fm=png", "/info/fake.jpg",
])
@pytest_twisted.ensureDeferred
async def test_415_not_an_image(servers, zoo, path):
    server, client = await servers.start(root=str(zoo))
    check_error(await client.get(path), 415, "unsupported_image", root=zoo)


@pytest_twisted.ensureDeferred
async def test_415_samples_readme(samples):
    server, client = samples
    check_error(await client.get("/images/README"), 415, "unsupported_image")
    check_error(await client.get("/images/make_samples.py?w=10"), 415, "unsupported_image")


@pytest_twisted.ensureDeferred
async def test_422_truncated_jpeg(servers, zoo):
    server, client = await servers.start(root=str(zoo))
    check_error(await client.get("/images/truncated.jpg?w=100"), 422, "corrupt_image", root=zoo)
    check_error(await client.get("/images/truncated.jpg?w=100&fm=png"), 422, "corrupt_image", root=zoo)


@pytest_twisted.ensureDeferred
async def test_503_when_the_queue_is_full(servers, zoo):
    server, client = await servers.start(root=str(zoo), workers=1, max_queue=0)
    reactor = get_reactor()
    in_flight = client.get(slow())
    await wait_for(reactor, lambda: server.service.stats()["in_processing"] == 1, what="processing")
    reply = await client.get(slow(1400))
    body = check_error(reply, 503, "overloaded", root=zoo)
    assert reply.header("retry-after") == "1"
    assert body["retry_after"] == 1
    head = await client.get(slow(1401), method="HEAD")
    assert head.code == 503 and head.header("retry-after") == "1" and head.body == b""
    # Originals need no worker: still served.
    assert (await client.get("/images/photo.jpg")).code == 200
    first = await in_flight
    assert first.code == 200
    assert first.image().size == (1500, 1000)


@pytest_twisted.ensureDeferred
async def test_504_when_processing_takes_too_long(servers, zoo):
    server, client = await servers.start(root=str(zoo), workers=1, timeout=0.1)
    reply = await client.get(slow())
    check_error(reply, 504, "timeout", root=zoo)
    # Fast requests on the same server are still answered.
    assert (await client.get("/healthz")).code == 200


@pytest_twisted.ensureDeferred
async def test_500_unexpected_errors_say_nothing(samples):
    from twisted.internet import defer

    server, client = samples
    service = server.service
    leaky = RuntimeError(f"boom in {SAMPLES_DIR}/photo.jpg\nTraceback (most recent call last):")
    service.transform = service.transform_located = lambda *a, **k: defer.fail(leaky)
    service.health = lambda: 1 / 0  # /healthz fails while rendering, synchronously
    body = check_error(await client.get("/images/photo.jpg?w=10"), 500, "internal")
    assert body["message"] == "internal error"
    check_error(await client.get("/healthz"), 500, "internal")
    del service.health, service.transform, service.transform_located
    assert (await client.get("/images/photo.jpg?w=10")).code == 200


@pytest_twisted.ensureDeferred
async def test_405_other_methods(samples):
    server, client = samples
    for method, path in (("POST", "/images/photo.jpg"), ("PUT", "/info/photo.jpg"),
                         ("DELETE", "/healthz"), ("POST", "/metrics")):
        reply = await client.get(path, method=method)
        check_error(reply, 405)
        assert "GET" in reply.header("allow")


# --- signed URLs -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signed_urls(servers, zoo):
    server, client = await servers.start(root=str(zoo), secret=SECRET)
    for path, params in (("photo.jpg", {}), ("photo.jpg", {"w": 100, "fit": "crop", "h": 50}),
                         ("sub/nested.jpg", {"w": 64, "fm": "webp"})):
        url = signed_url(SECRET, "images", path, params)
        reply = await client.get(url)
        assert reply.code == 200, (url, reply.body)
        if params:
            assert reply.image().width == params["w"]
    info = await client.get(signed_url(SECRET, "info", "photo.jpg"))
    assert info.code == 200 and info.json()["width"] == 1600
    # Health and metrics need no signature.
    assert (await client.get("/healthz")).code == 200
    assert (await client.get("/metrics")).code == 200


@pytest_twisted.ensureDeferred
async def test_403_bad_or_missing_signature(servers, zoo):
    server, client = await servers.start(root=str(zoo), secret=SECRET)
    good = signed_url(SECRET, "images", "photo.jpg", {"w": 100})
    signature = good.rsplit("s=", 1)[1]
    other = signed_url(b"another-secret-of-16-bytes", "images", "photo.jpg", {"w": 100})
    for path in (
        "/images/photo.jpg",
        "/images/photo.jpg?w=100",
        f"/images/photo.jpg?w=200&s={signature}",  # params changed
        f"/images/logo.png?w=100&s={signature}",  # path changed
        other,  # signed with another key
        good.replace("/images/", "/info/", 1),  # signed for another endpoint
        f"/images/photo.jpg?w=100&s={signature}&s={signature}",
        "/images/photo.jpg?w=100&s=",
        "/info/photo.jpg",
        "/images/missing.jpg",  # no existence check before the signature
    ):
        check_error(await client.get(path), 403, "forbidden", root=zoo)
    assert (await client.get(good)).code == 200
    assert server.service.stats()["processed"] == 1


# --- metrics and access log ----------------------------------------------------------


def parse_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_metrics(servers, zoo):
    server, client = await servers.start(root=str(zoo), workers=2, max_queue=9)
    for path in ("/images/photo.jpg", "/images/photo.jpg?w=10", "/images/photo.jpg?w=10",
                 "/images/missing.jpg", "/images/missing.jpg", "/images/.hidden.jpg",
                 "/info/photo.jpg", "/healthz", "/nope"):
        await client.get(path)
    reply = await client.get("/metrics")
    assert reply.code == 200
    assert reply.header("content-type").startswith("text/plain")
    samples = parse_metrics(reply.body.decode())

    def requests(endpoint, status):
        return samples.get(("imgserver_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0)

    assert requests("images", 200) == 3
    assert requests("images", 404) == 2
    assert requests("images", 403) == 1
    assert requests("info", 200) == 1
    assert requests("healthz", 200) == 1
    assert requests("other", 404) == 1
    assert samples[("imgserver_queue_depth", ())] == 0
    assert samples[("imgserver_workers", ())] == 2
    assert samples[("imgserver_cache_hits_total", ())] >= 1
    assert samples[("imgserver_processing_seconds_count", ())] == 2  # the w=10 transform and the info probe
    # The scrape itself is counted once it is answered.
    again = parse_metrics((await client.get("/metrics")).body.decode())
    assert again[("imgserver_requests_total", (("endpoint", "metrics"), ("status", "200")))] == 1


@pytest_twisted.ensureDeferred
async def test_access_log_one_line_per_request(samples):
    from twisted.logger import formatEvent, globalLogPublisher

    server, client = samples
    events = []

    def observe(event):
        if event.get("log_namespace") == "imgserver.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        paths = ["/images/photo.jpg?w=30", "/images/photo.jpg", "/images/missing.jpg",
                 "/info/logo.png", "/healthz", "/images/photo.jpg?w=bad"]
        for path in paths:
            await client.get(path)
        await client.get("/images/photo.jpg", method="HEAD")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(events) == len(paths) + 1
    statuses = [e["status"] for e in events]
    assert statuses == [200, 200, 404, 200, 200, 400, 200]
    assert [e["method"] for e in events] == ["GET"] * len(paths) + ["HEAD"]
    assert [e["uri"] for e in events][:3] == paths[:3]
    line = formatEvent(events[1])
    assert line.startswith("127.0.0.1 GET /images/photo.jpg 200 ")
    assert events[1]["bytes"] == len(sample_bytes("photo.jpg"))
    assert "\n" not in line


@pytest_twisted.ensureDeferred
async def test_access_log_and_metrics_count_requests_the_client_gave_up(servers, zoo):
    from twisted.logger import globalLogPublisher

    server, client = await servers.start(root=str(zoo), workers=1)
    reactor = get_reactor()
    events = []

    def observe(event):
        if event.get("log_namespace") == "imgserver.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        gone = client.start(slow())
        await wait_for(reactor, lambda: server.service.busy() == 1, what="processing")
        gone.cancel()
        gone.addErrback(lambda _: None)
        await wait_for(reactor, lambda: len(events) == 1, what="the access-log line")
        streamed = await raw_request(reactor, port_of(server), b"GET /images/big.jpg HTTP/1.1\r\nHost: x\r\n\r\n",
                                     stop_after=20_000)
        await wait_for(reactor, lambda: len(events) == 2, what="the access-log line")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert events[0]["status"] == 499 and events[0]["uri"] == slow()
    assert events[1]["status"] == 200 and 0 < events[1]["bytes"] < len(zoo.joinpath("big.jpg").read_bytes())
    assert len(streamed) >= 20_000
    samples = parse_metrics((await client.get("/metrics")).body.decode())
    assert samples[("imgserver_requests_total", (("endpoint", "images"), ("status", "499")))] == 1
    await wait_for(reactor, lambda: server.service.busy() == 0, what="the worker")


@pytest_twisted.ensureDeferred
async def test_serves_on_a_unix_socket(tmp_path):
    """``--http unix:/run/img.sock`` is documented: its clients have no host to log."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.logger import globalLogPublisher

    from imgserver.cli import Server
    from imgserver.settings import Settings

    reactor = get_reactor()
    server = Server(reactor, Settings(workers=1))
    socket_path = str(tmp_path / "img.sock")
    events = []

    def observe(event):
        if event.get("log_namespace") == "imgserver.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        await server.listen(f"unix:{socket_path}", None)
        for path in (b"/healthz", b"/images/logo.png?w=10", b"/images/missing.png"):
            answer = await raw_request(reactor, UNIXClientEndpoint(reactor, socket_path),
                                       b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404" if b"missing" in path else b"HTTP/1.1 200"), answer[:200]
    finally:
        globalLogPublisher.removeObserver(observe)
        await server.stop(grace=5)
    assert [(e["client"], e["status"]) for e in events] == [("-", 200), ("-", 200), ("-", 404)]


# --- load: a burst, disconnects ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_burst_of_500_requests_gets_200_or_503(servers):
    from twisted.internet import defer

    server, client = await servers.start(workers=2, max_queue=50)
    client.timeout = 30
    replies = await defer.gatherResults(
        [client.get(f"/images/photo.jpg?w={w}") for w in range(100, 600)],
        consumeErrors=True)
    codes = [r.code for r in replies]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(503) >= 1 and codes.count(200) >= 1
    for reply, w in zip(replies, range(100, 600)):
        if reply.code == 503:
            # From the queue's depth and recent processing times, not a constant.
            assert 1 <= int(reply.header("retry-after")) <= 60
            assert reply.json()["error"] == "overloaded"
            assert reply.json()["retry_after"] == int(reply.header("retry-after"))
        else:
            assert reply.image().width == w
    stats = server.service.stats()
    assert stats["rejected"] == codes.count(503)
    assert stats["processed"] == codes.count(200)
    assert stats["queued"] == 0 and server.service.busy() == 0
    assert (await client.get("/healthz")).json()["queued"] == 0


@pytest_twisted.ensureDeferred
async def test_clients_that_disconnect_cancel_their_work(servers, zoo):
    server, client = await servers.start(root=str(zoo), workers=1, max_queue=20)
    service = server.service
    reactor = get_reactor()
    pending = [client.start(slow(1500 + i)) for i in range(6)]
    await wait_for(reactor, lambda: service.busy() == 6 and service.stats()["in_processing"] == 1,
                   what="6 requests in the heavy lane")
    assert service.stats()["queued"] == 5
    for d in pending:
        d.cancel()
    for d in pending:
        with pytest.raises(ABORTED):
            await d
    await wait_for(reactor, lambda: service.stats()["queued"] == 0, timeout=1.0, what="queue emptied")
    await wait_for(reactor, lambda: service.busy() == 0, timeout=5.0, what="work in the thread finished")
    await sleep(reactor, 0.05)
    # Only the one already in a thread was processed; the queued ones never ran.
    assert service.stats()["processed"] <= 1
    assert service.stats()["files"]["open"] == 0
    health = (await client.get("/healthz")).json()
    assert {k: health[k] for k in ("status", "in_processing", "queued", "max_queue")} == \
        {"status": "ok", "in_processing": 0, "queued": 0, "max_queue": 20}


@pytest_twisted.ensureDeferred
async def test_identical_requests_share_one_processing(servers, zoo):
    from twisted.internet import defer

    server, client = await servers.start(root=str(zoo), workers=1)
    replies = await defer.gatherResults([client.get(slow(900)) for _ in range(5)], consumeErrors=True)
    assert {r.code for r in replies} == {200}
    assert len({r.body for r in replies}) == 1
    stats = server.service.stats()
    assert stats["processed"] == 1
    assert stats["coalesced"] + stats["cache"]["hits"] == 4


@pytest_twisted.ensureDeferred
async def test_coalesced_waiter_leaving_does_not_cancel_the_others(servers, zoo):
    server, client = await servers.start(root=str(zoo), workers=1, max_queue=20)
    service = server.service
    reactor = get_reactor()
    blocker = client.get(slow(1000))
    await wait_for(reactor, lambda: service.stats()["in_processing"] == 1, what="blocker")
    leaving = client.start(slow(1001))
    staying = client.get(slow(1001))
    await wait_for(reactor, lambda: service.stats()["coalesced"] == 1, what="coalesced")
    leaving.cancel()
    with pytest.raises(ABORTED):
        await leaving
    assert (await staying).code == 200
    assert (await blocker).code == 200
    assert service.stats()["processed"] == 2


@pytest_twisted.ensureDeferred
async def test_client_that_disconnects_while_an_original_streams(servers, zoo):
    server, client = await servers.start(root=str(zoo))
    reactor = get_reactor()
    got = await raw_request(reactor, port_of(server),
                            b"GET /images/big.jpg HTTP/1.1\r\nHost: x\r\n\r\n", stop_after=64 * 1024)
    assert got.startswith(b"HTTP/1.1 200")
    loader = server.service.loader
    await wait_for(reactor, lambda: loader.stats()["open"] == 0 and loader.stats()["active"] == 0,
                   what="stream stopped")
    again = await client.get("/images/big.jpg", headers={"Range": "bytes=-100"})
    assert again.code == 206 and len(again.body) == 100


@pytest_twisted.ensureDeferred
async def test_timeout_does_not_cut_an_original_being_sent_to_a_slow_client(servers, tmp_path):
    """The timeout bounds the wait for an answer (504), not the transfer of a
    large original to a slow reader."""
    data = b"\xff\xd8\xff\xe0" + os.urandom(24 * 1024 * 1024)  # sniffed as JPEG; never decoded
    (tmp_path / "huge.jpg").write_bytes(data)
    server, client = await servers.start(root=str(tmp_path), timeout=0.2)
    reactor = get_reactor()
    reader = await slow_reader(reactor, port_of(server),
                               b"GET /images/huge.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 64 * 1024)
    await sleep(reactor, 0.5)
    assert server.site.requests, "the answer should still be on its way"
    reader.transport.resumeProducing()
    answer = await reader.done
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == len(data) and body == data


# --- descriptors -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leak(zoo):
    """A server's whole life (all kinds of answers, aborted clients) leaves no descriptor open."""
    reactor = get_reactor()

    async def life() -> None:
        made = Servers(reactor)
        try:
            server, client = await made.start(root=str(zoo), workers=1, max_queue=2, timeout=5)
            for path in ("/images/photo.jpg", "/images/photo.jpg?w=33", "/images/logo.png?fm=jpg&w=20",
                         "/info/landscape.webp", "/images/missing.jpg", "/images/../x", "/images/notes.txt",
                         "/images/truncated.jpg?w=5", "/healthz", "/metrics"):
                await client.get(path)
            await client.get("/images/photo.jpg", headers={"Range": "bytes=5-50"})
            await client.get("/images/photo.jpg", method="HEAD")
            aborted = client.start(slow())
            await wait_for(reactor, lambda: server.service.busy() == 1, what="slow request")
            aborted.cancel()
            aborted.addErrback(lambda _: None)
            await raw_request(reactor, port_of(server), b"GET /images/big.jpg HTTP/1.1\r\nHost: x\r\n\r\n",
                              stop_after=10_000)
        finally:
            await made.close()

    await life()  # warm-up: one-time descriptors (mount table, ...) are opened here
    await sleep(reactor, 0.1)
    before = fd_count()
    await life()
    await wait_for(reactor, lambda: fd_count() <= before, timeout=3.0,
                   what=f"descriptors back to {before} (now {fd_count()})")
