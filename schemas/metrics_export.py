"""Exposition of the metrics: one process, or many summed through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import os
import shutil
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(name: str, processes: int) -> None:
    """Before forking and before prometheus_client is imported: a fresh shared directory,
    the one PROMETHEUS_MULTIPROC_DIR names (also for one process: prometheus-client writes
    there whenever it is set, and fails at start-up if it does not exist), else a temporary
    one when there are several processes."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory == "":  # set but empty: prometheus-client would write into the current directory
        del os.environ[MULTIPROC_ENV]
    if directory:
        shutil.rmtree(directory, ignore_errors=True)  # stale files would add old counts
        os.makedirs(directory, exist_ok=True)
    elif processes > 1:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix=f"sluice-{name}-metrics-")


WORKER_PREFIX = "sluice_worker_"


def _source():
    """This process's registry, or one that sums every process's files."""
    from prometheus_client import REGISTRY, CollectorRegistry

    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    from prometheus_client import multiprocess

    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed)
    return summed


class _Side:
    """Only one side's metrics: both sides import every definition (schemas.metrics), and a
    metric without labels exists from its definition on, so the gateway would otherwise
    export the workers' at 0 and the other way round."""

    def __init__(self, source, side: str):
        self._source = source
        self._worker = side == "worker"

    def collect(self):
        for family in self._source.collect():
            if family.name.startswith(WORKER_PREFIX) == self._worker or (
                    not family.name.startswith("sluice_")):  # process_*, python_* metrics
                yield family


def registry(side: str):
    """The registry ``side`` ("gateway" or "worker") serves at /metrics."""
    from prometheus_client import CollectorRegistry

    served = CollectorRegistry(auto_describe=False)
    served.register(_Side(_source(), side))
    return served


def exposition(side: str = "gateway") -> tuple[bytes, str]:
    """The current metrics in the text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry(side)), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay summed)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
