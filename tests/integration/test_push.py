"""The push route end to end: every answer checked against what reached the entry topic."""

from __future__ import annotations

import asyncio
import gzip

import orjson
import pytest

from gateway.state import STATE
from schemas import jsontext
from schemas.records import decode_value

pytestmark = pytest.mark.integration

ITEMS = [{"region": "North", "revenue": 142000, "target": 130000},
         {"region": "South", "revenue": 98000}]


def problem(response_body: bytes) -> dict:
    return orjson.loads(response_body)


async def assert_problem(resp, status: int, code: str) -> dict:
    body = await resp.read()
    assert resp.status == status, body
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    doc = problem(body)
    assert doc["code"] == code
    assert doc["status"] == status
    assert doc["request_id"] == resp.headers["X-Request-ID"]
    return doc


def events(records) -> list:
    """Events of the records in publish order (records of a test may sit on any partition)."""
    ordered = sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset))
    return [e for r in ordered for e in decode_value(r.value)]  # an array or one event


async def test_202_publishes_one_record_with_headers(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS), **{"X-Request-ID": "client-req-1"})
    assert resp.status == 202
    body = await resp.json()
    assert body == {"request_id": "client-req-1", "dataset": "sales", "items_received": 2,
                    "items_accepted": 2}
    assert resp.headers["X-Request-ID"] == "client-req-1"
    records = await gateway.published()
    assert len(records) == 1
    assert orjson.loads(records[0].value) == ITEMS
    headers = dict(records[0].headers)
    assert headers["sluice-request-id"] == b"client-req-1"
    assert headers["sluice-connector"] == b"pos"
    assert int(headers["sluice-received-at"]) > 1_700_000_000_000
    assert headers["content-type"] == b"application/json"
    assert "sluice-idempotency-key" not in headers


async def test_a_request_over_the_record_limit_is_split_into_parts(make_gateway):
    gateway = await make_gateway(KAFKA_MAX_RECORD_BYTES="2048")
    items = [{"region": f"r{i:03d}", "revenue": i, "note": "x" * 40} for i in range(150)]
    body = orjson.dumps(items, option=orjson.OPT_INDENT_2)  # 13 KB; 9 KB without the spaces
    resp = await gateway.post(body, **{"Idempotency-Key": "split-1"})
    assert resp.status == 202 and (await resp.json())["items_accepted"] == 150
    records = await gateway.published()
    # one partition, in order: offsets order the parts for the workers' last-writer-wins
    assert len({r.partition for r in records}) == 1
    records.sort(key=lambda r: r.offset)
    assert [dict(r.headers)["sluice-part"] for r in records] == [
        f"{i}/{len(records)}".encode() for i in range(len(records))]
    assert all(len(r.value) <= 2048 for r in records)
    assert len(records) <= 2 * -(-len(orjson.dumps(items)) // 2048)  # few, not one per item
    assert [i for r in records for i in orjson.loads(r.value)] == items
    again = await gateway.post(body, **{"Idempotency-Key": "split-1"})
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert len(await gateway.published()) == len(records)  # the replay published nothing


async def test_single_object_ndjson_and_gzip_bodies(gateway):
    one = await gateway.post(orjson.dumps(ITEMS[0]))
    assert one.status == 202 and (await one.json())["items_received"] == 1
    ndjson = b"\n".join(orjson.dumps(i) for i in ITEMS) + b"\n"
    nd = await gateway.post(ndjson, content_type="application/x-ndjson")
    assert nd.status == 202 and (await nd.json())["items_received"] == 2
    gz = await gateway.post(gzip.compress(orjson.dumps(ITEMS)), **{"Content-Encoding": "gzip"})
    assert gz.status == 202 and (await gz.json())["items_received"] == 2
    assert events(await gateway.published()) == [ITEMS[0], *ITEMS, *ITEMS]


async def test_generated_request_id_is_returned(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS))
    rid = (await resp.json())["request_id"]
    assert rid.startswith("req_") and resp.headers["X-Request-ID"] == rid
    records = await gateway.published()
    assert dict(records[0].headers)["sluice-request-id"] == rid.encode()


async def test_400_strict_lists_every_invalid_item_and_publishes_nothing(gateway):
    items = [ITEMS[0], {"region": "East", "revenue": "lots"}, {"revenue": 5}, ITEMS[1]]
    resp = await gateway.post(orjson.dumps(items))
    doc = await assert_problem(resp, 400, "VALIDATION_FAILED")
    assert doc["invalid_items"] == 2
    assert [(e["index"], e["path"]) for e in doc["errors"]] == [(1, "$.revenue"), (2, "$")]
    assert all(e["message"] for e in doc["errors"])
    assert await gateway.published() == []


async def test_errors_listed_are_capped(make_gateway):
    gw = await make_gateway(SLUICE_MAX_REPORTED_ERRORS="3")
    doc = await assert_problem(await gw.post(orjson.dumps([{"x": 1}] * 10)), 400,
                               "VALIDATION_FAILED")
    assert len(doc["errors"]) == 3 and doc["invalid_items"] == 10 and doc["errors_truncated"]


async def test_partial_accepts_valid_items_and_returns_the_rejected(gateway):
    items = [ITEMS[0], {"region": "East", "revenue": -1}, ITEMS[1]]
    resp = await gateway.post(orjson.dumps(items), query="?partial=true")
    assert resp.status == 202
    body = await resp.json()
    assert body["items_received"] == 3 and body["items_accepted"] == 2
    assert body["items_rejected"] == 1
    assert body["rejected"][0]["index"] == 1 and body["rejected"][0]["path"] == "$.revenue"
    assert events(await gateway.published()) == ITEMS


async def test_partial_with_nothing_valid_is_400(gateway):
    resp = await gateway.post(orjson.dumps([{"revenue": 1}]), query="?partial=true")
    await assert_problem(resp, 400, "VALIDATION_FAILED")
    assert await gateway.published() == []


# What the stores cannot keep: an integer column beyond 64 bits, the NUL character anywhere
# (PostgreSQL keeps none). Refused here, so the producer hears it at once, instead of a 202
# and a dead letter.
UNSTORABLE = (b'[{"region": "ok", "revenue": 1, "units": 9223372036854775807},'
              b' {"region": "big", "revenue": 1, "units": 9223372036854775808},'
              b' {"region": "a\\u0000b", "revenue": 2},'
              b' {"region": "key", "revenue": 3, "tags": {"k\\u0000": 1}},'
              b' {"region": "text\\\\u0000", "revenue": 4}]')  # a backslash, then u0000
NUL = "contains the NUL character (\\u0000), which the stores cannot keep"


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_400_what_the_stores_cannot_keep_is_refused_at_the_edge(gateway, encoding):
    body = UNSTORABLE if encoding == "identity" else gzip.compress(UNSTORABLE)
    doc = await assert_problem(await gateway.post(body, **{"Content-Encoding": encoding}), 400,
                               "VALIDATION_FAILED")
    assert doc["invalid_items"] == 3
    assert [(e["index"], e["path"], e["message"]) for e in doc["errors"]] == [
        (1, "$.units", "9223372036854775808 is greater than the maximum of 9223372036854775807"),
        (2, "$.region", NUL), (3, "$.tags", NUL)]
    assert await gateway.published() == []


async def test_partial_publishes_only_what_the_stores_can_keep(gateway):
    lines = b"\n".join(orjson.dumps(i) for i in orjson.loads(UNSTORABLE))
    resp = await gateway.post(lines, query="?partial=true", content_type="application/x-ndjson")
    assert resp.status == 202
    body = await resp.json()
    assert (body["items_accepted"], body["items_rejected"]) == (2, 3)
    assert [(e["index"], e["path"]) for e in body["rejected"]] == [
        (1, "$.units"), (2, "$.region"), (3, "$.tags")]
    assert [e["region"] for e in events(await gateway.published())] == ["ok", "text\\u0000"]


def nested(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = {"n": [leaf]}
    return leaf


async def test_items_nested_deeper_than_orjson_encodes_are_carried_not_500(gateway):
    """orjson parses 1,024 levels but encodes 254: an item in between must still be published
    where the gateway encodes it again (NDJSON, partial), and an invalid one refused with its
    error, not answered 500."""
    deep = {"region": "Deep", "revenue": 1, "extra": nested(300, 1)}
    ndjson = orjson.dumps(ITEMS[0]) + b"\n" + jsontext.dumps(deep) + b"\n"
    resp = await gateway.post(ndjson, content_type="application/x-ndjson")
    assert resp.status == 202, await resp.text()
    bad = {"region": "Deep", "revenue": nested(300, 1)}  # revenue must be a number
    partial = await gateway.post(jsontext.dumps([ITEMS[1], bad]), query="?partial=true")
    assert partial.status == 202, await partial.text()
    assert (await partial.json())["rejected"][0]["index"] == 1
    strict = await gateway.post(jsontext.dumps([bad]))
    doc = await assert_problem(strict, 400, "VALIDATION_FAILED")
    assert doc["errors"][0]["index"] == 0 and doc["errors"][0]["message"]
    too_deep = await gateway.post(b"[" * 1025 + b"]" * 1025)  # past what orjson parses
    await assert_problem(too_deep, 400, "MALFORMED_JSON")
    published = events(await gateway.published())
    assert [e["region"] for e in published] == [ITEMS[0]["region"], "Deep", ITEMS[1]["region"]]
    assert published[1] == deep


async def test_400_malformed_json_gives_the_position(gateway):
    resp = await gateway.post(b'[{"region": "North",\n  "revenue": }]')
    doc = await assert_problem(resp, 400, "MALFORMED_JSON")
    assert doc["line"] == 2 and doc["column"] > 1
    assert await gateway.published() == []


async def test_400_empty_array(gateway):
    await assert_problem(await gateway.post(b"[]"), 400, "EMPTY_PAYLOAD")
    assert await gateway.published() == []


@pytest.mark.parametrize("auth", [None, "Basic abc", "Bearer sk_pos_wrongsecret", "Bearer junk"])
async def test_401_missing_or_unknown_key(gateway, auth):
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    resp = await gateway.client.post("/v1/datasets/sales/events", data=orjson.dumps(ITEMS),
                                     headers=headers)
    await assert_problem(resp, 401, "UNAUTHORIZED")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await gateway.published() == []


async def test_403_key_of_another_dataset(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS), key=gateway.other_key)
    await assert_problem(resp, 403, "FORBIDDEN")
    assert await gateway.published() == []
    assert await gateway.published(gateway.other_topic) == []


async def test_404_unknown_dataset(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS), dataset="nope")
    await assert_problem(resp, 404, "DATASET_NOT_FOUND")
    assert await gateway.published() == []


async def test_413_declared_length_over_the_limit(gateway):
    big = orjson.dumps([{"region": "x" * 1000, "revenue": 1}] * 100)  # ~100 KB > 64 KiB
    await assert_problem(await gateway.post(big), 413, "PAYLOAD_TOO_LARGE")
    assert await gateway.published() == []


async def test_413_while_streaming_without_a_length(gateway):
    async def chunks():
        yield b"["
        for _ in range(200):
            yield orjson.dumps({"region": "x" * 500, "revenue": 1}) + b","
        yield b'{"region": "end", "revenue": 1}]'

    resp = await gateway.client.post(
        "/v1/datasets/sales/events", data=chunks(),
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"})
    await assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
    assert await gateway.published() == []


async def test_413_refused_before_the_body_is_sent(gateway):
    """A client announcing 10 MB gets its 413 without sending a byte of the body."""
    host, port = gateway.client.host, gateway.client.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"POST /v1/datasets/sales/events HTTP/1.1\r\nHost: {host}\r\n"
                  f"Authorization: Bearer {gateway.key}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 10000000\r\n\r\n").encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert b" 413 " in status_line
    writer.close()
    assert await gateway.published() == []


async def test_413_gzip_bomb(gateway):
    bomb = gzip.compress(b"[" + b" " * 2_000_000 + b"]")  # ~2 KB compressed, 2 MB inflated
    resp = await gateway.post(bomb, **{"Content-Encoding": "gzip"})
    await assert_problem(resp, 413, "DECOMPRESSED_TOO_LARGE")
    assert await gateway.published() == []


async def test_415_content_type_and_encoding(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS), content_type="text/plain")
    await assert_problem(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
    resp = await gateway.post(orjson.dumps(ITEMS), **{"Content-Encoding": "br"})
    await assert_problem(resp, 415, "UNSUPPORTED_CONTENT_ENCODING")
    assert await gateway.published() == []


async def test_x_item_key_must_match_the_dataset(gateway):
    ok = await gateway.post(orjson.dumps(ITEMS), **{"X-Item-Key": "region"})
    assert ok.status == 202
    resp = await gateway.post(orjson.dumps(ITEMS), **{"X-Item-Key": "revenue"})
    await assert_problem(resp, 400, "INVALID_HEADER")
    resp = await gateway.post(b'[{"id": 1}]', key=gateway.other_key, dataset="other",
                              **{"X-Item-Key": "id"})  # a dataset without an item key
    doc = await assert_problem(resp, 400, "INVALID_HEADER")
    assert "dataset 'other' has no item key" in doc["detail"]
    assert len(await gateway.published()) == 1
    assert await gateway.published(gateway.other_topic) == []


async def test_a_quoted_idempotency_key_is_the_bare_one_and_quotes_alone_are_keys(gateway):
    """The IETF draft sends the key as a structured-field string ("order-9"); any other
    printable text, quotes included, is a key as it is (the API fuzz test sent `"`)."""
    first = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": '"order-9"'})
    again = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "order-9"})
    assert first.status == again.status == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    for odd in ('"', '""', '"order-9'):
        assert (await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": odd})).status == 202
    assert len(await gateway.published()) == 4


async def test_idempotent_replay_publishes_nothing(gateway):
    first = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "order-1"})
    assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    again = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "order-1"})
    assert again.status == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    records = await gateway.published()
    assert len(records) == 1
    assert dict(records[0].headers)["sluice-idempotency-key"] == b"order-1"


async def test_same_key_same_content_gzip_or_not_is_a_replay(gateway):
    body = orjson.dumps(ITEMS)
    assert (await gateway.post(body, **{"Idempotency-Key": "k"})).status == 202
    again = await gateway.post(gzip.compress(body), **{"Content-Encoding": "gzip",
                                                      "Idempotency-Key": "k"})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(await gateway.published()) == 1


async def test_422_same_key_other_body(gateway):
    assert (await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "k2"})).status == 202
    resp = await gateway.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "k2"})
    await assert_problem(resp, 422, "IDEMPOTENCY_KEY_REUSED")
    assert events(await gateway.published()) == ITEMS


async def test_idempotency_keys_are_scoped_to_the_ingest_key(gateway, make_gateway):
    assert (await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "shared"})).status == 202
    resp = await gateway.post(b'{"a": 1}', key=gateway.other_key, dataset="other",
                              **{"Idempotency-Key": "shared"})
    assert resp.status == 202 and "Idempotent-Replayed" not in resp.headers
    assert len(await gateway.published(gateway.other_topic)) == 1


async def test_a_rejected_request_releases_its_idempotency_key(gateway):
    bad = await gateway.post(orjson.dumps([{"revenue": 1}]), **{"Idempotency-Key": "fixme"})
    await assert_problem(bad, 400, "VALIDATION_FAILED")
    good = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "fixme"})
    assert good.status == 202 and "Idempotent-Replayed" not in good.headers
    assert events(await gateway.published()) == ITEMS


async def test_invalid_idempotency_key_header(gateway):
    resp = await gateway.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "x" * 300})
    await assert_problem(resp, 400, "INVALID_HEADER")
    assert await gateway.published() == []


@pytest.mark.parametrize("request_id", [None, "client-op-7"])
async def test_concurrent_duplicates_publish_exactly_once(gateway, request_id):
    """Also when every attempt carries the client's same X-Request-ID, as a client retrying
    while its first attempt is in flight sends it: the claim belongs to the gateway's call,
    not to the request id (which the client chooses)."""
    body = orjson.dumps(ITEMS)
    headers = {"Idempotency-Key": "burst"} | ({"X-Request-ID": request_id} if request_id else {})
    responses = await asyncio.gather(*(gateway.post(body, **headers) for _ in range(20)))
    assert {r.status for r in responses} <= {202, 409}
    fresh = [r for r in responses if r.status == 202 and "Idempotent-Replayed" not in r.headers]
    assert len(fresh) == 1
    for r in responses:
        if r.status == 409:
            await assert_problem(r, 409, "IDEMPOTENCY_KEY_IN_USE")
    assert len(await gateway.published()) == 1


async def test_429_token_bucket_per_key(make_gateway):
    gw = await make_gateway(rate_limit={"requests_per_second": 0.5, "burst": 2})
    first = await gw.post(orjson.dumps(ITEMS))
    assert first.status == 202
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202
    limited = await gw.post(orjson.dumps(ITEMS))
    await assert_problem(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert len(await gw.published()) == 2
    # another key has its own bucket
    other = await gw.post(b'{"a": 1}', key=gw.other_key, dataset="other")
    assert other.status == 202


async def test_catalogue_reads(gateway):
    auth = {"Authorization": f"Bearer {gateway.key}"}
    listing = await (await gateway.client.get("/v1/datasets", headers=auth)).json()
    assert [d["id"] for d in listing["datasets"]] == ["sales"]
    assert {f["name"] for f in listing["datasets"][0]["fields"]} == {"region", "revenue", "target",
                                                                "units"}
    one = await gateway.client.get("/v1/datasets/sales", headers=auth)
    assert (await one.json())["schema"]["required"] == ["region", "revenue"]
    await assert_problem(await gateway.client.get("/v1/datasets/other", headers=auth), 403,
                         "FORBIDDEN")
    await assert_problem(await gateway.client.get("/v1/datasets"), 401, "UNAUTHORIZED")


async def test_a_schema_the_sample_generator_cannot_follow_gets_422(make_gateway):
    odd = {"id": "odd", "schema": {"type": "object", "required": ["code"], "properties": {
        "code": {"type": "string", "pattern": "^(?=a)b$"}}}}
    gateway = await make_gateway(datasets=(odd,))
    resp = await gateway.client.get("/v1/datasets/odd/sample",
                                    headers={"Authorization": f"Bearer {gateway.key}"})
    doc = await assert_problem(resp, 422, "SAMPLE_UNAVAILABLE")
    assert "pattern '^(?=a)b$'" in doc["detail"]


async def test_sample_request_is_accepted_as_is(gateway):
    auth = {"Authorization": f"Bearer {gateway.key}"}
    sample = await (await gateway.client.get("/v1/datasets/sales/sample", headers=auth)).json()
    assert sample["path"] == "/v1/datasets/sales/events"
    resp = await gateway.post(orjson.dumps(sample["body"]))
    assert resp.status == 202
    assert events(await gateway.published()) == sample["body"]


async def test_health_and_readiness(gateway):
    assert (await gateway.client.get("/healthz")).status == 200
    ready = await gateway.client.get("/readyz")
    assert ready.status == 200, await ready.text()


async def test_unknown_route_is_problem_json(gateway):
    await assert_problem(await gateway.client.get("/nope"), 404, "NOT_FOUND")
    wrong_method = await gateway.client.get("/v1/datasets/sales/events")
    await assert_problem(wrong_method, 405, "METHOD_NOT_ALLOWED")
    assert wrong_method.headers["Allow"] == "POST"  # RFC 9110 requires it on a 405


async def test_keys_never_appear_in_logs_or_answers(gateway, caplog):
    caplog.set_level("DEBUG")
    wrong = gateway.key[:-4] + "abcd"
    answers = []
    for key in (gateway.key, wrong):
        resp = await gateway.post(b'[{"region": 1}]', key=key)
        answers.append(await resp.text())
    assert (await gateway.post(orjson.dumps(ITEMS))).status == 202
    # the secret is what follows the key id (it may hold "_" itself: urlsafe base64)
    secret = gateway.key.removeprefix("sk_").partition("_")[2]
    assert len(secret) >= 32
    secrets = (gateway.key, wrong, secret, wrong.removeprefix("sk_").partition("_")[2])
    for text in (caplog.text, *answers):
        assert not [s for s in secrets if s in text]


# A gateway whose body budget is the sales dataset's largest body (256 KiB inflated), with
# the defaults the other dataset takes lowered to fit under it.
BUDGET = 256 * 1024
BUDGET_ENV = {"SLUICE_MAX_INFLIGHT_BODY_BYTES": str(BUDGET),
              "SLUICE_MAX_REQUEST_BYTES": str(64 * 1024),
              "SLUICE_MAX_DECOMPRESSED_BYTES": str(BUDGET)}


def sales_items(inflated_bytes: int, tag: str) -> list[dict]:
    """Valid sales items whose JSON array is just under ``inflated_bytes``."""
    one = len(orjson.dumps({"region": f"{tag}-000000", "revenue": 1})) + 1
    return [{"region": f"{tag}-{i:06d}", "revenue": 1}
            for i in range((inflated_bytes - 2) // one)]


def gzipped(items: list[dict]) -> dict:
    return {"body": gzip.compress(orjson.dumps(items)), "Content-Encoding": "gzip"}


def body_budget(gw):
    return gw.client.server.app[STATE].ingestor.budget


async def test_the_body_budget_comes_back_after_success_and_every_error(make_gateway):
    gw = await make_gateway(**BUDGET_ENV)
    budget = body_budget(gw)
    assert budget.capacity == BUDGET
    whole = sales_items(BUDGET, "whole")  # a body that needs all of the budget
    assert BUDGET - 64 < len(orjson.dumps(whole)) <= BUDGET

    def send(items=None, *, body=None, **headers):
        if items is not None:
            sent = gzipped(items)
            body, headers = sent.pop("body"), {**sent, **headers}
        return gw.post(body, **headers)

    invalid = [*whole[:-1], {"region": "", "revenue": -1}]
    await assert_problem(await send(invalid), 400, "VALIDATION_FAILED")
    assert budget.in_use == 0
    await assert_problem(await send(body=b'[{"region": "x", '), 400, "MALFORMED_JSON")
    assert budget.in_use == 0
    await assert_problem(await send(body=b"[" + b" " * 70_000 + b"]"), 413, "PAYLOAD_TOO_LARGE")
    assert budget.in_use == 0
    await assert_problem(await send(whole + whole[:10]), 413, "DECOMPRESSED_TOO_LARGE")
    assert budget.in_use == 0
    assert (await send(whole, **{"Idempotency-Key": "whole"})).status == 202
    assert budget.in_use == 0
    replay = await send(whole, **{"Idempotency-Key": "whole"})
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert budget.in_use == 0
    again = [*whole[:-1], {"region": "last", "revenue": 2}]
    assert (await send(again)).status == 202  # the whole budget is free again
    assert budget.in_use == 0
    assert events(await gw.published()) == whole + again
