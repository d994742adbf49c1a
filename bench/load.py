"""Load from wrk (Debian package): fixed-duration runs and constant-rate runs, parsed."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

SCRIPTS = Path(__file__).resolve().parent / "wrk"


@dataclass
class LoadResult:
    requests: int
    seconds: float
    non202: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    max_behind_ms: float | None = None  # constant-rate runs: worst lag behind the schedule

    @property
    def ok(self) -> int:
        return self.requests - self.non202

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def errors(self) -> int:
        return self.non202 + self.socket_errors


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk is not installed (Debian package wrk; `make bench` installs it)")
    return binary


def run(url: str, body: Path, *, seconds: float, threads: int = 2, connections: int = 32,
        key: str | None = None, gzip: bool = False, idempotency: bool = True,
        rate: float | None = None) -> LoadResult:
    """POST ``body`` to ``url`` for ``seconds``; at ``rate`` requests/s when given."""
    script = SCRIPTS / ("paced.lua" if rate else "post.lua")
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_PATH": _path(url),
           "BENCH_GZIP": "1" if gzip else "0", "BENCH_IDEMPOTENCY": "1" if idempotency else "0",
           "BENCH_RUN": f"{time.time_ns():x}", "BENCH_SCRIPTS": str(SCRIPTS),
           "BENCH_THREADS": str(threads)}
    if key:
        env["BENCH_KEY"] = key
    if rate:
        env["BENCH_RATE"] = str(rate)
    command = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
               "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                         timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    found: dict = {}
    for line in out.stdout.splitlines():
        if line.startswith(("BENCH ", "PACED ")):
            found.update(orjson.loads(line.split(" ", 1)[1]))
    if "requests" not in found:
        raise RuntimeError(f"no summary from wrk:\n{out.stdout}\n{out.stderr}")
    return LoadResult(
        requests=found["requests"], seconds=found["duration_us"] / 1e6,
        non202=found["non202"], socket_errors=found["socket_errors"],
        p50_ms=found["p50_us"] / 1000, p90_ms=found["p90_us"] / 1000,
        p99_ms=found["p99_us"] / 1000, max_ms=found["max_us"] / 1000,
        statuses=found.get("statuses") or {}, max_behind_ms=found.get("max_behind_ms"))


def _path(url: str) -> str:
    rest = url.split("://", 1)[1]
    return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
