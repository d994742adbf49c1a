"""The dataset catalogue: definition files loaded from a directory, with the key index."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import orjson
import yaml

from schemas.dataset import Dataset, DatasetError, Limits, parse_dataset
from schemas.keys import IngestKey, key_id_of, matches, redact

DEFINITION_SUFFIXES = (".json", ".yaml", ".yml")
Stamp = tuple[tuple[str, int, int, bytes], ...]


class CatalogueError(ValueError):
    """A catalogue that cannot be loaded: names the file and the reason."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key id (the connector) and the datasets it may write."""

    key_id: str
    datasets: frozenset[str]
    admin: bool = False

    def may_write(self, dataset_id: str) -> bool:
        return self.admin or dataset_id in self.datasets


class Catalogue:
    """Datasets by id plus an index of ingest keys by key id."""

    def __init__(self, datasets: list[Dataset], admin_keys: tuple[IngestKey, ...] = ()):
        self._datasets = {d.id: d for d in datasets}
        self._keys: dict[str, tuple[str, frozenset[str], bool]] = {}
        for dataset in datasets:
            for key in dataset.ingest_keys:
                self._add_key(key, dataset.id, admin=False)
        for key in admin_keys:
            self._add_key(key, None, admin=True)

    def _add_key(self, key: IngestKey, dataset_id: str | None, admin: bool) -> None:
        known = self._keys.get(key.key_id)
        if known is not None and known[0] != key.sha256:
            raise CatalogueError(
                f"ingest key id {key.key_id!r} is declared with two different hashes; "
                "a key id names one connector"
            )
        datasets = known[1] if known else frozenset()
        if dataset_id is not None:
            datasets = datasets | {dataset_id}
        self._keys[key.key_id] = (key.sha256, datasets, admin or bool(known and known[2]))

    def __iter__(self) -> Iterator[Dataset]:
        return iter(self._datasets.values())

    def __len__(self) -> int:
        return len(self._datasets)

    def get(self, dataset_id: str) -> Dataset | None:
        return self._datasets.get(dataset_id)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal for a presented key, or None; the digest check is constant-time."""
        key_id = key_id_of(presented)
        entry = self._keys.get(key_id) if key_id else None
        if entry is None or not matches(presented, entry[0]):
            return None
        return Principal(key_id, entry[1], entry[2])

    def datasets_of(self, key_id: str) -> frozenset[str] | None:
        """Datasets a connector (key id) may write, or None for an unknown connector."""
        entry = self._keys.get(key_id)
        return None if entry is None else entry[1]

    @property
    def max_request_bytes(self) -> int:
        return max((d.max_request_bytes for d in self), default=1024 * 1024)

    def changes_from(self, old: Catalogue) -> list[str]:
        """What differs from ``old``, by dataset id and key id (never a hash), for a log line:
        e.g. ``["datasets added: a", "keys removed: pos"]``; empty when nothing does."""
        datasets = ({d.id: _definition(d) for d in old}, {d.id: _definition(d) for d in self})
        found = []
        for kind, (before, after) in (("datasets", datasets), ("keys", (old._keys, self._keys))):
            changed = {i for i in after.keys() & before.keys() if after[i] != before[i]}
            for change, ids in (("added", after.keys() - before.keys()),
                                ("removed", before.keys() - after.keys()), ("changed", changed)):
                if ids:
                    found.append(f"{kind} {change}: {', '.join(sorted(ids))}")
        return found


def _definition(dataset: Dataset) -> tuple:
    """A dataset's definition without its compiled validators (which compare by identity)."""
    return tuple(getattr(dataset, f.name) for f in fields(dataset)
                 if not f.name.startswith("validate_"))


def definition_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in DEFINITION_SUFFIXES)


def catalogue_stamp(directory: Path) -> Stamp:
    """What changes when a definition file is added, removed or rewritten: each one's name,
    modification time, size and a digest of its bytes. Gateway and workers compare it with
    the stamp of the catalogue they loaded (taken before loading it) and reload when it
    differs. Time and size alone miss an edit that keeps both: a key's hash replaced by
    another (the same size) within the file system's timestamp granularity of the previous
    write, or by a tool that keeps the modification time (cp -p, rsync -t, tar); the revoked
    key would go on working. The files are small: reading them every few seconds is cheap."""
    return tuple((p.name, st.st_mtime_ns, st.st_size, hashlib.blake2b(p.read_bytes()).digest())
                 for p in definition_files(directory) for st in (p.stat(),))


def read_definition(path: Path) -> object:
    text = path.read_bytes()
    return orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def load_catalogue(
    directory: Path, limits: Limits, admin_keys: tuple[IngestKey, ...] = ()
) -> Catalogue:
    """Load every definition file in ``directory``; any bad file stops with its name and why."""
    if not directory.is_dir():
        raise CatalogueError(f"{directory}: catalogue directory does not exist")
    datasets: dict[str, tuple[Dataset, Path]] = {}
    topics: dict[str, str] = {}
    for path in definition_files(directory):
        try:
            dataset = parse_dataset(read_definition(path), limits)
        except (DatasetError, orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise CatalogueError(redact(f"{path}: {_reason(exc)}")) from exc
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            # a field of the wrong shape that a check further in trips over (a file cut
            # short while being written: `required:` or `properties:` holding null)
            raise CatalogueError(redact(f"{path}: malformed definition: {exc}")) from exc
        if dataset.id in datasets:
            raise CatalogueError(f"{path}: dataset id {dataset.id!r} already defined in "
                                 f"{datasets[dataset.id][1]}")
        if dataset.entry_topic in topics:
            raise CatalogueError(f"{path}: entry topic {dataset.entry_topic!r} already used by "
                                 f"dataset {topics[dataset.entry_topic]!r}")
        datasets[dataset.id] = (dataset, path)
        topics[dataset.entry_topic] = dataset.id
    if not datasets:
        raise CatalogueError(f"{directory}: no dataset definitions (*.json, *.yaml)")
    try:
        return Catalogue([d for d, _ in datasets.values()], admin_keys)
    except CatalogueError as exc:
        raise CatalogueError(f"{directory}: {exc}") from exc


def _reason(exc: Exception) -> str:
    """Why a file did not load. A YAML error is told by its line and column, without the
    lines of the file PyYAML quotes (a key pasted there by mistake would be logged)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f"{exc.context}: " if exc.context else ""
        return f"{context}{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(exc)
