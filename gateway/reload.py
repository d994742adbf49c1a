"""Catalogue reloads in a gateway process: the definition files checked every
SLUICE_CATALOGUE_RELOAD_S, and read again at once on SIGHUP.

A reload builds and checks the whole new catalogue first (config.load_checked_catalogue, as
start-up does), in a thread: pure-Python YAML takes a few ms per file (7 ms for an example
dataset), and the event loop serves meanwhile. Only a catalogue that passes replaces the one
serving, in one assignment to ``State.catalogue`` on the event loop, so no request sees half
of it; a request in flight keeps the Dataset and Principal it took (its key was valid when
it came). A catalogue that fails to load leaves the last good one serving: one ERROR line
per bad version of the files (its file and reason, never a key), and
``sluice_gateway_catalogue_reload_failed`` at 1 until a version loads. The process stays
ready: it serves what it served before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config import ConfigError, Settings, load_checked_catalogue
from gateway.state import STATE, State
from schemas import metrics
from schemas.catalogue import CatalogueError, Stamp, catalogue_stamp
from schemas.periodic import Periodic

log = logging.getLogger(__name__)


class CatalogueReloads:
    def __init__(self, settings: Settings, stamp: Stamp):
        self._settings = settings
        self._stamp: Stamp | tuple[str] = stamp  # of the files the serving catalogue came from
        self._failed: Stamp | tuple[str] | None = None  # of files that failed: not tried again
        self._forced = False  # a SIGHUP came: reload whatever the files look like
        self._checks: Periodic | None = None  # from start-up to shutdown

    def hangup(self) -> None:
        """SIGHUP: reload now (before the process has started: as soon as it has)."""
        self._forced = True
        if self._checks is not None:
            self._checks.wake()

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context (after the one that creates STATE): reload while the app runs."""
        state = app[STATE]
        metrics.CATALOGUE_RELOAD_FAILED.set(0)
        metrics.CATALOGUE_LOADED.set(time.time())
        self._checks = Periodic(
            lambda: self.reload(state),
            self._settings.catalogue_reload_s or None,
            at_start=self._forced,
            name="catalogue reload",
        )
        self._checks.start()
        yield
        await self._checks.stop()
        self._checks = None

    async def reload(self, state: State) -> None:
        """Load the catalogue again if its files changed (always after a SIGHUP) and serve
        it if it loads, else keep the one serving."""
        forced, self._forced = self._forced, False
        directory = self._settings.catalogue_dir
        try:  # taken before the files are read: a change made while they are is seen next time
            stamp: Stamp | tuple[str] = catalogue_stamp(directory)
        except OSError as exc:  # the directory is gone: reported once, like a file that fails
            stamp = (f"unreadable: {exc}",)
        if not forced and stamp in (self._stamp, self._failed):
            return
        try:
            catalogue = await asyncio.to_thread(load_checked_catalogue, self._settings)
        except (CatalogueError, ConfigError, OSError) as exc:
            self._failed = stamp
            state.reload_failed = True
            metrics.CATALOGUE_RELOADS.labels("failed").inc()
            metrics.CATALOGUE_RELOAD_FAILED.set(1)
            # names the file (or the dataset, or the variable), never a key (catalogue.py)
            log.error("catalogue reload failed, still serving the previous catalogue: %s", exc)
            return
        previous, state.catalogue = state.catalogue, catalogue  # the swap
        self._stamp, self._failed = stamp, None
        state.reload_failed = False
        metrics.CATALOGUE_RELOADS.labels("loaded").inc()
        metrics.CATALOGUE_RELOAD_FAILED.set(0)
        metrics.CATALOGUE_LOADED.set(time.time())
        log.info(
            "catalogue reloaded from %s: %s",
            directory,
            "; ".join(catalogue.changes_from(previous)) or "no change",
        )


RELOADS = web.AppKey("catalogue_reloads", CatalogueReloads)


def setup(app: web.Application, settings: Settings, stamp: Stamp) -> None:
    """Reloads for ``app``, whose catalogue was loaded from the files as of ``stamp``."""
    reloads = app[RELOADS] = CatalogueReloads(settings, stamp)
    app.cleanup_ctx.append(reloads.running)
