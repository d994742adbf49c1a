"""`make bench`: the gateway under wrk load beside its ceilings, latency at a constant rate,
and how fast the workers drain a backlog; one table, and JSON in bench/results/.

    python -m bench.run [--seconds 10] [--rounds 3] [--processes 2] [--targets bare relay raw]
                        [--scenarios ...] [--cpu-at-rates 250 1000] [--skip-drain]
                        [--drain-events 1000000] [--no-save]

Everything runs on this machine: a redis-server and a Tansu broker of its own on free ports,
the gateway (`sluice serve`), the references (bench/references.py), wrk, the workers and the
machine's PostgreSQL (started if it is down). Each target gets the same broker, process
count and load, and the targets take turns (each keeps its median round), so the ratios
compare like with like within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import bodies, load, redis_cpu
from bench.catalogue import write_catalogue
from bench.drain import drain
from bench.kafka import produce
from bench.machine import describe
from bench.procs import ROOT, Service, start, wait_http
from gateway.config import Settings
from schemas.keys import new_key
from tests.services import RedisServer, TansuBroker, create_topics, free_port

RESULTS = ROOT / "bench" / "results"
PATH = "/v1/datasets/sales/events"
TOPIC = "ingest.sales"
RELAY_TOPIC = "bench.relay"
WARMUP_S = 2.0
SETTLE_TRIES = 15
TOPICS = [TOPIC, TOPIC + ".dlq", RELAY_TOPIC]

SCENARIOS = {  # name: (what, events per request, gzip)
    "array100": "100-event JSON arrays",
    "single": "single events",
    "array1mib": "1 MiB JSON arrays",
    "gzip100": "gzip 100-event arrays",
}


def write_bodies(directory: Path) -> dict[str, tuple[Path, int, bool]]:
    big, big_count = bodies.array_up_to(1024 * 1024)
    hundred = bodies.array_of(100)
    contents = {
        "array100": (hundred, 100, False),
        "single": (orjson.dumps(bodies.events(1)[0]), 1, False),
        "array1mib": (big, big_count, False),
        "gzip100": (bodies.gzipped(hundred), 100, True),
    }
    out = {}
    for name, (data, count, gz) in contents.items():
        path = directory / f"{name}.body"
        path.write_bytes(data)
        out[name] = (path, count, gz)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.key = new_key("bench")
        self.redis = RedisServer().start()
        self.kafka = TansuBroker().start()
        self.infra = {"broker": self.kafka.proc.pid, "redis": self.redis.proc.pid}
        self.bodies = write_bodies(work)
        # the gateway's producer setting, given to the relay too: the same batching for both
        self.linger_ms = Settings.from_env(os.environ).kafka_linger_ms

    def close(self) -> None:
        self.kafka.close()
        self.redis.close()

    # -- targets -------------------------------------------------------------------------------

    def gateway(self, name: str = "gateway", root: Path = ROOT) -> tuple[Service, str]:
        """``sluice serve`` from the checkout at ``root``; ``name`` keeps two apart."""
        catalogue = self.work / name / "catalogue"
        write_catalogue(catalogue, self.key, {"sales": TOPIC})
        # made here too: a checkout from before 2026-11-26 does not make it for one process
        (self.work / name / "prom").mkdir(parents=True, exist_ok=True)
        port = free_port()
        service = start(name, ["-m", "gateway", "serve"], {
            "SLUICE_HOST": "127.0.0.1", "SLUICE_PORT": str(port),
            "SLUICE_PROCESSES": str(self.args.processes),
            "SLUICE_CATALOGUE_DIR": str(catalogue), "REDIS_URL": self.redis.url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
            "KAFKA_LINGER_MS": str(self.linger_ms), "SLUICE_LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": str(self.work / name / "prom"),
        }, self.logs, root)
        wait_http(service, f"http://127.0.0.1:{port}/readyz")
        return service, f"http://127.0.0.1:{port}{PATH}"

    def reference(self, kind: str) -> tuple[Service, str]:
        port = free_port()
        extra = (["--bootstrap", self.kafka.bootstrap, "--topic", RELAY_TOPIC,
                  "--linger-ms", str(self.linger_ms)] if kind == "relay" else [])
        service = start(kind, ["-m", "bench.references", kind, "--port", str(port),
                               "--processes", str(self.args.processes), *extra], {}, self.logs)
        wait_http(service, f"http://127.0.0.1:{port}/", status=405)
        return service, f"http://127.0.0.1:{port}{PATH}"

    # -- measurements --------------------------------------------------------------------------

    def create_topics(self) -> None:
        asyncio.run(create_topics(self.kafka.bootstrap, TOPICS, partitions=3))

    def fresh_broker(self) -> None:
        """An empty broker on the same port: Tansu's memory storage keeps every record, and a
        broker holding gigabytes spends about twice the CPU per request (measured), so each
        run starts from an empty one, whoever ran before it."""
        self.kafka.restart()
        self.infra["broker"] = self.kafka.proc.pid
        self.create_topics()

    def settle(self, service: Service, url: str, scenario: str, **options: Any) -> None:
        """Until ``service`` answers a second of load without errors: its producers reconnect
        to a new broker."""
        body = self.bodies[scenario][0]
        for _ in range(SETTLE_TRIES):
            if load.run(url, body, seconds=1, **options).errors == 0:
                return
        raise RuntimeError(f"{service.name} answers errors after a broker restart; "
                           f"see {service.log}")

    def load(self, service: Service, url: str, scenario: str, *, rate: float | None = None,
             auth: bool = True, broker: bool = True) -> dict[str, Any]:
        body, count, gz = self.bodies[scenario]
        options = {"key": self.key if auth else None, "gzip": gz, "idempotency": auth}
        if broker:
            self.fresh_broker()
        self.settle(service, url, scenario, **options)
        if rate is None:
            load.run(url, body, seconds=WARMUP_S, **options)
        cpu_before = self._cpu(service)
        result = load.run(url, body, seconds=self.args.seconds, rate=rate, **options)
        cpu = {name: round(after - cpu_before[name], 2) for name, after in
               self._cpu(service).items()}
        return {
            "events_per_s": round(result.requests_per_s * count),
            "requests_per_s": round(result.requests_per_s, 1),
            "p50_ms": result.p50_ms, "p90_ms": result.p90_ms, "p99_ms": result.p99_ms,
            "max_ms": result.max_ms, "errors": result.errors, "statuses": result.statuses,
            "events_per_request": count, "body_bytes": body.stat().st_size,
            "cpu_s": cpu, **({"max_behind_ms": result.max_behind_ms} if rate else {}),
        }

    def _cpu(self, service: Service) -> dict[str, float]:
        from bench.procs import cpu_seconds, descendants

        out = {name: cpu_seconds(descendants(pid)) for name, pid in self.infra.items()}
        out[service.name] = service.cpu()
        for pid, seconds in service.per_process_cpu().items():
            out[f"{service.name}:{pid}"] = seconds
        out["wrk"] = _wrk_cpu()
        return out

    def raw_producer(self) -> dict[str, Any]:
        body, count, _ = self.bodies["array100"]
        sent, took = asyncio.run(produce(self.kafka.bootstrap, RELAY_TOPIC, [body.read_bytes()],
                                         seconds=self.args.seconds))
        return {"records_per_s": round(sent / took, 1), "events_per_s": round(sent * count / took),
                "events_per_record": count}


def _wrk_cpu() -> float:
    """CPU of finished wrk runs: children's time of this process (wrk is our only child)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    bench = Bench(args, work)
    report: dict[str, Any] = {"machine": describe(args.processes), "seconds": args.seconds,
                              "rounds": args.rounds, "scenarios": {},
                              "ceilings": {"bare": {}, "relay": {}},
                              "ratio_to_ceiling": {}, "ratio_to_http": {}}
    services: dict[str, tuple[Service, str]] = {}
    try:
        bench.create_topics()
        # Every target runs from the start (idle ones cost nothing) and each scenario is
        # measured in rounds that alternate the targets, keeping each target's median round:
        # a machine that slows down or speeds up during the run moves all of them alike.
        for kind in (k for k in ("bare", "relay") if k in args.targets):
            services[kind] = bench.reference(kind)
        services["gateway"] = bench.gateway()
        wanted = [s for s in SCENARIOS if s in args.scenarios]
        for scenario in wanted:
            rounds: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.rounds):
                for kind, (service, url) in services.items():
                    if kind != "gateway" and scenario == "gzip100":
                        continue  # the references do not inflate gzip
                    rounds.setdefault(kind, []).append(bench.load(
                        service, url, scenario, auth=kind == "gateway", broker=kind != "bare"))
            for kind, results in rounds.items():
                chosen = _median(results)
                target = (report["scenarios"] if kind == "gateway"
                          else report["ceilings"][kind])
                target[scenario] = chosen
                _progress(kind, scenario, chosen)
        if "raw" in args.targets:
            bench.fresh_broker()
            report["ceilings"]["raw_producer"] = bench.raw_producer()
            _progress("raw_producer", "array100", report["ceilings"]["raw_producer"])
        if "array100" in report["scenarios"]:
            service, url = services["gateway"]
            half = report["scenarios"]["array100"]["requests_per_s"] / 2
            report["latency_at_half_max"] = {"rate_requests_per_s": round(half),
                                             **bench.load(service, url, "array100", rate=half)}
            _progress("gateway paced", "array100", report["latency_at_half_max"])
        if args.cpu_at_rates and "array100" in args.scenarios:
            report["cpu_at_rates"] = [cpu_at_rate(bench, services, rate)
                                      for rate in args.cpu_at_rates]
        for service, _ in services.values():
            service.stop()
        services.clear()
        for scenario, result in report["scenarios"].items():
            relay = report["ceilings"]["relay"].get(scenario)
            bare = report["ceilings"]["bare"].get(scenario)
            if relay:
                report["ratio_to_ceiling"][scenario] = round(
                    result["events_per_s"] / relay["events_per_s"], 3)
            if bare:
                report["ratio_to_http"][scenario] = round(
                    result["events_per_s"] / bare["events_per_s"], 3)
        if not args.skip_drain:
            bench.fresh_broker()
            report["drain"] = drain(bench.kafka.bootstrap, bench.redis.url, bench.key, work,
                                    args.drain_events, args.processes, bench.kafka.proc.pid)
            report["drain_events_per_s"] = {store: d["events_per_s"]
                                            for store, d in report["drain"].items()}
        report["redis_cpu_us_per_request"] = redis_cpu.run()
        print(f"  redis cpu      {report['redis_cpu_us_per_request']['total']} us per request",
              flush=True)
    finally:
        for service, _ in services.values():
            service.stop()
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return report


def cpu_at_rate(bench: Bench, services: dict[str, tuple[Service, str]], rate: float
                ) -> dict[str, Any]:
    """CPU per request of the gateway and the relay (and of the broker and Redis beside
    them) at a constant rate of ``array100`` requests: what a request costs below full load,
    where nothing is batched."""
    entry: dict[str, Any] = {"rate_requests_per_s": rate}
    for kind in ("gateway", "relay"):
        if kind not in services:
            continue
        service, url = services[kind]
        r = bench.load(service, url, "array100", rate=rate, auth=kind == "gateway")
        served = max(r["requests_per_s"] * bench.args.seconds, 1)
        entry[kind] = {
            "cpu_us_per_request": {name: round(seconds / served * 1e6)
                                   for name, seconds in r["cpu_s"].items()
                                   if ":" not in name and name != "wrk"},
            "requests_per_s": r["requests_per_s"], "p99_ms": r["p99_ms"], "errors": r["errors"]}
    cpu = {kind: entry[kind]["cpu_us_per_request"] for kind in ("gateway", "relay")
           if kind in entry}
    print(f"  cpu at {rate:,.0f} req/s: "
          + "; ".join(f"{kind} {c.get(kind, 0):,} us/request (broker {c.get('broker', 0):,}, "
                      f"redis {c.get('redis', 0):,})" for kind, c in cpu.items()), flush=True)
    return entry


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median events/s (the lower middle of an even count), with every
    round's events/s beside it."""
    ordered = sorted(results, key=lambda r: r["events_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_events_per_s"] = [r["events_per_s"] for r in results]
    return chosen


def _progress(target: str, scenario: str, result: dict[str, Any]) -> None:
    rounds = result.get("rounds_events_per_s")
    print(f"  {target:<14} {scenario:<10} {result.get('events_per_s', 0):>11,} events/s "
          f"p99 {result.get('p99_ms', float('nan')):.1f} ms"
          + (f"  (rounds: {', '.join(f'{r:,}' for r in rounds)})" if rounds else ""),
          flush=True)


def table(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']['summary']}", "",
             f"{'target':<14}{'scenario':<11}{'events/s':>11}{'req/s':>9}{'p50 ms':>8}"
             f"{'p99 ms':>8}{'max ms':>8}{'errors':>7}  cpu s (gateway|ref, broker, redis)"]

    def row(target: str, scenario: str, r: dict[str, Any]) -> str:
        cpu = r.get("cpu_s", {})
        own = cpu.get(target.split()[0], cpu.get("gateway", 0))
        return (f"{target:<14}{scenario:<11}{r['events_per_s']:>11,}{r['requests_per_s']:>9,.0f}"
                f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['max_ms']:>8.1f}{r['errors']:>7}  "
                f"{own:.1f}, {cpu.get('broker', 0):.1f}, {cpu.get('redis', 0):.1f}")

    for scenario, r in report["scenarios"].items():
        lines.append(row("gateway", scenario, r))
        for kind in ("relay", "bare"):
            if scenario in report["ceilings"][kind]:
                lines.append(row(kind, scenario, report["ceilings"][kind][scenario]))
    paced = report.get("latency_at_half_max")
    if paced:
        lines.append(row("gateway paced", "array100", paced)
                     + f"  at {paced['rate_requests_per_s']} req/s, "
                       f"max behind schedule {paced['max_behind_ms']} ms")
    raw = report["ceilings"].get("raw_producer")
    if raw:
        lines.append(f"raw aiokafka producer: {raw['records_per_s']:,.0f} records/s = "
                     f"{raw['events_per_s']:,} events/s")
    lines.append("")
    for scenario in report["scenarios"]:
        lines.append(f"{scenario:<11} ratio_to_ceiling (relay) "
                     f"{report['ratio_to_ceiling'].get(scenario, '-')}, "
                     f"ratio_to_http (bare) {report['ratio_to_http'].get(scenario, '-')}")
    for entry in report.get("cpu_at_rates", []):
        lines.append(f"cpu per request at {entry['rate_requests_per_s']:,.0f} req/s (us; "
                     "server, broker, redis): " + "; ".join(
                         f"{kind} {c[kind]:,}, {c.get('broker', 0):,}, {c.get('redis', 0):,}"
                         for kind in ("gateway", "relay") if kind in entry
                         for c in [entry[kind]["cpu_us_per_request"]]))
    for store, d in report.get("drain", {}).items():
        lines.append(f"drain {store:<19} {d['events_per_s']:>9,} events/s; {d['events']:,} events "
                     f"in {d['seconds']:.1f} s from worker start "
                     f"({d['steady_seconds']:.1f} s after the first commit)")
    if "redis_cpu_us_per_request" in report:
        lines += ["Redis CPU per request (bench.redis_cpu):",
                  *redis_cpu.lines(report["redis_cpu_us_per_request"])]
    return "\n".join(lines)


def save(report: dict[str, Any], kind: str = "") -> Path:
    """``<kind->latest.json`` and a dated copy named after the time and the commit."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    prefix = f"{kind}-" if kind else ""
    (RESULTS / f"{prefix}latest.json").write_bytes(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M")
    dated = RESULTS / f"{prefix}{stamp}-{report['machine']['commit'][:8]}.json"
    dated.write_bytes(text)
    return dated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured runs per target and scenario, alternating targets")
    parser.add_argument("--processes", type=int, default=2, help="server processes")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS),
                        choices=list(SCENARIOS))
    parser.add_argument("--targets", nargs="*", default=["bare", "relay", "raw"],
                        choices=["bare", "relay", "raw"],
                        help="references measured beside the gateway (all, for the record)")
    parser.add_argument("--cpu-at-rates", nargs="*", type=float, default=[250.0, 1000.0],
                        help="constant rates (array100 requests/s) at which to measure CPU "
                             "per request of the gateway and the relay (none: skip)")
    parser.add_argument("--skip-drain", action="store_true")
    parser.add_argument("--drain-events", type=int, default=1_000_000)
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args()
    print(f"sluice bench on {platform.node()}: {args.seconds:g} s per run", flush=True)
    started = time.monotonic()
    report = run(args)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(report))
    if not args.no_save:
        print(f"\nresults: {RESULTS / 'latest.json'} and {save(report)}")


if __name__ == "__main__":
    main()
