import json

import pytest
from twisted.python.failure import Failure
from twisted.spread import pb

from imgserver import errors
from imgserver.errors import (
    BadRequest,
    CorruptImage,
    Forbidden,
    ImageServerError,
    NotFound,
    Overloaded,
    Timeout,
    TooLarge,
    UnsupportedImage,
    error_body,
    error_headers,
    error_status,
)

EXPECTED = [
    (BadRequest, 400, "bad_request"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (TooLarge, 413, "too_large"),
    (UnsupportedImage, 415, "unsupported_image"),
    (CorruptImage, 422, "corrupt_image"),
    (Overloaded, 503, "overloaded"),
    (Timeout, 504, "timeout"),
]


@pytest.mark.parametrize("cls,status,code", EXPECTED)
def test_status_and_code(cls, status, code):
    err = cls("something")
    assert isinstance(err, ImageServerError)
    assert isinstance(err, pb.Error)
    assert err.status == status == error_status(err)
    assert err.code == code
    assert str(err) == "something"
    body = json.loads(error_body(err))
    assert body["error"] == code
    assert body["message"] == "something"


@pytest.mark.parametrize("cls,status,code", EXPECTED)
def test_default_messages(cls, status, code):
    err = cls()
    assert err.message
    assert json.loads(error_body(err))["message"] == err.message


def test_corrupt_is_an_unsupported_image():
    assert issubclass(CorruptImage, UnsupportedImage)
    assert CorruptImage.status != UnsupportedImage.status


def test_codes_are_distinct():
    codes = [code for _, _, code in EXPECTED]
    assert len(set(codes)) == len(codes)


def test_overloaded_retry_after():
    err = Overloaded(retry_after=7)
    assert err.retry_after == 7
    body = json.loads(error_body(err))
    assert body == {"error": "overloaded", "message": err.message, "retry_after": 7}
    assert (b"Retry-After", b"7") in error_headers(err)
    assert (b"Content-Type", b"application/json") in error_headers(err)


def test_overloaded_pickles_with_retry_after():
    import pickle

    err = pickle.loads(pickle.dumps(Overloaded("busy", retry_after=3)))
    assert (str(err), err.retry_after) == ("busy", 3)


def test_unexpected_exceptions_become_a_generic_500():
    err = FileNotFoundError(2, "No such file", "/srv/secret/images/a.jpg")
    assert error_status(err) == 500
    body = error_body(err)
    assert json.loads(body) == {"error": "internal", "message": "internal error"}
    assert b"/srv" not in body


@pytest.mark.parametrize(
    "message",
    [
        "cannot open /srv/images/a.jpg",
        "cannot open '/srv/images/a.jpg'",
        "path=/home/user/.ssh/id_rsa",
        "C:\\Users\\me\\img.jpg failed",
        'Traceback (most recent call last):\n  File "/usr/lib/python3.11/x.py", line 1',
    ],
)
def test_error_body_never_shows_absolute_paths(message):
    body = error_body(NotFound(message)).decode()
    message_out = json.loads(body)["message"]
    assert "/srv" not in message_out and "/home" not in message_out and "/usr" not in message_out
    assert "\\Users" not in message_out
    assert "\n" not in message_out
    assert not any(token.startswith("/") for token in message_out.split())


def test_error_body_is_short():
    body = error_body(BadRequest("x" * 10_000))
    assert len(body) < 300


def test_pb_clients_see_the_class_name():
    # What PB sends for a failure raised by a remote_ method.
    try:
        raise NotFound("no such image")
    except NotFound:
        failure = Failure()
    state = pb.failure2Copyable(failure, 0).getStateToCopy()
    assert state["type"] == b"imgserver.errors.NotFound"
    assert state["value"] == "no such image"


def test_all_exports_exist():
    for name in errors.__all__:
        assert hasattr(errors, name)
