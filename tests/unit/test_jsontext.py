"""schemas.jsontext: orjson's output, also past the 254 levels orjson encodes."""

from __future__ import annotations

import sys

import orjson
import pytest

from schemas.jsontext import MAX_DEPTH, dumps


def test_shallow_values_are_orjsons_own_output():
    value = {"region": "Nörd", "n": [1, 2.5, None, True], "big": 18446744073709551615}
    assert dumps(value) == orjson.dumps(value)


@pytest.mark.parametrize("depth", [255, 600, MAX_DEPTH])
def test_every_depth_orjson_parses_is_encoded_back_the_same(depth):
    text = b"[" * (depth - 1) + b'{"s":"\\u00e9\\n"}' + b"]" * (depth - 1)
    value = orjson.loads(text)  # orjson's own limit: the deepest event Sluice can hold
    limit = sys.getrecursionlimit()
    assert dumps(value) == text.replace(b"\\u00e9", "é".encode())
    assert sys.getrecursionlimit() == limit


def test_other_type_errors_are_not_swallowed():
    with pytest.raises(TypeError):
        dumps({1, 2})
