"""What the gateway accepts, the workers can store.

Items with every column kind, their values drawn from everything JSON and the schema's
formats allow (integers past 64 bits, RFC 3339 date-times of any year, offset, case and leap
second, any text), are sent as a JSON body; every item the gateway's validation accepts must
shape into a row both stores keep. A disagreement means a 202 and then a dead letter, or a
worker that stops at the item: the producer must hear it at the edge instead. And whatever a
record written straight to Kafka holds, decoding it yields such rows and dead letters only.
"""

from __future__ import annotations

import functools
import json
from datetime import date, datetime

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.columns import INT64_MAX, INT64_MIN
from schemas.dataset import Limits, parse_dataset
from schemas.structure import Structure
from schemas.validation import validate
from workers.decode import Decoded, decode

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


def storable(row: tuple, structure: Structure) -> bool:
    """Whether both stores keep every value of the row in its column: 64-bit integers, finite
    floats, text without NUL, dates and aware timestamps; in a json column, JSON text (the
    value as orjson writes it, integers up to 2**64 - 1) without NUL."""
    return all(value is None or _KEEPS[kind](value)
               for value, (_, kind) in zip(row, structure.data_columns, strict=True))


_KEEPS = {
    "integer": lambda v: type(v) is int and INT64_MIN <= v <= INT64_MAX,
    "number": lambda v: type(v) is float and v - v == 0.0,
    "boolean": lambda v: type(v) is bool,
    "text": lambda v: type(v) is str and "\x00" not in v,
    "timestamp": lambda v: type(v) is datetime and v.tzinfo is not None,
    "date": lambda v: type(v) is date,
    "json": lambda v: type(v) is str and "\\u0000" not in v and _is_json(v),
}


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


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
            assert storable(row, structure), (item, row)
            key = dataset.item_key or dataset.event_id
            assert key is None or row[structure.data_names.index(key)] is not None

    check()


# Any JSON at all, as a Kafka-native producer may write it: no gateway checked it. Values at
# the edges of what the stores and Python's datetime keep are drawn often.
EDGES = st.sampled_from([2**63, -(2**63) - 1, 2**64 - 1, 10**20, -(10**20), 1e300, -1e300,
                         253_402_300_800, -62_135_596_801, 10**16, 0.5, "", "\x00", "1e3",
                         "0000-01-01", "9999-12-31T23:59:59-01:00", "true", " 12 "])
NAMES = st.sampled_from([*SCHEMA["properties"], "lat", "deep", "z", "other"])  # and nested
LEAVES = st.none() | st.booleans() | NUMBERS | st.text() | DATE_TIMES | DATES | EDGES
ANY_JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES | st.text(), inner,
                                                                max_size=4),
    max_leaves=10)
_DEEP = functools.reduce(lambda inner, _: [inner], range(300), 1)  # orjson writes 254 levels
ANY_ITEM = st.fixed_dictionaries({}, optional={  # each column's name half the time
    name: EDGES | LEAVES | ANY_JSON for name in [*SCHEMA["properties"], "other"]})


@pytest.mark.parametrize("options", [{"nested": "columns"}, {"item_key": "key"}])
def test_no_record_value_stops_a_worker(options):
    """Whatever a record holds, decoding it yields storable rows and dead letters: nothing
    else (an exception here would stop the worker at this record, every time it is read)."""
    dataset = parse_dataset({"id": "every", "schema": SCHEMA, **options}, Limits())
    structure = Structure(dataset)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(ANY_ITEM | ANY_JSON, max_size=3) | ANY_ITEM)
    @example({"n": 1, "at": 10**20})  # each once stopped a worker
    @example([{"key": None, "n": 1}, {"n": 2**63}, {"text": "\x00", "n": 1}])
    @example([{"n": -(2**63) - 1, "tags": 2**63}])  # a big integer alone in a json column
    @example([{"n": 1, "tags": _DEEP}, {"n": 1, "other": _DEEP}, {"n": 1, "key": _DEEP}])
    def check(value):
        record = ConsumerRecord("ingest.every", 0, 0, 1_700_000_000_000, 0, None,
                                json.dumps(value).encode(), None, 0, 0, [])
        out = Decoded()
        decode(record, structure, out)
        for row in out.rows:
            assert storable(row.values, structure), row.values

    check()
