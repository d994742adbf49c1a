"""Entity structure: columns from a schema and the coercion of values into rows."""

from datetime import UTC, date, datetime

import jsonschema_rs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.columns import EXTRA_COLUMN
from schemas.dataset import DatasetError, Limits, parse_dataset
from schemas.structure import (
    ShapeError,
    Structure,
    to_boolean,
    to_integer,
    to_number,
    to_text,
    to_timestamp,
)

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "string"},
    "n": {"type": "integer", "default": 5},
    "x": {"type": "number"},
    "ok": {"type": "boolean"},
    "at": {"type": "string", "format": "date-time"},
    "day": {"type": "string", "format": "date"},
    "geo": {"type": "object", "properties": {"lat": {"type": "number"},
                                             "inner": {"type": "object", "properties": {
                                                 "z": {"type": "integer"}}}},
            "required": ["lat"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "kind": {"enum": ["a", "b"]},
}, "required": ["id", "geo"]}


def structure(**extra) -> Structure:
    return Structure(parse_dataset({"id": "d", "schema": SCHEMA, **extra}, Limits()))


def test_columns_flatten_nested_objects():
    s = structure()
    assert s.data_columns == [("id", "text"), ("n", "integer"), ("x", "number"),
                              ("ok", "boolean"), ("at", "timestamp"), ("day", "date"),
                              ("geo__lat", "number"), ("geo__inner__z", "integer"),
                              ("tags", "json"), ("kind", "text"), (EXTRA_COLUMN, "json")]


def test_nested_json_and_dropping_unknown_fields():
    s = structure(nested="json", unknown_fields="drop")
    assert ("geo", "json") in s.data_columns and EXTRA_COLUMN not in dict(s.data_columns)
    row = s.shape({"id": "a", "geo": {"lat": 1}, "surprise": True})
    assert row["geo"] == '{"lat":1}' and "surprise" not in str(row)


def test_shape_coerces_and_fills_defaults():
    row = structure().shape({"id": 7, "x": "1.5", "ok": "yes", "at": "2026-01-02T03:04:05",
                             "day": "2026-01-02", "geo": {"lat": "52.1"}, "other": [1]})
    assert row["id"] == "7" and row["n"] == 5 and row["x"] == 1.5 and row["ok"] is True
    assert row["at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert row["day"] == date(2026, 1, 2)
    assert row["geo__lat"] == 52.1 and row["geo__inner__z"] is None
    assert row[EXTRA_COLUMN] == '{"other":[1]}'


@pytest.mark.parametrize("item, path", [
    ({"geo": {"lat": 1}}, "$.id"),
    ({"id": "a"}, "$.geo.lat"),
    ({"id": "a", "geo": {"lat": "north"}}, "$.geo.lat"),
    ({"id": "a", "geo": {"lat": 1}, "n": 1.5}, "$.n"),
    ({"id": "a", "geo": {"lat": 1}, "ok": "maybe"}, "$.ok"),
    ({"id": "a", "geo": {"lat": 1}, "at": "yesterday"}, "$.at"),
    ({"id": {"no": 1}, "geo": {"lat": 1}}, "$.id"),
])
def test_shape_errors_name_the_field(item, path):
    with pytest.raises(ShapeError) as info:
        structure().shape(item)
    assert info.value.path == path


def test_non_object_item():
    with pytest.raises(ShapeError):
        structure().shape([1, 2])


def test_overlong_column_names_are_refused():
    schema = {"type": "object", "properties": {"a" * 70: {"type": "string"}}}
    with pytest.raises(DatasetError, match="longer"):
        Structure(parse_dataset({"id": "d", "schema": schema}, Limits()))


def test_epoch_timestamps_in_seconds_and_milliseconds():
    assert to_timestamp(1_800_000_000) == to_timestamp(1_800_000_000_000)
    assert to_timestamp("2026-01-02T03:04:05+02:00") == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("text, moment", [
    ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("1990-12-31T23:59:60Z", datetime(1991, 1, 1, tzinfo=UTC)),  # as PostgreSQL reads it
    ("1990-12-31T23:59:60.5Z", datetime(1991, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ("2016-12-31t18:59:60-05:00", datetime(2017, 1, 1, tzinfo=UTC)),
])
def test_every_rfc3339_date_time_the_schema_accepts_converts(text, moment):
    """The validators check format: date-time as RFC 3339, which allows a lowercase t and z
    and a leap second; fromisoformat reads neither, so such valid events were dead-lettered."""
    assert jsonschema_rs.Draft7Validator({"format": "date-time"}, validate_formats=True
                                         ).is_valid(text)
    assert to_timestamp(text) == moment


@pytest.mark.parametrize("value", [10**20, -(10**20), 67_768_036_191_676_796_000])
def test_epochs_beyond_the_platforms_time_are_refused_as_shape_errors(value):
    """fromtimestamp raises OSError for these (not one of the errors a shaper maps): a
    Kafka-native record holding one stopped its worker, every time it was read."""
    with pytest.raises(ValueError, match="outside the date-time range"):
        to_timestamp(value)
    with pytest.raises(ShapeError, match=r"\$\.at: .*outside the date-time range"):
        structure().row_values({"id": "a", "at": value})


@given(st.integers(-(10**12), 10**12))
def test_integers_survive_as_text_and_numbers(n):
    assert to_integer(str(n)) == n
    assert to_integer(float(n)) == n if abs(n) < 2**53 else True
    assert to_number(str(n)) == float(n)
    assert to_text(n) == str(n)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**64 - 1, 1.8446744073709552e19,
                                   "99999999999999999999"])
def test_integers_beyond_64_bits_are_refused(value):
    """The stores keep 64-bit integers; a larger one (JSON Schema's "integer" has no bound,
    orjson reads up to 2**64 - 1) would fail its whole batch's write, again and again. It is
    refused here, so the event is dead-lettered and the partition flows."""
    with pytest.raises(ValueError, match="64-bit"):
        to_integer(value)
    s = structure()
    with pytest.raises(ShapeError, match="64-bit"):
        s.row_values({"id": "a", "n": value})  # the compiled shaper's fast path too
    assert to_integer(2**63 - 1) == 2**63 - 1 and to_integer(-(2**63)) == -(2**63)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_round_trip_through_text(x):
    assert to_number(repr(x)) == x


@given(st.booleans())
def test_booleans_round_trip_through_text(b):
    assert to_boolean(to_text(b)) is b
    assert to_boolean(int(b)) is b


@given(st.one_of(st.lists(st.integers()), st.dictionaries(st.text(), st.integers())))
def test_containers_are_not_scalars(value):
    for coerce in (to_integer, to_number, to_text, to_boolean):
        with pytest.raises((TypeError, ValueError)):
            coerce(value)


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                    timezones=st.just(UTC)))
def test_timestamps_round_trip_through_iso_text(moment):
    assert to_timestamp(moment.isoformat()) == moment


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["12", " 7 ", "1.5", "true", "no", "2026-01-02", "2026-01-02T03:04:05Z",
                     "2026-01-02T03:04:05+05:30", "yesterday", "nan", "1e999"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["lat", "z"]),
                                                         st.integers(), max_size=2))
_INNER = st.one_of(_VALUES, st.fixed_dictionaries({}, optional={"z": _VALUES}))
_GEO = st.one_of(_VALUES, st.fixed_dictionaries({}, optional={"lat": _VALUES, "inner": _INNER}))
_ITEMS = st.one_of(st.fixed_dictionaries({}, optional={
    **{name: _VALUES for name in ("id", "n", "x", "ok", "at", "day", "tags", "kind", "other")},
    "geo": _GEO}), _VALUES)


def _outcome(shape, item):
    try:
        return shape(item)
    except ShapeError as exc:
        return ("ShapeError", exc.path, exc.message)


@pytest.mark.parametrize("options", [{}, {"nested": "json", "unknown_fields": "drop"},
                                     {"item_key": "tags"}])  # an item key of kind json
@settings(max_examples=400)
@given(item=_ITEMS)
@example(item={"id": "a", "x": float("nan"), "geo": {"lat": 1}})  # the identity tests' edges
@example(item={"id": "a", "geo": {"lat": float("inf")}, "n": True, "ok": 1})
@example(item={"id": 1, "geo": {"lat": 2, "inner": {"z": 3.0}}, "n": None, "x": 4})
def test_compiled_shaper_matches_the_reference_loop(options, item):
    """The per-dataset compiled row_values gives the same row, or the same error, as the loop
    over the column plan it unrolls."""
    s = structure(**options)
    assert _outcome(s.row_values, item) == _outcome(lambda i: Structure.row_values(s, i), item)


def test_boolean_subschemas_are_read_as_json_schema_means_them():
    """``true`` takes any value (a json column); ``false`` is never present (no column)."""
    schema = {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string"}, "any": True, "never": False,
        "geo": {"type": "object", "properties": {"lat": True}}}}
    dataset = parse_dataset({"id": "d", "schema": schema}, Limits())
    s = Structure(dataset)
    assert s.data_columns == [("id", "text"), ("any", "json"), ("geo__lat", "json"),
                              (EXTRA_COLUMN, "json")]
    assert [f["name"] for f in dataset.fields] == ["id", "any", "geo"]
    row = s.shape({"id": "a", "any": [1, {"b": 2}], "geo": {"lat": "north"}})
    assert row["any"] == '[1,{"b":2}]' and row["geo__lat"] == '"north"'
    assert dataset.validate_item.is_valid({"id": "a", "any": 1})
    assert not dataset.validate_item.is_valid({"id": "a", "never": 1})
    keyed = parse_dataset({"id": "k", "item_key": "any", "schema": schema}, Limits())
    assert keyed.validate_item.is_valid({"id": "a", "any": 1})
    assert not keyed.validate_item.is_valid({"id": "a", "any": None})  # a null key is no key
