"""The dataset model: one definition file parsed, checked and compiled into a Dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs

from schemas.columns import check_column_names, properties, store_bounded
from schemas.keys import SHA256_RE, IngestKey, key_id_problem

DATASET_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_ITEM_ID = "urn:sluice:dataset-item"
_KNOWN_FIELDS = {
    "id", "title", "description", "schema", "item_key", "event_id", "entry_topic",
    "max_request_bytes", "max_decompressed_bytes", "rate_limit", "ingest_keys",
    "nested", "unknown_fields",
}


class DatasetError(ValueError):
    """A dataset definition that cannot be used; the message names the field and the reason."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Defaults a definition may override (from the process settings)."""

    max_request_bytes: int = 1024 * 1024
    max_decompressed_bytes: int = 8 * 1024 * 1024
    requests_per_second: float = 0.0  # 0 = no rate limit
    burst: int = 0


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_second: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.requests_per_second > 0


@dataclass(frozen=True, slots=True, eq=False)
class Dataset:
    id: str
    title: str
    description: str
    schema: dict[str, Any]
    item_key: str | None
    event_id: str | None
    entry_topic: str
    max_request_bytes: int
    max_decompressed_bytes: int
    rate_limit: RateLimit
    ingest_keys: tuple[IngestKey, ...]
    nested: str  # "columns" or "json": how workers store nested objects
    unknown_fields: str  # "keep" or "drop"
    validate_item: Any = field(repr=False)  # compiled validator (jsonschema-rs) of one item
    validate_array: Any = field(repr=False)  # the same for a whole array, in one call

    @property
    def identifying(self) -> tuple[str, ...]:
        """The fields that identify an item (item key, event id): required, never null."""
        return _identifying(self.item_key, self.event_id)

    @property
    def fields(self) -> list[dict[str, Any]]:
        """Top-level fields with their JSON types, for catalogue listings."""
        required = set(self.schema.get("required", ()))
        return [
            {"name": name, "type": prop.get("type", "any"), "required": name in required}
            for name, prop in properties(self.schema)
        ]


def parse_dataset(raw: Any, limits: Limits) -> Dataset:
    """Build a Dataset from a parsed definition file, compiling its validators."""
    if not isinstance(raw, dict):
        raise DatasetError("a dataset definition must be a mapping")
    unknown = set(raw) - _KNOWN_FIELDS
    if unknown:
        raise DatasetError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_FIELDS)}")
    dataset_id = raw.get("id")
    if not isinstance(dataset_id, str) or not DATASET_ID_RE.match(dataset_id):
        raise DatasetError(f"id: {dataset_id!r} must match {DATASET_ID_RE.pattern}")
    schema = raw.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise DatasetError("schema: must be a JSON Schema whose type is 'object'")
    item_key = _optional_field(raw, "item_key", schema)
    event_id = _optional_field(raw, "event_id", schema)
    nested = _choice(raw, "nested", ("columns", "json"))
    unknown_fields = _choice(raw, "unknown_fields", ("keep", "drop"))
    try:
        check_column_names(schema, nested == "json", keep_unknown=unknown_fields == "keep")
    except ValueError as exc:
        raise DatasetError(f"schema: {exc}") from None
    identifying = _identifying(item_key, event_id)
    checked = store_bounded(_with_required(schema, list(identifying)),
                            nested_json=nested == "json", identifying=identifying)
    try:
        validate_item = compile_schema(checked)
        validate_array = compile_schema(_array_of(checked))
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        raise DatasetError(f"schema: {str(exc).splitlines()[0]}") from exc
    return Dataset(
        id=dataset_id,
        title=_string(raw, "title", dataset_id),
        description=str(raw.get("description") or ""),
        schema=schema,
        item_key=item_key,
        event_id=event_id,
        entry_topic=_string(raw, "entry_topic", f"ingest.{dataset_id}"),
        max_request_bytes=_positive_int(raw, "max_request_bytes", limits.max_request_bytes),
        max_decompressed_bytes=_positive_int(
            raw, "max_decompressed_bytes", limits.max_decompressed_bytes
        ),
        rate_limit=_rate_limit(raw.get("rate_limit"), limits),
        ingest_keys=_ingest_keys(raw.get("ingest_keys", [])),
        nested=nested,
        unknown_fields=unknown_fields,
        validate_item=validate_item,
        validate_array=validate_array,
    )


def _identifying(item_key: str | None, event_id: str | None) -> tuple[str, ...]:
    return tuple(f for f in (item_key, event_id) if f)


def compile_schema(schema: dict) -> Any:
    """A compiled validator: draft-07 unless ``$schema`` names another draft; formats are
    checked; a ``$ref`` is never fetched from the network (a catalogue must not make the
    gateway call out)."""
    cls = (jsonschema_rs.validator_cls_for(schema) if "$schema" in schema
           else jsonschema_rs.Draft7Validator)
    return cls(schema, validate_formats=True, offline=True)


def _optional_field(raw: dict, name: str, schema: dict) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value not in schema.get("properties", {}):
        raise DatasetError(f"{name}: {value!r} must name a property of the schema")
    return value


def _with_required(schema: dict, fields: list[str]) -> dict:
    """The schema with the identifying fields made mandatory: an item without them is unusable."""
    required = list(schema.get("required", []))
    missing = [f for f in fields if f not in required]
    return {**schema, "required": required + missing} if missing else schema


def _array_of(schema: dict) -> dict:
    """The item schema as an array schema of the same draft: the item stays a resource of its
    own (an ``$id`` of its own unless it has one), so that its ``#`` references still mean the
    item and its definitions, as in the item validator."""
    draft = schema.get("$schema")
    item = {k: v for k, v in schema.items() if k != "$schema"}
    item.setdefault("id" if draft and "draft-04" in draft else "$id", _ITEM_ID)
    return {"type": "array", "items": item, **({"$schema": draft} if draft else {})}


def _string(raw: dict, name: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{name}: must be a non-empty string")
    return value


def _positive_int(raw: dict, name: str, default: int) -> int:
    value = raw.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DatasetError(f"{name}: {value!r} must be a positive integer")
    return value


def _choice(raw: dict, name: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(name, allowed[0])
    if value not in allowed:
        raise DatasetError(f"{name}: {value!r} must be one of {list(allowed)}")
    return value


def _rate_limit(raw: Any, limits: Limits) -> RateLimit:
    if raw is None:
        return RateLimit(limits.requests_per_second, limits.burst)
    if not isinstance(raw, dict) or set(raw) - {"requests_per_second", "burst"}:
        raise DatasetError("rate_limit: must be a mapping of requests_per_second and burst")
    rps = raw.get("requests_per_second", limits.requests_per_second)
    if not isinstance(rps, int | float) or isinstance(rps, bool) or rps < 0:
        raise DatasetError(f"rate_limit.requests_per_second: {rps!r} must be a number >= 0")
    burst = raw.get("burst", max(1, int(rps)))
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise DatasetError(f"rate_limit.burst: {burst!r} must be an integer >= 1")
    return RateLimit(float(rps), burst)


def _ingest_keys(raw: Any) -> tuple[IngestKey, ...]:
    if not isinstance(raw, list):
        raise DatasetError("ingest_keys: must be a list of {id, sha256}")
    keys = []
    for i, entry in enumerate(raw):
        key_id = entry.get("id") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        problem = key_id_problem(key_id)
        if problem:
            raise DatasetError(f"ingest_keys[{i}].id: {problem}")
        if not isinstance(digest, str) or not SHA256_RE.match(digest):
            raise DatasetError(f"ingest_keys[{i}].sha256: must be 64 lowercase hex digits")
        keys.append(IngestKey(key_id, digest))
    return tuple(keys)
