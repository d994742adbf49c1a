"""Entity structure: a dataset's schema as typed columns, and items coerced into rows.

Shared by the workers (which shape rows) and anything that describes a dataset's table. Pure
computation, no I/O. Coercion is lenient where the meaning is unambiguous (``"12"`` for an
integer, ``"true"`` for a boolean, an ISO string or epoch for a date-time) and refuses the rest
with a ShapeError naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from schemas import jsontext
from schemas.columns import EXTRA_COLUMN, INT64_MAX, INT64_MIN, accepts_null, column_fields
from schemas.dataset import Dataset

_INT_RE = re.compile(r"^[+-]?\d+$")
_LEAP_SECOND_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:)60(\.\d+)?(.*)$")
_MISSING = object()


class ShapeError(ValueError):
    """An item that cannot become a row: ``path`` says which field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    path: tuple[str, ...]
    kind: str
    required: bool
    default: Any = _MISSING


class Structure:
    """The table plan of one dataset and the function from an item to a row."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.keep_unknown = dataset.unknown_fields == "keep"
        self.columns = _plan(dataset.schema, dataset.nested == "json", dataset.identifying)
        self._known_top = frozenset(dataset.schema.get("properties", {}))
        self.key_column = _column_of(dataset.item_key)
        self.event_column = _column_of(dataset.event_id)
        # per column: top-level name (or None for a nested path), path, coercion, required,
        # default; the top-level case skips the path walk
        self._coerce = [(c.path[0] if len(c.path) == 1 else None, c.path, self.coercion(c),
                         c.required, c.default) for c in self.columns]
        names = [n for n, _ in self.data_columns]
        self.data_names = tuple(names)
        self.key_index = names.index(self.key_column) if self.key_column else None
        self.row_values = compile_shaper(self)  # type: ignore[method-assign]

    def coercion(self, column: Column) -> Callable[[Any], Any]:
        """The function that makes a value of ``column`` the row's: its kind's, or for an
        item key of kind json, to_item_key (a batch keeps one row per key, as the store)."""
        if column.kind == "json" and column.name == self.key_column:
            return to_item_key
        return _COERCE[column.kind]

    @property
    def data_columns(self) -> list[tuple[str, str]]:
        """(name, kind) of every column that comes from the item, in table order."""
        out = [(c.name, c.kind) for c in self.columns]
        if self.keep_unknown:
            out.append((EXTRA_COLUMN, "json"))
        return out

    def shape(self, item: Any) -> dict[str, Any]:
        """The row for one item as {column: value}; raises ShapeError."""
        return dict(zip(self.data_names, self.row_values(item), strict=True))

    def row_values(self, item: Any) -> tuple:
        """The row for one item, values in ``data_names`` order; raises ShapeError.

        The workers' per-event hot path. Replaced in each instance by the same steps
        compiled for its columns (compile_shaper); this loop over the plan is their reference.
        """
        if not isinstance(item, dict):
            raise ShapeError("$", f"an item must be a JSON object, not {type(item).__name__}")
        values: list[Any] = []
        append = values.append
        for top, path, coerce, required, default in self._coerce:
            value = item.get(top, _MISSING) if top is not None else _get(item, path)
            if value is _MISSING or value is None:
                if default is not _MISSING:
                    value = default
                elif required:
                    raise ShapeError(_dotted(path), "is required")
                else:
                    append(None)
                    continue
            try:
                append(coerce(value))
            except (ValueError, TypeError, OverflowError) as exc:
                raise ShapeError(_dotted(path), str(exc)) from None
        if self.keep_unknown:
            if item.keys() <= self._known_top:
                append(None)
            else:
                append(unknown_json(item, self._known_top))
        return tuple(values)


# A value of this exact type that passes this test is its own coercion (the to_* functions
# return it unchanged): the compiled shaper skips the call. Timestamps, dates and json values
# (written as JSON text) always convert.
_IDENTITY = {
    "text": "type({v}) is str",
    "integer": f"type({{v}}) is int and {INT64_MIN} <= {{v}} <= {INT64_MAX}",
    "number": "type({v}) is float and {v} - {v} == 0.0",  # finite, as to_number requires
    "boolean": "type({v}) is bool",
}


def compile_shaper(structure: Structure) -> Callable[[Any], tuple]:
    """Structure.row_values with the loop over the columns unrolled, once per dataset: no
    per-column tuple, call or list append, and no coercion call for a value that already has
    its column's type (1.28 -> 0.55 us per event of the `sales` example).

    Only identifiers made here go into the source; field names, paths, defaults and the
    coercions are bound as arguments of the enclosing function, never written into the code.
    """
    bound: dict[str, Any] = {"MISSING": _MISSING, "ShapeError": ShapeError, "get_path": _get,
                             "ERRORS": (ValueError, TypeError, OverflowError),
                             "KNOWN": structure._known_top, "unknown_json": unknown_json}
    body = ["if not isinstance(item, dict):",
            "    raise ShapeError('$', 'an item must be a JSON object, not '"
            " + type(item).__name__)"]
    names = []
    for i, column in enumerate(structure.columns):
        v = f"v{i}"
        names.append(v)
        coerce = structure.coercion(column)
        bound.update({f"top{i}": column.path[0], f"path{i}": column.path,
                      f"where{i}": _dotted(column.path), f"coerce{i}": coerce,
                      f"default{i}": column.default})
        body.append(f"{v} = item.get(top{i}, MISSING)" if len(column.path) == 1
                    else f"{v} = get_path(item, path{i})")
        convert = _conversion(v, i, column.kind if coerce is _COERCE[column.kind] else None)
        body.append(f"if {v} is MISSING or {v} is None:")
        if column.default is not _MISSING:
            body += [f"    {v} = default{i}", *convert]
        elif column.required:
            body += [f"    raise ShapeError(where{i}, 'is required')", *convert]
        else:  # optional: absent or null stays None, without conversion
            body += [f"    {v} = None", *(["else:", *_indented(convert)] if convert else [])]
    if structure.keep_unknown:
        names.append("extra")
        body.append("extra = None if item.keys() <= KNOWN else unknown_json(item, KNOWN)")
    body.append(f"return ({', '.join(names)}{',' if len(names) == 1 else ''})")
    source = (f"def make({', '.join(bound)}):\n    def row_values(item):\n"
              + "".join(f"        {line}\n" for line in body) + "    return row_values\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<shaper of dataset {structure.dataset.id}>", "exec"), namespace)
    return namespace["make"](**bound)


def _conversion(v: str, i: int, kind: str | None) -> list[str]:
    """Source lines that coerce local ``v`` with column ``i``'s coercion, unless it already
    has the column's type (``kind``; None: a coercion of its own, always called)."""
    identity = _IDENTITY.get(kind) if kind is not None else None
    lines = ["try:", f"    {v} = coerce{i}({v})", "except ERRORS as exc:",
             f"    raise ShapeError(where{i}, str(exc)) from None"]
    if identity is None:
        return lines
    return [f"if not ({identity.format(v=v)}):", *_indented(lines)]


def _indented(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]


def _column_of(field: str | None) -> str | None:
    return field  # identifying fields are top-level properties: their column keeps the name


def _plan(schema: dict, nested_json: bool, identifying: tuple[str, ...]) -> list[Column]:
    """The columns of the item's fields (their names checked when the dataset was parsed).

    A column is required (absent or null refused) when its field is required and its schema
    does not allow null, and always when it identifies the item: a null key is no key.
    """
    return [Column("__".join(path), path, kind,
                   (len(path) == 1 and path[0] in identifying)
                   or (required and not accepts_null(prop)),
                   prop.get("default", _MISSING))
            for path, prop, kind, required in column_fields(schema, nested_json)]


def _get(item: dict, path: tuple[str, ...]) -> Any:
    value: Any = item
    for part in path:
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _dotted(path: tuple[str, ...]) -> str:
    return "$." + ".".join(path)


# Exact-type checks first: the common case costs one comparison (bool is an int subclass, so
# it never takes the int paths by accident).
_NUMBERS = (int, float)


def to_text(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _NUMBERS):
        return repr(value) if isinstance(value, float) else str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def to_integer(value: Any) -> int:
    if type(value) is int:
        number = value
    elif isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    elif (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
          or (isinstance(value, str) and _INT_RE.match(value.strip()))):
        number = int(value)
    else:
        raise ValueError(f"expected an integer, got {value!r}")
    # the stores' integers are 64-bit: a larger one would fail the whole batch's write, for
    # ever (JSON Schema's "integer" has no bound, and orjson reads up to 2**64 - 1 exactly)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{value!r} is outside the 64-bit integer range")
    return number


def to_number(value: Any) -> float:
    kind = type(value)
    if kind is float and value - value == 0.0:  # finite (inf - inf and nan are nan)
        return value
    if kind is int:
        return float(value)
    if isinstance(value, bool):
        raise TypeError("expected a number, got a boolean")
    if isinstance(value, _NUMBERS):
        number = float(value)
    elif isinstance(value, str):
        number = float(value.strip())
    else:
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def to_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ValueError(f"expected a boolean, got {value!r}")


def to_timestamp(value: Any) -> datetime:
    """ISO 8601 text (naive means UTC) or epoch seconds/milliseconds, as an aware UTC time."""
    if isinstance(value, str):  # text first: the common case
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            parsed = _rfc3339_rest(value.strip())
        if parsed.tzinfo is UTC:  # "...Z": already what we store
            return parsed
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    if isinstance(value, bool):
        raise TypeError("expected a date-time, got a boolean")
    if isinstance(value, _NUMBERS):
        seconds = value / 1000 if abs(value) >= 100_000_000_000 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except OSError:  # beyond the platform's time_t: not one of the ERRORS a shaper maps
            raise ValueError(f"{value!r} is outside the date-time range") from None
    raise TypeError(f"expected a date-time, got {type(value).__name__}")


def _rfc3339_rest(text: str) -> datetime:
    """What RFC 3339 (the schema's date-time format) allows and fromisoformat does not read:
    a lowercase ``t`` or ``z``, and a leap second, read as PostgreSQL reads it (the next
    second). Without this, a valid event would be dead-lettered."""
    text = text.upper()
    leap = _LEAP_SECOND_RE.match(text)
    if leap is None:
        return datetime.fromisoformat(text)
    return datetime.fromisoformat(f"{leap[1]}59{leap[2] or ''}{leap[3]}") + timedelta(seconds=1)


def to_date(value: Any) -> date:
    if isinstance(value, str) and len(value.strip()) == 10:
        return date.fromisoformat(value.strip())
    return to_timestamp(value).date()


def to_json(value: Any) -> str:
    """A json column's value as its JSON text, which both stores keep as it is (SQLite as
    text, PostgreSQL as jsonb): a string, number or boolean keeps its JSON type (``"1"``,
    ``1`` and ``true`` stay apart) and an integer up to 2**64 - 1 its digits. Any depth
    orjson reads (1,024 levels) is written back (``schemas.jsontext``)."""
    return jsontext.dumps(value).decode()


def unknown_json(item: dict, known: frozenset[str]) -> str:
    """The item's fields its schema does not name, as the JSON text of one object (the
    ``_extra`` column)."""
    return jsontext.dumps({k: v for k, v in item.items() if k not in known}).decode()


_KEY_NUMBERS = (INT64_MIN, 2**64 - 1)  # the integers orjson reads as int


def to_item_key(value: Any) -> str:
    """An item key whose field may hold any JSON (an untyped or multi-type field), as its
    JSON text (to_json): a string, number or boolean, an integral number as the integer
    (``1.0`` is ``1``, as PostgreSQL's jsonb compares them). A batch keeps one row per key's
    text, so that text must be one both stores take for the same item: an object or array
    (whose keys' order and numbers' forms jsonb does not compare as text) is refused."""
    kind = type(value)
    if kind is float:
        if value.is_integer() and _KEY_NUMBERS[0] <= value <= _KEY_NUMBERS[1]:
            value = int(value)
    elif kind is dict or kind is list:
        raise TypeError("an item key must be a string, a number or a boolean, not "
                        + ("an object" if kind is dict else "an array"))
    return to_json(value)


_COERCE: dict[str, Callable[[Any], Any]] = {
    "text": to_text,
    "integer": to_integer,
    "number": to_number,
    "boolean": to_boolean,
    "timestamp": to_timestamp,
    "date": to_date,
    "json": to_json,
}
