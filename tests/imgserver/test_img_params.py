from urllib.parse import parse_qs

import pytest

from imgserver.errors import BadRequest
from imgserver.params import TransformSpec, parse_transform


def parse(query: str, **kwargs):
    return parse_transform(parse_qs(query, keep_blank_values=True), **kwargs)


def test_no_parameters_means_the_original():
    assert parse("") is None
    assert parse_transform({}) is None


def test_signature_alone_means_the_original():
    assert parse("s=abcdef") is None


def test_full_spec():
    spec = parse("w=200&h=100&fit=crop&fm=webp&q=70&s=sig")
    assert spec == TransformSpec(width=200, height=100, fit="crop", format="webp", quality=70)


def test_defaults():
    spec = parse("w=200")
    assert spec == TransformSpec(width=200, height=None, fit="clip", format=None, quality=85)
    assert parse("w=200", default_quality=60).quality == 60


@pytest.mark.parametrize(
    "fm,canonical", [("jpg", "jpeg"), ("jpeg", "jpeg"), ("png", "png"), ("webp", "webp")]
)
def test_formats(fm, canonical):
    assert parse(f"fm={fm}").format == canonical


@pytest.mark.parametrize("fit", ["clip", "crop", "scale", "max"])
def test_fits(fit):
    assert parse(f"w=10&fit={fit}").fit == fit


def test_format_or_quality_alone_is_a_transform():
    assert parse("fm=png") == TransformSpec(format="png")
    assert parse("q=50") == TransformSpec(quality=50)


def test_limits_are_inclusive():
    spec = parse("w=8192&h=1&q=100")
    assert (spec.width, spec.height, spec.quality) == (8192, 1, 100)
    assert parse("q=1").quality == 1
    assert parse("w=100", max_dimension=100).width == 100


def test_twisted_style_bytes_arguments():
    spec = parse_transform({b"w": [b"300"], b"fit": [b"max"], b"s": [b"x"]})
    assert spec == TransformSpec(width=300, fit="max")


def test_single_values_and_ints_are_accepted_for_pb_callers():
    assert parse_transform({"w": 120, "h": "80"}) == TransformSpec(width=120, height=80)


@pytest.mark.parametrize(
    "query,fragment",
    [
        # repeated
        ("w=1&w=2", "more than once"),
        ("w=1&w=1", "more than once"),
        ("fm=png&fm=png", "more than once"),
        # unknown
        ("width=100", "unknown parameter"),
        ("W=100", "unknown parameter"),
        ("crop=faces&fit=crop&w=1&h=1", "not supported"),
        ("zoom=2", "unknown parameter"),
        # empty
        ("w=", "empty"),
        ("h=", "empty"),
        ("fit=", "empty"),
        ("fm=", "empty"),
        ("q=", "empty"),
        # not a whole number
        ("w=abc", "whole number"),
        ("w=1.5", "whole number"),
        ("w=1e3", "whole number"),
        ("w=0x10", "whole number"),
        ("w=%2B5", "whole number"),  # +5
        ("w=%205", "whole number"),  # leading space
        ("w=5%20", "whole number"),  # trailing space
        ("w=1_000", "whole number"),
        ("w=%D9%A5", "whole number"),  # ARABIC-INDIC DIGIT FIVE
        ("w=99999999999999999999", "whole number"),
        # zero / negative
        ("w=0", "between 1 and 8192"),
        ("h=0", "between 1 and 8192"),
        ("w=-5", "whole number"),
        ("q=0", "between 1 and 100"),
        ("q=-1", "whole number"),
        # too large
        ("w=8193", "between 1 and 8192"),
        ("h=100000", "between 1 and 8192"),
        ("q=101", "between 1 and 100"),
        # bad names
        ("fit=fill", "fit needs w, h or both"),
        ("fit=CROP&w=1", "fit must be one of"),
        ("fit=clamp&w=1", "fit must be one of"),
        ("fm=jp2", "fm must be one of"),
        ("fm=JPG", "fm must be one of"),
        ("fm=png8", "fm must be one of"),
        # fit without a size
        ("fit=crop", "fit needs w, h or both"),
        ("fit=clip&fm=png", "fit needs w, h or both"),
    ],
)
def test_bad_requests(query, fragment):
    with pytest.raises(BadRequest, match=fragment) as info:
        parse(query)
    assert info.value.status == 400


def test_max_dimension_setting_is_applied():
    with pytest.raises(BadRequest, match="between 1 and 500"):
        parse("w=501", max_dimension=500)


def test_blank_list_is_empty():
    with pytest.raises(BadRequest, match="empty"):
        parse_transform({"w": []})


def test_invalid_utf8_bytes():
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_transform({b"w": [b"\xff"]})


def test_message_truncates_long_input():
    with pytest.raises(BadRequest) as info:
        parse("fm=" + "x" * 5000)
    assert len(str(info.value)) < 120


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"height": -1},
        {"width": True},
        {"fit": "zoom"},
        {"format": "heif"},
        {"quality": 0},
        {"quality": 101},
    ],
)
def test_spec_validates_itself(kwargs):
    with pytest.raises(BadRequest):
        TransformSpec(**kwargs)


def test_cache_key_is_canonical():
    assert parse("w=200&h=100&fit=crop").cache_key() == parse("fit=crop&h=100&w=200").cache_key()
    assert parse("w=200&fm=jpg").cache_key() == parse("w=200&fm=jpeg").cache_key()
    assert parse("w=0200").cache_key() == parse("w=200").cache_key()
    # the default quality is filled in, so asking for it explicitly changes nothing
    assert parse("w=200&q=85").cache_key() == parse("w=200").cache_key()


def test_cache_key_merges_equivalent_fits():
    clip = parse("w=200").cache_key()
    assert parse("w=200&fit=crop").cache_key() == clip
    assert parse("w=200&fit=scale").cache_key() == clip
    assert parse("w=200&fit=max").cache_key() != clip
    assert parse("w=200&h=200&fit=crop").cache_key() != parse("w=200&h=200").cache_key()


def test_cache_key_ignores_quality_for_png():
    assert parse("fm=png&q=10").cache_key() == parse("fm=png&q=90").cache_key()
    assert parse("fm=webp&q=10").cache_key() != parse("fm=webp&q=90").cache_key()


def test_cache_keys_differ():
    queries = [
        "w=100",
        "h=100",
        "w=100&h=100",
        "w=100&h=100&fit=max",
        "w=100&fm=png",
        "w=100&q=50",
        "fm=png",
    ]
    keys = {parse(q).cache_key() for q in queries}
    assert len(keys) == len(queries)


@pytest.mark.parametrize("value", [1.5, None, object()])
def test_non_text_values_from_programmatic_callers_are_bad_requests(value):
    with pytest.raises(BadRequest):
        parse_transform({"w": value})
