"""Bench catalogues: the example `sales` dataset under other ids and topics, with a bench key."""

from __future__ import annotations

from pathlib import Path

import yaml

from schemas.keys import hash_key

ROOT = Path(__file__).resolve().parents[1]


def write_catalogue(directory: Path, key: str, datasets: dict[str, str], *,
                    item_key: bool = True) -> None:
    """The example `sales` dataset under each id -> topic, with a bench key and no real limit.

    Without ``item_key`` every event becomes a row (the append path), as for event streams.
    """
    example = yaml.safe_load((ROOT / "schemas/examples/sales.yaml").read_text())
    if not item_key:
        example.pop("item_key", None)
    directory.mkdir(parents=True, exist_ok=True)
    for dataset_id, topic in datasets.items():
        definition = {**example, "id": dataset_id, "entry_topic": topic,
                      # on, so the token bucket runs, but never the bottleneck
                      "rate_limit": {"requests_per_second": 1_000_000, "burst": 1_000_000},
                      "max_request_bytes": 2 * 1024 * 1024,
                      "max_decompressed_bytes": 16 * 1024 * 1024,
                      "ingest_keys": [{"id": "bench", "sha256": hash_key(key)}]}
        (directory / f"{dataset_id}.yaml").write_text(yaml.safe_dump(definition))
