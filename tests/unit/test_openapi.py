"""docs/openapi.yaml: a well-formed OpenAPI 3.1 document, with exactly the routes the gateway
registers, every error code, and schemas that the bodies the code builds satisfy."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway import chunks
from gateway.accounting import RequestOutcome, _log_fields
from gateway.app import create_app
from gateway.budget import BodyBudget
from gateway.config import Settings
from gateway.errors import ERROR_CODES, ApiError
from gateway.ingest import Ingestor, IngestRequest
from gateway.payload import JSON, check_declared_length, gunzip, parse_items
from gateway.routes import datasets
from gateway.routes.stats import _entry, _stats
from gateway.sessions import CLOSED, PENDING, Session, parse_create
from schemas import outcomes as o
from schemas import windows as w
from schemas.catalogue import Principal, load_catalogue
from schemas.dataset import Limits, parse_dataset
from schemas.sample import sample_request
from schemas.validation import validate

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PROBLEM_JSON = "application/problem+json"
SETTINGS = Settings.from_env({})
SALES = parse_dataset({
    "id": "sales", "item_key": "region",
    "rate_limit": {"requests_per_second": 10, "burst": 20},
    "schema": {"type": "object", "properties": {"region": {"type": "string"},
                                                "revenue": {"type": "number"},
                                                "note": {"type": ["string", "null"]}},
               "required": ["region", "revenue"]},
}, Limits())
PRINCIPAL = Principal("pos", frozenset({"sales"}))


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only references inside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(doc, node["$ref"])
    return node


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def validator(doc: dict[str, Any], schema: dict[str, Any]):
    """A JSON Schema 2020-12 validator of ``schema`` (OpenAPI 3.1 schemas are JSON Schema
    2020-12), its references resolved in the document."""
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def assert_valid(doc: dict[str, Any], pointer: str, body: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in validator(doc, {"$ref": pointer}).iter_errors(body)]
    assert not errors, f"{pointer}: {errors}\n{body}"


def problem_schema(doc: dict[str, Any], status: int) -> str:
    """The pointer to the schema of the shared problem answer for ``status``."""
    for name, response in doc["components"]["responses"].items():
        narrowed = response["content"][PROBLEM_JSON]["schema"]["allOf"][1]["properties"]
        if narrowed["status"]["const"] == status:
            return f"#/components/responses/{name}/content/application~1problem+json/schema"
    raise AssertionError(f"no problem answer for {status}")


# -- the document ----------------------------------------------------------------------------


def test_the_document_is_openapi_3_1_and_every_reference_resolves(spec):
    assert isinstance(spec["openapi"], str) and re.fullmatch(r"3\.1\.\d+", spec["openapi"])
    assert isinstance(spec["info"]["title"], str) and isinstance(spec["info"]["version"], str)
    for ref in references(spec):
        resolve(spec, ref)


def test_operations_are_well_formed(spec):
    schemes = set(spec["components"]["securitySchemes"])
    tags = {tag["name"] for tag in spec["tags"]}
    ids = [op["operationId"] for _, _, op in operations(spec)]
    assert len(ids) == len(set(ids))
    for requirement in spec["security"]:
        assert set(requirement) <= schemes
    for method, path, op in operations(spec):
        where = f"{method.upper()} {path}"
        assert path.startswith("/") and set(op["tags"]) <= tags, where
        for requirement in op.get("security", []):
            assert set(requirement) <= schemes, where
        params = [deref(spec, p) for p in op.get("parameters", [])]
        declared = {p["name"] for p in params if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), where
        assert all(p["required"] is True for p in params if p["in"] == "path"), where
        assert op["responses"], where
        for status, response in op["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d", status), (where, status)
            answer = deref(spec, response)
            assert answer["description"], (where, status)
            # Every answer carries X-Request-ID (the edge middleware sets it).
            assert "X-Request-ID" in answer.get("headers", {}), (where, status)
            if int(status) >= 400 and (method, path, status) != ("get", "/readyz", "503"):
                schema = answer["content"][PROBLEM_JSON]["schema"]
                assert {"$ref": "#/components/schemas/Problem"} in schema["allOf"], where


def test_every_schema_is_valid_json_schema_2020_12(spec):
    jsonschema = pytest.importorskip("jsonschema")
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_examples_match_their_schemas(spec):
    found = 0
    for method, path, op in operations(spec):
        media = [*op.get("requestBody", {}).get("content", {}).items(),
                 *((m, c) for r in op["responses"].values()
                   for m, c in deref(spec, r).get("content", {}).items())]
        for _, content in media:
            for name, example in content.get("examples", {}).items():
                errors = [e.message for e in
                          validator(spec, content["schema"]).iter_errors(example["value"])]
                assert not errors, (method, path, name, errors)
                found += 1
    assert found


# -- agreement with the code -----------------------------------------------------------------


def test_the_paths_are_exactly_the_routes_the_gateway_registers(spec, tmp_path):
    (tmp_path / "sales.yaml").write_text(yaml.safe_dump({"id": "sales",
                                                         "schema": {"type": "object"}}))
    # create_app loads the catalogue and adds routes; Redis and Kafka wait for start-up.
    app = create_app(Settings.from_env({"SLUICE_CATALOGUE_DIR": str(tmp_path)}))
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()}
    # aiohttp adds HEAD beside every GET
    registered -= {("HEAD", path) for method, path in set(registered) if method == "GET"}
    documented = {(method.upper(), path) for method, path, _ in operations(spec)}
    assert documented == registered


def test_the_code_enum_is_exactly_the_error_codes(spec):
    problem = spec["components"]["schemas"]["Problem"]
    enum = deref(spec, problem["properties"]["code"])["enum"]
    assert len(enum) == len(set(enum))
    assert set(enum) == {cls.code for cls in ERROR_CODES}


def test_each_status_answer_names_the_codes_of_that_status(spec):
    by_status: dict[int, set[str]] = {}
    for response in spec["components"]["responses"].values():
        schema = response["content"][PROBLEM_JSON]["schema"]["allOf"][1]["properties"]
        by_status[schema["status"]["const"]] = set(schema["code"]["enum"])
    assert by_status == {status: {c.code for c in ERROR_CODES if c.status == status}
                         for status in {c.status for c in ERROR_CODES}}


def _raised(call, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value


async def test_problems_as_the_code_renders_them_match(spec):
    with pytest.raises(ApiError) as inflated:
        await gunzip(gzip.compress(b"x" * 100), 10, BodyBudget(1 << 30).hold("sales"))
    rendered = [cls() for cls in ERROR_CODES] + [
        _raised(parse_items, b'{"a": ', JSON),
        _raised(parse_items, b'{"a": 1}\n{"a"\n', "application/x-ndjson"),
        _raised(check_declared_length, 10, 5),
        inflated.value,
        _raised(parse_create, b'{"dataset": "sales", "timeout_s": 0}', SETTINGS),
    ]
    for error in rendered:
        for instance in ("/v1/datasets/sales/events", None):
            body = orjson.loads(orjson.dumps(error.body("req_0123456789abcdef01234567",
                                                        instance)))
            assert_valid(spec, problem_schema(spec, error.status), body)


class _Publisher:
    async def publish(self, topic, items, meta, raw=None) -> int:
        return 1


async def _push(body: bytes, partial: bool) -> Any:
    request = IngestRequest(SALES, PRINCIPAL, body, False, JSON, partial, None,
                            "req_0123456789abcdef01234567", 1_700_000_000_000)
    try:
        ingestor = Ingestor(None, _Publisher(), 1, BodyBudget(1 << 30))
        answer = await ingestor._process(request, body, {})
    except ApiError as exc:
        return exc.body(request.request_id, "/v1/datasets/sales/events")
    return orjson.loads(answer.body)


async def test_push_answers_match(spec):
    good, bad = b'{"region": "N", "revenue": 1}', b'{"region": "S", "revenue": "x"}'
    accepted = "#/components/schemas/PushAccepted"
    assert_valid(spec, accepted, await _push(b"[" + good + b"]", False))
    assert_valid(spec, accepted, await _push(b"[" + good + b"," + bad + b"," + bad + b"]", True))
    refused = await _push(b"[" + good + b"," + bad + b"]", False)
    assert refused["code"] == "VALIDATION_FAILED"
    assert_valid(spec, problem_schema(spec, 400), refused)


def test_dataset_answers_match(spec):
    plain = parse_dataset({"id": "other", "schema": {"type": "object"}}, Limits())
    catalogue = list(load_catalogue(ROOT / "schemas" / "examples", Limits()))
    for dataset in [SALES, plain, *catalogue]:
        assert_valid(spec, "#/components/schemas/DatasetDetail", datasets.detail(dataset))
        path = f"/v1/datasets/{dataset.id}/events"
        assert_valid(spec, "#/components/schemas/SampleRequest",
                     sample_request(dataset.id, dataset.schema, dataset.item_key, path))
    assert_valid(spec, "#/components/schemas/DatasetList",
                 {"datasets": [datasets.summary(d) for d in [SALES, plain, *catalogue]]})


def test_session_answers_match(spec):
    pending = Session("ing_0123456789abcdef01234567", "sales", None, "pos", PENDING, 1000,
                      2000, None, 60_000, 1, 1, 0, 3, 2, 1, 1, 0, 0)
    closed = Session("ing_0123456789abcdef01234567", "sales", "retail", "pos", CLOSED, 1000,
                     2000, 3000, 60_000, 1, 0, 1, 3, 2, 1, 2, 0, 0)
    for session in (pending, closed):
        assert_valid(spec, "#/components/schemas/Ingestion", session.document())
    request = IngestRequest(SALES, PRINCIPAL, b"", False, JSON, True, None,
                            "req_0123456789abcdef01234567", 0)
    items = [{"region": "N", "revenue": 1}, {"region": "S"}, 7]
    verdict = validate(SALES, items, 1, b"")
    body = orjson.loads(orjson.dumps(chunks.answer(pending.id, request, items, verdict)))
    assert body["failed_truncated"] is True
    assert_valid(spec, "#/components/schemas/ChunkAccepted", body)


def test_statistics_and_log_answers_match(spec):
    def hashed(fields: dict[str, Any]) -> dict[bytes, bytes]:
        return {k.encode(): str(v).encode() for k, v in fields.items()}

    assert_valid(spec, "#/components/schemas/Totals", _stats({}))
    assert_valid(spec, "#/components/schemas/Totals",
                 _stats(hashed({o.ACCEPTED: 3, o.FIRST_EVENT_AT: 1, o.LAST_EVENT_AT: 2})))
    windows = w.summed([hashed({o.ACCEPTED: 1})] * len(w.read_keys("d:sales", 0)), o.COUNTERS)
    assert_valid(spec, "#/components/schemas/Windows", windows)

    refused = RequestOutcome("sales", "pos", "req_1", 1_700_000_000_000, 202)
    refused.refused(_raised(parse_items, b"[]", JSON))
    answered = RequestOutcome("sales", "pos", "req_2", 1_700_000_000_000, 202, received=2,
                              accepted=1, rejected=1,
                              errors=[{"index": 1, "path": "$.a", "message": "m"}])
    worker_error = orjson.dumps({"index": 0, "code": "SHAPE_FAILED", "message": "m"})
    for fields, errors in [
        (_log_fields(refused), []),
        (_log_fields(answered), [worker_error]),
        ([o.WRITTEN, "1"], []),  # counted by a worker after the log's record expired
    ]:
        raw = {k.encode(): v.encode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
        assert_valid(spec, "#/components/schemas/LogEntry", _entry(raw, errors))
