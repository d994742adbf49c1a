"""Catalogue reads: list datasets, one dataset's schema, a sample request."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.auth import authenticate, authorize
from gateway.errors import SampleUnavailable
from gateway.protocol import add_routes, header
from gateway.state import STATE
from schemas.dataset import Dataset
from schemas.sample import SampleError, sample_request


def summary(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": dataset.id,
        "title": dataset.title,
        "description": dataset.description,
        "entry_topic": dataset.entry_topic,
        "item_key": dataset.item_key,
        "event_id": dataset.event_id,
        "fields": dataset.fields,
    }


def detail(dataset: Dataset) -> dict[str, Any]:
    return {
        **summary(dataset),
        "schema": dataset.schema,
        "limits": {
            "max_request_bytes": dataset.max_request_bytes,
            "max_decompressed_bytes": dataset.max_decompressed_bytes,
            "rate_limit": {
                "requests_per_second": dataset.rate_limit.requests_per_second,
                "burst": dataset.rate_limit.burst,
            } if dataset.rate_limit.enabled else None,
        },
    }


async def list_datasets(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    visible = [summary(d) for d in state.catalogue if principal.may_write(d.id)]
    return web.json_response({"datasets": visible})


async def get_dataset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    dataset = authorize(state.catalogue, principal, request.match_info["dataset"])
    return web.json_response(detail(dataset))


async def get_sample(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = authenticate(state.catalogue, header(request, "Authorization"))
    dataset = authorize(state.catalogue, principal, request.match_info["dataset"])
    path = f"/v1/datasets/{dataset.id}/events"
    try:
        sample = sample_request(dataset.id, dataset.schema, dataset.item_key, path)
    except SampleError as exc:  # a schema beyond the generator: the dataset itself is fine
        raise SampleUnavailable(f"no sample can be generated for dataset {dataset.id!r}: "
                                f"{exc}") from None
    return web.json_response(sample)


def setup(app: web.Application) -> None:
    add_routes(
        app,
        ("GET", "/v1/datasets", list_datasets),
        ("GET", "/v1/datasets/{dataset}", get_dataset),
        ("GET", "/v1/datasets/{dataset}/sample", get_sample),
    )
