"""Two versions of the gateway side by side, under the same load at the same time.

    python -m bench.ab OLD [NEW] [--scenario single] [--rounds 5] [--seconds 8] [--processes 1]
                       [--rate 300]

OLD and NEW are git revisions (NEW defaults to the working tree, ``.``). Each is checked out
into var/ab/<commit> (a git worktree) and served from there, beside the other, on one Redis and
one broker; each round loads both at once with half of the usual wrk connections. A machine
that drifts, or another process that takes the CPU for a while, then slows both alike, so
their ratio is steady where two runs one after the other differ by 10-20 % on these machines:
the same gateway against itself comes out within about 1 %. For changes of a few per cent,
which `make bench` cannot see. Prints each round's requests/s and CPU per request of both,
and the median ratio NEW/OLD. With ``--rate`` both take that many requests/s (below full load,
where nothing is batched) and the ratio is of their CPU per request, OLD/NEW: above 1, the
new one costs less.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench import load
from bench.procs import ROOT
from bench.run import SCENARIOS, Bench

TREES = ROOT / "var" / "ab"


def checkout(revision: str) -> tuple[str, Path]:
    """(label, source tree) of a revision: the working tree for '.', else a worktree."""
    if revision == ".":
        return "working tree", ROOT
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify",
                             f"{revision}^{{commit}}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    tree = TREES / commit[:12]
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True)
    return f"{revision} ({commit[:8]})", tree


def round_of(bench: Bench, targets: list[tuple[Any, str]], scenario: str,
             seconds: float, rate: float | None = None) -> list[tuple[float, float, float]]:
    """Both targets loaded at once, as fast as they answer or at ``rate`` requests/s each:
    (requests/s, CPU us per request, p99 ms) of each."""
    body, _, gz = bench.bodies[scenario]
    results: list[Any] = [None] * len(targets)
    cpu_before = [service.cpu() for service, _ in targets]

    def run(i: int, url: str) -> None:
        results[i] = load.run(url, body, seconds=seconds, key=bench.key, gzip=gz,
                              connections=16, rate=rate)

    threads = [threading.Thread(target=run, args=(i, url)) for i, (_, url) in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = []
    for (service, _), before, result in zip(targets, cpu_before, results, strict=True):
        if result.errors:
            raise SystemExit(f"{service.name}: {result.errors} errors; see {service.log}")
        cpu = (service.cpu() - before) / max(result.requests_per_s * seconds, 1) * 1e6
        out.append((result.requests_per_s, cpu, result.p99_ms))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default=".")
    parser.add_argument("--scenario", default="single", choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--processes", type=int, default=1, help="per gateway")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s for each gateway (default: as many as wrk gets); the "
                             "ratio is then of CPU per request, old / new")
    args = parser.parse_args()
    (old_label, old_tree), (new_label, new_tree) = checkout(args.old), checkout(args.new)
    work = Path(tempfile.mkdtemp(prefix="sluice-ab-"))
    bench = Bench(args, work)
    services = []
    try:
        bench.create_topics()
        services = [bench.gateway("old", old_tree), bench.gateway("new", new_tree)]
        ratios = []
        measure = "CPU per request old/new" if args.rate else "requests/s new/old"
        at = f" at {args.rate:,.0f} requests/s each" if args.rate else ""
        for number in range(args.rounds):
            if number % 2 == 0:
                bench.fresh_broker()  # an empty broker, as `make bench` measures
                for service, url in services:
                    bench.settle(service, url, args.scenario, key=bench.key,
                                 gzip=bench.bodies[args.scenario][2])
            (old_rps, old_cpu, old_p99), (new_rps, new_cpu, new_p99) = round_of(
                bench, services, args.scenario, args.seconds, args.rate)
            # higher is better either way: throughput new/old, or CPU per request old/new
            ratios.append(old_cpu / new_cpu if args.rate else new_rps / old_rps)
            print(f"round {number + 1}: old {old_rps:,.0f} req/s ({old_cpu:,.0f} us CPU/req, "
                  f"p99 {old_p99:.1f} ms), new {new_rps:,.0f} req/s ({new_cpu:,.0f} us CPU/req, "
                  f"p99 {new_p99:.1f} ms), {measure} {ratios[-1]:.3f}", flush=True)
        print(f"\n{args.scenario}{at}: {measure}, new {new_label} against old {old_label}: "
              f"median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-"
              f"{max(ratios):.3f})")
    finally:
        for service, _ in services:
            service.stop()
        bench.close()


if __name__ == "__main__":
    main()
