"""The ``sluice-worker`` command: run consumer processes, show stored rows, print settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

from schemas import logs
from schemas.catalogue import CatalogueError, load_catalogue
from schemas.envconfig import ConfigError
from schemas.metrics_export import prepare_multiprocess, registry
from schemas.runtime import CONFIG_EXIT, supervise
from workers.config import WorkerSettings, markdown_table
from workers.sinks import StorageSchemaError


def _settings(args: argparse.Namespace) -> WorkerSettings:
    overrides = {}
    if getattr(args, "processes", None):
        overrides["processes"] = args.processes
    if getattr(args, "catalogue", None):
        overrides["catalogue_dir"] = Path(args.catalogue)
    return WorkerSettings.from_env(**overrides)


def _run_one(settings: WorkerSettings) -> None:
    from workers.consumer import run_worker

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_worker(settings))
    except (StorageSchemaError, CatalogueError) as exc:
        logging.getLogger("workers").error("stopping: %s", exc)
        sys.exit(CONFIG_EXIT)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.log_level, settings.log_format)
    load_catalogue(settings.catalogue_dir, settings.limits)  # fail fast, before forking
    prepare_multiprocess("worker", settings.processes)  # before prometheus_client's import
    if settings.metrics_port:
        _serve_metrics(settings.metrics_port)  # in the parent: it sums every process
    if settings.processes == 1:
        _run_one(settings)
        return 0
    return supervise(lambda: _run_one(settings), settings.processes, "worker")


def _serve_metrics(port: int) -> None:
    """GET /metrics on ``port`` (from the supervisor when there are several processes)."""
    from prometheus_client import start_http_server

    import schemas.metrics  # noqa: F401 - registers the worker metrics in this process

    start_http_server(port, registry=registry("worker"))


def cmd_rows(args: argparse.Namespace) -> int:
    """Print the newest stored rows of a dataset (what `make run` suggests after the curl)."""
    from workers.sinks.sqlite import path_of

    settings = _settings(args)
    query = (f'SELECT * FROM "{args.dataset}" ORDER BY _received_at DESC, _offset DESC '
             f"LIMIT {int(args.limit)}")
    if settings.storage_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(path_of(settings.storage_url))
        cursor = conn.execute(query)
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    else:
        import asyncpg

        async def fetch():
            conn = await asyncpg.connect(settings.storage_url)
            try:
                return await conn.fetch(query)
            finally:
                await conn.close()

        records = asyncio.run(fetch())
        names = list(records[0].keys()) if records else []
        rows = [tuple(r) for r in records]
    for row in rows:
        print({n: v for n, v in zip(names, row, strict=True) if v is not None})
    if not rows:
        print(f"no rows in {args.dataset} yet")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sluice-worker", description=__doc__)
    sub = top.add_subparsers(dest="command")
    run = sub.add_parser("run", help="consume the entry topics (the default)")
    run.add_argument("--processes", type=int, help="overrides WORKER_PROCESSES")
    run.add_argument("--catalogue", help="overrides SLUICE_CATALOGUE_DIR")
    run.set_defaults(func=cmd_run)
    rows = sub.add_parser("rows", help="show the newest stored rows of a dataset")
    rows.add_argument("dataset")
    rows.add_argument("--limit", type=int, default=10)
    rows.set_defaults(func=cmd_rows)
    sub.add_parser("config", help="print the settings table").set_defaults(
        func=lambda _: print(markdown_table()) or 0)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["run", *(argv or sys.argv[1:])])
    try:
        return args.func(args)
    except (ConfigError, CatalogueError) as exc:
        print(f"sluice-worker: {exc}", file=sys.stderr)
        return CONFIG_EXIT


if __name__ == "__main__":
    sys.exit(main())
