"""The gallery (issue 12 item 5): pure rendering, HTTP against real servers on
127.0.0.1, ``imgserver --demo --serve``, and a real headless Chromium driven
over the DevTools protocol (``headless.py``); with ``IMGSERVER_DOCS=1`` it writes docs/gallery.png.
"""

from __future__ import annotations

import io
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from headless import Browser, find_chromium
from http_helpers import LISTEN, Client, Servers, get_reactor, port_of, wait_for
from PIL import Image, ImageDraw, ImageOps

from imgserver import gallery, paths, signing
from imgserver.cli import Server
from imgserver.gallery import (CSP, CSS, EAGER_THUMBNAILS, PAGE_SIZE, THUMB_FALLBACK, THUMB_WIDTHS, Entry,
                               Listing, Urls, classify, display_name, esc, paginate, render_detail,
                               render_gallery, scan_directory)
from imgserver.settings import SAMPLES_DIR, Settings

REPO = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef-gallery-secret"

#: File names that would break HTML, attributes, URLs or srcset if not escaped.
HOSTILE = ['<b>&"quotes\'.png', "100%.jpg", "sp ace, comma.webp", "#hash?q=1.jpg",
           "<img src=x onerror=alert(1)>.png", "é ß €.png"]
NOT_UTF8 = b"caf\xe9.jpg"


# --- helpers -------------------------------------------------------------------


class Page(HTMLParser):
    """Every element and its attributes; the text of each ``class="name"`` / ``"why"`` span."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.names: list[str] = []
        self.whys: list[str] = []
        self._capture: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        cls = attrs.get("class")
        if tag == "span" and cls in ("name", "why"):
            self._capture = self.names if cls == "name" else self.whys
            self._capture.append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self._capture = None

    def handle_data(self, data):
        if self._capture is not None:
            self._capture[-1] += data

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for t, attrs in self.elements if t == tag]

    def thumbnails(self) -> list[dict[str, str]]:
        return [a for a in self.all("img") if "srcset" in a]

    def links(self, prefix: str) -> list[str]:
        return [a["href"] for a in self.all("a") if a.get("href", "").startswith(prefix)]


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "main", "ul",
                "li", "a", "img", "span", "nav", "footer", "code", "div", "figure", "figcaption", "section",
                "table", "tr", "th", "td", "br"}


def check_harmless(text: str) -> Page:
    """No element or attribute the page does not make itself: nothing a name could have injected."""
    page = Page(text)
    assert {tag for tag, _ in page.elements} <= ALLOWED_TAGS
    for tag, attrs in page.elements:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
    assert "<script" not in text.lower()
    assert len(page.all("style")) == 1
    return page


def srcset_of(attrs: dict[str, str]) -> list[tuple[str, str]]:
    return [tuple(c.split()) for c in attrs["srcset"].split(", ")]


def decoded_path(url: str, endpoint: str) -> str:
    """The file path a URL names, decoded the way the server decodes it."""
    raw = urlsplit(url).path
    assert raw.startswith(f"/{endpoint}/"), url
    return paths.join(paths.split_url_path(raw[len(endpoint) + 2:]))


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A pleasant deterministic picture: a two-colour gradient and translucent discs."""
    rnd = random.Random(seed)
    colours = [tuple(rnd.randrange(30, 230) for _ in range(3)) for _ in range(2)]
    im = ImageOps.colorize(Image.linear_gradient("L").resize((width, height)), *colours).convert("RGBA")
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(7):
        r = rnd.randrange(min(width, height) // 10, min(width, height) // 3)
        x, y = rnd.randrange(width), rnd.randrange(height)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(*(rnd.randrange(256) for _ in range(3)), 150))
    return Image.alpha_composite(im, layer).convert("RGB")


def save(path: Path | bytes, im: Image.Image) -> None:
    name = os.fsdecode(path).lower()
    fmt = "JPEG" if name.endswith((".jpg", ".jpeg")) else "WEBP" if name.endswith(".webp") else "PNG"
    out = io.BytesIO()
    im.save(out, fmt, quality=85)
    with open(path, "wb") as f:
        f.write(out.getvalue())


def make_root(root: Path, size: tuple[int, int] = (700, 660), broken: bool = True) -> list[str]:
    """An image tree with every kind of awkward entry; the image names the root's page must show."""
    names = ["alpha.jpg", "beta.png", "gamma.webp", "UPPER.JPG", *HOSTILE]
    for i, name in enumerate(names):
        save(root / name, picture(*size, seed=i))
    (root / "more").mkdir()
    save(root / "more" / "inside.jpg", picture(*size, seed=50))
    (root / "<i>dir&").mkdir()
    save(root / "<i>dir&" / "x.png", picture(*size, seed=51))
    save(root / ".hidden.jpg", picture(64, 64, seed=52))
    (root / ".git").mkdir()
    (root / "notes.txt").write_text("not an image")
    save(os.path.join(os.fsencode(root), NOT_UTF8), picture(64, 64, seed=53))
    save(root / "bell\x07.png", picture(64, 64, seed=54))
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    save(outside / "secret.jpg", picture(64, 64, seed=55))
    os.symlink("alpha.jpg", root / "alias.jpg")                # inside: an image
    os.symlink("more", root / "more-link")                     # inside: a folder (openat2)
    os.symlink(outside / "secret.jpg", root / "escape.jpg")    # outside: never listed
    os.symlink(outside, root / "escape-dir")                   # outside: never listed
    os.symlink("missing.jpg", root / "dangling.jpg")           # nowhere: never listed
    names.append("alias.jpg")
    if broken:
        (root / "fake.png").write_text("a text file with an image's name")
        names.append("fake.png")
    return names


def openat2_confines() -> bool:
    from asyncfile import confine

    return confine.confinement_method() == "openat2"


async def start(servers: Servers, gallery: bool = True, **settings) -> tuple[Server, Client]:
    server = Server(servers.reactor, Settings(**settings), gallery=gallery)
    servers.started.append(server)
    await server.listen(LISTEN, None)
    client = Client(servers.reactor, port_of(server))
    servers.clients.append(client)
    return server, client


@pytest_twisted.async_yield_fixture
async def servers():
    made = Servers(get_reactor())
    yield made
    await made.close()


def html_of(reply) -> str:
    assert reply.code == 200, (reply.code, reply.body[:300])
    assert reply.header("content-type") == "text/html; charset=utf-8"
    assert reply.header("content-security-policy") == CSP
    assert reply.header("x-content-type-options") == "nosniff"
    assert reply.header("cache-control") == "no-cache"
    return reply.body.decode("utf-8")


# --- rendering (pure) ------------------------------------------------------------


def test_escaping_of_hostile_text():
    assert esc('<b>&"x\'') == "&lt;b&gt;&amp;&quot;x&#x27;"
    assert display_name(os.fsdecode(NOT_UTF8)) == "caf\\xe9.jpg"      # non-UTF-8 bytes
    assert display_name("bell\x07\x1b[31m.png") == "bell\\x07\\x1b[31m.png"  # controls, ANSI
    assert display_name("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # a right-to-left override
    assert display_name("\ud800") == "\\xed\\xa0\\x80"                  # a lone surrogate
    assert esc("é 漢字") == "é 漢字"


def listing_with(names, dirs=(), segments=()) -> Listing:
    entries = [classify(segments, n, "dir", gallery.image_extensions()) for n in dirs]
    entries += [classify(segments, n, "file", gallery.image_extensions()) for n in names]
    listing = Listing(tuple(segments), [e for e in entries if e is not None])
    listing.entries.sort(key=gallery._sort_key)
    return listing


def test_gallery_page_escapes_every_name_and_links_back_to_it():
    hostile = [*HOSTILE, os.fsdecode(NOT_UTF8), "bell\x07.png", "evil\u202egnp.png"]
    listing = listing_with(hostile, dirs=["<i>dir&", "folder"], segments=("a&b", "c<d"))
    text = render_gallery(listing, 1, Urls())
    page = check_harmless(text)
    # What a browser shows is exactly the name (or its escaped display form).
    assert sorted(page.names) == sorted([display_name(n) for n in hostile] + ["<i>dir&/", "folder/"])
    # Not servable (not linked): not UTF-8, a control character.
    assert sorted(page.whys) == ["the name is not UTF-8: the server does not serve it",
                                 "the server does not serve this name (forbidden path: control character)"]
    servable = [*HOSTILE, "evil\u202egnp.png"]  # a bidi override is a legal name: served, shown escaped
    assert page.names.count("evil\\u202egnp.png") == 1
    thumbs = page.thumbnails()
    assert sorted(t["alt"] for t in thumbs) == sorted(display_name(n) for n in servable)
    for thumb in thumbs:
        path = decoded_path(thumb["src"], "images")
        assert display_name(path) == "a&b/c<d/" + thumb["alt"]
        for url, _ in srcset_of(thumb):
            assert url.isascii() and " " not in url and "," not in url
            assert decoded_path(url, "images") == path
    assert sorted(decoded_path(t["src"], "images") for t in thumbs) == sorted("a&b/c<d/" + n for n in servable)
    views = sorted(decoded_path(u, "view") for u in page.links("/view/"))
    assert views == sorted("a&b/c<d/" + n for n in servable)
    folders = [decoded_path(u, "gallery") for u in page.links("/gallery/")]
    assert folders == ["a&b", "a&b/c<d/<i>dir&", "a&b/c<d/folder"]  # the crumb, then the folders
    assert page.all("title") and "c&lt;d · imgserver" in text
    assert "\x07" not in text and "\u202e" not in text


@pytest.mark.parametrize("auto_format", [False, True])
def test_srcset_offers_every_width(auto_format):
    text = render_gallery(listing_with(["a b.jpg"]), 1, Urls(auto_format=auto_format))
    (thumb,) = check_harmless(text).thumbnails()
    candidates = srcset_of(thumb)
    assert [d for _, d in candidates] == [f"{w}w" for w in THUMB_WIDTHS]
    assert len(THUMB_WIDTHS) >= 4
    for (url, _), width in zip(candidates, THUMB_WIDTHS):
        expected = {"w": str(width), "h": str(width), "fit": "crop"}
        if auto_format:
            expected["auto"] = "format"
        assert query_of(url) == expected
    assert thumb["src"] == candidates[THUMB_WIDTHS.index(THUMB_FALLBACK)][0]
    assert thumb["sizes"] and thumb["width"] == thumb["height"] == "200"
    assert ("auto=format" in text) == auto_format


def test_signed_urls_verify():
    urls = Urls(secret=SECRET, auto_format=True)
    name = HOSTILE[0]
    text = render_gallery(listing_with([name], segments=("sub dir",)), 1, urls)
    (thumb,) = check_harmless(text).thumbnails()
    for url in [thumb["src"]] + [u for u, _ in srcset_of(thumb)]:
        query = parse_qs(urlsplit(url).query, keep_blank_values=True)
        signing.verify(SECRET, "images", decoded_path(url, "images"), query)
    detail = render_detail("sub dir/" + name, {"width": 10, "height": 10, "bytes": 5}, None, urls,
                           gallery.DETAIL_TRANSFORMS[:3])
    page = check_harmless(detail)
    signed = [a["href"] for a in page.all("a") if a["href"].startswith(("/images/", "/info/"))]
    signed += [a["src"] for a in page.all("img")]
    assert len(signed) >= 6
    for url in signed:
        endpoint = urlsplit(url).path.split("/")[1]
        query = parse_qs(urlsplit(url).query, keep_blank_values=True)
        signing.verify(SECRET, endpoint, decoded_path(url, endpoint), query)
    with pytest.raises(Exception):
        signing.verify(SECRET, "info", decoded_path(thumb["src"], "images"),
                       parse_qs(urlsplit(thumb["src"]).query))


def test_paging():
    entries = [Entry(f"img{i:03}.jpg", "image") for i in range(2 * PAGE_SIZE + 5)]
    assert paginate(entries, 1)[1:] == (1, 3)
    assert len(paginate(entries, 3)[0]) == 5
    assert paginate(entries, 99)[1] == 3 and paginate(entries, 0)[1] == 1
    assert paginate([], 5) == ([], 1, 1)
    listing = Listing(("many",), entries)
    pages = [check_harmless(render_gallery(listing, n, Urls())) for n in (1, 2, 3)]
    assert [len(p.thumbnails()) for p in pages] == [PAGE_SIZE, PAGE_SIZE, 5]
    assert [p.thumbnails()[0]["alt"] for p in pages] == ["img000.jpg", f"img{PAGE_SIZE:03}.jpg",
                                                         f"img{2 * PAGE_SIZE:03}.jpg"]
    rel = [[(a["rel"], a["href"]) for a in p.all("a") if "rel" in a] for p in pages]
    assert rel == [[("next", "/gallery/many?page=2")],
                   [("prev", "/gallery/many"), ("next", "/gallery/many?page=3")],
                   [("prev", "/gallery/many?page=2")]]
    # Only the thumbnails below the fold wait for the browser to scroll.
    lazy = [t.get("loading") for t in pages[0].thumbnails()]
    assert lazy == [None] * EAGER_THUMBNAILS + ["lazy"] * (PAGE_SIZE - EAGER_THUMBNAILS)
    small = Listing((), entries[:3])
    assert "page 1 of" not in render_gallery(small, 1, Urls())


def test_classify():
    ext = (".jpg", ".png")
    assert classify((), "a.JPG", "file", ext) == Entry("a.JPG", "image")
    assert classify((), "a.jpg", "symlink", ext) == Entry("a.jpg", "image")
    assert classify((), "sub", "dir", ext) == Entry("sub", "dir")
    for name, kind in [(".a.jpg", "file"), (".git", "dir"), ("a.txt", "file"), ("a.jpg", "other"), ("b.gif", "file")]:
        assert classify((), name, kind, ext) is None, name
    assert classify((), os.fsdecode(NOT_UTF8), "file", ext).kind == "bad"
    assert classify((), "a\\b.jpg", "file", ext).kind == "bad"  # a backslash: refused by the path policy
    assert classify(("x" * 250,) * 17, "y.jpg", "file", ext).kind == "bad"  # path too long


def test_scan_directory(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shown = make_root(root)
    extensions = gallery.image_extensions()
    listing = scan_directory(str(root), (), extensions)
    images = [e.name for e in listing.entries if e.kind == "image"]
    assert sorted(images) == sorted(shown)
    dirs = [e.name for e in listing.entries if e.kind == "dir"]
    assert dirs == (["<i>dir&", "more", "more-link"] if openat2_confines() else ["<i>dir&", "more"])
    bad = sorted(e.name for e in listing.entries if e.kind == "bad")
    assert bad == sorted(["bell\x07.png", os.fsdecode(NOT_UTF8)])
    assert [e.kind for e in listing.entries] == sorted((e.kind for e in listing.entries),
                                                       key=["dir", "image", "bad"].index)
    assert not listing.truncated
    assert scan_directory(str(root), ("more",), extensions).entries == [Entry("inside.jpg", "image")]
    from asyncfile import OutsideRoot

    for where, error in [(("escape-dir",), OutsideRoot), (("..",), OutsideRoot),
                         (("missing",), FileNotFoundError), (("alpha.jpg",), NotADirectoryError)]:
        with pytest.raises(error):
            scan_directory(str(root), where, extensions)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(80):
        (big / f"{i:02}.png").touch()
    capped = scan_directory(str(big), (), extensions, max_entries=50)
    assert capped.truncated and len(capped.entries) == 50
    assert "only the first" in render_gallery(capped, 1, Urls())


def test_detail_page():
    info = {"width": 1600, "height": 1067, "format": "jpeg", "mode": "RGB", "bytes": 48634, "orientation": 6}
    urls = Urls()
    text = render_detail("a/<x>&.jpg", info, None, urls, gallery.DETAIL_TRANSFORMS[:4])
    page = check_harmless(text)
    imgs = page.all("img")
    assert decoded_path(imgs[0]["src"], "images") == "a/<x>&.jpg" and not urlsplit(imgs[0]["src"]).query
    assert (imgs[0]["width"], imgs[0]["height"]) == ("1600", "1067")
    assert [query_of(i["src"]) for i in imgs[1:]] == [dict(q) for _, q in gallery.DETAIL_TRANSFORMS[:4]]
    assert "48,634" in text and "<th>orientation</th><td>6</td>" in text
    assert page.links("/info/") == ["/info/a/%3Cx%3E%26.jpg"]
    assert [decoded_path(u, "gallery") for u in page.links("/gallery/")] == ["a"]
    # A huge original is shown as a resized copy, and linked.
    huge = dict(info, width=20000, height=20000)
    page = check_harmless(render_detail("h.jpg", huge, None, urls))
    assert query_of(page.all("img")[0]["src"]) == {"w": "1600", "h": "1600", "fit": "max"}
    assert "/images/h.jpg" in page.links("/images/")
    # An unreadable image: its error, escaped, and no transforms.
    page = check_harmless(render_detail("f.png", None, "<not> an image", urls, gallery.DETAIL_TRANSFORMS))
    assert not page.all("img") and "&lt;not&gt; an image" in render_detail("f.png", None, "<not> an image", urls)


def test_csp_allows_exactly_the_stylesheet():
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in CSP
    assert "script-src" not in CSP and "default-src 'none'" in CSP
    assert f"<style>{CSS}</style>" in render_gallery(Listing(()), 1, Urls())


# --- HTTP ------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    names = make_root(root)
    return root, names


@pytest_twisted.ensureDeferred
async def test_gallery_is_off_unless_asked(servers):
    server, client = await start(servers, gallery=False)
    for path in ("/", "/gallery/", "/view/photo.jpg"):
        reply = await client.get(path)
        assert reply.code == 404 and reply.header("content-type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_every_listed_image_and_every_link_works(servers, root):
    root, names = root
    server, client = await start(servers, root=str(root), workers=2)
    for path in ("/", "/gallery", "/gallery/"):
        text = html_of(await client.get(path))
        page = check_harmless(text)
        assert sorted(t["alt"] for t in page.thumbnails()) == sorted(names)
    assert f"{len(names)} images" in text and "3 folders" in text
    assert "caf\\xe9.jpg" in page.names and "bell\\x07.png" in page.names
    for absent in (".hidden", "secret", "escape", "dangling", "notes", ".git"):
        assert absent not in text
    sizes = {}
    for thumb in page.thumbnails():
        path = decoded_path(thumb["src"], "images")
        for url, descriptor in srcset_of(thumb):
            reply = await client.get(url)
            if path == "fake.png":
                assert reply.code == 415
                continue
            assert reply.code == 200, (url, reply.body[:200])
            width = int(descriptor[:-1])
            sizes[url] = reply.image().size
            assert sizes[url] == (width, width), url
    assert len(sizes) == (len(names) - 1) * len(THUMB_WIDTHS)
    for link in page.links("/gallery/"):
        assert check_harmless(html_of(await client.get(link))).thumbnails()
    for link in page.links("/view/"):
        html_of(await client.get(link))
    head = await client.get("/", method="HEAD")
    assert head.code == 200 and head.body == b"" and int(head.header("content-length")) == len(text.encode())


@pytest_twisted.ensureDeferred
async def test_subfolders_and_confinement(servers, root):
    root, names = root
    server, client = await start(servers, root=str(root))
    page = check_harmless(html_of(await client.get("/gallery/more")))
    assert [t["alt"] for t in page.thumbnails()] == ["inside.jpg"]
    assert (await client.get(page.thumbnails()[0]["src"])).code == 200
    page = check_harmless(html_of(await client.get("/gallery/%3Ci%3Edir%26/")))
    assert [t["alt"] for t in page.thumbnails()] == ["x.png"]
    refused = {"/gallery/..": 403, "/gallery/%2e%2e": 403, "/gallery/more/%2e%2e/..": 403,
               "/gallery/a%2fb": 403, "/gallery/.git": 403, "/gallery/escape-dir": 403,
               "/gallery/missing": 404, "/gallery/alpha.jpg": 404, "/gallery/more//x": 403,
               "/gallery/%ff": 400, "/view/..%2falpha.jpg": 403, "/view/.hidden.jpg": 403,
               "/view/escape.jpg": 403, "/view/missing.png": 404, "/view/": 404, "/view/more": 404,
               "//more": 404, "/?page=0": 400, "/?page=x": 400, "/?page=1&page=2": 400, "/?w=10": 400,
               "/view/alpha.jpg?x=1": 400}
    for path, status in refused.items():
        reply = await client.get(path)
        assert reply.code == status, (path, reply.code, reply.body[:200])
        assert reply.header("content-type") == "application/json"
        assert str(root).encode() not in reply.body


@pytest_twisted.ensureDeferred
async def test_paging_over_http(servers, tmp_path):
    for i in range(PAGE_SIZE + 7):
        (tmp_path / f"{i:03}.png").touch()  # listed by name: never decoded here
    server, client = await start(servers, root=str(tmp_path))
    first = check_harmless(html_of(await client.get("/")))
    last = check_harmless(html_of(await client.get("/?page=2")))
    beyond = html_of(await client.get("/?page=99"))
    assert len(first.thumbnails()) == PAGE_SIZE and len(last.thumbnails()) == 7
    assert first.links("/?page=2") == ["/?page=2"]
    assert "page 2 of 2" in beyond


@pytest_twisted.ensureDeferred
async def test_signed_gallery(servers, root):
    root, names = root
    server, client = await start(servers, root=str(root), secret=SECRET)
    page = check_harmless(html_of(await client.get("/")))
    thumb = next(t for t in page.thumbnails() if t["alt"] == HOSTILE[0])
    assert query_of(thumb["src"])["s"]
    assert (await client.get(thumb["src"])).code == 200
    unsigned = thumb["src"].split("&s=")[0]
    assert (await client.get(unsigned)).code == 403
    detail = check_harmless(html_of(await client.get(Urls.view(HOSTILE[0]))))
    for img in detail.all("img"):
        assert (await client.get(img["src"])).code == 200, img["src"]
    (info,) = detail.links("/info/")
    assert (await client.get(info)).json()["width"] == 700


@pytest_twisted.ensureDeferred
async def test_detail_view(servers, root):
    root, names = root
    server, client = await start(servers, root=str(root))
    text = html_of(await client.get("/view/" + "alpha.jpg"))
    page = check_harmless(text)
    info = (await client.get("/info/alpha.jpg")).json()
    for key, value in info.items():
        assert f"<th>{key}</th>" in text
    imgs = page.all("img")
    assert urlsplit(imgs[0]["src"]).path == "/images/alpha.jpg" and not urlsplit(imgs[0]["src"]).query
    assert len(imgs) >= 5  # the original and at least the four classic transforms
    for img in imgs:
        reply = await client.get(img["src"])
        assert reply.code == 200 and reply.image().size[0] > 0, img["src"]
    text = html_of(await client.get("/view/fake.png"))
    assert "not an image" in text.lower() and not check_harmless(text).all("img")


@pytest_twisted.ensureDeferred
async def test_listing_runs_off_the_reactor_thread_and_is_bounded(servers, root, monkeypatch):
    root, names = root
    monkeypatch.setattr(gallery, "LISTINGS_AT_ONCE", 1)
    monkeypatch.setattr(gallery, "LISTINGS_WAITING", 0)
    release = threading.Event()
    threads_seen = []
    real_scan = gallery.scan_directory

    def slow_scan(*args, **kwargs):
        threads_seen.append(threading.current_thread())
        release.wait(20)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(gallery, "scan_directory", slow_scan)
    server, client = await start(servers, root=str(root))
    try:
        first = client.get("/")
        answered = []
        first.addBoth(lambda r: answered.append(r) or r)
        await wait_for(get_reactor(), lambda: threads_seen, what="the listing to start")
        assert threads_seen[0] is not threading.main_thread()
        second = await client.get("/gallery/more")
        assert second.code == 503 and second.header("retry-after")
        assert (await client.get("/healthz")).code in (200, 503)  # the reactor answers meanwhile
        assert not answered
        # A client that gives up does not free the place while its thread still lists.
        first.cancel()
        first.addErrback(lambda f: None)
        await wait_for(get_reactor(), lambda: not server.site.requests, what="the server to let go")
        assert (await client.get("/gallery/more")).code == 503
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while (reply := await client.get("/gallery/more")).code == 503:  # once the thread has ended
        assert time.monotonic() < deadline
    assert reply.code == 200 and len(threads_seen) == 2


def test_demo_serve_keeps_serving_until_interrupted():
    proc = subprocess.Popen([sys.executable, "-m", "imgserver", "--demo", "--serve"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # A thread reads the lines: select() on a buffered pipe misses lines already read
        # into the buffer (this test hung that way under load when the demo's lines arrived at once).
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")]
                         + [lines.put("")], daemon=True).start()
        deadline, out = time.monotonic() + 60, ""
        while "Ctrl-C" not in out:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no 'Ctrl-C' line within 60 s:\n{out}") from None
            assert line, (out, proc.stderr.read())
            out += line
        url = re.search(r"the gallery is at (http://127\.0\.0\.1:\d+/)", out).group(1)
        assert re.search(r"HTTP 200 / +[\d.]+ ms  HTML, [\d,]+ bytes, 3 images", out), out
        with urllib.request.urlopen(url, timeout=20) as reply:
            text = reply.read().decode()
            assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        page = check_harmless(text)
        assert sorted(t["alt"] for t in page.thumbnails()) == sorted(
            n for n in os.listdir(SAMPLES_DIR) if n.endswith((".jpg", ".png", ".webp")))
        with urllib.request.urlopen(url.rstrip("/") + page.thumbnails()[0]["src"], timeout=20) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("image/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# --- a real browser ----------------------------------------------------------------------


IMAGES_JS = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    title: document.title,
    scripts: document.scripts.length,
    names: [...document.querySelectorAll('.name')].map(e => e.textContent),
    images: imgs.map(i => ({
      alt: i.alt, current: i.currentSrc, natural: i.naturalWidth, complete: i.complete,
      candidates: i.srcset ? i.srcset.split(',').map(c => {
        const [u, d] = c.trim().split(/\\s+/); return [new URL(u, document.baseURI).href, d]; }) : [],
    })),
  };
})()"""


def drive(base: str, screenshot: Path) -> dict:
    """Blocking (a thread): the gallery at DPR 1 and 2, a detail page, a screenshot."""
    with Browser(timeout=30) as browser:
        seen = {}
        for scale in (1, 2):
            page = browser.new_page(1280, 800, scale=scale)
            page.navigate(base + "/")
            seen[scale] = page.evaluate(IMAGES_JS)
            if scale == 1:
                screenshot.parent.mkdir(exist_ok=True)
                screenshot.write_bytes(page.screenshot())
        page.navigate(base + Urls.view("alpha.jpg"))
        seen["detail"] = page.evaluate(IMAGES_JS)
        seen["version"] = browser.version.get("product")
        return seen


@pytest.mark.skipif(find_chromium() is None,
                    reason="needs a Chromium: Debian's package (apt-get install -y chromium), or $CHROMIUM")
@pytest_twisted.ensureDeferred
async def test_gallery_in_headless_chromium(servers, tmp_path):
    from twisted.internet import threads

    root = tmp_path / "root"
    root.mkdir()
    names = make_root(root, size=(900, 640), broken=False)
    for name in os.listdir(SAMPLES_DIR):
        if name.endswith((".jpg", ".png", ".webp")):
            (root / name).write_bytes(Path(SAMPLES_DIR, name).read_bytes())
            names.append(name)
    server, client = await start(servers, root=str(root), workers=2)
    base = f"http://127.0.0.1:{port_of(server)}"
    # IMGSERVER_DOCS=1 refreshes the README's picture; otherwise the test leaves the repository alone.
    screenshot = REPO / "docs" / "gallery.png" if os.environ.get("IMGSERVER_DOCS") else tmp_path / "gallery.png"
    seen = await threads.deferToThread(drive, base, screenshot)

    for scale in (1, 2):
        result = seen[scale]
        assert result["title"] == "images · imgserver" and result["scripts"] == 0
        assert sorted(i["alt"] for i in result["images"]) == sorted(names)
        assert "caf\\xe9.jpg" in result["names"] and HOSTILE[0] in result["names"]
        for image in result["images"]:
            assert image["complete"] and image["natural"] > 0, image  # every thumbnail decodes
            assert image["current"] in [u for u, _ in image["candidates"]], image  # chosen from srcset
    chosen = {scale: {i["alt"]: dict(i["candidates"])[i["current"]] for i in seen[scale]["images"]}
              for scale in (1, 2)}
    for name in names:
        # Twice the pixels per CSS pixel: a wider candidate.
        assert int(chosen[2][name][:-1]) > int(chosen[1][name][:-1]), (name, chosen[1][name], chosen[2][name])
    detail = seen["detail"]["images"]
    assert len(detail) >= 5
    for image in detail:
        assert image["complete"] and image["natural"] > 0, image
    with Image.open(screenshot) as shot:
        assert shot.size == (1280, 800)
