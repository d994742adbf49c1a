"""Which properties of a dataset's schema become columns, of which kinds and bounds.

Shared by the dataset model (whose validators hold each column's values to what its store
keeps) and the entity structure (which plans the table and shapes rows). Pure, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # bigint (PostgreSQL), INTEGER (SQLite)
# Dates in the year 0000, and date-times on the calendar's first day with an offset ahead of
# UTC or on its last with one behind (in UTC, possibly a day outside the calendar: refused
# whole, as "exactly when the time is within the offset" is no regular expression worth
# keeping). Without look-ahead, which costs the validator ten times as much.
_OFFSET = "(?:0[1-9]|1[0-9]|2[0-3]|00:(?:0[1-9]|[1-5][0-9]))"  # hh:mm other than 00:00
_OUTSIDE_DATES = {"not": {"pattern": "^0000-"}}
_OUTSIDE_TIMES = {"not": {"pattern": f"^(?:0000-|0001-01-01[Tt].*[+]{_OFFSET}"
                                     f"|9999-12-31[Tt].*-{_OFFSET})"}}
_NOT_NULL = {"not": {"type": "null"}}
_NOT_NULL_MESSAGE = '{"type":"null"} is not allowed for null'
_STORE_BOUNDS: dict[str, tuple[dict, ...]] = {
    "integer": ({"minimum": INT64_MIN, "maximum": INT64_MAX},),
    "date": (_OUTSIDE_DATES,),
    "timestamp": (_OUTSIDE_TIMES,),
}


@dataclass(frozen=True, slots=True)
class MetaColumn:
    name: str
    kind: str


# Metadata columns of every dataset table, in table order, after the item's.
META_COLUMNS = (
    MetaColumn("_request_id", "text"),
    MetaColumn("_connector", "text"),
    MetaColumn("_received_at", "timestamp"),
    MetaColumn("_session_id", "text"),
    MetaColumn("_sync_id", "text"),
    MetaColumn("_idempotency_key", "text"),
    MetaColumn("_part", "integer"),
    MetaColumn("_topic", "text"),
    MetaColumn("_partition", "integer"),
    MetaColumn("_offset", "integer"),
    MetaColumn("_index", "integer"),
)


EXTRA_COLUMN = "_extra"  # unknown fields, when the dataset keeps them
MAX_IDENTIFIER = 63  # bytes: PostgreSQL's limit (it cuts longer names), the stricter store's
MAX_COLUMNS = 1600  # PostgreSQL's limit per table (SQLite's default is 2000)


def properties(schema: dict) -> Iterator[tuple[str, dict]]:
    """(name, schema) of an object schema's properties, boolean subschemas read as JSON
    Schema means them: ``true`` (anything) as ``{}``, ``false`` (never present) left out."""
    for name, prop in schema.get("properties", {}).items():
        if prop is not False:
            yield name, {} if prop is True else prop


def column_fields(schema: dict, nested_json: bool, prefix: tuple[str, ...] = (),
                  required: bool = True) -> Iterator[tuple[tuple[str, ...], dict, str, bool]]:
    """(path, property schema, column kind, required) of every property that becomes a
    column, in table order: an object's properties become columns of their own unless
    ``nested_json`` keeps objects whole as json."""
    mandatory = set(schema.get("required", ()))
    for name, prop in properties(schema):
        path = (*prefix, name)
        is_required = required and name in mandatory
        kind = kind_of(prop)
        if kind == "object" and not nested_json and prop.get("properties"):
            yield from column_fields(prop, nested_json, path, is_required)
        else:
            yield path, prop, "json" if kind == "object" else kind, is_required


def check_column_names(schema: dict, nested_json: bool, keep_unknown: bool) -> None:
    """ValueError for a schema whose table the stores cannot create: a column name longer
    than PostgreSQL keeps, two fields (or a field and a metadata column) with one name, as
    ``a__b`` and the nested ``a.b`` are, or more columns than a table may have."""
    taken = {m.name: "a metadata column" for m in META_COLUMNS}
    if keep_unknown:
        taken[EXTRA_COLUMN] = "the column of unknown fields"
    for path, _, _, _ in column_fields(schema, nested_json):
        name, field = "__".join(path), ".".join(path)
        if len(name.encode()) > MAX_IDENTIFIER:
            raise ValueError(f"field {field!r} makes a column name longer than "
                             f"{MAX_IDENTIFIER} bytes")
        if name in taken:
            raise ValueError(f"field {field!r} makes the column {name!r}, which is already "
                             f"{taken[name]}")
        taken[name] = f"the column of field {field!r}"
    if len(taken) > MAX_COLUMNS:
        raise ValueError(f"the table would have {len(taken)} columns (with the metadata "
                         f"columns); the stores keep at most {MAX_COLUMNS}")


def kind_of(prop: dict) -> str:
    """The column kind of a property schema ("object" for one whose fields may be columns)."""
    kinds = prop.get("type")
    if isinstance(kinds, list):
        real = [k for k in kinds if k != "null"]
        kinds = real[0] if len(real) == 1 else None
    if kinds == "string":
        return {"date-time": "timestamp", "date": "date"}.get(prop.get("format"), "text")
    if kinds in ("integer", "number", "boolean", "object"):
        return kinds
    if kinds is None and "enum" in prop and all(isinstance(v, str) for v in prop["enum"]):
        return "text"
    if kinds is None and "properties" in prop:
        return "object"
    return "json"


def store_bounded(schema: dict, nested_json: bool, identifying: tuple[str, ...] = ()) -> dict:
    """The schema with every column held to what the stores keep: integers to 64 bits, dates
    and date-times to the years 1-9999 (Python's, which shapes them), and the ``identifying``
    fields (item key, event id) to non-null values (a null key is no key: PostgreSQL refuses
    it in a primary key, for ever, and SQLite would keep one row per null).

    JSON Schema's ``integer`` has no bound, and RFC 3339 allows the year 0000 and offsets
    that cross the calendar's first or last day; such a value would pass validation and be
    acknowledged, then be dead-lettered by the workers. Bounded, it is refused at the edge
    with the other schema errors. Only columns are bounded: a big integer inside a json
    column is kept as it is by both stores. A bound never loosens or reinterprets the
    dataset's own (see _add_bound).
    """
    bounded = copy.deepcopy(schema)
    top = bounded.get("properties", {})
    for name in identifying:  # ``true`` means ``{}``, which can hold the not-null bound
        if top.get(name) is True:
            top[name] = {}
    for path, prop, kind, _ in column_fields(bounded, nested_json):
        bounds = _STORE_BOUNDS.get(kind, ())
        if kind == "integer" and _within_int64(prop):
            bounds = ()
        if len(path) == 1 and path[0] in identifying and accepts_null(prop):
            bounds = (*bounds, _NOT_NULL)
        for bound in bounds:
            _add_bound(prop, bound)
    return bounded


def _add_bound(prop: dict, bound: dict) -> None:
    """Beside the property's own keywords when it has none of the bound's (nor a draft-04
    exclusive flag, which would change what a bound means), else in its ``allOf`` (which
    costs the validator more): either way the bound only adds to them."""
    clash = set(bound) & set(prop)
    if "minimum" in bound:
        clash |= {"exclusiveMinimum", "exclusiveMaximum"} & set(prop)
    if not clash:
        prop.update(bound)
    elif isinstance(prop.get("allOf", []), list):
        prop["allOf"] = [*prop.get("allOf", []), bound]


def bound_message(message: str, value: Any) -> str | None:
    """A plain message for a value refused by a store bound, in place of the schema's."""
    if _OUTSIDE_DATES["not"]["pattern"] in message or _OUTSIDE_TIMES["not"]["pattern"] in message:
        return (f"{orjson.dumps(value).decode()} is outside the years 1-9999 (in UTC), "
                "which the stores keep")
    if value is None and message == _NOT_NULL_MESSAGE:
        return "must not be null: it identifies the item"
    return None


def accepts_null(prop: dict) -> bool:
    """Whether a property's schema may allow null (without a type, unless an enum rules it
    out): a required field that does is stored as NULL when null, not refused."""
    kinds = prop.get("type")
    if kinds is None:
        return "enum" not in prop or None in prop["enum"]
    return kinds == "null" or (isinstance(kinds, list) and "null" in kinds)


def _within_int64(prop: dict) -> bool:
    """Whether the property's own bounds already keep it to 64 bits (the bound costs the
    validator about 0.02 us per value)."""
    low, high = prop.get("minimum"), prop.get("maximum")
    return (isinstance(low, int | float) and isinstance(high, int | float)
            and low >= INT64_MIN and high <= INT64_MAX)


def nul_path(value: Any, path: str = "$") -> str | None:
    """The JSONPath of the first string (or the object with a key) in ``value`` that holds
    the NUL character, or None. PostgreSQL keeps no NUL in text or jsonb, so such an event
    would fail its batch's write for ever; it is refused wherever it enters, whatever the
    store, so that an event's fate never depends on the store.

    Depth first with a stack of its own: JSON nests up to 1024 levels as orjson reads it,
    beyond Python's recursion limit."""
    pending = [iter(((path, value),))]
    while pending:
        for where, item in pending[-1]:
            if isinstance(item, str):
                if "\x00" in item:
                    return where
            elif isinstance(item, dict | list):
                pending.append(_entries(item, where))
                break
        else:
            pending.pop()
    return None


def _entries(value: dict | list, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of each member of an object or array, in order; for an object's key
    holding NUL, the object's own path with a NUL string, which nul_path then reports."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                yield path, "\x00"
                return
            yield f"{path}.{key}", item
    else:
        for i, item in enumerate(value):
            yield f"{path}[{i}]", item


NUL_MESSAGE = "contains the NUL character (\\u0000), which the stores cannot keep"


def may_hold_nul(data: bytes) -> bool:
    """Whether JSON text may hold NUL: JSON writes it only as the escape \\u0000. Most
    bodies hold no backslash at all, which one memchr tells (0.4 us for 10 KB, where the
    search for the escape itself takes 5 us)."""
    return b"\\" in data and b"\\u0000" in data
