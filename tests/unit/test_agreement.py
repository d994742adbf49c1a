"""What the gateway accepts, the workers can store.

Items with every column kind, their values drawn from everything JSON and the schema's
formats allow (integers past 64 bits, RFC 3339 date-times of any year, offset, case and leap
second, any text), are sent as a JSON body; every item the gateway's validation accepts must
shape into a row both stores keep. A disagreement means a 202 and then a dead letter, or a
worker that stops at the item: the producer must hear it at the edge instead.
"""

from __future__ import annotations

import json
from datetime import date, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.columns import INT64_MAX, INT64_MIN
from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from schemas.validation import validate

SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer"},
    "small": {"type": ["integer", "null"], "minimum": -5, "maximum": 5},
    "x": {"type": "number"},
    "ok": {"type": "boolean"},
    "at": {"type": "string", "format": "date-time"},
    "day": {"type": "string", "format": "date"},
    "kind": {"enum": ["a", "b"]},
    "text": {"type": "string"},
    "geo": {"type": "object", "properties": {"lat": {"type": "number"},
                                             "deep": {"type": "object", "properties": {
                                                 "z": {"type": "integer"}}}}},
    "tags": {"type": "array"},
    "maybe": {"type": ["string", "null"]},  # required, and null allowed: stored as NULL
    "key": {"type": ["string", "null"]},  # the item key of one variant: null refused there
}, "required": ["n", "maybe"]}

_DAY = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
DATES = st.from_regex(rf"\A{_DAY}\Z")
DATE_TIMES = st.from_regex(  # RFC 3339, section 5.6
    rf"\A{_DAY}[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{{1,9}})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)\Z")
INTEGERS = st.one_of(st.integers(), st.integers(INT64_MIN - 2, INT64_MIN + 2),
                     st.integers(INT64_MAX - 2, INT64_MAX + 2),
                     st.integers(2**64 - 2, 2**64 + 2))
NUMBERS = st.one_of(INTEGERS, st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(), inner, max_size=3), max_leaves=6)
ITEMS = st.fixed_dictionaries({"n": INTEGERS}, optional={
    "maybe": st.none() | st.text(), "key": st.none() | st.text(),
    "small": st.none() | INTEGERS, "x": NUMBERS, "ok": st.booleans(), "at": DATE_TIMES,
    "day": DATES, "kind": st.sampled_from(["a", "b"]), "text": st.text(),
    "geo": st.fixed_dictionaries({}, optional={"lat": NUMBERS, "deep": st.fixed_dictionaries(
        {}, optional={"z": INTEGERS})}),
    "tags": st.lists(JSON, max_size=3), "other": JSON})


def storable(value) -> bool:
    """What both stores keep in a column: 64-bit integers, finite floats, text without NUL,
    dates and aware timestamps; in a json column, what orjson writes (it refuses integers
    past 64 bits) without NUL."""
    if isinstance(value, bool) or value is None or isinstance(value, date):
        return not isinstance(value, datetime) or value.tzinfo is not None
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return value - value == 0.0
    if isinstance(value, str):
        return "\x00" not in value
    return b"\\u0000" not in orjson.dumps(value)


@pytest.mark.parametrize("options", [{"nested": "columns"}, {"nested": "json"},
                                     {"item_key": "key"}, {"event_id": "key"}])
def test_every_item_the_gateway_accepts_becomes_a_storable_row(options):
    dataset = parse_dataset({"id": "every", "schema": SCHEMA, **options}, Limits())
    structure = Structure(dataset)

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(ITEMS, min_size=1, max_size=3))
    def check(items):
        body = json.dumps(items).encode()  # as a producer may write it: any integer, any text
        parsed = orjson.loads(body)  # as the gateway reads it
        verdict = validate(dataset, parsed, cap=10, body=body)
        for item in verdict.valid:
            row = structure.row_values(item)  # must not raise: the item was acknowledged
            assert all(storable(v) for v in row), (item, row)
            key = dataset.item_key or dataset.event_id
            assert key is None or row[structure.data_names.index(key)] is not None

    check()
