"""The ``sluice`` command: serve the gateway, create ingest keys, create entry topics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import orjson
import yaml

from gateway.config import ConfigError, Settings, markdown_table
from schemas import logs
from schemas.catalogue import CatalogueError, definition_files, load_catalogue, read_definition
from schemas.keys import hash_key, new_key
from schemas.metrics_export import prepare_multiprocess
from schemas.records import dlq_topic


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "processes", None):
        overrides["processes"] = args.processes
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if getattr(args, "catalogue", None):
        overrides["catalogue_dir"] = Path(args.catalogue)
    return Settings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    prepare_multiprocess("gateway", settings.processes)  # before prometheus_client's import
    from gateway.server import serve  # uvloop, aiohttp and the metrics only when serving

    logs.configure(settings.log_level, settings.log_format)
    load_catalogue(settings.catalogue_dir, settings.limits, settings.admin_keys)  # fail fast
    return serve(settings)


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id = args.id or (args.dataset.replace("_", "-") + "-key" if args.dataset else "admin")
    key = new_key(key_id)
    digest = hash_key(key)
    if args.admin:
        print(f"admin key (shown once, store it now): {key}", file=sys.stderr)
        print(f"SLUICE_ADMIN_KEYS={key_id}:{digest}")
        return 0
    if not args.dataset:
        raise SystemExit("--dataset is required unless --admin is given")
    entry = {"id": key_id, "sha256": digest}
    if args.write:
        _append_key(_settings(args).catalogue_dir, args.dataset, entry)
        print(f"added key {key_id!r} to dataset {args.dataset!r}", file=sys.stderr)
    else:
        print(f"paste under ingest_keys: in {args.dataset}'s definition file:", file=sys.stderr)
        print(f"  - {{id: {key_id}, sha256: {digest}}}", file=sys.stderr)
    print("ingest key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def _append_key(directory: Path, dataset_id: str, entry: dict) -> None:
    for path in definition_files(directory):
        raw = read_definition(path)
        if isinstance(raw, dict) and raw.get("id") == dataset_id:
            keys = [k for k in raw.get("ingest_keys", []) if k.get("id") != entry["id"]]
            raw["ingest_keys"] = [*keys, entry]
            text = (orjson.dumps(raw, option=orjson.OPT_INDENT_2) if path.suffix == ".json"
                    else yaml.safe_dump(raw, sort_keys=False).encode())
            path.write_bytes(text)
            return
    raise SystemExit(f"no dataset {dataset_id!r} in {directory}")


def cmd_topics_create(args: argparse.Namespace) -> int:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    settings = _settings(args)
    catalogue = load_catalogue(settings.catalogue_dir, settings.limits, settings.admin_keys)

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            topics = [t for d in catalogue for t in (d.entry_topic, dlq_topic(d.entry_topic))]
            wanted = [t for t in topics if t not in existing]
            if wanted:
                # another gateway or auto-creation may create them meanwhile
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(t, args.partitions, args.replication)
                                               for t in wanted])
            for topic in topics:
                print(f"{topic}: {'created' if topic in wanted else 'exists'}")
        finally:
            await admin.close()

    asyncio.run(create())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    catalogue = load_catalogue(settings.catalogue_dir, settings.limits, settings.admin_keys)
    for dataset in catalogue:
        print(f"{dataset.id}: topic {dataset.entry_topic}, {len(dataset.ingest_keys)} key(s)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(markdown_table())
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--processes", type=int, help="overrides SLUICE_PROCESSES")
    serve.add_argument("--port", type=int, help="overrides SLUICE_PORT")
    serve.add_argument("--catalogue", help="overrides SLUICE_CATALOGUE_DIR")
    serve.set_defaults(func=cmd_serve)
    keys = sub.add_parser("keys", help="ingest keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--dataset", help="dataset the key may write")
    create.add_argument("--id", help="key id, also the connector name (default <dataset>-key)")
    create.add_argument("--admin", action="store_true", help="a key for every dataset")
    create.add_argument("--write", action="store_true",
                        help="add the key's hash to the dataset's file in the catalogue")
    create.add_argument("--catalogue", help="overrides SLUICE_CATALOGUE_DIR")
    create.set_defaults(func=cmd_keys_create)
    topics = sub.add_parser("topics", help="entry topics").add_subparsers(dest="t", required=True)
    tcreate = topics.add_parser("create", help="create missing entry and dead-letter topics")
    tcreate.add_argument("--partitions", type=int, default=3)
    tcreate.add_argument("--replication", type=int, default=1)
    tcreate.add_argument("--catalogue", help="overrides SLUICE_CATALOGUE_DIR")
    tcreate.set_defaults(func=cmd_topics_create)
    check = sub.add_parser("check", help="load and check the catalogue")
    check.add_argument("--catalogue", help="overrides SLUICE_CATALOGUE_DIR")
    check.set_defaults(func=cmd_check)
    sub.add_parser("config", help="print the settings table").set_defaults(func=cmd_config)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CatalogueError) as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
