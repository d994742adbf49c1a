"""What every handler reaches through the application: settings, catalogue, clients."""

from __future__ import annotations

from dataclasses import dataclass

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
    catalogue: Catalogue
    redis: Redis
    publisher: Publisher
    ingestor: Ingestor
    accountant: Accountant


STATE = web.AppKey("state", State)
REQUEST_ID = web.RequestKey("request_id", str)  # set by the error middleware on every request
