"""Serving: uvloop, N processes sharing one port (SO_REUSEPORT), graceful shutdown.

The parent process only supervises: it forks the workers, forwards SIGTERM/SIGINT, and
replaces a worker that died unexpectedly. Each worker finishes its in-flight requests and
flushes its Kafka producer before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time

import uvloop
from aiohttp import web

from gateway.app import SERVER_KWARGS, create_app
from gateway.config import Settings
from schemas.catalogue import Catalogue

log = logging.getLogger(__name__)

_RESTART_BACKOFF_S = 1.0


async def serve_one(settings: Settings, catalogue: Catalogue | None = None) -> None:
    """Run one gateway process until SIGTERM or SIGINT."""
    app = create_app(settings, catalogue)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, **SERVER_KWARGS)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=1024)
    await site.start()
    log.info("gateway process %d listening on %s:%d", os.getpid(), settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway process %d stopping: finishing in-flight requests", os.getpid())
    await runner.cleanup()  # stops accepting, waits for handlers, then closes the producer


def run_process(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_one(settings))


def serve(settings: Settings) -> None:
    """Serve with ``settings.processes`` processes; returns when all have stopped."""
    if settings.processes == 1:
        run_process(settings)
        return
    ctx = multiprocessing.get_context("fork")
    stopping = False
    children: list[multiprocessing.Process] = []

    def spawn() -> multiprocessing.Process:
        child = ctx.Process(target=run_process, args=(settings,), daemon=False)
        child.start()
        return child

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    children.extend(spawn() for _ in range(settings.processes))
    while not stopping:
        time.sleep(0.2)
        for i, child in enumerate(children):
            if not child.is_alive() and not stopping:
                log.error("gateway process %s exited with %s; replacing it",
                          child.pid, child.exitcode)
                time.sleep(_RESTART_BACKOFF_S)
                children[i] = spawn()
    for child in children:
        child.join()
