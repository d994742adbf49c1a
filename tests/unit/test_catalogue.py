"""Dataset definitions and the catalogue: checks, compiled validators, keys."""

from pathlib import Path

import pytest

from schemas.catalogue import CatalogueError, load_catalogue
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
    verdict = validate(dataset, [{"n": 1}, {"n": 1, "id": "a"}], cap=10)
    assert verdict.invalid == 1
    assert verdict.errors[0].index == 0


@pytest.mark.parametrize("raw, field", [
    ({"id": "Bad", "schema": SCHEMA}, "id"),
    ({"id": "d", "schema": {"type": "array"}}, "schema"),
    ({"id": "d", "schema": SCHEMA, "item_key": "missing"}, "item_key"),
    ({"id": "d", "schema": SCHEMA, "max_request_bytes": 0}, "max_request_bytes"),
    ({"id": "d", "schema": SCHEMA, "rate_limit": {"requests_per_second": -1}}, "rate_limit"),
    ({"id": "d", "schema": SCHEMA, "ingest_keys": [{"id": "k", "sha256": "abc"}]}, "sha256"),
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
    verdict = validate(dataset, items, cap=3)
    assert verdict.invalid == 10
    assert len(verdict.errors) == 3
    assert verdict.errors[0].path == "$.n"
    assert verdict.valid == [{"n": 1}]
