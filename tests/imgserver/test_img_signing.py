"""Signed URLs (imgserver.signing): the message covers the endpoint, the path as
decoded once, and the canonical query."""

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

import pytest

from imgserver import paths, signing
from imgserver.errors import Forbidden
from imgserver.signing import canonical_message, sign, signed_url, verify

SECRET = b"0123456789abcdef0123456789abcdef"


def request_parts(url: str):
    """What the HTTP layer hands over: the endpoint, the path decoded once, the decoded args."""
    parts = urlsplit(url)
    _, endpoint, raw = parts.path.split("/", 2)
    return endpoint, paths.join(paths.split_url_path(raw)), parse_qs(parts.query, keep_blank_values=True)


def test_round_trip():
    url = signed_url(SECRET, "images", "photos/a b.jpg", {"w": 200, "fit": "crop"})
    assert url.startswith("/images/photos/a%20b.jpg?")
    endpoint, path, args = request_parts(url)
    assert (endpoint, path) == ("images", "photos/a b.jpg")
    verify(SECRET, endpoint, path, args)


def test_round_trip_with_twisted_style_bytes():
    endpoint, path, args = request_parts(signed_url(SECRET, "info", "x.png", {"fm": "webp"}))
    verify(SECRET, endpoint, path, {k.encode(): [v.encode() for v in vs] for k, vs in args.items()})


def test_round_trip_without_parameters():
    url = signed_url(SECRET, "images", "/a.jpg")
    assert url.startswith("/images/a.jpg?s=")
    verify(SECRET, *request_parts(url))


def test_signature_format():
    sig = sign(SECRET, "images", "a.jpg", {"w": ["1"]})
    assert len(sig) == 43 and "=" not in sig
    assert set(sig) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    expected = hmac.new(SECRET, canonical_message("images", "a.jpg", {"w": ["1"]}), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + "=") == expected


def test_canonical_message():
    assert canonical_message("images", "d/a b%.jpg", [("w", "1"), ("fm", "png"), ("s", "x")]) == \
        b"imgserver-v2\nimages\nd/a%20b%25.jpg\nfm=png&w=1"


def test_the_endpoint_is_signed():
    assert sign(SECRET, "images", "a.jpg") != sign(SECRET, "info", "a.jpg")
    endpoint, path, args = request_parts(signed_url(SECRET, "images", "a.jpg"))
    with pytest.raises(Forbidden, match="bad signature"):
        verify(SECRET, "info", path, args)


@pytest.mark.parametrize("endpoint", ["", "a/b", "a\nb", "imägés", None, b"images"])
def test_endpoint_names_are_checked(endpoint):
    with pytest.raises(ValueError):
        sign(SECRET, endpoint, "a.jpg")


def test_parameter_order_does_not_matter():
    assert sign(SECRET, "images", "a.jpg", [("w", "1"), ("h", "2")]) == sign(
        SECRET, "images", "a.jpg", [("h", "2"), ("w", "1")]
    )
    assert sign(SECRET, "images", "a.jpg", "w=1&h=2") == sign(SECRET, "images", "a.jpg", {"h": ["2"], "w": ["1"]})


def test_s_is_not_signed():
    assert sign(SECRET, "images", "a.jpg", {"w": ["1"], "s": ["whatever"]}) == sign(
        SECRET, "images", "a.jpg", {"w": ["1"]}
    )


def test_the_path_is_the_decoded_one():
    # A leading slash is not part of the name.
    assert sign(SECRET, "images", "/a b.jpg") == sign(SECRET, "images", "a b.jpg")
    # Decoded means decoded: a "%" is a literal character, never decoded again.
    assert sign(SECRET, "images", "%61.jpg") != sign(SECRET, "images", "a.jpg")
    assert sign(SECRET, "images", "%41.jpg") != sign(SECRET, "images", "A.jpg")
    # A separator inside a name (it can only come from %2F, which the path
    # rules refuse) is not the same as a directory.
    assert sign(SECRET, "images", "a%2Fb.jpg") != sign(SECRET, "images", "a/b.jpg")


def test_a_signature_for_a_percent_name_serves_only_that_name():
    """Issue 9: the signature made for the file ``%41.jpg`` must not serve ``A.jpg``."""
    url = signed_url(SECRET, "images", "%41.jpg")
    assert url.startswith("/images/%2541.jpg?")
    endpoint, path, args = request_parts(url)
    assert path == "%41.jpg"
    verify(SECRET, endpoint, path, args)
    with pytest.raises(Forbidden):
        verify(SECRET, endpoint, "A.jpg", args)


def test_path_must_be_text():
    with pytest.raises(TypeError):
        sign(SECRET, "images", b"a.jpg")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e, path, args: (e, path.replace("a.jpg", "b.jpg"), args),
        lambda e, path, args: (e, "other/" + path, args),
        lambda e, path, args: ("info", path, args),
        lambda e, path, args: (e, path, {**args, "w": ["2000"]}),
        lambda e, path, args: (e, path, {**args, "q": ["100"]}),
        lambda e, path, args: (e, path, {k: v for k, v in args.items() if k != "fit"}),
        lambda e, path, args: (e, path, {**args, "w": ["200", "200"]}),
        lambda e, path, args: (
            e, path,
            {**args, "s": [args["s"][0][:-1] + ("A" if args["s"][0][-1] != "A" else "B")]},
        ),
        lambda e, path, args: (e, path, {**args, "s": [args["s"][0][:20]]}),
        lambda e, path, args: (e, path, {**args, "s": [args["s"][0] + "AA"]}),
        lambda e, path, args: (e, path, {**args, "s": ["é" * 43]}),
    ],
)
def test_tampering_is_forbidden(tamper):
    endpoint, path, args = tamper(*request_parts(signed_url(SECRET, "images", "a.jpg", {"w": 200, "fit": "crop"})))
    with pytest.raises(Forbidden, match="bad signature") as info:
        verify(SECRET, endpoint, path, args)
    assert info.value.status == 403


def test_wrong_secret_is_forbidden():
    endpoint, path, args = request_parts(signed_url(SECRET, "images", "a.jpg", {"w": 200}))
    with pytest.raises(Forbidden, match="bad signature"):
        verify(b"another secret of enough length", endpoint, path, args)


@pytest.mark.parametrize("args", [{"w": ["200"]}, {"w": ["200"], "s": [""]}, {}])
def test_missing_signature_is_forbidden(args):
    with pytest.raises(Forbidden, match="missing signature"):
        verify(SECRET, "images", "a.jpg", args)


def test_repeated_signature_is_forbidden():
    sig = sign(SECRET, "images", "a.jpg", {"w": ["200"]})
    with pytest.raises(Forbidden, match="more than one"):
        verify(SECRET, "images", "a.jpg", {"w": ["200"], "s": [sig, sig]})


def test_explicit_signature_argument():
    sig = sign(SECRET, "images", "a.jpg", {"w": ["200"]})
    verify(SECRET, "images", "a.jpg", {"w": ["200"]}, signature=sig)
    with pytest.raises(Forbidden):
        verify(SECRET, "images", "a.jpg", {"w": ["201"]}, signature=sig)


def test_constant_time_comparison_is_used(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    endpoint, path, args = request_parts(signed_url(SECRET, "images", "a.jpg", {"w": 1}))
    verify(SECRET, endpoint, path, args)
    with pytest.raises(Forbidden):
        verify(SECRET, endpoint, path, {**args, "w": ["2"]})
    assert len(calls) == 2


def test_secret_may_be_text():
    assert sign(SECRET.decode(), "images", "a.jpg") == sign(SECRET, "images", "a.jpg")


def test_signed_url_encodes_awkward_names_and_values():
    url = signed_url(SECRET, "images", "dir/100% & more?.jpg", [("fm", "png"), ("w", "10")])
    assert "?" not in url.split("?", 1)[0][1:]
    endpoint, path, args = request_parts(url)
    assert urlsplit(url).path == "/images/dir/100%25%20%26%20more%3F.jpg"
    assert path == "dir/100% & more?.jpg"
    assert args["fm"] == ["png"] and args["w"] == ["10"]
    verify(SECRET, endpoint, path, args)
