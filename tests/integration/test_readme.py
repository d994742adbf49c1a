"""The README's shell examples, run as written against a served gateway and workers.

Every ```sh block of README.md runs, in order, in one bash process: a reader's terminal, so
variables such as ``$ING`` carry from one block to the next. It runs in a directory laid out
as a checkout after `make run` (its own code prepares it: the example catalogue with the
development key for ``sales`` in var/catalogue, the key in var/dev-key, the rows in
var/sluice.db, ``.venv/bin/sluice`` and ``sluice-worker``), with that key as ``SLUICE_KEY``
and `make run`'s settings in the environment. Only the gateway's address is rewritten
(http://127.0.0.1:8080 to the test's port). Commands that start what the test has started
itself, or that take minutes, are not run (``NOT_RUN``). Before each block the workers have
stored everything published so far, as when a reader pauses between examples.

A ```json block that follows a ```sh block (with prose between them at most) shows the answer
of that block's last command; ``mismatches`` says how it is compared. Every other curl call
must get a 2xx, and every command must succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.local import stack as make_run
from schemas.catalogue import load_catalogue
from schemas.dataset import Limits
from schemas.records import dlq_topic
from tests.integration.test_server import ROOT, serve, stop_gateway
from tests.services import create_topics

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
ADDRESS = "http://127.0.0.1:8080"  # the gateway `make run` starts, as the README calls it
# Commands not run: they start the services the test started itself (make run, serve, the
# workers) or take minutes (make test, make bench, ...).
NOT_RUN = re.compile(r"(make|\.venv/bin/sluice serve|\.venv/bin/sluice-worker run"
                     r"|\.venv/bin/python -m bench\.\S+)(\s|$)")
FENCE = re.compile(r"^```(\w*)\s*$")
BLOCK_SECONDS = 30


@dataclass
class Shown:
    """An answer as the README shows it: optional status line and headers, then JSON."""

    line: int
    status: int | None
    headers: dict[str, str]  # lower-case names
    body: object


@dataclass
class Example:
    line: int  # README line of the block's first line
    text: str  # the block, commands not run turned into comments (line numbers kept)
    answer: Shown | None = None


def examples(readme: str) -> list[Example]:
    """The ```sh blocks of ``readme``, each with the answer shown after it, if any."""
    lines = readme.splitlines()
    found: list[Example] = []
    previous: tuple[str, int] | None = None  # (language, README line after the block)
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        language, body = opening[1], lines[i + 1:end]
        if language == "sh":
            found.append(_example(i + 2, body))
        elif (language == "json" and previous and previous[0] == "sh"
              and not any(line.startswith("#") for line in lines[previous[1]:i])):
            found[-1].answer = _shown(i + 2, "\n".join(body))
        previous, i = (language, end + 1), end + 1
    return found


def _example(line: int, body: list[str]) -> Example:
    example = Example(line, "")
    kept = []
    for n, text in enumerate(body):
        if NOT_RUN.match(text.strip()):
            assert not text.rstrip().endswith("\\"), f"README.md:{line + n}: a command " \
                "left out goes on on the next line, which would run alone"
            text = f"# not run: {text}"
        kept.append(text)
    example.text = "\n".join(kept) + "\n"
    return example


def _shown(line: int, text: str) -> Shown:
    status, headers = None, {}
    if text.startswith("HTTP/"):
        head, _, text = text.partition("\n\n")
        status_line, *fields = head.splitlines()
        status = int(status_line.split()[1])
        for name, _, value in (f.partition(":") for f in fields):
            headers[name.strip().lower()] = value.strip()
    return Shown(line, status, headers, json.loads(text) if text.strip() else None)


def mismatches(shown: object, got: object, where: str = "$") -> list[str]:
    """Where ``got`` differs from the README's ``shown``. Objects have the same keys, arrays
    the same length, and the values are equal, except what the README abbreviates: a string
    ending in "..." (an id, "req_5f0c...") stands for any string with the same prefix up to
    its last "_" and at least as long, and a 13-digit integer (a time in epoch ms) for any
    13-digit integer."""
    if isinstance(shown, dict) and isinstance(got, dict):
        problems = []
        if shown.keys() != got.keys():
            problems.append(f"{where}: keys {sorted(got.keys() - shown.keys())} not shown, "
                            f"{sorted(shown.keys() - got.keys())} shown but missing")
        for name in (name for name in shown if name in got):
            problems += mismatches(shown[name], got[name], f"{where}.{name}")
        return problems
    if isinstance(shown, list) and isinstance(got, list) and len(shown) == len(got):
        return [problem for n, (s, g) in enumerate(zip(shown, got, strict=True))
                for problem in mismatches(s, g, f"{where}[{n}]")]
    return [] if _same(shown, got) else [f"{where}: {got!r}, shown {shown!r}"]


def _same(shown: object, got: object) -> bool:
    if isinstance(shown, str) and shown.endswith("..."):
        head = shown[:-3]
        return (isinstance(got, str) and got.startswith(head[:head.rfind("_") + 1])
                and len(got) >= len(head))
    if type(shown) is int and 10**12 <= shown < 10**13:
        return type(got) is int and 10**12 <= got < 10**13
    return type(shown) is type(got) and shown == got


def json_values(text: str) -> list[object]:
    """The JSON values printed one after the other (curl adds no newline between them)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


@dataclass
class Ran:
    stdout: str
    stderr: str
    failed: list[tuple[int, int]]  # (line in the block, exit status) of each failed command
    answers: list[tuple[int | None, dict[str, str]]]  # status and headers of each curl call


class Terminal:
    """One bash process, as a reader's terminal: each block is sourced from a file of its own
    with its output sent to files; a failing command is noted with its line (ERR trap), and
    curl notes each answer's status line and headers (-D) besides printing what it prints."""

    PRELUDE = r"""
set -o pipefail
trap '__rc=$?; [ -z "${BASH_SOURCE[0]-}" ] || echo "$LINENO $__rc" >> "$__out.failed"' ERR
curl() {
  echo >> "$__out.calls"
  command curl -D "$__out.headers.$(wc -l < "$__out.calls")" "$@"
}
"""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.dir = directory / ".readme"
        self.dir.mkdir()
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-s"], cwd=directory,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.proc.stdin.write(self.PRELUDE)

    async def run(self, example: Example) -> Ran:
        out, block = self.dir / str(example.line), self.dir / f"{example.line}.sh"
        block.write_text(example.text)
        for name in ("calls", "failed", "stdout", "stderr"):
            Path(f"{out}.{name}").write_text("")
        self.proc.stdin.write(f'__out={out}; source {block} </dev/null >"$__out.stdout" '
                              f'2>"$__out.stderr"; echo __done\n')
        self.proc.stdin.flush()
        done = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline),
                                      BLOCK_SECONDS)
        assert done == "__done\n", f"README.md:{example.line}: the block ended the shell"
        calls = len(Path(f"{out}.calls").read_text().splitlines())
        return Ran(Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text(),
                   [tuple(map(int, f.split())) for f in
                    Path(f"{out}.failed").read_text().splitlines()],
                   [_answer(Path(f"{out}.headers.{n}")) for n in range(1, calls + 1)])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _answer(path: Path) -> tuple[int | None, dict[str, str]]:
    """Status and headers curl wrote with -D (the last response: after a 100 Continue)."""
    if not path.exists() or not path.read_text().strip():
        return None, {}
    status_line, *fields = path.read_text().strip().split("\r\n\r\n")[-1].splitlines()
    return int(status_line.split()[1]), {
        name.strip().lower(): value.strip()
        for name, _, value in (f.partition(":") for f in fields)}


def problems_of(example: Example, ran: Ran) -> list[str]:
    """What went wrong, each naming its README line."""
    lines = example.text.splitlines()
    problems = []
    for at, status in ran.failed:
        first = at - 1  # the command's first line: LINENO may be one it goes on to
        while first > 0 and lines[first - 1].rstrip().endswith("\\"):
            first -= 1
        problems.append(f"README.md:{example.line + first}: exit status {status}: "
                        f"{lines[first].strip()}\n  stderr: {ran.stderr.strip()[-2000:]}")
    if problems:
        return problems  # what follows would only repeat it
    shown = example.answer
    output = f"\n  output: {ran.stdout.strip()[-2000:]}"
    for n, (status, _) in enumerate(ran.answers, 1):
        if n == len(ran.answers) and shown and shown.status is not None:
            if status != shown.status:
                problems.append(f"README.md:{shown.line}: the answer of README.md:"
                                f"{example.line} is HTTP {status}, shown {shown.status}"
                                + output)
        elif status is None or not 200 <= status < 300:
            problems.append(f"README.md:{example.line}: curl call {n} of the block got HTTP "
                            f"{status}, and the README shows no such answer" + output)
    if shown is None:
        return problems
    headers = ran.answers[-1][1] if ran.answers else {}
    for name, value in shown.headers.items():
        if name not in headers or not _same(value, headers[name]):
            problems.append(f"README.md:{shown.line}: header {name}: {headers.get(name)!r}, "
                            f"shown {value!r}")
    if shown.body is not None:
        try:
            got = json_values(ran.stdout)[-1]
        except (ValueError, IndexError):
            return [*problems, f"README.md:{shown.line}: the answer of README.md:"
                               f"{example.line} is not JSON" + output]
        problems += [f"README.md:{shown.line}: the answer of README.md:{example.line} "
                     f"differs at {problem}" for problem in mismatches(shown.body, got)]
    return problems


def after_make_run(directory: Path, monkeypatch) -> str:
    """``directory`` laid out as a checkout after `make run` (its own code writes the
    catalogue and the development key there), with the commands the README calls: the key."""
    monkeypatch.setattr(make_run, "VAR", directory / "var")
    (directory / "var").mkdir()
    key = make_run.ensure_catalogue({})
    for name, module in (("sluice", "gateway"), ("sluice-worker", "workers"),
                         ("python", None), ("python3", None)):
        path = directory / (".venv/bin" if module else "bin") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {f"-m {module} " if module else ""}'
                        '"$@"\n')
        path.chmod(0o755)
    return key


@contextlib.contextmanager
def workers_running(settings: dict[str, str], log: Path):
    """`sluice-worker run` with ``settings``, as `make run` starts it, logging to ``log``."""
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "run"], cwd=ROOT, stderr=output,
            env={**os.environ, **settings, "WORKER_GROUP_ID": "readme", "WORKER_BATCH_MS": "50",
                 "WORKER_SESSION_TIMEOUT_MS": "3000", "WORKER_METRICS_PORT": "0"})
        try:
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_stored(reader: AIOKafkaConsumer, partitions: list[TopicPartition], log: Path,
                      timeout: float = 15) -> None:
    """Until the workers have committed every record published so far (after storing it and
    counting it in the statistics, request logs and sessions)."""
    deadline = time.monotonic() + timeout
    while True:
        ends = await reader.end_offsets(partitions)
        behind = {f"{tp.topic}/{tp.partition}": (committed, end) for tp, end in ends.items()
                  if (committed := await reader.committed(tp) or 0) < end}
        if not behind:
            return
        assert time.monotonic() < deadline, "the workers did not store what was published " \
            f"(committed, end): {behind}; their log ends:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.05)


async def test_the_readme_examples_work_as_written(tmp_path, own_broker, redis_url,
                                                   monkeypatch):
    broker = own_broker()
    key = after_make_run(tmp_path, monkeypatch)
    catalogue = tmp_path / "var" / "catalogue"
    topics = [d.entry_topic for d in load_catalogue(catalogue, Limits())]
    await create_topics(broker.bootstrap, topics + [dlq_topic(t) for t in topics])
    settings = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
                "REDIS_URL": redis_url, "SLUICE_CATALOGUE_DIR": str(catalogue),
                "STORAGE_URL": f"sqlite:///{tmp_path}/var/sluice.db"}
    log = tmp_path / "var" / "workers.log"
    problems, answered = [], 0
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.enter_context(workers_running(settings, log))
        gateway, base = await serve(settings)
        cleanup.callback(stop_gateway, gateway)
        reader = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="readme",
                                  enable_auto_commit=False)  # never subscribes: joins nothing
        await reader.start()
        cleanup.push_async_callback(reader.stop)
        await reader.topics()
        partitions = [TopicPartition(t, p) for t in topics for p in reader.partitions_for_topic(t)]
        terminal = Terminal(tmp_path, {
            **os.environ, **settings, "SLUICE_KEY": key, "PYTHONPATH": str(ROOT),
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
        cleanup.callback(terminal.close)
        for example in examples(README.read_text()):
            if not any(line.strip() and not line.lstrip().startswith("#")
                       for line in example.text.splitlines()):
                continue  # nothing left to run
            await wait_stored(reader, partitions, log)
            ran = await terminal.run(replace(example, text=example.text.replace(ADDRESS, base)))
            problems += problems_of(example, ran)
            answered += example.answer is not None
    assert not problems, "README examples that do not work as written:\n" + "\n".join(problems)
    assert answered >= 3, f"only {answered} README answers were checked: is README.md parsed?"


def test_the_comparison_rule():
    shown = {"id": "req_5f0c...", "at": 1795612140635, "n": 2, "ok": True, "none": None,
             "failed": [{"index": 1}]}
    assert mismatches(shown, {"id": "req_9a0b1c2d3e4f", "at": 1795612199999, "n": 2, "ok": True,
                              "none": None, "failed": [{"index": 1}]}) == []
    assert mismatches(shown, {"id": "ing_9a0b1c2d3e4f", "at": 17956121, "n": 2.0, "ok": 1,
                              "failed": [{"index": 1, "record": {}}], "more": 0}) == [
        "$: keys ['more'] not shown, ['none'] shown but missing",
        "$.id: 'ing_9a0b1c2d3e4f', shown 'req_5f0c...'",
        "$.at: 17956121, shown 1795612140635",
        "$.n: 2.0, shown 2",
        "$.ok: 1, shown True",
        "$.failed[0]: keys ['record'] not shown, [] shown but missing"]
    assert mismatches([1, 2], [1]) == ["$: [1], shown [1, 2]"]
