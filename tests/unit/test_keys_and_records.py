"""Ingest keys and the entry-topic record format."""

import orjson
import pytest

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
