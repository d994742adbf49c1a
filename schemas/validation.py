"""Validating items against a dataset's compiled schema, reporting every invalid item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schemas.columns import NUL_MESSAGE, bound_message, may_hold_nul, nul_path
from schemas.dataset import Dataset

MAX_MESSAGE = 300  # characters of one error message (they quote the offending value)
TOO_DEEP_MESSAGE = "the item does not match the schema, nested too deeply to say where"


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


def validate(dataset: Dataset, items: Sequence[Any], cap: int, body: bytes) -> Verdict:
    """Check every item; the common all-valid case costs one compiled call for the array.

    ``body`` is what the items were parsed from: when it holds the escape of NUL, which no
    store keeps, the items holding one are invalid too. An invalid item is reported with its
    first error (where, and what is wrong).
    """
    nul = may_hold_nul(body)
    if not nul and dataset.validate_array.is_valid(items):
        return Verdict(items, 0, [])
    valid: list[Any] = []
    errors: list[ItemError] = []
    invalid = 0
    check = dataset.validate_item
    for index, item in enumerate(items):
        schema_valid = check.is_valid(item)
        where = nul_path(item) if nul and schema_valid else None
        if schema_valid and where is None:
            valid.append(item)
            continue
        invalid += 1
        if len(errors) < cap:
            if where is not None:
                errors.append(ItemError(index, where, NUL_MESSAGE))
            else:
                errors.append(_first_error(check, index, item))
    return Verdict(valid, invalid, errors)


def _first_error(check: Any, index: int, item: Any) -> ItemError:
    try:
        error = next(check.iter_errors(item))
    except ValueError:  # jsonschema-rs cannot describe an item nested this deep
        return ItemError(index, "$", TOO_DEEP_MESSAGE)
    return ItemError(index, json_path(error.instance_path), _message(error))


def json_path(path: Sequence[Any]) -> str:
    """An instance path such as ['a', 0] as the JSONPath '$.a[0]'."""
    out = ["$"]
    for part in path:
        out.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(out)


def _message(error: Any) -> str:
    message = bound_message(error.message, error.instance) or error.message
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
