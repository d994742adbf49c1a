"""Process supervision shared by the gateway and the workers: N forked children, restarted
if they die, stopped together on SIGTERM/SIGINT, and (``hangup``) sent on the SIGHUP the
supervisor gets. A child that exits with code 2 (a configuration or schema problem) stops the
whole group: restarting it cannot help."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable

from schemas.metrics_export import process_exited

log = logging.getLogger(__name__)

CONFIG_EXIT = 2
_RESTART_BACKOFF_S = 1.0
_HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # the supervisor's own handlers


def supervise(target: Callable[[], None], processes: int, name: str, *,
              hangup: bool = False) -> int:
    """Run ``target`` in ``processes`` forked children until SIGTERM/SIGINT; the exit code.
    With ``hangup``, a SIGHUP is passed on to every child (which ignores it until ``target``
    handles it)."""
    ctx = multiprocessing.get_context("fork")
    stopping = False
    exit_code = 0
    children: list[multiprocessing.Process] = []

    def spawn() -> multiprocessing.Process:
        # The signals stay blocked across the fork: until _child has set its own actions, the
        # child holds the supervisor's handlers, and one run there (a SIGHUP passed on to a
        # replacement just forked) killed it. Pending, they meet the child's own actions.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            child = ctx.Process(target=_child, args=(target, hangup), name=name)
            child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return child

    signalled: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None and child.pid not in signalled:
                signalled.add(child.pid)
                os.kill(child.pid, signal.SIGTERM)

    def pass_on(signum: int, _frame: object) -> None:
        alive = [c.pid for c in children if c.is_alive() and c.pid is not None]
        log.info("%s: SIGHUP passed on to processes %s", name, alive)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if hangup:
        signal.signal(signal.SIGHUP, pass_on)
    process_exited(os.getpid())  # this process serves nothing: its live gauges (0) must not count
    children.extend(spawn() for _ in range(processes))
    while not stopping:
        time.sleep(0.2)
        for i, child in enumerate(children):
            if child.is_alive() or stopping:
                continue
            process_exited(child.pid)
            if child.exitcode == CONFIG_EXIT:
                log.error("%s process %s stopped on a configuration error; stopping all",
                          name, child.pid)
                exit_code = CONFIG_EXIT
                forward(signal.SIGTERM, None)
                break
            log.error("%s process %s exited with %s; replacing it", name, child.pid,
                      child.exitcode)
            time.sleep(_RESTART_BACKOFF_S)
            if not stopping:  # a SIGTERM during the back-off: its replacement would never
                children[i] = spawn()  # hear it, and the join below would wait for ever
    forward(signal.SIGTERM, None)  # a child forked while the signal was being handled
    for child in children:
        child.join()
    return exit_code


def _child(target: Callable[[], None], hangup: bool) -> None:
    """A forked child runs ``target`` with the default SIGTERM and SIGINT actions, not the
    supervisor's forwarding handler (which it inherits with the fork): a signal that comes
    before the target installs its own handlers then ends the child instead of being lost.
    A SIGHUP passed on (``hangup``) is ignored until the target handles it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if hangup:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)  # blocked by spawn, across the fork
    target()
