"""Broker and Redis trouble: 503 with Retry-After, keys released, nothing half-acknowledged."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from schemas.redis_keys import idempotency_key
from tests.integration.test_body_budget import until
from tests.integration.test_push import (
    BUDGET,
    BUDGET_ENV,
    ITEMS,
    assert_problem,
    body_budget,
    events,
    gzipped,
    sales_items,
)
from tests.services import TansuBroker, create_topics, free_port

pytestmark = pytest.mark.integration


async def test_503_when_the_broker_is_down_releases_the_key(make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="2")
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # connected and warm
    broker.stop()
    resp = await gw.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "retry-me"})
    await assert_problem(resp, 503, "BROKER_UNAVAILABLE")
    assert int(resp.headers["Retry-After"]) >= 1
    redis = Redis.from_url(gw.redis_url)
    assert await redis.exists(idempotency_key("sales", "pos", "retry-me")) == 0
    await redis.aclose()
    assert (await gw.client.get("/readyz")).status == 503

    broker.start()  # an empty broker (memory storage) on the same port: the gateway recovers
    await create_topics(broker.bootstrap, [gw.topic], partitions=2)
    for _ in range(40):
        retry = await gw.post(orjson.dumps(ITEMS[1:]), **{"Idempotency-Key": "after"})
        if retry.status == 202:
            break
        await assert_problem(retry, 503, "BROKER_UNAVAILABLE")
        await asyncio.sleep(0.25)
    assert retry.status == 202


async def test_503_when_the_broker_does_not_answer_and_the_retry_goes_through(
        make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="1")
    assert (await gw.post(orjson.dumps(ITEMS[1:]))).status == 202  # connected and warm
    body = orjson.dumps(ITEMS[:1])
    broker.pause()
    try:
        for _ in range(2):  # the key is released each time: 503 again, never 409
            resp = await gw.post(body, **{"Idempotency-Key": "retry-me"})
            await assert_problem(resp, 503, "BROKER_UNAVAILABLE")
    finally:
        broker.resume()
    retry = await gw.post(body, **{"Idempotency-Key": "retry-me"})
    assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
    # A 503 means "not confirmed", not "not written": the broker may still append the refused
    # attempts once it answers again. Every copy carries the Idempotency-Key, which is what
    # lets workers store the request once; nothing else was published.
    values = [orjson.loads(r.value) for r in await gw.published()]
    assert values.count(ITEMS[1:]) == 1  # the warm-up request
    copies = [r for r in await gw.published() if orjson.loads(r.value) == ITEMS[:1]]
    assert 1 <= len(copies) <= 3 and len(copies) == len(values) - 1
    assert all(dict(r.headers)["sluice-idempotency-key"] == b"retry-me" for r in copies)


async def test_409_while_in_flight_then_exactly_one_publish(make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="8")
    assert (await gw.post(orjson.dumps(ITEMS[1:]))).status == 202  # connected and warm
    body = orjson.dumps(ITEMS[:1])
    broker.pause()  # the first request's publish now waits for an answer
    try:
        first = asyncio.create_task(gw.post(body, **{"Idempotency-Key": "slow"}))
        await asyncio.sleep(0.5)
        assert not first.done()
        duplicate = await gw.post(body, **{"Idempotency-Key": "slow"})
        await assert_problem(duplicate, 409, "IDEMPOTENCY_KEY_IN_USE")
        assert duplicate.headers["Retry-After"] == "1"
        changed = await gw.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "slow"})
        await assert_problem(changed, 422, "IDEMPOTENCY_KEY_REUSED")
    finally:
        broker.resume()
    resp = await first
    assert resp.status == 202
    replay = await gw.post(body, **{"Idempotency-Key": "slow"})
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert events(await gw.published()) == ITEMS[1:] + ITEMS[:1]


def _busy_refusals() -> float:
    return REGISTRY.get_sample_value("sluice_body_budget_waits_total",
                                     {"dataset": "sales", "outcome": "refused"}) or 0.0


async def test_503_server_busy_when_the_body_budget_is_full_then_the_retry_goes_through(
        make_gateway, own_broker):
    broker = own_broker()
    gw = await make_gateway(bootstrap=broker.bootstrap, KAFKA_PUBLISH_TIMEOUT_S="8",
                            **BUDGET_ENV)
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # connected and warm
    budget = body_budget(gw)
    first, second = sales_items(BUDGET * 2 // 3, "first"), sales_items(BUDGET // 2, "second")
    refused_before = _busy_refusals()
    broker.pause()  # the first request holds its body's bytes until Kafka answers
    try:
        sent = gzipped(first)
        held = len(sent["body"]) + len(orjson.dumps(first))  # compressed and inflated
        slow = asyncio.create_task(gw.post(sent.pop("body"), **sent, **{"Idempotency-Key": "a"}))
        await until(lambda: budget.in_use == held, "the first request holds its body")
        assert not slow.done()
        sent = gzipped(second)  # a few KiB compressed: its inflated bytes are what do not fit
        refused = asyncio.create_task(gw.post(sent.pop("body"), **sent,
                                              **{"Idempotency-Key": "b"}))
        await until(lambda: budget.waiting == 1, "the second request waits for room")
        assert budget.in_use == budget.capacity  # inflated into all the room there was, held
        busy = await refused
        doc = await assert_problem(busy, 503, "SERVER_BUSY")
        assert busy.headers["Retry-After"] == "1"
        assert "Nothing was accepted" in doc["detail"]
        assert not slow.done() and budget.waiting == 0 and budget.in_use == held
        redis = Redis.from_url(gw.redis_url)  # refused before admission: never claimed
        assert await redis.exists(idempotency_key("sales", "pos", "b")) == 0
        await redis.aclose()
    finally:
        broker.resume()
    assert (await slow).status == 202
    assert budget.in_use == 0
    assert _busy_refusals() == refused_before + 1
    sent = gzipped(second)
    retry = await gw.post(sent.pop("body"), **sent, **{"Idempotency-Key": "b"})
    assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
    assert budget.in_use == 0
    assert events(await gw.published()) == ITEMS + first + second  # the refused one: never


async def test_503_when_redis_is_down(make_gateway, own_redis):
    server = own_redis()
    gw = await make_gateway(redis=server.url)
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202
    server.stop()
    for headers in ({}, {"Idempotency-Key": "during-outage"}):
        resp = await gw.post(orjson.dumps(ITEMS[:1]), **headers)
        await assert_problem(resp, 503, "REDIS_UNAVAILABLE")
        assert resp.headers["Retry-After"] == "1"
    assert (await gw.client.get("/readyz")).status == 503
    assert events(await gw.published()) == ITEMS  # nothing of the refused requests

    server.start()
    resp = await gw.post(orjson.dumps(ITEMS[:1]), **{"Idempotency-Key": "during-outage"})
    assert resp.status == 202, await resp.text()
    assert events(await gw.published()) == ITEMS + ITEMS[:1]


async def test_gateway_starts_while_kafka_is_down_and_connects_later(make_gateway, own_broker):
    broker = own_broker()
    broker.stop()
    gw = await make_gateway(bootstrap=broker.bootstrap, create=False)
    await assert_problem(await gw.post(orjson.dumps(ITEMS)), 503, "BROKER_UNAVAILABLE")
    broker.start()
    await create_topics(broker.bootstrap, [gw.topic, gw.other_topic], partitions=2)
    for _ in range(60):
        if (await gw.client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.25)
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202
    assert events(await gw.published()) == ITEMS


class MisadvertisedBroker(TansuBroker):
    """Tansu advertising a port nobody listens on: bootstrap answers, its broker never does
    (a wrong advertised listener, a network policy)."""

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--advertised-listener-url") + 1] = (
            f"tcp://127.0.0.1:{free_port()}")
        return command

    def healthy(self) -> bool:
        return True  # listening and its banner printed; metadata leads nowhere on purpose


async def test_a_broker_unreachable_past_bootstrap_leaves_the_gateway_up_and_not_ready(
        make_gateway):
    """With idempotence on (real Kafka's default), aiokafka asked for a producer id for as
    long as no broker answered: the gateway's start-up never ended (no listener, SIGTERM
    ignored). It now starts, not ready, answers 503, and keeps trying in the background."""
    broker = MisadvertisedBroker()
    broker.start()
    try:
        gw = await asyncio.wait_for(make_gateway(
            bootstrap=broker.bootstrap, create=False, KAFKA_ENABLE_IDEMPOTENCE="true",
            KAFKA_PUBLISH_TIMEOUT_S="2"), 30)
        assert (await gw.client.get("/readyz")).status == 503
        resp = await gw.post(orjson.dumps(ITEMS), **{"Idempotency-Key": "unreachable"})
        await assert_problem(resp, 503, "BROKER_UNAVAILABLE")
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        broker.close()


async def test_a_claim_left_by_a_failed_admission_is_released_once_redis_answers(
        make_gateway, own_redis):
    """Redis stalled past the client's timeout, then ran the admission it had queued: the
    claim was pending under a call that had answered 503, and the client's retries got 409
    until the lock expired. The gateway releases it in the background once Redis answers."""
    server = own_redis()
    gw = await make_gateway(redis=server.url)  # REDIS_TIMEOUT_S 0.5, lock TTL 10 s
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # connected, scripts loaded
    body = orjson.dumps(ITEMS[:1])
    server.pause()
    try:
        resp = await gw.post(body, **{"Idempotency-Key": "lost-answer"})
        await assert_problem(resp, 503, "REDIS_UNAVAILABLE")
    finally:
        server.resume()  # it runs the queued admission now: the claim is taken
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5  # well before the lock's TTL lets the retry through anyway
    while True:
        retry = await gw.post(body, **{"Idempotency-Key": "lost-answer"})
        if retry.status == 202:
            break
        await assert_problem(retry, 409, "IDEMPOTENCY_KEY_IN_USE")
        assert loop.time() < deadline, "the claim was not released"
        await asyncio.sleep(0.2)
    assert events(await gw.published()) == ITEMS + ITEMS[:1]
