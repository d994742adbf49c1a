"""The gateway reloads its catalogue when the definition files change (SLUICE_CATALOGUE_RELOAD_S)
and on SIGHUP: keys revoked and added, datasets added and removed, schemas, rate and body
limits, all on the next request; a broken edit leaves the last good catalogue serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from schemas.keys import hash_key, new_key
from tests.integration.conftest import Gateway
from tests.integration.test_push import ITEMS, assert_problem, events
from tests.integration.test_server import post, start_gateway, stop_gateway
from tests.services import consume_all

pytestmark = pytest.mark.integration
RELOAD = {"SLUICE_CATALOGUE_RELOAD_S": "0.1"}
LOGGER = "gateway.reload"


def edit(directory: Path, dataset: str, **changes) -> None:
    """Rewrite ``dataset``'s definition file with ``changes`` (None removes a field)."""
    path = directory / f"{dataset}.yaml"
    definition = yaml.safe_load(path.read_text())
    definition.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in definition.items() if v is not None}))


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        await asyncio.sleep(0.05)


async def status_of(gw: Gateway, path: str, key: str) -> int:
    resp = await gw.client.get(path, headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp.status


async def metric(gw: Gateway, name: str) -> float | None:
    text = await (await gw.client.get("/metrics")).text()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else None


def reload_lines(caplog, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == level]


async def test_a_revoked_key_gets_401_from_the_next_request_after_the_reload(make_gateway, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    gw = await make_gateway(**RELOAD)
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202
    directory = gw.settings.catalogue_dir
    edit(directory, "sales", ingest_keys=[])
    await until(lambda: _is(status_of(gw, "/v1/datasets/sales", gw.key), 401))
    await assert_problem(await gw.post(orjson.dumps(ITEMS)), 401, "UNAUTHORIZED")
    assert events(await gw.published()) == ITEMS  # the 202's only
    assert (await gw.post(orjson.dumps([{}]), key=gw.other_key, dataset="other")).status == 202
    assert any(
        "datasets changed: sales" in m and "keys removed: pos" in m
        for m in reload_lines(caplog, "INFO")
    )
    assert gw.key not in caplog.text


async def test_a_new_key_and_a_new_dataset_work_after_the_reload(make_gateway, kafka):
    gw = await make_gateway(**RELOAD)
    directory = gw.settings.catalogue_dir
    key = new_key("pos2")
    sales = yaml.safe_load((directory / "sales.yaml").read_text())
    await assert_problem(await gw.post(orjson.dumps(ITEMS), key=key), 401, "UNAUTHORIZED")
    edit(
        directory,
        "sales",
        ingest_keys=[*sales["ingest_keys"], {"id": "pos2", "sha256": hash_key(key)}],
    )
    topic = f"{gw.topic}.fresh"  # not created yet
    (directory / "fresh.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "fresh",
                "entry_topic": topic,
                "schema": {"type": "object"},
                "ingest_keys": [{"id": "pos2", "sha256": hash_key(key)}],
            }
        )
    )
    await until(lambda: _is(status_of(gw, "/v1/datasets/fresh", key), 200))
    assert (await gw.post(orjson.dumps(ITEMS), key=key)).status == 202
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # the old key still works
    assert events(await gw.published()) == ITEMS + ITEMS
    # ready all the same: a dataset added before its topic must not take every gateway out
    # of its load balancer; /readyz names the topic
    resp = await gw.client.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert topic in (await resp.json())["checks"]["kafka"]
    # its pushes go as at start: 503 TOPIC_NOT_FOUND until the topic exists, where the broker
    # does not create topics on first use (real Kafka's auto.create.topics.enable=false);
    # Tansu does, as Kafka with it on
    assert (await gw.post(b'{"a": 1}', key=key, dataset="fresh")).status == 202
    assert events(await consume_all(kafka.bootstrap, topic)) == [{"a": 1}]


async def test_schema_rate_limit_and_body_limit_changes_and_a_removed_dataset_apply(make_gateway):
    gw = await make_gateway(**RELOAD)
    directory = gw.settings.catalogue_dir
    # 1.2 MB: over sales' 64 KiB, and over the largest limit of the catalogue at start
    # (other's 1 MiB), which became aiohttp's client_max_size
    big = orjson.dumps([{"region": f"r{i}", "revenue": 1, "units": 1} for i in range(30_000)])
    assert 1024 * 1024 < len(big) < 2 * 1024 * 1024
    await assert_problem(await gw.post(big), 413, "PAYLOAD_TOO_LARGE")
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # no units: valid
    await assert_problem(await gw.post(b"{}", dataset="other"), 403, "FORBIDDEN")
    schema = yaml.safe_load((directory / "sales.yaml").read_text())["schema"]
    edit(
        directory,
        "sales",
        schema={**schema, "required": [*schema["required"], "units"]},
        max_request_bytes=2 * 1024 * 1024,
        max_decompressed_bytes=2 * 1024 * 1024,
        rate_limit={"requests_per_second": 0.01, "burst": 2},
    )
    (directory / "other.yaml").unlink()

    async def reloaded() -> bool:
        resp = await gw.client.get(
            "/v1/datasets/sales", headers={"Authorization": f"Bearer {gw.key}"}
        )
        return (await resp.json())["limits"]["max_request_bytes"] == 2 * 1024 * 1024

    await until(reloaded)
    await assert_problem(await gw.post(b"{}", dataset="other"), 404, "DATASET_NOT_FOUND")
    await assert_problem(await gw.post(orjson.dumps(ITEMS)), 400, "VALIDATION_FAILED")
    assert (await gw.post(big)).status == 202  # the bucket's second (last) token
    await assert_problem(await gw.post(big), 429, "RATE_LIMITED")
    assert len(events(await gw.published())) == len(ITEMS) + 30_000


async def test_a_broken_edit_keeps_the_last_good_catalogue_until_it_is_fixed(make_gateway, caplog):
    gw = await make_gateway(**RELOAD)
    directory = gw.settings.catalogue_dir
    failed, loaded = (
        f'sluice_gateway_catalogue_reloads_total{{outcome="{o}"}}' for o in ("failed", "loaded")
    )
    counted = {name: await metric(gw, name) or 0 for name in (failed, loaded)}  # by earlier tests
    good = yaml.safe_load((directory / "sales.yaml").read_text())
    pasted = new_key("pos2")  # a key pasted where its hash belongs, on a line PyYAML quotes
    (directory / "sales.yaml").write_text(
        yaml.safe_dump({**good, "ingest_keys": None})[:-1]
        + f"\ningest_keys: [{{id: pos2, sha256: {pasted}]\n"
    )
    await until(lambda: _is(metric(gw, "sluice_gateway_catalogue_reload_failed"), 1.0))
    assert (await gw.post(orjson.dumps(ITEMS))).status == 202  # the old catalogue: pos works
    resp = await gw.client.get("/readyz")
    assert resp.status == 200  # still serving the last good catalogue
    assert "failed to load" in (await resp.json())["checks"]["catalogue"]
    await asyncio.sleep(0.5)  # five more checks: the same bad files are reported once
    errors = reload_lines(caplog, "ERROR")
    assert len(errors) == 1, errors
    assert "sales.yaml" in errors[0] and "line" in errors[0]
    assert pasted.removeprefix("sk_pos2_") not in caplog.text and gw.key not in caplog.text
    assert await metric(gw, failed) == counted[failed] + 1

    (directory / "sales.yaml").write_text(yaml.safe_dump({**good, "ingest_keys": []}))  # fixed
    await until(lambda: _is(status_of(gw, "/v1/datasets/sales", gw.key), 401))
    assert await metric(gw, "sluice_gateway_catalogue_reload_failed") == 0
    assert await metric(gw, loaded) == counted[loaded] + 1
    resp = await gw.client.get("/readyz")
    assert "failed" not in (await resp.json())["checks"]["catalogue"]


@pytest.mark.parametrize("processes", [2, 1])
async def test_sighup_reloads_every_process_of_sluice_serve(tmp_path, kafka, redis_url, processes):
    """Periodic checks off: only the SIGHUP to `sluice serve` reloads (with 2 processes the
    supervisor passes it on to both); each process counts its reload, and no process lets
    the revoked key in."""
    proc, base, key, topic = await start_gateway(
        tmp_path, kafka.bootstrap, redis_url, processes, SLUICE_CATALOGUE_RELOAD_S="0"
    )
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    try:
        assert len(children) == (processes if processes > 1 else 0)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as s:  # spread over both

            async def statuses(n: int) -> set[int]:
                found = set()
                for _ in range(n):
                    async with post(s, base, key, orjson.dumps(ITEMS)) as resp:
                        found.add(resp.status)
                return found

            async def reloads() -> float:
                async with s.get(base + "/metrics") as resp:
                    text = await resp.text()
                line = 'sluice_gateway_catalogue_reloads_total{outcome="loaded"} '
                return sum(float(x.split(" ")[1]) for x in text.splitlines() if x.startswith(line))

            assert await statuses(10) == {202}
            edit(tmp_path, "sales", ingest_keys=[])
            assert await statuses(10) == {202}  # no periodic checks: nothing reloaded yet
            proc.send_signal(signal.SIGHUP)
            await until(lambda: _is(reloads(), float(processes)))
            assert await statuses(20) == {401}
        assert proc.poll() is None
        assert sorted(
            subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ) == sorted(children)
        assert len(await consume_all(kafka.bootstrap, topic)) == 20
    finally:
        code, leftover = stop_gateway(proc)
        for pid in children:  # a supervisor that died of the signal leaves them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert code == 0 and not leftover


async def _is(value: Awaitable, expected) -> bool:
    return await value == expected
