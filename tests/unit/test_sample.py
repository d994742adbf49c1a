"""The sample generator: whatever it produces validates against the schema it came from."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.dataset import compile_schema
from schemas.sample import SampleError, sample_item, sample_request

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "array", "items": {"type": "integer"}, "minItems": 3}}}}},
    {"type": "object", "properties": {"kind": {"enum": ["x", "y"]}, "v": {"const": 7}}},
    {"type": "object", "required": ["a"], "properties": {"a": True, "b": False}},
    {"type": "object", "properties": {f: {"type": "string", "format": f} for f in
                                      ("date-time", "date", "email", "uri", "uuid", "ipv4")}},
    {"type": "object", "properties": {
        "n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "i": {"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 7},
        "m": {"type": "integer", "multipleOf": 5, "exclusiveMinimum": 100}}},
    {"type": "object", "properties": {
        "cur": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "inv": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "short": {"type": "string", "minLength": 12, "maxLength": 12}}},
    {"type": "object", "allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]},
                                 {"properties": {"b": {"type": "boolean"}}}]},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
                                      "y": {"oneOf": [{"type": "string", "maxLength": 3}]}}},
    {"type": "object", "properties": {"node": {"$ref": "#/$defs/node"}},
     "$defs": {"node": {"type": "object", "properties": {
         "name": {"type": "string"}, "child": {"$ref": "#/$defs/node"}}, "required": ["name"]}}},
    {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True,
                                               "minItems": 3, "items": {"type": "string"}}}},
    {"type": "object", "properties": {"n": {"type": ["null", "number"]}}},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_sample_validates(schema):
    compile_schema(schema).validate(sample_item(schema))  # the gateway's own validator


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_datasets_have_valid_samples(path):
    definition = yaml.safe_load(path.read_text())
    request = sample_request(definition["id"], definition["schema"],
                             definition.get("item_key"), "/x")
    compile_schema(definition["schema"]).validate(request["body"][0])
    assert request["headers"]["Content-Type"] == "application/json"


def test_unsatisfiable_pattern():
    with pytest.raises(SampleError):
        sample_item({"type": "string", "pattern": "^(?=a)b$"})
    with pytest.raises(SampleError, match="'b' is required but its schema is false"):
        sample_item({"type": "object", "required": ["b"], "properties": {"b": False}})


def _leaf():
    numbers = st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(
        lambda t: {"minimum": t[0], "maximum": t[0] + t[1]})
    lengths = st.tuples(st.integers(0, 20), st.integers(0, 20)).map(
        lambda t: {"minLength": t[0], "maxLength": t[0] + t[1]})
    return st.one_of(
        numbers.map(lambda b: {"type": "integer", **b}),
        numbers.map(lambda b: {"type": "number", **b}),
        lengths.map(lambda b: {"type": "string", **b}),
        st.just({"type": "boolean"}),
        st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4).map(
            lambda e: {"enum": e}),
    )


def _object(children):
    return st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), children,
                           max_size=5).flatmap(lambda props: st.builds(
                               lambda req: {"type": "object", "properties": props,
                                            "required": req},
                               st.lists(st.sampled_from(sorted(props)) if props else st.nothing(),
                                        unique=True)))


schemas = st.recursive(_leaf(), lambda children: st.one_of(
    _object(children),
    st.builds(lambda items, n: {"type": "array", "items": items, "minItems": n},
              children, st.integers(0, 3)),
), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_object(schemas))
def test_generated_items_always_validate(schema):
    compile_schema(schema).validate(sample_item(schema))  # the gateway's own validator
