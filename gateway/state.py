"""What every handler reaches through the application: settings, catalogue, clients."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from redis.asyncio import Redis

from gateway.accounting import Accountant
from gateway.config import Settings
from gateway.ingest import Ingestor
from gateway.publisher import Publisher
from schemas.catalogue import Catalogue


@dataclass(slots=True)
class State:
    settings: Settings
    catalogue: Catalogue  # replaced whole by a reload (gateway.reload): read it once a request
    redis: Redis
    publisher: Publisher
    ingestor: Ingestor
    accountant: Accountant
    # entry topics of the catalogue the process started with: the ones /readyz requires
    start_topics: frozenset[str] = field(default_factory=frozenset)
    reload_failed: bool = False  # the files as they are now did not load (gateway.reload)


STATE = web.AppKey("state", State)
REQUEST_ID = web.RequestKey("request_id", str)  # set by the error middleware on every request
