"""Dataset definitions and the catalogue: checks, compiled validators, keys."""

import re
from pathlib import Path

import orjson
import pytest
import yaml

from schemas.catalogue import CatalogueError, load_catalogue
from schemas.columns import accepts_null, nul_path, store_bounded
from schemas.dataset import DatasetError, Limits, parse_dataset
from schemas.keys import hash_key, new_key
from schemas.validation import validate

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["n"]}


def test_examples_load():
    catalogue = load_catalogue(EXAMPLES, Limits())
    assert {d.id for d in catalogue} >= {"sales", "telemetry", "journal"}
    sales = catalogue.get("sales")
    assert sales.entry_topic == "ingest.sales"
    assert sales.item_key == "region"
    assert sales.rate_limit.enabled


def test_defaults_and_identifying_fields_become_required():
    dataset = parse_dataset({"id": "d1", "schema": SCHEMA, "item_key": "id"}, Limits())
    assert dataset.entry_topic == "ingest.d1"
    assert dataset.max_request_bytes == 1024 * 1024
    items = [{"n": 1}, {"n": 1, "id": "a"}]
    verdict = validate(dataset, items, cap=10, body=orjson.dumps(items))
    assert verdict.invalid == 1
    assert verdict.errors[0].index == 0


@pytest.mark.parametrize("raw, field", [
    ({"id": "Bad", "schema": SCHEMA}, "id"),
    ({"id": "d", "schema": {"type": "array"}}, "schema"),
    ({"id": "d", "schema": SCHEMA, "item_key": "missing"}, "item_key"),
    ({"id": "d", "schema": SCHEMA, "max_request_bytes": 0}, "max_request_bytes"),
    ({"id": "d", "schema": SCHEMA, "rate_limit": {"requests_per_second": -1}}, "rate_limit"),
    ({"id": "d", "schema": SCHEMA, "ingest_keys": [{"id": "k", "sha256": "abc"}]}, "sha256"),
    ({"id": "d", "schema": SCHEMA, "ingest_keys": [{"id": "kafka", "sha256": "ab" * 32}]},
     r"ingest_keys\[0\]\.id: key id 'kafka' is reserved"),
    ({"id": "d", "schema": SCHEMA, "surprise": 1}, "unknown field"),
    ({"id": "d", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}, "schema"),
])
def test_bad_definitions_name_the_field(raw, field):
    with pytest.raises(DatasetError, match=field):
        parse_dataset(raw, Limits())


def test_bad_file_stops_loading_with_its_name(tmp_path):
    (tmp_path / "good.yaml").write_text("id: good\nschema: {type: object}\n")
    (tmp_path / "broken.yaml").write_text("id: broken\nschema: [\n")
    with pytest.raises(CatalogueError, match=r"broken\.yaml"):
        load_catalogue(tmp_path, Limits())


def test_duplicate_ids_and_topics_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("id: a\nschema: {type: object}\n")
    (tmp_path / "b.yaml").write_text("id: a\nschema: {type: object}\n")
    with pytest.raises(CatalogueError, match="already defined"):
        load_catalogue(tmp_path, Limits())
    (tmp_path / "b.yaml").write_text("id: b\nentry_topic: ingest.a\nschema: {type: object}\n")
    with pytest.raises(CatalogueError, match="entry topic"):
        load_catalogue(tmp_path, Limits())


def test_authentication_by_key(tmp_path):
    key = new_key("pos")
    other = new_key("pos")  # same id, different secret
    (tmp_path / "a.yaml").write_text(
        f"id: a\nschema: {{type: object}}\ningest_keys: [{{id: pos, sha256: {hash_key(key)}}}]\n")
    (tmp_path / "b.yaml").write_text("id: b\nschema: {type: object}\n")
    catalogue = load_catalogue(tmp_path, Limits())
    principal = catalogue.authenticate(key)
    assert principal.key_id == "pos"
    assert principal.may_write("a") and not principal.may_write("b")
    assert catalogue.authenticate(other) is None
    assert catalogue.authenticate("garbage") is None


def test_validation_caps_reported_errors():
    dataset = parse_dataset({"id": "d", "schema": SCHEMA}, Limits())
    items = [{"n": "x"}] * 10 + [{"n": 1}]
    verdict = validate(dataset, items, cap=3, body=orjson.dumps(items))
    assert verdict.invalid == 10
    assert len(verdict.errors) == 3
    assert verdict.errors[0].path == "$.n"
    assert verdict.valid == [{"n": 1}]


NESTED = {"type": "object", "properties": {
    "n": {"type": ["integer", "null"]},
    "limit": {"type": "integer", "maximum": 10, "allOf": [{"multipleOf": 2}]},
    "o": {"type": "object", "properties": {"c": {"type": "integer"}}},
    "ids": {"type": "array", "items": {"type": "integer"}},  # a json column
}}
BIG = 2**63


def invalid_paths(dataset, items: list) -> list[tuple[int, str, str]]:
    verdict = validate(dataset, items, cap=100, body=orjson.dumps(items))
    assert verdict.invalid == len(verdict.errors)
    return [(e.index, e.path, e.message) for e in verdict.errors]


def test_integer_columns_are_held_to_64_bits_the_stores_integers():
    """JSON Schema's integer has no bound; the workers would refuse (dead-letter) larger
    values, so the gateway refuses them with the other schema errors instead."""
    dataset = parse_dataset({"id": "d", "schema": NESTED}, Limits())
    # as parsed by orjson: exact up to 2**64 - 1, beyond that (either way) a float
    items = orjson.loads(b"""[
        {"n": 9223372036854775807, "o": {"c": -9223372036854775808}, "ids": [%d], "limit": 4},
        {"n": 9223372036854775808}, {"n": 18446744073709551615}, {"o": {"c": %d}},
        {"n": -1e19}, {"limit": 12}, {"limit": 3}, {"n": null}]""" % (BIG, BIG))
    assert invalid_paths(dataset, items) == [
        (1, "$.n", f"{BIG} is greater than the maximum of {BIG - 1}"),
        (2, "$.n", f"{2**64 - 1} is greater than the maximum of {BIG - 1}"),
        (3, "$.o.c", f"{BIG} is greater than the maximum of {BIG - 1}"),
        (4, "$.n", f"-10000000000000000000.0 is less than the minimum of {-BIG}"),
        (5, "$.limit", "12 is greater than the maximum of 10"),  # the dataset's own bounds
        (6, "$.limit", "3 is not a multiple of 2"),
    ]
    assert NESTED["properties"]["limit"]["allOf"] == [{"multipleOf": 2}]  # not changed
    as_json = parse_dataset({"id": "d", "schema": NESTED, "nested": "json"}, Limits())
    assert invalid_paths(as_json, [{"o": {"c": BIG}}]) == []  # kept whole in a json column


def test_dates_are_held_to_the_years_the_stores_keep():
    """RFC 3339 allows the year 0000, and offsets that take the first or last day of the
    calendar out of it in UTC; Python's datetime (which shapes rows) holds 1-9999."""
    schema = {"type": "object", "properties": {
        "at": {"type": "string", "format": "date-time"},
        "day": {"type": ["string", "null"], "format": "date"}}}
    dataset = parse_dataset({"id": "d", "schema": schema}, Limits())
    good = [{"at": "0001-01-01T00:00:00Z", "day": "0001-01-01"},
            {"at": "9999-12-31T23:59:59-00:00", "day": "9999-12-31"},
            {"at": "0001-01-01T05:00:00-04:00"}, {"at": "9999-12-31T01:00:00+01:00"}]
    assert invalid_paths(dataset, good) == []
    outside = "is outside the years 1-9999 (in UTC), which the stores keep"
    bad = [{"day": "0000-12-31"}, {"at": "0000-06-01T00:00:00Z"},
           {"at": "0001-01-01T00:30:00+01:00"}, {"at": "9999-12-31t23:30:00-01:00"}]
    assert invalid_paths(dataset, bad) == [
        (0, "$.day", f'"0000-12-31" {outside}'), (1, "$.at", f'"0000-06-01T00:00:00Z" {outside}'),
        (2, "$.at", f'"0001-01-01T00:30:00+01:00" {outside}'),
        (3, "$.at", f'"9999-12-31t23:30:00-01:00" {outside}')]


def test_integers_already_bounded_by_the_dataset_are_left_as_they_are():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 100},
                                               "m": {"type": "integer", "minimum": 0}}}
    bounded = store_bounded(schema, nested_json=False)["properties"]
    assert bounded["n"] == schema["properties"]["n"]
    assert bounded["m"]["allOf"] == [{"minimum": -(2**63), "maximum": 2**63 - 1}]


def test_draft4_exclusive_bounds_keep_their_meaning():
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
              "properties": {"n": {"type": "integer", "maximum": 10, "exclusiveMaximum": True}}}
    dataset = parse_dataset({"id": "d", "schema": schema}, Limits())
    assert [i for i, _, _ in invalid_paths(dataset, [{"n": 9}, {"n": 10}, {"n": BIG}])] == [1, 2]


def test_items_holding_nul_are_invalid_wherever_it_is():
    dataset = parse_dataset({"id": "d", "schema": SCHEMA}, Limits())
    message = "contains the NUL character (\\u0000), which the stores cannot keep"
    items = [{"n": 1, "id": "a\x00b"}, {"n": 2}, {"n": 3, "extra": {"k\x00": [1]}},
             {"n": 4, "list": ["ok", "\x00"]}, {"n": "x", "id": "\x00"}]
    assert invalid_paths(dataset, items) == [
        (0, "$.id", message), (2, "$.extra", message), (3, "$.list[1]", message),
        (4, "$.n", "\"x\" is not of type \"integer\""),  # the schema's error comes first
    ]
    # the text backslash-u0000 (an escaped backslash) is no NUL
    text = [{"n": 1, "id": "a\\u0000"}]
    body = orjson.dumps(text)
    assert b"\\u0000" in body and validate(dataset, text, cap=5, body=body).invalid == 0


def test_nul_is_found_however_deep_it_is():
    """orjson reads JSON nested up to 1024 levels: the search for NUL recursed once per level
    and raised RecursionError from about 1000 (a worker stopped at such a record, and its
    replacement, every time). It keeps a stack of its own."""
    deep = orjson.loads(b'{"a": ' + b"[" * 1020 + b'{"k\\u0000": 1}' + b"]" * 1020 + b"}")
    assert nul_path(deep) == "$.a" + "[0]" * 1020
    assert nul_path(orjson.loads(b"[" * 1024 + b"]" * 1024)) is None
    # the first in document order, an object with a NUL key at the object's path
    assert nul_path({"a": "x", "b": {"c": ["ok", "\x00"], "d\x00": 1}}) == "$.b.c[1]"
    assert nul_path({"a": {"k\x00": "\x00"}, "b": "\x00"}) == "$.a"


DRAFT4 = "http://json-schema.org/draft-04/schema#"
DRAFT2020 = "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("schema, good, bad", [
    # keywords of the dataset's draft: read as draft-07 by the array check, they were ignored
    # (2020-12) or stopped the dataset from loading (draft-04's boolean exclusiveMaximum)
    ({"$schema": DRAFT2020, "type": "object", "properties": {"a": {}, "n": {}},
      "dependentRequired": {"a": ["n"]}}, {"a": 1, "n": 1}, {"a": 1}),
    ({"$schema": DRAFT4, "type": "object",
      "properties": {"n": {"type": "integer", "maximum": 10, "exclusiveMaximum": True}}},
     {"n": 9}, {"n": 10}),
    # "#" is the item, and its definitions stay reachable, with or without an $id of its own
    ({"type": "object", "properties": {"n": {"type": "integer"},
                                       "kids": {"type": "array", "items": {"$ref": "#"}}}},
     {"kids": [{"n": 1}]}, {"kids": [{"n": "x"}]}),
    ({"$id": "https://example.com/s.json", "type": "object", "definitions": {"p": {
        "type": "integer"}}, "properties": {"n": {"$ref": "#/definitions/p"}}}, {"n": 1},
     {"n": "x"}),
])
def test_the_whole_array_check_reads_the_schema_as_the_item_check(schema, good, bad):
    dataset = parse_dataset({"id": "d", "schema": schema}, Limits())
    assert dataset.validate_item.is_valid(good) and not dataset.validate_item.is_valid(bad)
    assert dataset.validate_array.is_valid([good, good])
    assert not dataset.validate_array.is_valid([good, bad])
    items = [good, bad]
    assert validate(dataset, items, cap=5, body=orjson.dumps(items)).invalid == 1


def _props(**props) -> dict:
    return {"type": "object", "properties": props}


@pytest.mark.parametrize("schema, extra, message", [
    (_props(**{"x" * 64: {}}), {}, "makes a column name longer than 63 bytes"),
    (_props(a={"type": "object", "properties": {"é" * 31: {}}}), {},  # 3 + 62 bytes
     "makes a column name longer than 63 bytes"),
    (_props(a__b={}, a={"type": "object", "properties": {"b": {}}}), {},
     "field 'a.b' makes the column 'a__b', which is already the column of field 'a__b'"),
    (_props(_offset={"type": "integer"}), {},
     "field '_offset' makes the column '_offset', which is already a metadata column"),
    (_props(_extra={}), {}, "which is already the column of unknown fields"),
    (_props(**{f"f{i}": {} for i in range(1589)}), {},  # + 11 metadata + _extra
     "the table would have 1601 columns (with the metadata columns); the stores keep at "
     "most 1600"),
])
def test_schemas_whose_table_cannot_be_created_are_refused_at_load(schema, extra, message):
    """Found by the gateway and `sluice check` alike, not by a worker failing to create the
    table after the events were acknowledged."""
    with pytest.raises(DatasetError, match=re.escape(message)):
        parse_dataset({"id": "d", "schema": schema, **extra}, Limits())


def test_names_that_collide_only_in_a_mode_are_refused_only_in_it():
    nested = _props(a__b={}, a={"type": "object", "properties": {"b": {}}})
    assert parse_dataset({"id": "d", "schema": nested, "nested": "json"}, Limits())
    assert parse_dataset({"id": "d", "schema": _props(_extra={}), "unknown_fields": "drop"},
                         Limits())
    wide = _props(**{f"f{i}": {} for i in range(1589)})
    assert parse_dataset({"id": "d", "schema": wide, "unknown_fields": "drop"}, Limits())


@pytest.mark.parametrize("field", ["item_key", "event_id"])
def test_an_identifying_field_must_not_be_null_even_where_the_schema_allows_it(field):
    schema = _props(k={"type": ["string", "null"]}, note={"type": ["string", "null"]})
    dataset = parse_dataset({"id": "d", "schema": schema, field: "k"}, Limits())
    assert invalid_paths(dataset, [{"k": "a", "note": None}, {"k": None}, {"note": "x"}]) == [
        (1, "$.k", "must not be null: it identifies the item"),
        (2, "$", '"k" is a required property')]


@pytest.mark.parametrize("prop, nullable", [
    ({}, True), ({"type": "null"}, True), ({"type": ["string", "null"]}, True),
    ({"enum": ["a", None]}, True), ({"type": "string"}, False), ({"enum": ["a", "b"]}, False),
    ({"type": ["string", "integer"]}, False),
])
def test_which_properties_allow_null(prop, nullable):
    assert accepts_null(prop) is nullable


def test_a_key_pasted_into_a_definition_file_is_not_quoted(tmp_path):
    """PyYAML's message quotes the lines around the error, and a key id's message quotes
    the id: neither carries a key's secret into a log line or the CLI's output."""
    key = new_key("pos")
    secret = key.removeprefix("sk_pos_")
    sales = {"id": "sales", "schema": {"type": "object"}}
    (tmp_path / "sales.yaml").write_text(yaml.safe_dump(sales)
                                         + f"ingest_keys: [{{id: pos, sha256: {key}]\n")
    with pytest.raises(CatalogueError, match=r"sales\.yaml: .* at line \d+, column \d+") as bad:
        load_catalogue(tmp_path, Limits())
    assert secret not in str(bad.value)
    (tmp_path / "sales.yaml").write_text(yaml.safe_dump(
        {**sales, "ingest_keys": [{"id": key, "sha256": hash_key(key)}]}))
    with pytest.raises(CatalogueError, match=r"key id 'sk_pos_\.\.\.' must match") as bad:
        load_catalogue(tmp_path, Limits())
    assert secret not in str(bad.value)
