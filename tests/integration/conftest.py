"""A real gateway for integration tests: catalogue on disk, real Redis, real Tansu broker."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import SERVER_KWARGS, create_app
from gateway.config import Settings
from gateway.protocol import EdgeRunner
from schemas.keys import hash_key, new_key
from tests.services import consume_all, create_topics

SALES_SCHEMA = {
    "type": "object",
    "properties": {
        "region": {"type": "string", "minLength": 1},
        "revenue": {"type": "number", "minimum": 0},
        "target": {"type": "number"},
        "units": {"type": "integer", "minimum": 0},
    },
    "required": ["region", "revenue"],
}


class EdgeTestServer(TestServer):
    """aiohttp's test server with the production runner (gateway.protocol), and as in
    production without handler cancellation (aiohttp's test server turns it on: a client
    that disconnects would cancel its handler, which `sluice serve` lets finish)."""

    async def _make_runner(self, **kwargs):
        return EdgeRunner(self.app, **{**kwargs, "handler_cancellation": False})


@dataclass
class Gateway:
    """A running gateway plus what a test needs to check its effects."""

    client: TestClient
    bootstrap: str
    redis_url: str
    topic: str  # the sales dataset's entry topic, unique to this test
    other_topic: str
    key: str  # may write sales
    other_key: str  # may write only the other dataset
    settings: Settings
    headers: dict[str, str] = field(default_factory=dict)

    async def post(self, body: bytes | str, *, key: str | None = None, dataset: str = "sales",
                   content_type: str = "application/json", query: str = "", **headers: str):
        sent = {"Content-Type": content_type, **headers}
        if key != "":
            sent["Authorization"] = f"Bearer {key or self.key}"
        data = body.encode() if isinstance(body, str) else body
        return await self.client.post(f"/v1/datasets/{dataset}/events{query}", data=data,
                                      headers=sent)

    async def published(self, topic: str | None = None):
        return await consume_all(self.bootstrap, topic or self.topic)


def write_catalogue(directory: Path, suffix: str, key: str, other_key: str,
                    rate_limit: dict | None) -> tuple[str, str]:
    topic, other_topic = f"ingest.sales.{suffix}", f"ingest.other.{suffix}"
    sales = {"id": "sales", "title": "Sales", "item_key": "region", "entry_topic": topic,
             "max_request_bytes": 64 * 1024, "max_decompressed_bytes": 256 * 1024,
             "schema": SALES_SCHEMA,
             "ingest_keys": [{"id": "pos", "sha256": hash_key(key)}]}
    if rate_limit:
        sales["rate_limit"] = rate_limit
    other = {"id": "other", "entry_topic": other_topic,
             "schema": {"type": "object"},
             "ingest_keys": [{"id": "crm", "sha256": hash_key(other_key)}]}
    (directory / "sales.yaml").write_text(yaml.safe_dump(sales))
    (directory / "other.yaml").write_text(yaml.safe_dump(other))
    return topic, other_topic


@pytest.fixture
async def make_gateway(tmp_path, kafka, redis_url):
    """Factory: start a gateway (optionally against another broker or Redis)."""
    started: list[TestClient] = []

    async def make(*, bootstrap: str | None = None, redis: str | None = None,
                   rate_limit: dict | None = None, create: bool = True,
                   datasets: tuple[dict, ...] = (), **env: str) -> Gateway:
        """``datasets``: more definitions (without ingest keys: the sales key may use them)."""
        bootstrap = bootstrap or kafka.bootstrap
        key, other_key = new_key("pos"), new_key("crm")
        directory = tmp_path / f"catalogue-{len(started)}"
        directory.mkdir()
        suffix = uuid.uuid4().hex[:10]
        topic, other_topic = write_catalogue(directory, suffix, key, other_key, rate_limit)
        topics = [topic, other_topic]
        for extra in datasets:
            topics.append(f"ingest.{extra['id']}.{suffix}")
            (directory / f"{extra['id']}.yaml").write_text(yaml.safe_dump({
                "entry_topic": topics[-1], **extra,
                "ingest_keys": [{"id": "pos", "sha256": hash_key(key)}]}))
        if create:
            await create_topics(bootstrap, topics, partitions=2)
        settings = Settings.from_env({
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_ENABLE_IDEMPOTENCE": "false",
            "REDIS_URL": redis or redis_url,
            "SLUICE_CATALOGUE_DIR": str(directory),
            "KAFKA_PUBLISH_TIMEOUT_S": "3",
            "SLUICE_IDEMPOTENCY_LOCK_TTL_S": "10",
            "REDIS_TIMEOUT_S": "0.5",
            **env,
        })
        server = EdgeTestServer(create_app(settings))
        await server.start_server(**SERVER_KWARGS)  # as in production: no auto-decompression
        client = TestClient(server)
        await client.start_server()
        started.append(client)
        return Gateway(client, bootstrap, redis or redis_url, topic, other_topic, key,
                       other_key, settings)

    yield make
    for client in started:
        await client.close()


@pytest.fixture
async def gateway(make_gateway) -> Gateway:
    return await make_gateway()


async def with_sales_key(gw: Gateway, key_id: str) -> tuple[TestClient, str]:
    """Another gateway on the same Redis and broker whose catalogue is ``gw``'s plus a key
    ``key_id`` that may write sales: its client (the caller closes it) and the key."""
    key = new_key(key_id)
    directory = gw.settings.catalogue_dir.parent / f"{gw.settings.catalogue_dir.name}-{key_id}"
    shutil.copytree(gw.settings.catalogue_dir, directory)
    sales = yaml.safe_load((directory / "sales.yaml").read_text())
    sales["ingest_keys"].append({"id": key_id, "sha256": hash_key(key)})
    (directory / "sales.yaml").write_text(yaml.safe_dump(sales))
    server = EdgeTestServer(create_app(dataclasses.replace(gw.settings, catalogue_dir=directory)))
    await server.start_server(**SERVER_KWARGS)
    client = TestClient(server)
    await client.start_server()
    return client, key
