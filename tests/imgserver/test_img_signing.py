import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

import pytest

from imgserver import signing
from imgserver.errors import Forbidden
from imgserver.signing import canonical_message, sign, signed_url, verify

SECRET = b"0123456789abcdef0123456789abcdef"


def request_parts(url: str):
    """What the HTTP layer would hand over: raw path, decoded args."""
    parts = urlsplit(url)
    return parts.path, parse_qs(parts.query, keep_blank_values=True)


def test_round_trip():
    url = signed_url(SECRET, "photos/a b.jpg", {"w": 200, "fit": "crop"})
    assert url.startswith("/photos/a%20b.jpg?")
    path, args = request_parts(url)
    verify(SECRET, path, args)


def test_round_trip_with_twisted_style_bytes():
    path, args = request_parts(signed_url(SECRET, "x.png", {"fm": "webp"}))
    verify(SECRET, path.encode(), {k.encode(): [v.encode() for v in vs] for k, vs in args.items()})


def test_round_trip_without_parameters():
    url = signed_url(SECRET, "/a.jpg")
    assert url.startswith("/a.jpg?s=")
    verify(SECRET, *request_parts(url))


def test_signature_format():
    sig = sign(SECRET, "/a.jpg", {"w": ["1"]})
    assert len(sig) == 43 and "=" not in sig
    assert set(sig) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    expected = hmac.new(SECRET, canonical_message("/a.jpg", {"w": ["1"]}), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + "=") == expected


def test_parameter_order_does_not_matter():
    assert sign(SECRET, "/a.jpg", [("w", "1"), ("h", "2")]) == sign(
        SECRET, "/a.jpg", [("h", "2"), ("w", "1")]
    )
    assert sign(SECRET, "/a.jpg", "w=1&h=2") == sign(SECRET, "/a.jpg", {"h": ["2"], "w": ["1"]})


def test_s_is_not_signed():
    assert sign(SECRET, "/a.jpg", {"w": ["1"], "s": ["whatever"]}) == sign(
        SECRET, "/a.jpg", {"w": ["1"]}
    )


def test_equivalent_path_spellings():
    assert sign(SECRET, "/a%20b.jpg") == sign(SECRET, "a%20b.jpg") == sign(SECRET, "/a b.jpg")
    assert sign(SECRET, "/%61.jpg") == sign(SECRET, "/a.jpg")
    # an encoded slash is a different path from a real one
    assert sign(SECRET, "/a%2Fb.jpg") != sign(SECRET, "/a/b.jpg")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda path, args: (path.replace("a.jpg", "b.jpg"), args),
        lambda path, args: ("/other" + path, args),
        lambda path, args: (path, {**args, "w": ["2000"]}),
        lambda path, args: (path, {**args, "q": ["100"]}),
        lambda path, args: (path, {k: v for k, v in args.items() if k != "fit"}),
        lambda path, args: (path, {**args, "w": ["200", "200"]}),
        lambda path, args: (
            path,
            {**args, "s": [args["s"][0][:-1] + ("A" if args["s"][0][-1] != "A" else "B")]},
        ),
        lambda path, args: (path, {**args, "s": [args["s"][0][:20]]}),
        lambda path, args: (path, {**args, "s": [args["s"][0] + "AA"]}),
        lambda path, args: (path, {**args, "s": ["é" * 43]}),
    ],
)
def test_tampering_is_forbidden(tamper):
    path, args = request_parts(signed_url(SECRET, "a.jpg", {"w": 200, "fit": "crop"}))
    path, args = tamper(path, args)
    with pytest.raises(Forbidden, match="bad signature") as info:
        verify(SECRET, path, args)
    assert info.value.status == 403


def test_wrong_secret_is_forbidden():
    path, args = request_parts(signed_url(SECRET, "a.jpg", {"w": 200}))
    with pytest.raises(Forbidden, match="bad signature"):
        verify(b"another secret of enough length", path, args)


@pytest.mark.parametrize("args", [{"w": ["200"]}, {"w": ["200"], "s": [""]}, {}])
def test_missing_signature_is_forbidden(args):
    with pytest.raises(Forbidden, match="missing signature"):
        verify(SECRET, "/a.jpg", args)


def test_repeated_signature_is_forbidden():
    sig = sign(SECRET, "/a.jpg", {"w": ["200"]})
    with pytest.raises(Forbidden, match="more than one"):
        verify(SECRET, "/a.jpg", {"w": ["200"], "s": [sig, sig]})


def test_explicit_signature_argument():
    sig = sign(SECRET, "/a.jpg", {"w": ["200"]})
    verify(SECRET, "/a.jpg", {"w": ["200"]}, signature=sig)
    with pytest.raises(Forbidden):
        verify(SECRET, "/a.jpg", {"w": ["201"]}, signature=sig)


def test_constant_time_comparison_is_used(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    path, args = request_parts(signed_url(SECRET, "a.jpg", {"w": 1}))
    verify(SECRET, path, args)
    with pytest.raises(Forbidden):
        verify(SECRET, path, {**args, "w": ["2"]})
    assert len(calls) == 2


def test_secret_may_be_text():
    assert sign(SECRET.decode(), "/a.jpg") == sign(SECRET, "/a.jpg")


def test_signed_url_encodes_awkward_names_and_values():
    url = signed_url(SECRET, "dir/100% & more?.jpg", [("fm", "png"), ("w", "10")])
    assert "?" not in url.split("?", 1)[0][1:]
    path, args = request_parts(url)
    assert path == "/dir/100%25%20%26%20more%3F.jpg"
    assert args["fm"] == ["png"] and args["w"] == ["10"]
    verify(SECRET, path, args)
