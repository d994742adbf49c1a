"""Ingest keys and the entry-topic record format."""

from itertools import pairwise

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.keys import hash_key, key_id_of, matches, new_key
from schemas.records import H_PART, H_REQUEST_ID, RecordMeta, decode_value, encode_values


def test_key_roundtrip():
    key = new_key("pos-terminals")
    assert key.startswith("sk_pos-terminals_")
    assert key_id_of(key) == "pos-terminals"
    assert matches(key, hash_key(key))
    assert not matches(key + "x", hash_key(key))


@pytest.mark.parametrize("bad", ["", "sk_", "sk_Upper_abc", "pk_abc_def", "sk_abc_", "sk_abc"])
def test_malformed_keys_have_no_id(bad):
    assert key_id_of(bad) is None


def test_key_id_is_checked():
    with pytest.raises(ValueError):
        new_key("Bad Id")


def test_one_record_per_request_when_it_fits():
    items = [{"a": i} for i in range(100)]
    values = encode_values(items, 1_000_000)
    assert len(values) == 1
    assert decode_value(values[0]) == items


def test_large_requests_split_at_item_boundaries():
    items = [{"a": "x" * 100, "i": i} for i in range(100)]
    values = encode_values(items, 1000)
    assert len(values) > 1
    assert all(len(v) <= 1000 for v in values)
    assert [i for v in values for i in decode_value(v)] == items


_ITEMS = st.lists(st.fixed_dictionaries({"s": st.text(max_size=300),
                                         "n": st.integers(-(2**63), 2**63 - 1)}),
                  min_size=1, max_size=60)


@settings(max_examples=300)
@given(items=_ITEMS, max_bytes=st.integers(20, 3000), padded=st.booleans())
def test_splitting_keeps_every_item_once_in_order_in_values_that_fit(items, max_bytes, padded):
    # the body the items came from: compact, or with whitespace (bigger than their encoding)
    body = orjson.dumps(items, option=orjson.OPT_INDENT_2) if padded else orjson.dumps(items)
    for hint in (None, len(body)):
        values = encode_values(items, max_bytes, hint)
        assert [i for v in values for i in decode_value(v)] == items
        assert all(len(v) <= max_bytes or len(decode_value(v)) == 1 for v in values)
        # as few as greedy packing would leave: no two neighbours fit in one value
        assert all(len(a) + len(b) - 1 > max_bytes for a, b in pairwise(values))
        if len(orjson.dumps(items)) <= max_bytes:
            assert values == [orjson.dumps(items)]


def test_a_single_event_value_decodes_as_one_event():
    assert decode_value(b'{"a":1}') == [{"a": 1}]


def test_headers():
    meta = RecordMeta("req_1", "pos", 1700000000000, idempotency_key="k1")
    headers = dict(meta.headers())
    assert headers[H_REQUEST_ID] == b"req_1"
    assert headers["sluice-received-at"] == b"1700000000000"
    assert headers["sluice-idempotency-key"] == b"k1"
    assert H_PART not in headers
    assert dict(meta.headers(1, 3))[H_PART] == b"1/3"
    assert "sluice-session-id" not in headers
    orjson.dumps([h[0] for h in meta.headers()])
