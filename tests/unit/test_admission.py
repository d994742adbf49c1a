"""The stored answer is not awaited by the request: its failure is counted and logged there."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.admission import _completed


def _errors() -> float:
    return REGISTRY.get_sample_value("sluice_redis_errors_total", {"operation": "complete"}) or 0


async def test_a_failed_store_is_counted_and_logged_never_raised(caplog):
    before = _errors()
    sent = asyncio.get_running_loop().create_future()
    sent.set_exception(RedisConnectionError("gone"))
    with caplog.at_level(logging.WARNING, logger="gateway.admission"):
        _completed(sent)
    assert _errors() == before + 1
    assert "ConnectionError" in caplog.text and "claim will expire" in caplog.text


async def test_a_stored_or_refused_answer_is_not_an_error():
    before = _errors()
    for result in (1, 0):
        sent = asyncio.get_running_loop().create_future()
        sent.set_result(result)
        _completed(sent)
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()
    _completed(cancelled)
    assert _errors() == before
