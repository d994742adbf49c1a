"""Validating items against a dataset's compiled schema, reporting every invalid item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastjsonschema import JsonSchemaValueException

from schemas.dataset import Dataset


@dataclass(frozen=True, slots=True)
class ItemError:
    index: int
    path: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "message": self.message}


@dataclass(frozen=True, slots=True)
class Verdict:
    """Which items passed; ``errors`` holds at most ``cap`` entries, ``invalid`` counts all."""

    valid: Sequence[Any]
    invalid: int
    errors: list[ItemError]


def validate(dataset: Dataset, items: Sequence[Any], cap: int) -> Verdict:
    """Check every item; the common all-valid case costs one compiled call for the array."""
    try:
        dataset.validate_array(items)
        return Verdict(items, 0, [])
    except JsonSchemaValueException:
        pass  # find out which items failed, one by one
    valid: list[Any] = []
    errors: list[ItemError] = []
    invalid = 0
    for index, item in enumerate(items):
        try:
            dataset.validate_item(item)
        except JsonSchemaValueException as exc:
            invalid += 1
            if len(errors) < cap:
                errors.append(ItemError(index, json_path(exc.path), _message(exc)))
        else:
            valid.append(item)
    return Verdict(valid, invalid, errors)


def json_path(path: Sequence[Any]) -> str:
    """fastjsonschema's ['data', 'a', 0] as the JSONPath '$.a[0]'."""
    out = ["$"]
    for part in path[1:]:
        out.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(out)


def _message(exc: JsonSchemaValueException) -> str:
    # fastjsonschema words messages as "data.field must be ..."; the path is reported apart.
    name = exc.name or "data"
    message = exc.message
    return message[len(name) + 1 :] if message.startswith(name + " ") else message
