"""A valid example item generated from a dataset's JSON Schema (Fynapse's sample request)."""

from __future__ import annotations

import math
import re
from typing import Any

from schemas.columns import properties

_FORMATS = {
    "date-time": "2026-01-15T10:30:00Z",
    "date": "2026-01-15",
    "time": "10:30:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
}
_PATTERN_CANDIDATES = ("example", "EUR", "ABC", "A1", "1", "123456", "abc-123", "x")
_MAX_DEPTH = 6


class SampleError(ValueError):
    """The schema asks for something this generator cannot produce."""


def sample_request(dataset_id: str, schema: dict, item_key: str | None, path: str) -> dict:
    """A complete example request for the push route of ``dataset_id``."""
    request: dict[str, Any] = {
        "method": "POST",
        "path": path,
        "headers": {
            "Authorization": "Bearer <your ingest key>",
            "Content-Type": "application/json",
            "Idempotency-Key": "<unique key per logical request>",
        },
        "body": [sample_item(schema)],
    }
    if item_key:
        request["note"] = (f"'{item_key}' identifies an item of dataset '{dataset_id}': "
                           "a later write of the same item replaces the earlier one")
    return request


def sample_item(schema: dict) -> Any:
    return _Generator(schema).value(schema, 0)


class _Generator:
    def __init__(self, root: dict):
        self.root = root

    def resolve(self, schema: dict) -> dict:
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        if not ref.startswith("#/"):
            raise SampleError(f"cannot follow non-local $ref {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        merged = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        return self.resolve(merged)

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or schema == {}:
            return "example"
        schema = self.resolve(schema)
        for key in ("const",):
            if key in schema:
                return schema[key]
        if schema.get("examples"):
            return schema["examples"][0]
        if "default" in schema:
            return schema["default"]
        if schema.get("enum"):
            return schema["enum"][0]
        if "allOf" in schema:
            return self.value(_merge(schema), depth)
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                base = {k: v for k, v in schema.items() if k != combinator}
                return self.value({**base, **self.resolve(schema[combinator][0])}, depth)
        kind = _type_of(schema)
        return getattr(self, f"_{kind}")(schema, depth)

    def _object(self, schema: dict, depth: int) -> dict:
        required = set(schema.get("required", ()))
        out = {}
        for name, prop in properties(schema):
            if depth < _MAX_DEPTH or name in required:
                out[name] = self.value(prop, depth + 1)
        for name in required - out.keys():
            if schema.get("properties", {}).get(name) is False:
                raise SampleError(f"field {name!r} is required but its schema is false")
            out[name] = "example"
        return out

    def _array(self, schema: dict, depth: int) -> list:
        count = max(1, schema.get("minItems", 1)) if depth < _MAX_DEPTH else schema.get(
            "minItems", 0)
        items = schema.get("items", {})
        if isinstance(items, list):  # tuple form
            return [self.value(s, depth + 1) for s in items]
        first = self.value(items, depth + 1)
        if schema.get("uniqueItems") and count > 1:
            return [first] + [self._variant(items, i, depth) for i in range(1, count)]
        return [first] * count

    def _variant(self, items: dict, i: int, depth: int) -> Any:
        kind = _type_of(self.resolve(items))
        if kind in ("integer", "number"):
            return self.value(items, depth + 1) + i * (items.get("multipleOf", 1))
        if kind == "string":
            return f"{self.value(items, depth + 1)}{i}"
        raise SampleError("cannot generate distinct items for uniqueItems")

    def _string(self, schema: dict, depth: int) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength", 1 << 30)
        if "format" in schema and schema["format"] in _FORMATS:
            return _FORMATS[schema["format"]]
        pattern = schema.get("pattern")
        candidates = _PATTERN_CANDIDATES if pattern else ("example",)
        for candidate in candidates:
            text = _fit(candidate, low, high)
            if pattern is None or re.search(pattern, text):
                return text
        generated = _from_pattern(pattern)
        if generated is not None and low <= len(generated) <= high:
            return generated
        raise SampleError(f"cannot generate a value for pattern {pattern!r}")

    def _integer(self, schema: dict, depth: int) -> int:
        return int(self._number({**schema, "multipleOf": schema.get("multipleOf", 1)}, depth))

    def _number(self, schema: dict, depth: int) -> float | int:
        low = schema.get("minimum", -math.inf)
        high = schema.get("maximum", math.inf)
        xlow = schema.get("exclusiveMinimum", -math.inf)
        xhigh = schema.get("exclusiveMaximum", math.inf)
        step = schema.get("multipleOf")
        for candidate in (1, 100, 0, low, xlow + (step or 1), high, xhigh - (step or 1)):
            if not math.isfinite(candidate):
                continue
            if step:
                candidate = math.ceil(candidate / step) * step
            if low <= candidate <= high and xlow < candidate < xhigh:
                return candidate
        if step:
            start = max(low, xlow) if math.isfinite(max(low, xlow)) else 0
            value = (math.floor(start / step) + 1) * step
            if value <= high and value < xhigh:
                return value
        if math.isfinite(max(low, xlow)) and math.isfinite(min(high, xhigh)):
            return (max(low, xlow) + min(high, xhigh)) / 2
        raise SampleError("cannot find a number within the bounds")

    def _boolean(self, schema: dict, depth: int) -> bool:
        return True

    def _null(self, schema: dict, depth: int) -> None:
        return None


def _type_of(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    return kind


def _merge(schema: dict) -> dict:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _fit(text: str, low: int, high: int) -> str:
    text = text[:high]
    return text + "x" * (low - len(text)) if len(text) < low else text


_TOKEN = re.compile(r"\\d|\\w|\[([^\]]+)\]|\\(.)|([^\\\[\]{}()*+?^$|.])|\.")
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}|\+|\*|\?")


def _from_pattern(pattern: str) -> str | None:
    """Generate text for simple anchored patterns: literals, classes, \\d, \\w, {n,m}, +, ?, *."""
    body = pattern.removeprefix("^").removesuffix("$")
    out, pos = [], 0
    while pos < len(body):
        token = _TOKEN.match(body, pos)
        if token is None:
            return None
        char = _char_for(token)
        pos = token.end()
        repeat = _REPEAT.match(body, pos)
        count = 1
        if repeat:
            pos = repeat.end()
            if repeat.group(1):
                count = int(repeat.group(1))
            elif repeat.group(0) in ("*", "?"):
                count = 0
        out.append(char * count)
    text = "".join(out)
    return text if re.search(pattern, text) else None


def _char_for(token: re.Match) -> str:
    text = token.group(0)
    if text == r"\d":
        return "1"
    if text in (r"\w", "."):
        return "a"
    if token.group(1):  # a class like A-Z or 0-9a-f: its first character
        return token.group(1).lstrip("^")[0]
    return token.group(2) or token.group(3)
