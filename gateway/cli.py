"""The ``sluice`` command: serve the gateway, create ingest keys, create entry topics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import orjson
import yaml

from gateway.config import ConfigError, Settings, load_checked_catalogue, markdown_table
from schemas import logs
from schemas.catalogue import (
    Catalogue,
    CatalogueError,
    definition_files,
    load_catalogue,
    read_definition,
)
from schemas.dataset import Limits
from schemas.keys import IngestKey, hash_key, key_id_problem, new_key
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
    load_checked_catalogue(settings)  # fail fast, before the processes start
    return serve(settings)


class Refused(Exception):
    """A command that would break something: its message is printed, nothing is written,
    and the exit code is 2."""


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id = args.id or (args.dataset.replace("_", "-") + "-key" if args.dataset else "admin")
    problem = key_id_problem(key_id)
    if problem:
        raise Refused(f"{problem}; nothing written")
    if args.admin:
        key = new_key(key_id)
        print(f"admin key (shown once, store it now): {key}", file=sys.stderr)
        print(f"SLUICE_ADMIN_KEYS={key_id}:{hash_key(key)}")
        return 0
    if not args.dataset:
        raise SystemExit("--dataset is required unless --admin is given")
    settings = _settings(args)
    catalogue = load_catalogue(settings.catalogue_dir, settings.limits, settings.admin_keys)
    if catalogue.get(args.dataset) is None:
        raise Refused(f"no dataset {args.dataset!r} in {settings.catalogue_dir}")
    if any(k.key_id == key_id for k in settings.admin_keys):
        raise Refused(f"key id {key_id!r} is an admin key (SLUICE_ADMIN_KEYS), which may write "
                      "every dataset already; nothing written")
    # A key id names one key: a second secret for it would stop the catalogue from loading.
    granted = catalogue.datasets_of(key_id)
    if granted is not None and args.dataset in granted:
        raise Refused(f"key id {key_id!r} may write dataset {args.dataset!r} already; nothing "
                      "written (to replace its secret, remove its entries from the definition "
                      "files and create it again)")
    if granted is not None:
        return _grant(args, settings, key_id, _stored_hash(catalogue, key_id), granted)
    key = new_key(key_id)
    entry = {"id": key_id, "sha256": hash_key(key)}
    if args.write:
        _append_key(settings.catalogue_dir, args.dataset, entry, settings.limits,
                    settings.admin_keys)
        print(f"added key {key_id!r} to dataset {args.dataset!r}", file=sys.stderr)
    else:
        print(f"paste under ingest_keys: in {args.dataset}'s definition file:", file=sys.stderr)
        print(f"  - {{id: {key_id}, sha256: {entry['sha256']}}}", file=sys.stderr)
    print("ingest key (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def _grant(args: argparse.Namespace, settings: Settings, key_id: str, digest: str,
           granted: frozenset[str]) -> int:
    """Let an existing key write one more dataset, with the secret it has."""
    already = ", ".join(sorted(granted))
    if args.write:
        _append_key(settings.catalogue_dir, args.dataset, {"id": key_id, "sha256": digest},
                    settings.limits, settings.admin_keys)
        print(f"granted the existing key {key_id!r} (datasets {already}) dataset "
              f"{args.dataset!r} too; its secret is unchanged, no new key was created")
    else:
        print(f"paste under ingest_keys: in {args.dataset}'s definition file:", file=sys.stderr)
        print(f"  - {{id: {key_id}, sha256: {digest}}}", file=sys.stderr)
        print(f"key {key_id!r} exists (datasets {already}): no new key was created; the line "
              f"above grants it dataset {args.dataset!r} with its secret unchanged")
    return 0


def _stored_hash(catalogue: Catalogue, key_id: str) -> str:
    return next(k.sha256 for d in catalogue for k in d.ingest_keys if k.key_id == key_id)


def _append_key(directory: Path, dataset_id: str, entry: dict, limits: Limits | None = None,
                admin_keys: tuple[IngestKey, ...] = ()) -> None:
    """Add ``entry`` to the ingest keys in ``dataset_id``'s definition file (in place of an
    entry with its id there), once the whole catalogue with that change loads (else
    Refused, and nothing is written): a key id with two hashes, say, would stop the next
    gateway and workers from starting."""
    for path in definition_files(directory):
        raw = read_definition(path)
        if isinstance(raw, dict) and raw.get("id") == dataset_id:
            keys = [k for k in raw.get("ingest_keys") or [] if k.get("id") != entry["id"]]
            raw["ingest_keys"] = [*keys, entry]
            text = (orjson.dumps(raw, option=orjson.OPT_INDENT_2) if path.suffix == ".json"
                    else yaml.safe_dump(raw, sort_keys=False).encode())
            _check_catalogue(directory, path, text, limits or Limits(), admin_keys)
            path.write_bytes(text)
            return
    raise Refused(f"no dataset {dataset_id!r} in {directory}")


def _check_catalogue(directory: Path, changed: Path, text: bytes, limits: Limits,
                     admin_keys: tuple[IngestKey, ...]) -> None:
    """Load a copy of the catalogue with ``changed`` holding ``text``, as start-up will."""
    with tempfile.TemporaryDirectory() as scratch:
        for path in definition_files(directory):
            (Path(scratch) / path.name).write_bytes(text if path == changed
                                                    else path.read_bytes())
        try:
            load_catalogue(Path(scratch), limits, admin_keys)
        except CatalogueError as exc:
            reason = str(exc).replace(scratch, str(directory))
            raise Refused(f"nothing written: with this key the catalogue would not load: "
                          f"{reason}") from None


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
    catalogue = load_checked_catalogue(settings)  # as the gateway loads it, at start or reload
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
    except (ConfigError, CatalogueError, Refused) as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
