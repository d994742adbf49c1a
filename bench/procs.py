"""Processes under measurement: start, wait until they answer, CPU seconds and RSS from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def named(command: str) -> list[int]:
    """Every process whose command name is ``command`` (a server we did not start)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += int(fields[21]) * _PAGE
    return total


@dataclass
class Service:
    """A process tree we started; CPU is read over the whole tree."""

    name: str
    proc: subprocess.Popen
    log: Path
    pids: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        self.pids = descendants(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def per_process_cpu(self) -> dict[int, float]:
        return {pid: cpu_seconds([pid]) for pid in self.pids}

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, args: list[str], env: dict[str, str], logs: Path,
          root: Path = ROOT) -> Service:
    """``python args`` in ``root`` (a checkout: its code is what runs), logging to logs/."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, cwd=root,
                                stdout=out, stderr=subprocess.STDOUT)
    return Service(name, proc, log)


def wait_http(service: Service, url: str, timeout: float = 30.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    break
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                break
        except OSError:
            pass
        if service.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{service.name} did not answer {url}; see {service.log}:\n"
                             + service.log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
    time.sleep(0.5)  # let every forked process bind
    service.refresh()
