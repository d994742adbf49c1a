"""Bearer ingest keys: from the Authorization header to a Principal allowed on a dataset."""

from __future__ import annotations

from gateway.errors import DatasetNotFound, Forbidden, Unauthorized
from schemas.catalogue import Catalogue, Principal
from schemas.dataset import Dataset


def authenticate(catalogue: Catalogue, authorization: str | None) -> Principal:
    """The caller's principal; 401 for a missing, malformed or unknown key."""
    if not authorization:
        raise Unauthorized("send the ingest key as 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must use the Bearer scheme")
    principal = catalogue.authenticate(key.strip())
    if principal is None:
        raise Unauthorized("unknown ingest key")
    return principal


def authorize(catalogue: Catalogue, principal: Principal, dataset_id: str) -> Dataset:
    """The dataset if it exists (404) and the principal may use it (403)."""
    dataset = catalogue.get(dataset_id)
    if dataset is None:
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    if not principal.may_write(dataset.id):
        raise Forbidden(f"this ingest key may not write to dataset {dataset_id!r}")
    return dataset
