"""Where the gateway spends its CPU under load: py-spy samples every serving process while wrk
runs one scenario, then prints the functions with the most samples (own and inclusive).

    python -m bench.profile [--scenario array100] [--seconds 15] [--processes 2] [--native]
                            [--rate 250]

Collapsed stacks of each process are left in var/profile/ (speedscope and flamegraph.pl
read them). py-spy
(PyPI) is installed into the virtualenv by `make profile`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import load
from bench.procs import ROOT
from bench.run import Bench

OUT = ROOT / "var" / "profile"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: `make profile` installs it")
    return found


def record(pids: list[int], seconds: float, native: bool) -> list[Path]:
    """Collapsed stacks of each process, sampled at 200 Hz for ``seconds``."""
    OUT.mkdir(parents=True, exist_ok=True)
    outs = [OUT / f"{pid}.txt" for pid in pids]
    procs = [subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration",
                               f"{seconds:g}", "--rate", "200", "--format", "raw",
                               "--output", str(out), "--nonblocking",
                               *(["--native"] if native else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for pid, out in zip(pids, outs, strict=True)]
    for proc in procs:
        proc.wait()
    return outs


def summarize(files: list[Path], top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            frames = stack.split(";")
            total += samples
            own[_short(frames[-1])] += samples
            for frame in {_short(f) for f in frames}:
                inclusive[frame] += samples
    lines = [f"{total} samples"]
    for title, counter in (("own", own), ("inclusive", inclusive)):
        lines.append(f"\n{title:>9}  function")
        for frame, samples in counter.most_common(top):
            lines.append(f"{100 * samples / max(total, 1):8.1f}%  {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "handler (aiohttp/web_protocol.py:452)" -> drop the line number, keep file and function
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="array100",
                        choices=["array100", "single", "array1mib", "gzip100"])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s at a constant rate (default: as many as wrk gets)")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    args.skip_drain = True
    work = Path(tempfile.mkdtemp(prefix="sluice-profile-"))
    bench = Bench(args, work)
    try:
        bench.create_topics()
        service, url = bench.gateway()
        try:
            servers = [pid for pid in service.pids if pid != service.proc.pid] or service.pids
            body, _, gz = bench.bodies[args.scenario]
            result: dict = {}
            loader = threading.Thread(target=lambda: result.update(r=load.run(
                url, body, seconds=args.seconds + 2, key=bench.key, gzip=gz, rate=args.rate)))
            loader.start()
            files = record(servers, args.seconds, args.native)
            loader.join()
        finally:
            service.stop()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    r = result.get("r")
    if r:
        print(f"under profiling: {r.requests_per_s:,.0f} requests/s, p99 {r.p99_ms:.1f} ms, "
              f"{r.errors} errors")
    print(summarize(files, args.top))
    print(f"\ncollapsed stacks: {OUT}/<pid>.txt (flamegraph.pl or speedscope read them)")


if __name__ == "__main__":
    main()
