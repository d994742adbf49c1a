"""Memory over a long run: the gateway under constant load with the workers storing into
PostgreSQL behind it, RSS of each side and Redis's memory and key count sampled every 10 s.

    python -m bench.soak [--seconds 600] [--rate 500] [--processes 2] [--no-save]

RSS is compared after a warm-up (allocators and caches settle in the first minute): the bar
is that neither side grows by more than 10 % over the run. It runs apart from `make bench`
on a broker of its own: Tansu's memory storage keeps every record in RAM (about 1 GB a
minute at 1,700 requests/s of 10 KB), so the rate is moderate by default.

Redis grows by design with the stored Idempotency-Key answers (every request sends a key,
kept 24 hours); what must not grow is the rest: the report gives Redis's growth per request
and the keys per request (1 when the request log, statistics and rate buckets stay bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis

from bench import load
from bench.drain import _fresh_database
from bench.procs import Service, start

WARMUP_S = 60.0
SAMPLE_S = 10.0


def soak(gateway: Service, url: str, body: Path, key: str, rate: float, seconds: float,
         bootstrap: str, redis_url: str, catalogue: Path, work: Path) -> dict[str, Any]:
    storage = asyncio.run(_fresh_database(f"sluice_soak_{int(time.time())}"))
    workers = start("workers-soak", ["-m", "workers", "run"], {
        "STORAGE_URL": storage, "SLUICE_CATALOGUE_DIR": str(catalogue),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "REDIS_URL": redis_url, "WORKER_GROUP_ID": f"soak-{int(time.time())}",
        "WORKER_PROCESSES": "1", "WORKER_METRICS_PORT": "0", "SLUICE_LOG_LEVEL": "WARNING",
    }, work / "logs")
    redis = Redis.from_url(redis_url)
    outcome: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: outcome.update(result=load.run(
        url, body, seconds=seconds, key=key, rate=rate)))
    samples: list[dict[str, float]] = []
    started = time.monotonic()
    loader.start()
    try:
        while loader.is_alive():
            time.sleep(SAMPLE_S)
            workers.refresh()
            memory = redis.info("memory")["used_memory"]
            samples.append({"t": round(time.monotonic() - started),
                            "gateway_mib": round(gateway.rss() / 2**20, 1),
                            "workers_mib": round(workers.rss() / 2**20, 1),
                            "redis_mib": round(memory / 2**20, 1), "redis_keys": redis.dbsize()})
        loader.join()
    finally:
        workers.stop()
        redis.close()
    settled = [s for s in samples if s["t"] >= WARMUP_S] or samples
    report: dict[str, Any] = {"seconds": seconds, "rate_requests_per_s": round(rate),
                              "warmup_s": WARMUP_S, "samples": samples}
    for side in ("gateway_mib", "workers_mib"):
        values = [s[side] for s in settled]
        report[side.removesuffix("_mib")] = {
            "first_mib": values[0], "last_mib": values[-1], "min_mib": min(values),
            "max_mib": max(values),
            "growth": round((values[-1] - values[0]) / values[0], 3) if values[0] else None}
    result = outcome.get("result")
    if result is not None:
        report.update(requests_per_s=round(result.requests_per_s, 1), errors=result.errors,
                      p99_ms=result.p99_ms)
        requests = result.requests_per_s * (settled[-1]["t"] - settled[0]["t"])
        if requests:
            report["redis"] = {
                "first_mib": settled[0]["redis_mib"], "last_mib": settled[-1]["redis_mib"],
                "bytes_per_request": round((settled[-1]["redis_mib"] - settled[0]["redis_mib"])
                                           * 2**20 / requests),
                "keys_per_request": round((settled[-1]["redis_keys"] - settled[0]["redis_keys"])
                                          / requests, 3)}
    return report


def main() -> None:
    from bench.machine import describe
    from bench.run import Bench, save

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s of 100 events")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    bench = Bench(argparse.Namespace(processes=args.processes), work)
    report: dict[str, Any] = {"machine": describe(args.processes)}
    try:
        bench.create_topics()
        service, url = bench.gateway()
        try:
            report.update(soak(service, url, bench.bodies["array100"][0], bench.key, args.rate,
                               args.seconds, bench.kafka.bootstrap, bench.redis.url,
                               work / "catalogue", work))
        finally:
            service.stop()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    for side in ("gateway", "workers"):
        r = report[side]
        print(f"{side:<8} RSS after warm-up {r['first_mib']} -> {r['last_mib']} MiB "
              f"(min {r['min_mib']}, max {r['max_mib']}; growth {r['growth']:+.1%})")
    if "redis" in report:
        r = report["redis"]
        print(f"redis    {r['first_mib']} -> {r['last_mib']} MiB: {r['bytes_per_request']} bytes "
              f"and {r['keys_per_request']} keys per request")
    print(f"{report.get('requests_per_s')} requests/s for {args.seconds:g} s, "
          f"{report.get('errors')} errors, p99 {report.get('p99_ms')} ms")
    if not args.no_save:
        print(f"results: {save(report, 'soak')}")


if __name__ == "__main__":
    main()
