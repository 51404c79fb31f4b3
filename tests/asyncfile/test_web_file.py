"""``asyncfile.web.File`` against ``twisted.web.static.File``, on real servers.

The same table of requests goes to two real sites on 127.0.0.1 built alike,
one from ``twisted.web.static.File`` and one from ``asyncfile.web.File``; the
answers must be the same (status, body bytes, the headers that matter),
except where ``DIFFERENCES`` says otherwise — the one list of what is meant
to differ, each entry asserted on both sides.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.web import resource, script, static

from asyncfile import conditional
from asyncfile.web import File

from .web_helpers import (
    HELLO,
    LogCapture,
    all_closed,
    MTIME_NS,
    OUTSIDE,
    Sites,
    build_tree,
    etag_of_path,
    fds_under,
    fetch,
    parse_answer,
    raw_exchange,
    request_bytes,
    wait_for,
)

LAST_MODIFIED = conditional.http_date(-(-MTIME_NS // 10**9))  # static.File: ceil(st_mtime)
LONG_AGO = "Sat, 01 Jan 2000 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"

#: The headers compared between the two servers.
HEADERS = ("content-type", "content-encoding", "content-length", "content-range", "last-modified",
           "accept-ranges", "location", "etag", "allow", "retry-after")


@dataclass
class Case:
    name: str
    path: str  # as sent on the request line
    method: str = "GET"
    #: Request headers; ``ETAG`` in a value becomes the served file's entity tag.
    headers: dict[str, str] = field(default_factory=dict)
    #: The served file (relative to ``served``) whose representation answers, if any.
    file: str | None = None


CASES = [
    Case("plain", "/files/hello.txt", file="hello.txt"),
    Case("head", "/files/hello.txt", "HEAD", file="hello.txt"),
    Case("big", "/files/big.bin", file="big.bin"),
    Case("empty file", "/files/empty.txt", file="empty.txt"),
    Case("html", "/files/page.html", file="page.html"),
    Case("unknown extension", "/files/data.unknownext", file="data.unknownext"),
    Case("no extension", "/files/noext", file="noext"),
    Case("gzip encoding", "/files/archive.tar.gz", file="archive.tar.gz"),
    Case("bzip2 encoding", "/files/notes.txt.bz2", file="notes.txt.bz2"),
    Case("dot file", "/files/.hidden", file=".hidden"),
    Case("percent-encoded space", "/files/with%20space.txt", file="with space.txt"),
    Case("percent-encoded utf-8", "/files/%C3%BCn%C3%AF.txt", file="\u00fcn\u00ef.txt"),
    Case("percent-encoded letters", "/files/%68ello.txt", file="hello.txt"),
    Case("symlink inside", "/files/link-in.txt", file="hello.txt"),
    Case("symlink up, inside", "/files/list/link-up.txt", file="hello.txt"),
    Case("symlink outside", "/files/escape/link-out.txt"),
    Case("through a symlinked dir outside", "/files/escape/dir-out/secret.txt"),
    Case("listing a symlinked dir outside", "/files/escape/dir-out/"),
    Case("dangling symlink", "/files/escape/dangling"),
    Case("symlink loop", "/files/escape/loop"),
    Case("missing", "/files/missing.txt"),
    Case("missing in sub", "/files/sub/missing.txt"),
    Case("missing dir", "/files/nodir/x.txt"),
    Case("file as dir", "/files/hello.txt/x"),
    Case("file with slash", "/files/hello.txt/"),
    Case("dot-dot", "/files/../outside/secret.txt"),
    Case("dot-dot encoded", "/files/%2e%2e/outside/secret.txt"),
    Case("slashes encoded", "/files/sub%2F..%2F..%2Foutside%2Fsecret.txt"),
    Case("dot-dot deeper", "/files/sub/../../outside/secret.txt"),
    Case("nul byte", "/files/hello.txt%00"),
    Case("bad utf-8", "/files/%FF.txt"),
    Case("dir without slash", "/files/sub"),
    Case("top dir without slash", "/files"),
    Case("dir without slash, query", "/files/sub?a=1"),
    Case("head on dir", "/files/sub", "HEAD"),
    Case("dir with index", "/files/sub/", file="sub/index.html"),
    Case("index by name", "/files/sub/index.html", file="sub/index.html"),
    Case("listing", "/files/list/"),
    Case("listing head", "/files/list/", "HEAD"),
    Case("listing of the root", "/files/"),
    Case("nested dir without slash", "/files/list/nested"),
    Case("listing with links out", "/files/escape/"),
    Case("listing disabled", "/nolist/list/"),
    Case("post", "/files/hello.txt", "POST"),
    Case("put child", "/files/extra"),
    Case("single file", "/single", file="hello.txt"),
    Case("single file, slash", "/single/"),
    Case("single file, child", "/single/x"),
    Case("ignoredExts", "/ign/doc", file="doc.html"),
    Case("ignoredExts, exact", "/ign/doc.html", file="doc.html"),
    Case("ignoredExts, missing", "/ign/nothing"),
    Case("ignoredExts star", "/star/doc", file="doc.html"),
    Case("ignoredExts star in sub", "/star/sub/inner", file="sub/inner.txt"),
    Case("processor", "/files/scripts/hello.rpy"),
    Case("processor index", "/files/scripts/withindex/"),
    Case("processor missing", "/files/scripts/missing.rpy"),
    Case("processor through ignoredExts", "/rpyign/hello"),
    Case("processor, head", "/files/scripts/hello.rpy", "HEAD"),
    Case("empty segment after index", "/files/sub//x"),
    Case("empty segment after listing", "/files/list//x"),
    Case("post to listing", "/files/list/", "POST"),
    Case("post to index", "/files/sub/", "POST"),
    Case("dot segment", "/files/./hello.txt", file="hello.txt"),
    # ranges
    Case("range first bytes", "/files/hello.txt", headers={"Range": "bytes=0-9"}, file="hello.txt"),
    Case("range open end", "/files/hello.txt", headers={"Range": "bytes=1300-"}, file="hello.txt"),
    Case("range suffix", "/files/hello.txt", headers={"Range": "bytes=-20"}, file="hello.txt"),
    Case("range past end clipped", "/files/hello.txt", headers={"Range": "bytes=1310-9999"},
         file="hello.txt"),
    Case("range whole", "/files/hello.txt", headers={"Range": "bytes=0-"}, file="hello.txt"),
    Case("range big middle", "/files/big.bin", headers={"Range": "bytes=200000-600000"}, file="big.bin"),
    Case("range invalid order", "/files/hello.txt", headers={"Range": "bytes=9-2"}, file="hello.txt"),
    Case("range other unit", "/files/hello.txt", headers={"Range": "lines=0-9"}, file="hello.txt"),
    Case("range garbage", "/files/hello.txt", headers={"Range": "bytes=abc"}, file="hello.txt"),
    Case("range on head", "/files/hello.txt", "HEAD", headers={"Range": "bytes=0-9"}, file="hello.txt"),
    Case("range unsatisfiable", "/files/hello.txt", headers={"Range": "bytes=5000-"}, file="hello.txt"),
    Case("range on empty file", "/files/empty.txt", headers={"Range": "bytes=0-0"}, file="empty.txt"),
    Case("range suffix zero", "/files/hello.txt", headers={"Range": "bytes=-0"}, file="hello.txt"),
    Case("range suffix too long", "/files/hello.txt", headers={"Range": "bytes=-5000"}, file="hello.txt"),
    Case("range upper-case unit", "/files/hello.txt", headers={"Range": "BYTES=0-9"}, file="hello.txt"),
    Case("multipart", "/files/hello.txt", headers={"Range": "bytes=0-0,-1"}, file="hello.txt"),
    Case("multipart big", "/files/big.bin", headers={"Range": "bytes=0-9,300000-700000,-100"},
         file="big.bin"),
    Case("multipart overlapping", "/files/hello.txt", headers={"Range": "bytes=0-99,50-149"},
         file="hello.txt"),
    Case("multipart gzip", "/files/archive.tar.gz", headers={"Range": "bytes=0-1,10-20"},
         file="archive.tar.gz"),
    Case("multipart one satisfiable", "/files/hello.txt", headers={"Range": "bytes=0-4,9000-"},
         file="hello.txt"),
    Case("multipart none satisfiable", "/files/hello.txt", headers={"Range": "bytes=8000-,9000-"},
         file="hello.txt"),
    Case("multipart overlapping past size", "/files/hello.txt", headers={"Range": "bytes=0-,0-,0-"},
         file="hello.txt"),
    # conditionals
    Case("if-modified-since same", "/files/hello.txt", headers={"If-Modified-Since": LAST_MODIFIED},
         file="hello.txt"),
    Case("if-modified-since later", "/files/hello.txt", headers={"If-Modified-Since": FUTURE},
         file="hello.txt"),
    Case("if-modified-since earlier", "/files/hello.txt", headers={"If-Modified-Since": LONG_AGO},
         file="hello.txt"),
    Case("if-modified-since garbage", "/files/hello.txt", headers={"If-Modified-Since": "yesterday"},
         file="hello.txt"),
    Case("if-modified-since with length", "/files/hello.txt",
         headers={"If-Modified-Since": LAST_MODIFIED + "; length=1380"}, file="hello.txt"),
    Case("if-modified-since on head", "/files/hello.txt", "HEAD",
         headers={"If-Modified-Since": LAST_MODIFIED}, file="hello.txt"),
    Case("if-none-match etag", "/files/hello.txt", headers={"If-None-Match": "ETAG"}, file="hello.txt"),
    Case("if-none-match weak etag", "/files/hello.txt", headers={"If-None-Match": "W/ETAG"},
         file="hello.txt"),
    Case("if-none-match star", "/files/hello.txt", headers={"If-None-Match": "*"}, file="hello.txt"),
    Case("if-none-match other", "/files/hello.txt", headers={"If-None-Match": '"other"'},
         file="hello.txt"),
    Case("if-none-match beats if-modified-since", "/files/hello.txt",
         headers={"If-None-Match": '"other"', "If-Modified-Since": LAST_MODIFIED}, file="hello.txt"),
    Case("if-match etag", "/files/hello.txt", headers={"If-Match": "ETAG"}, file="hello.txt"),
    Case("if-match star", "/files/hello.txt", headers={"If-Match": "*"}, file="hello.txt"),
    Case("if-match other", "/files/hello.txt", headers={"If-Match": '"other"'}, file="hello.txt"),
    Case("if-unmodified-since earlier", "/files/hello.txt", headers={"If-Unmodified-Since": LONG_AGO},
         file="hello.txt"),
    Case("if-unmodified-since later", "/files/hello.txt", headers={"If-Unmodified-Since": FUTURE},
         file="hello.txt"),
    Case("if-range etag", "/files/hello.txt", headers={"Range": "bytes=0-9", "If-Range": "ETAG"},
         file="hello.txt"),
    Case("if-range other etag", "/files/hello.txt", headers={"Range": "bytes=0-9", "If-Range": '"x"'},
         file="hello.txt"),
    Case("if-range date", "/files/hello.txt",
         headers={"Range": "bytes=0-9", "If-Range": LAST_MODIFIED}, file="hello.txt"),
    Case("if-range old date", "/files/hello.txt",
         headers={"Range": "bytes=0-9", "If-Range": LONG_AGO}, file="hello.txt"),
]

# -- what is meant to differ ---------------------------------------------------------------
#: A header value that must equal the length of the answer's own body.
BODY_LENGTH = object()


def contains(*needles: bytes) -> Callable[[bytes], bool]:
    return lambda body: all(n in body for n in needles)


def lacks(*needles: bytes) -> Callable[[bytes], bool]:
    return lambda body: not any(n in body for n in needles)


FORBIDDEN_PAGE = contains(b"403 - Forbidden Resource")
NOT_FOUND_PAGE = contains(b"404 - No Such Resource", b"File not found.")
PROCESSING_FAILED = contains(b"Processing Failed")
PRECONDITION_FAILED_PAGE = contains(b"Precondition Failed")
HTML = "text/html; charset=utf-8"
SIZE = len(HELLO)

NOT_MODIFIED_HERE = {"status": (200, 304), "body": (HELLO, b""),
                     "content-length": (str(SIZE), "0"), "content-type": ("text/plain", None)}
PRECONDITION_FAILED_HERE = {"status": (200, 412), "body": (HELLO, PRECONDITION_FAILED_PAGE),
                            "content-type": ("text/plain", HTML), "content-length": (str(SIZE), None)}
RANGE_IGNORED_HERE = {"status": (206, 200), "body": (HELLO[:10], HELLO), "content-length": ("10", str(SIZE)),
                      "content-range": (f"bytes 0-9/{SIZE}", None)}

#: Every intended difference: case -> aspect ("status", "body", "parts" or a
#: header) -> (what static.File answers, what asyncfile.web.File answers).  A
#: value is the expected value (None: absent) or a predicate.  Under "*":
#: what differs for every case that answers from a file (``Case.file``).
DIFFERENCES: dict[str, dict[str, tuple[Any, Any]]] = {
    "*": {
        # asyncfile.web.File sends a strong ETag (inode, size, mtime) with
        # every answer from a file; static.File none.
        "etag": (None, "the served file's ETag"),
    },
    # Symlinks leading outside the directory: refused (403), not followed;
    # the listing leaves out entries it cannot open beneath the directory.
    "symlink outside": {
        "status": (200, 403), "body": (OUTSIDE, FORBIDDEN_PAGE),
        "content-type": ("text/plain", HTML), "content-length": (BODY_LENGTH, BODY_LENGTH),
        "last-modified": (LAST_MODIFIED, None), "accept-ranges": ("bytes", None),
    },
    "through a symlinked dir outside": {
        "status": (200, 403), "body": (OUTSIDE, FORBIDDEN_PAGE),
        "content-type": ("text/plain", HTML), "content-length": (BODY_LENGTH, BODY_LENGTH),
        "last-modified": (LAST_MODIFIED, None), "accept-ranges": ("bytes", None),
    },
    "listing a symlinked dir outside": {
        "status": (200, 403), "body": (contains(b"secret.txt"), FORBIDDEN_PAGE),
        "content-length": (BODY_LENGTH, BODY_LENGTH),
    },
    "listing with links out": {
        "body": (contains(b"inside.txt", b"link-out.txt", b"dir-out/"),
                 lambda b: contains(b"inside.txt")(b) and lacks(b"link-out.txt", b"dir-out")(b)),
        "content-length": (BODY_LENGTH, BODY_LENGTH),
    },
    # A symlink loop: refused as a symlink that cannot be followed beneath the
    # directory (OutsideRoot, ELOOP): 403; static.File: 404 (it does not exist).
    "symlink loop": {"status": (404, 403), "body": (NOT_FOUND_PAGE, FORBIDDEN_PAGE),
                     "content-length": (BODY_LENGTH, BODY_LENGTH)},
    # static.File gives a NUL byte to os.stat (ValueError: 500); here 404.
    "nul byte": {
        "status": (500, 404), "body": (PROCESSING_FAILED, NOT_FOUND_PAGE),
        "content-type": ("text/html", HTML), "content-length": (BODY_LENGTH, BODY_LENGTH),
    },
    # Ranges follow RFC 9110 (asyncfile.conditional.parse_ranges).
    "range suffix too long": {  # static.File: a negative offset, then a failed seek
        "status": (500, 206), "body": (PROCESSING_FAILED, HELLO),
        "content-type": ("text/html", "text/plain"), "content-length": (BODY_LENGTH, BODY_LENGTH),
        "content-range": (f"bytes {SIZE - 5000}-{SIZE - 1}/{SIZE}", f"bytes 0-{SIZE - 1}/{SIZE}"),
    },
    "range upper-case unit": {  # units are case-insensitive (RFC 9110 §14.1)
        "status": (200, 206), "body": (HELLO, HELLO[:10]),
        "content-length": (str(SIZE), "10"), "content-range": (None, f"bytes 0-9/{SIZE}"),
    },
    "multipart one satisfiable": {  # one satisfiable range: a single part
        "status": (206, 206), "parts": ([("text/plain", f"bytes 0-4/{SIZE}", HELLO[:5])], None),
        "body": (None, HELLO[:5]), "content-type": ("multipart/byteranges", "text/plain"),
        "content-length": (BODY_LENGTH, "5"), "content-range": (None, f"bytes 0-4/{SIZE}"),
    },
    "multipart none satisfiable": {  # static.File: StopIteration in its producer (500)
        "status": (500, 416), "body": (PROCESSING_FAILED, b""),
        "content-type": ("text/html", "text/plain"), "content-length": (BODY_LENGTH, "0"),
        "content-range": (f"bytes */{SIZE}", f"bytes */{SIZE}"),
    },
    "multipart overlapping past size": {  # the whole file once, not three times
        "status": (206, 200), "body": (None, HELLO),
        "parts": ([("text/plain", f"bytes 0-{SIZE - 1}/{SIZE}", HELLO)] * 3, None),
        "content-type": ("multipart/byteranges", "text/plain"), "content-length": (BODY_LENGTH, str(SIZE)),
    },
    # Preconditions: static.File knows If-Modified-Since only.
    "if-none-match etag": NOT_MODIFIED_HERE,
    "if-none-match weak etag": NOT_MODIFIED_HERE,
    "if-none-match star": NOT_MODIFIED_HERE,
    "if-none-match beats if-modified-since": {  # If-None-Match decides; If-Modified-Since is ignored
        "status": (304, 200), "body": (b"", HELLO),
        "content-length": ("0", str(SIZE)), "content-type": (None, "text/plain"),
    },
    "if-modified-since with length": {  # not an HTTP-date: ignored here, cut off there
        "status": (304, 200), "body": (b"", HELLO),
        "content-length": ("0", str(SIZE)), "content-type": (None, "text/plain"),
    },
    "if-match other": PRECONDITION_FAILED_HERE,
    "if-unmodified-since earlier": PRECONDITION_FAILED_HERE,
    "if-range other etag": RANGE_IGNORED_HERE,  # If-Range no longer holds: the whole file
    "if-range old date": RANGE_IGNORED_HERE,
}


def _matches(expected: Any, actual: Any) -> bool:
    if callable(expected):
        return actual is not None and bool(expected(actual))
    return bool(expected == actual)


def _aspects(answer: Any) -> dict[str, Any]:
    """What is compared of one answer."""
    out: dict[str, Any] = {"status": answer.status}
    multipart = (answer.header("content-type") or "").startswith("multipart/byteranges")
    out["parts"] = answer.parts() if multipart else None
    out["body"] = None if multipart else answer.body
    for name in HEADERS:
        out[name] = answer.header(name)
    if multipart:  # boundaries differ (random here, the clock there): compared as parsed parts
        out["content-type"] = "multipart/byteranges"
    return out


def compare(case: Case, theirs: Any, ours: Any, served: str) -> list[str]:
    """The problems in a pair of answers (empty: as expected)."""
    a, b = _aspects(theirs), _aspects(ours)
    if case.file is not None and b["status"] in (200, 206, 304, 412, 416):
        a_etag, b_etag = DIFFERENCES["*"]["etag"]
        assert a_etag is None
        b["etag"] = b["etag"] == etag_of_path(os.path.join(served, case.file)) and "the served file's ETag"
    expected = DIFFERENCES.get(case.name, {})
    problems = []
    for aspect in a:
        if aspect == "etag" and case.file is not None and b["status"] in (200, 206, 304, 412, 416):
            want = DIFFERENCES["*"]["etag"]
        elif aspect in expected:
            want = expected[aspect]
        else:
            if a[aspect] != b[aspect] and not (aspect == "content-length" and a["parts"] is not None):
                problems.append(f"{aspect}: static {_short(a[aspect])} != ours {_short(b[aspect])}")
            continue
        for side, answer, value, wanted in (("static", theirs, a[aspect], want[0]),
                                            ("ours", ours, b[aspect], want[1])):
            if wanted is BODY_LENGTH:
                ok = value == str(len(answer.body))
            else:
                ok = _matches(wanted, value)
            if not ok:
                problems.append(f"{aspect}: {side} answered {_short(value)}, expected {_short(wanted)}")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 160 else text[:150] + f"... ({len(text)} chars)"


# -- the two sites -------------------------------------------------------------------------
def make_root(file_class: Any, served: str, **kwargs: Any) -> resource.Resource:
    root = resource.Resource()
    files = file_class(served, **kwargs)
    files.processors = {".rpy": script.ResourceScript}
    files.putChild(b"extra", static.Data(b"extra data", "text/plain"))
    root.putChild(b"files", files)
    root.putChild(b"ign", file_class(served, ignoredExts=(".html",), **kwargs))
    root.putChild(b"star", file_class(served, ignoredExts=("*",), **kwargs))
    root.putChild(b"single", file_class(os.path.join(served, "hello.txt"), **kwargs))
    scripts = file_class(os.path.join(served, "scripts"), ignoredExts=(".rpy",), **kwargs)
    scripts.processors = {".rpy": script.ResourceScript}
    root.putChild(b"rpyign", scripts)
    no_list = type("NoList", (file_class,), {"directoryListing": lambda self: self.forbidden})
    root.putChild(b"nolist", no_list(served, **kwargs))
    return root


def our_files(root: resource.Resource) -> list[File]:
    return [child for child in root.children.values() if isinstance(child, File)]


def close_static_leftovers(served: str) -> None:
    """Close the file objects static.File left open: a request its producer
    failed (500) never closes its file, and the logged failure keeps it alive.
    (asyncfile.web.File holds descriptors, never file objects: untouched.)"""
    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, io.BufferedReader) and isinstance(obj.name, str) and obj.name.startswith(served):
            obj.close()


@pytest.fixture
def tree(tmp_path):
    return build_tree(str(tmp_path))


@pytest.fixture
def sites():
    made = Sites()
    yield made
    pytest_twisted.blockon(defer.ensureDeferred(made.stop()))


@pytest.fixture
def web(tree, sites, make_loader):
    """Both sites, and after the test: no descriptor of the tree left open."""
    loader = make_loader()
    ours = make_root(File, tree["served"], loader=loader)
    theirs = make_root(static.File, tree["served"])
    context = {"loader": loader, "ours": sites.listen(ours), "theirs": sites.listen(theirs),
               "root": ours, "tree": tree}
    yield context
    pytest_twisted.blockon(defer.ensureDeferred(sites.stop()))
    close_static_leftovers(tree["served"])
    for f in our_files(ours):
        f.close()
    pytest_twisted.blockon(defer.ensureDeferred(all_closed(loader)))
    assert loader.stats()["open"] == 0
    assert fds_under(tree["served"], tree["outside"]) == {}


def _headers_for(case: Case, served: str) -> dict[str, str]:
    if case.file is None:
        return case.headers
    tag = etag_of_path(os.path.join(served, case.file))
    return {k: v.replace("ETAG", tag) for k, v in case.headers.items()}


# -- the table -----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_same_answers_as_static(web, engine):
    served = web["tree"]["served"]
    problems = {}
    for case in CASES:
        headers = _headers_for(case, served)
        theirs = await fetch(web["theirs"], case.path, case.method, headers)
        ours = await fetch(web["ours"], case.path, case.method, headers)
        found = compare(case, theirs, ours, served)
        if found:
            problems[case.name] = found
        await all_closed(web["loader"])  # started before the answer, maybe not ended
        assert web["loader"].stats()["open"] == 0, case.name
    assert not problems, "\n".join(f"{name}:\n  " + "\n  ".join(p) for name, p in problems.items())


def test_differences_name_real_cases():
    names = {case.name for case in CASES}
    assert set(DIFFERENCES) - {"*"} <= names


# -- one connection, several requests -------------------------------------------------------
def split_answers(raw: bytes, methods: list[str]) -> list[Any]:
    """The answers of pipelined requests, in order (each framed by Content-Length)."""
    answers = []
    for method in methods:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = 0
        status = int(head.split(b" ", 2)[1])
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if method == "HEAD" or status == 304:
            length = 0
        answers.append(parse_answer(head + b"\r\n\r\n" + rest[:length], method))
        raw = rest[length:]
    assert raw == b"", raw[:200]
    return answers


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_share_a_connection(web):
    """Keep-alive and pipelining: bodies sent with sendfile, then the next
    answers on the same connection, as static.File gives them."""
    requests = [("GET", "/files/big.bin", {}), ("GET", "/files/hello.txt", {"Range": "bytes=0-9,-5"}),
                ("HEAD", "/files/hello.txt", {}), ("GET", "/files/sub", {}), ("GET", "/files/nothing", {}),
                ("GET", "/files/list/", {}), ("GET", "/files/hello.txt", {"Range": "bytes=100-199"}),
                ("GET", "/files/big.bin", {"Range": "bytes=1000-"})]
    raw = b""
    for i, (method, path, headers) in enumerate(requests):
        last = i == len(requests) - 1
        raw += request_bytes(path, method, headers).replace(
            b"Connection: close\r\n", b"Connection: close\r\n" if last else b"")
    methods = [m for m, _, _ in requests]
    before = _sendfile_stats()
    theirs = split_answers(await raw_exchange(web["theirs"], raw), methods)
    ours = split_answers(await raw_exchange(web["ours"], raw), methods)
    for (method, path, headers), a, b in zip(requests, theirs, ours):
        assert (a.status, a.header("location"), a.header("content-range")) == (
            b.status, b.header("location"), b.header("content-range")), path
        if a.status == 206 and (a.header("content-type") or "").startswith("multipart/"):
            assert a.parts() == b.parts()
        else:
            assert a.body == b.body, path
    if web["loader"].engine.name != "threads":
        # One per range sent larger than SMALL_BODY (big.bin twice); hello.txt's are loaded.
        assert _sendfile_stats()["zero_copy"] - before["zero_copy"] == 2


def _sendfile_stats() -> dict[str, int]:
    from asyncfile import sendfile

    return sendfile.stats()


# -- zero copy ---------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_zero_copy_on_and_off_send_the_same_bytes(tree, sites, make_loader, engine):
    served = tree["served"]
    loader = make_loader()
    with open(os.path.join(served, "big.bin"), "rb") as f:
        big = f.read()
    on = File(served, loader=loader)
    off = File(served, loader=loader, zero_copy=False)
    ports = {True: sites.listen(on), False: sites.listen(off)}
    answers = {}
    for zero_copy, port in ports.items():
        before = _sendfile_stats()
        got = [await fetch(port, "/big.bin"),
               await fetch(port, "/big.bin", headers={"Range": "bytes=70000-500000"}),
               await fetch(port, "/big.bin", headers={"Range": "bytes=0-99,200000-300000,-7"})]
        after = _sendfile_stats()
        transfers = after["transfers"] - before["transfers"]
        zero = after["zero_copy"] - before["zero_copy"]
        if zero_copy:
            assert transfers == 3  # one per range larger than SMALL_BODY (not 0-99 and -7)
            assert zero == (0 if engine == "threads" else 3)  # threads: nothing is read inline
        else:
            assert (transfers, zero) == (0, 0)
        answers[zero_copy] = got
    for answers_ in answers.values():
        assert answers_[0].body == big
        assert answers_[1].body == big[70000:500001]
        assert [p[2] for p in answers_[2].parts()] == [big[:100], big[200000:300001], big[-7:]]
    assert [a.body for a in answers[True][:2]] == [a.body for a in answers[False][:2]]
    assert answers[True][2].parts() == answers[False][2].parts()
    await sites.stop()
    for f in (on, off):
        f.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    assert fds_under(served) == {}


# -- finishing as soon as the last byte is out --------------------------------------------------
def _counting_site(root: Any) -> tuple[Any, dict[str, int], Callable[[int], defer.Deferred[None]]]:
    """A Site counting what Twisted reports of each request: its ``notifyFinish``
    fired (``finished``) or failed (``lost``), and its access-log lines."""
    from twisted.web import server

    counts = {"finished": 0, "lost": 0, "logged": 0}
    waiting: list[tuple[int, defer.Deferred[None]]] = []

    def ended(outcome: str) -> None:
        counts[outcome] += 1
        for total, d in list(waiting):
            if counts["finished"] + counts["lost"] >= total:
                waiting.remove((total, d))
                d.callback(None)

    class Request(server.Request):
        def process(self) -> None:
            self.notifyFinish().addCallbacks(lambda _: ended("finished"), lambda _: ended("lost"))
            super().process()

    class Site(server.Site):
        def log(self, request: Any) -> None:
            counts["logged"] += 1

    def all_ended(total: int) -> defer.Deferred[None]:
        """Fires once ``total`` requests have ended, one way or the other."""
        from twisted.internet import reactor

        d: defer.Deferred[None] = defer.Deferred()
        waiting.append((total, d))
        if counts["finished"] + counts["lost"] >= total:
            waiting.remove((total, d))
            d.callback(None)
        return d.addTimeout(20, reactor)

    site = Site(root)
    site.requestFactory = Request
    return site, counts, all_ended


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_finished_in_the_turn_its_last_byte_is_handed_over(tmp_path, sites, make_loader, zero_copy,
                                                                  monkeypatch):
    """A client that reads exactly Content-Length bytes and closes at once
    (curl) must find every request finished: ``notifyFinish`` fired, not
    failed, and one access-log line each.  The request is finished in the
    reactor turn that hands its last byte over (not after its handle's close,
    which the threads engine runs in the pool), and sendfile says it is done
    in the call that sent the last byte, even when that call used up the
    turn's budget: here every one does, as on a busy machine."""
    from twisted.internet import reactor

    from asyncfile import sendfile as sendfile_module

    from .web_helpers import EagerClient

    ticks = iter(range(1, 1 << 62))
    monkeypatch.setattr(sendfile_module, "perf_counter", lambda: float(next(ticks)))  # 1 s per call
    served = str(tmp_path / "served")
    os.mkdir(served)
    sizes = {"tiny.bin": 100, "small.bin": 16 * 1024, "medium.bin": 100 * 1024, "large.bin": 3 << 20}
    contents = {}
    for name, size in sizes.items():
        contents[name] = os.urandom(size)
        with open(os.path.join(served, name), "wb") as f:
            f.write(contents[name])
    loader = make_loader()
    files = File(served, loader=loader, zero_copy=zero_copy)
    site, counts, all_ended = _counting_site(files)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    sites.ports.append(port)
    before = _sendfile_stats()
    rounds = 10
    for _ in range(rounds):
        for name, data in contents.items():
            raw = await EagerClient(port.getHost().port, request_bytes("/" + name)).done
            assert parse_answer(raw).body == data, name
    total = rounds * len(contents)
    await all_ended(total)
    assert counts == {"finished": total, "lost": 0, "logged": total}
    if zero_copy and loader.engine.name != "threads":  # medium and large went with sendfile
        assert _sendfile_stats()["zero_copy"] - before["zero_copy"] == 2 * rounds
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    assert fds_under(served) == {}


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_requests_leave_no_reference_cycles(tmp_path, sites, make_loader, zero_copy):
    """What a request leaves behind is freed by reference counting: objects
    in reference cycles wait for the cyclic collector, and at thousands of
    requests per second its full collections stop the reactor for tens of
    milliseconds (measured: 26 objects a request, 30-40 ms pauses).

    Counted with the collector off, per window of requests: none of
    asyncfile's or twisted.web's objects, and no more ctypes types after
    three rounds than after one (a buffer of a size not seen before made a
    new array type: cyclic garbage)."""
    from .web_helpers import EagerClient

    served = str(tmp_path / "served")
    os.makedirs(os.path.join(served, "dir"))
    for name, size in (("small.bin", 16 * 1024), ("large.bin", 300 * 1024)):
        with open(os.path.join(served, name), "wb") as f:
            f.write(os.urandom(size))
    loader = make_loader()
    files = File(served, loader=loader, zero_copy=zero_copy)
    port = sites.listen(files)
    tag = etag_of_path(os.path.join(served, "small.bin"))
    requests = [request_bytes("/small.bin"), request_bytes("/large.bin"),
                request_bytes("/small.bin", "HEAD"), request_bytes("/small.bin", headers={"If-None-Match": tag}),
                request_bytes("/small.bin", headers={"Range": "bytes=10-99"}),
                request_bytes("/large.bin", headers={"Range": "bytes=0-9,100000-299999"}),
                request_bytes("/missing.bin"), request_bytes("/dir")]
    lengths = iter(range(40000, 60000, 7))  # ranges of sizes never seen before, loaded in one piece

    async def serve_all() -> None:
        for raw in requests:
            await EagerClient(port, raw).done
        await EagerClient(port, request_bytes("/large.bin", headers={"Range": f"bytes=0-{next(lengths)}"})).done
        await all_closed(loader)

    async def garbage(rounds: int) -> Counter[str]:
        """The cyclic garbage of ``rounds`` rounds, by where its types come from."""
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(rounds):
                await serve_all()
            gc.collect()
            return Counter("twisted.web" if type(o).__module__.startswith("twisted.web")
                           else type(o).__module__.partition(".")[0] for o in gc.garbage)
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
            gc.enable()

    await serve_all()  # the first request opens the directory; caches fill
    one, three = await garbage(1), await garbage(3)
    # The server's side only: what earlier tests' clients drop meanwhile is not ours.
    assert (one["asyncfile"], one["twisted.web"], three["asyncfile"], three["twisted.web"]) == (0, 0, 0, 0)
    assert three["_ctypes"] <= one["_ctypes"], (one, three)
    await sites.stop()
    files.close()


# -- the client going away --------------------------------------------------------------------
@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_client_gone_mid_body_closes_the_handle(tmp_path, sites, make_loader, zero_copy):
    served = str(tmp_path / "served")
    os.mkdir(served)
    with open(os.path.join(served, "large.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) * 48)  # far more than the socket buffers hold
    loader = make_loader()
    files = File(served, loader=loader, zero_copy=zero_copy)
    port = sites.listen(files)
    with LogCapture() as log:
        got = await raw_exchange(port, request_bytes("/large.bin"), stop_after=256 * 1024)
        assert got.startswith(b"HTTP/1.1 200 OK")
        assert len(got) < 48 << 20
        await wait_for(lambda: loader.stats()["open"] == 0, what="the handle to be closed")
    assert log.failures() == [] and log.lines() == []  # a client going away is not worth a line
    files.close()
    assert fds_under(served) == {}
    assert loader.stats()["active"] == 0


@pytest_twisted.ensureDeferred
async def test_client_gone_before_the_open_ends(fuse_tree, sites, make_loader):
    """The request goes away while its open is held in a FUSE daemon: the
    descriptor that open returns later is closed, no answer is written."""
    fs, mount = fuse_tree
    loader = make_loader()
    files = File(mount, loader=loader)
    port = sites.listen(files)
    await fetch(port, "/hello.txt")  # the root is open
    fs.set_fault("big.bin", open_gate=True)
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from .web_helpers import _Raw

    client = _Raw(request_bytes("/big.bin"), None)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await fs.when_blocked(reactor, "big.bin", "open", timeout=20)
    client.transport.abortConnection()
    assert await client.done == b""
    fs.release_opens("big.bin")
    await wait_for(lambda: loader.stats()["open"] == 0 and loader.stats()["active"] == 0,
                   what="the late descriptor to be closed")
    await fs.when_closed(reactor, "big.bin", timeout=20)
    await sites.stop()
    files.close()
    assert fds_under(mount) == {}


class _StalledClient(protocol.Protocol):
    """Asks for a file, stops reading after the first bytes (the body stays
    in flight), reads again on ``resume()``; ``closed`` fires with all it got."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.started: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.started.called:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.started.callback(None)

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(bytes(self.data))


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "read"])
@pytest_twisted.ensureDeferred
async def test_loader_closed_mid_body_logs_a_line_not_a_traceback(tmp_path, sites, make_loader, zero_copy):
    """Reactor shutdown closes the loader under requests still sending: each
    is cut short (its connection closed) and logged as one short line, with
    no traceback; nothing reaches the client but the short body."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    served = str(tmp_path / "served")
    os.mkdir(served)
    size = 32 << 20  # far more than the socket buffers hold
    with open(os.path.join(served, "large.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) * 32)
    loader = make_loader()
    files = File(served, loader=loader, zero_copy=zero_copy)
    port = sites.listen(files)
    clients = [_StalledClient(request_bytes("/large.bin")) for _ in range(3)]
    with LogCapture() as log:
        for client in clients:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        for client in clients:
            await client.started.addTimeout(20, reactor)
        await loader.close()
        for client in clients:
            client.resume()
        bodies = [await client.closed.addTimeout(20, reactor) for client in clients]
    for raw in bodies:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % size in head
        assert len(body) < size
    assert log.failures() == []
    lines = log.lines()
    assert len(lines) == len(clients), lines
    assert all(line.startswith("stopped sending /large.bin") and "\n" not in line for line in lines), lines
    await sites.stop()
    files.close()
    assert fds_under(served) == {}


@pytest_twisted.ensureDeferred
async def test_unexpected_error_mid_body_is_logged_with_its_traceback(tmp_path, sites, make_loader,
                                                                      monkeypatch):
    """An error nobody expects (a bug, say) after the headers went out: the
    connection is closed short, the traceback is logged (server side only)."""
    served = str(tmp_path / "served")
    os.mkdir(served)
    with open(os.path.join(served, "big.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    loader = make_loader()
    monkeypatch.setattr(loader, "stream", lambda *a, **k: defer.fail(RuntimeError("a bug in a stream")))
    files = File(served, loader=loader)
    port = sites.listen(files)
    with LogCapture() as log:
        raw = await raw_exchange(port, request_bytes("/big.bin"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b""
    failures = log.failures()
    assert [type(f.value) for f in failures] == [RuntimeError]
    assert "a bug in a stream" in failures[0].getTraceback()
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0


# -- slow storage: the reactor keeps serving -------------------------------------------------
@pytest.fixture(scope="module")
def _faultfs(tmp_path_factory):
    from asyncfile.testing.faultfs import FaultFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    paths = build_tree(str(tmp_path_factory.mktemp("web-faultfs")))
    fs = FaultFS(paths["served"], gate_timeout=30.0)
    with fs as mount:
        yield fs, mount


@pytest.fixture
def fuse_tree(_faultfs, make_loader):
    """The served tree through a FaultFS mount (shared by this module's
    tests); faults are cleared (parked calls let go) before the loaders close."""
    fs, mount = _faultfs
    fs.clear_all()
    yield fs, mount
    fs.clear_all()


@pytest_twisted.ensureDeferred
async def test_open_held_on_slow_storage_does_not_stop_other_requests(fuse_tree, sites, make_loader):
    from twisted.internet import reactor

    fs, mount = fuse_tree
    loader = make_loader()
    files = File(mount, loader=loader)
    port = sites.listen(files)
    fs.set_fault("big.bin", open_gate=True)
    held = defer.ensureDeferred(fetch(port, "/big.bin"))
    await fs.when_blocked(reactor, "big.bin", "open", timeout=20)
    other = await fetch(port, "/hello.txt")  # served meanwhile, from the same mount
    assert (other.status, other.body) == (200, HELLO)
    listing = await fetch(port, "/list/")
    assert listing.status == 200 and b"a.txt" in listing.body
    assert not held.called
    fs.release_opens("big.bin")
    answer = await held
    with open(os.path.join(fs.source, "big.bin"), "rb") as f:
        assert (answer.status, answer.body) == (200, f.read())
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    await fs.when_closed(reactor, timeout=20)
    assert fds_under(mount, fs.source) == {}


@pytest_twisted.ensureDeferred
async def test_read_held_on_slow_storage_does_not_stop_other_requests(fuse_tree, sites, make_loader):
    from twisted.internet import reactor

    fs, mount = fuse_tree
    loader = make_loader()
    files = File(mount, loader=loader)
    port = sites.listen(files)
    fs.set_fault("big.bin", read_gate=True)
    held = defer.ensureDeferred(fetch(port, "/big.bin", headers={"Range": "bytes=0-99,-100"}))
    await fs.when_blocked(reactor, "big.bin", "read", timeout=20)
    other = await fetch(port, "/hello.txt", headers={"Range": "bytes=0-9"})
    assert (other.status, other.body) == (206, HELLO[:10])
    assert not held.called
    fs.release_reads("big.bin")
    answer = await held
    with open(os.path.join(fs.source, "big.bin"), "rb") as f:
        big = f.read()
    assert answer.status == 206
    assert [p[2] for p in answer.parts()] == [big[:100], big[-100:]]
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    await fs.when_closed(reactor, timeout=20)
    assert fds_under(mount, fs.source) == {}


@pytest.mark.parametrize("engine", ["nowait"], indirect=True)  # listings always run in the pool
@pytest_twisted.ensureDeferred
async def test_listing_slow_storage_does_not_stop_other_requests(tree, sites, make_loader):
    """Every lookup on this mount takes 0.1 s: listing a directory of six
    entries takes a second or more, all of it off the reactor thread."""
    from asyncfile.testing.slowfs import SlowFS, fuse_unavailable_reason

    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    source = os.path.join(os.path.dirname(tree["served"]), "slow-source")
    os.mkdir(source)
    for i in range(6):
        with open(os.path.join(source, f"entry{i}.txt"), "wb") as f:
            f.write(b"x" * i)
    loader = make_loader()
    with SlowFS(source, read_delay=0.0, getattr_delay=0.1, attr_timeout=0.0) as mount:
        root = resource.Resource()
        slow = File(mount, loader=loader)
        local = File(tree["served"], loader=loader)
        root.putChild(b"slow", slow)
        root.putChild(b"local", local)
        port = sites.listen(root)
        listing = defer.ensureDeferred(fetch(port, "/slow/"))
        await wait_for(lambda: loader.stats()["io_threads_busy"] > 0, what="the listing to start")
        for _ in range(3):
            other = await fetch(port, "/local/hello.txt")
            assert (other.status, other.body) == (200, HELLO)
        assert not listing.called
        answer = await listing
        assert answer.status == 200
        for i in range(6):
            assert b'<a href="entry%d.txt">entry%d.txt</a>' % (i, i) in answer.body
            assert b"<td>%dB</td>" % i in answer.body
        await sites.stop()
        slow.close()
        local.close()
        await all_closed(loader)
        assert loader.stats()["open"] == 0
        assert fds_under(mount, source, tree["served"]) == {}


# -- errors ----------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_full_queue_answers_503_with_retry_after(tree, sites, make_loader):
    loader = make_loader(max_open=1, max_waiting=0)
    files = File(tree["served"], loader=loader)
    port = sites.listen(files)
    assert (await fetch(port, "/hello.txt")).status == 200  # the root is open now
    await all_closed(loader)  # its place is given back (threads: after a close in the pool)
    held = await loader.open(os.path.join(tree["served"], "page.html"))
    try:
        for path in ("/hello.txt", "/list/", "/sub/"):
            answer = await fetch(port, path)
            assert (answer.status, answer.header("retry-after")) == (503, "1"), path
            assert b"Traceback" not in answer.body and tree["served"].encode() not in answer.body
    finally:
        await held.close()
    assert (await fetch(port, "/hello.txt")).body == HELLO
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    assert fds_under(tree["served"]) == {}


@pytest_twisted.ensureDeferred
async def test_read_error_before_and_after_the_answer_started(fuse_tree, sites, make_loader):
    """EIO in the middle of a body: the headers are out, so the connection is
    closed short; EIO from an open: a 500 page, with no traceback or path."""
    from twisted.internet import reactor

    fs, mount = fuse_tree
    loader = make_loader()
    files = File(mount, loader=loader)
    port = sites.listen(files)
    fs.set_fault("big.bin", read_error_at=300000)
    with LogCapture() as log:
        raw = await raw_exchange(port, request_bytes("/big.bin"))
    assert [f.value.errno for f in log.failures()] == [errno.EIO]  # with its traceback, server side
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: %d" % os.path.getsize(os.path.join(fs.source, "big.bin")) in head
    assert len(body) < 300000  # cut short: the client knows it is incomplete
    fs.set_fault("hello.txt", open_error=errno.EIO)
    answer = await fetch(port, "/hello.txt")
    assert answer.status == 500
    assert b"Traceback" not in answer.body and mount.encode() not in answer.body
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    await fs.when_closed(reactor, timeout=20)
    assert fds_under(mount, fs.source) == {}


@pytest_twisted.ensureDeferred
async def test_close_then_serve_again(tree, sites, make_loader):
    loader = make_loader()
    files = File(tree["served"], loader=loader)
    port = sites.listen(files)
    assert (await fetch(port, "/hello.txt")).body == HELLO
    await all_closed(loader)  # the file's close may still run in the pool (threads)
    assert fds_under(tree["served"]) != {}  # the directory, between requests
    files.close()
    assert fds_under(tree["served"]) == {}
    assert (await fetch(port, "/list/")).status == 200
    await all_closed(loader)
    files.close()
    assert fds_under(tree["served"]) == {}


@pytest_twisted.ensureDeferred
async def test_type_and_encoding_attributes(tree, sites, make_loader):
    loader = make_loader()
    one = File(os.path.join(tree["served"], "hello.txt"), loader=loader)
    one.type, one.encoding = "application/x-custom", "identity"
    root = resource.Resource()
    root.putChild(b"one", one)
    theirs = static.File(os.path.join(tree["served"], "hello.txt"))
    theirs.type, theirs.encoding = "application/x-custom", "identity"
    other = resource.Resource()
    other.putChild(b"one", theirs)
    a = await fetch(sites.listen(other), "/one")
    b = await fetch(sites.listen(root), "/one")
    for answer in (a, b):
        assert (answer.header("content-type"), answer.header("content-encoding"), answer.body) == (
            "application/x-custom", "identity", HELLO)
    await sites.stop()
    one.close()


# -- FileLoader.listdir ------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_listdir_names_sorted_confined_off_thread(tree, make_loader, monkeypatch):
    served = tree["served"]
    loader = make_loader()
    threads = []
    real_listdir = os.listdir

    def spying_listdir(path: Any = ".") -> list[str]:
        if isinstance(path, int):
            threads.append(threading.current_thread())
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", spying_listdir)
    root = await loader.open_root(served)
    try:
        assert await loader.listdir(".", root=root) == sorted(real_listdir(served))
        assert await loader.listdir("list", root=root) == ["a.txt", "b.html", "c.tar.gz", "link-up.txt",
                                                            "nested"]
        assert await loader.listdir(os.path.join(served, "sub")) == ["index.html", "inner.txt"]
        assert threads and threading.main_thread() not in threads
        for path, error in (("..", "OutsideRoot"), ("escape/dir-out", "OutsideRoot"),
                            (tree["outside"], "OutsideRoot"), ("hello.txt", "NotADirectoryError"),
                            ("nothing", "FileNotFoundError"), ("bad\0name", "ValueError")):
            with pytest.raises(Exception) as raised:
                await loader.listdir(path, root=root)
            assert type(raised.value).__name__ == error, (path, raised.value)
            if isinstance(raised.value, OSError):
                assert raised.value.filename == path  # relative, never the root's path
        assert loader.stats()["active"] == 0
    finally:
        root.close()
    assert fds_under(served) == {}


@pytest_twisted.ensureDeferred
async def test_listdir_limits_cancellation_and_close(tree, make_loader):
    from asyncfile import LoaderClosed, Overloaded

    served = tree["served"]
    loader = make_loader(max_open=1, max_waiting=1)
    held = await loader.open(os.path.join(served, "hello.txt"))
    waiting = loader.listdir(served)  # waits for the place the handle holds
    with pytest.raises(Overloaded):
        await loader.listdir(served)  # the queue is full
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    assert loader.stats()["waiting"] == 0
    queued = loader.listdir(os.path.join(served, "sub"))
    await held.close()
    assert await queued == ["index.html", "inner.txt"]
    assert loader.stats()["active"] == 0
    running = loader.listdir(served)
    await loader.close()
    with pytest.raises(LoaderClosed):
        await running
    with pytest.raises(LoaderClosed):
        await loader.listdir(served)
    assert fds_under(served) == {}


@pytest_twisted.ensureDeferred
async def test_fifo_is_refused_at_once(tmp_path, sites, make_loader):
    """static.File would wait forever in open() for a FIFO's writer, in the
    reactor thread; here 403 at once (and listed like static.File lists it)."""
    served = str(tmp_path / "served")
    os.mkdir(served)
    os.mkfifo(os.path.join(served, "pipe"))
    loader = make_loader()
    files = File(served, loader=loader)
    port = sites.listen(files)
    answer = await fetch(port, "/pipe")
    assert answer.status == 403
    listing = await fetch(port, "/")
    assert b'<a href="pipe">pipe</a>' in listing.body
    await sites.stop()
    files.close()
    await all_closed(loader)
    assert loader.stats()["open"] == 0
    assert fds_under(served) == {}


@pytest_twisted.ensureDeferred
async def test_default_loader_when_none_is_given(tree, sites):
    from asyncfile import default_loader

    files = File(tree["served"])  # no loader, no reactor touched until a request comes
    port = sites.listen(files)
    assert files.loader is default_loader()
    answer = await fetch(port, "/sub/")
    assert (answer.status, answer.body) == (200, b"<p>the index of sub</p>\n")
    await sites.stop()
    files.close()
    await all_closed(default_loader())
    assert default_loader().stats()["open"] == 0
    assert fds_under(tree["served"]) == {}
