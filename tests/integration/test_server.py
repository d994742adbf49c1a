"""The served gateway: several processes on one port, graceful shutdown with requests in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from schemas.keys import KEY_PREFIX, new_key
from tests.integration.conftest import write_catalogue
from tests.integration.test_protocol import assert_problem, chunked_push, exchange
from tests.integration.test_push import ITEMS, events
from tests.services import consume_all, create_topics, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def start_gateway(tmp_path, bootstrap: str, redis_url: str, processes: int, *,
                        dataset: str = "sales", **extra: str):
    """The served gateway, and the ingest key and entry topic of ``dataset`` (sales: with an
    item key; other: append-only)."""
    key, other = new_key("pos"), new_key("crm")
    topic, other_topic = write_catalogue(tmp_path, os.urandom(4).hex(), key, other, None)
    await create_topics(bootstrap, [topic, other_topic], partitions=2)
    proc, base = await serve({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "REDIS_URL": redis_url, "SLUICE_CATALOGUE_DIR": str(tmp_path),
        "SLUICE_PROCESSES": str(processes), "SLUICE_SHUTDOWN_TIMEOUT_S": "20", **extra})
    return (proc, base, key, topic) if dataset == "sales" else (proc, base, other, other_topic)


async def serve(settings: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`sluice serve` with ``settings`` added to this environment, on a free port of
    127.0.0.1, once /readyz answers 200: the process and its base URL."""
    port = free_port()
    env = {**os.environ, **settings, "SLUICE_PORT": str(port), "SLUICE_HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with session.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass  # not listening yet
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "gateway did not become ready"
            await asyncio.sleep(0.2)
    return proc, base


def stop_gateway(proc: subprocess.Popen) -> tuple[int, list[str]]:
    """SIGTERM the served gateway: its exit code and the processes it left running (which
    are then killed)."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    finally:
        leftover = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in leftover:
            os.kill(int(pid), signal.SIGKILL)
    return code, leftover


def post(session, base, key, body, **headers):
    return session.post(f"{base}/v1/datasets/sales/events", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers})


async def test_two_processes_share_the_port(tmp_path, kafka, redis_url):
    proc, base, key, topic = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 2)
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            statuses = []
            for _ in range(20):
                async with post(s, base, key, orjson.dumps(ITEMS)) as resp:
                    statuses.append(resp.status)
        assert statuses == [202] * 20
        assert len(await consume_all(kafka.bootstrap, topic)) == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_a_retry_sent_the_moment_the_202_arrives_gets_the_replay(tmp_path, kafka,
                                                                    redis_url):
    """The answer is stored just after the 202; a retry that reaches the other process first
    waits for it (gateway.admission) instead of answering 409, and publishes nothing."""
    proc, base, key, topic = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 2)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                for _ in range(4)]  # one kept-alive connection each, to either process
    try:
        for s in sessions:
            async with s.get(base + "/healthz") as resp:
                assert resp.status == 200
        body = orjson.dumps(ITEMS)
        stop = asyncio.Event()

        async def background(s):  # keeps both processes' Redis pipelines busy
            sent = 0
            while not stop.is_set():
                async with post(s, base, key, body) as resp:
                    assert resp.status == 202
                sent += 1
            return sent

        busy = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
        load = [asyncio.create_task(background(busy)) for _ in range(16)]
        for n in range(40):
            first, retry = sessions[n % 4], sessions[(n + 1) % 4]
            async with post(first, base, key, body, **{"Idempotency-Key": f"k{n}"}) as resp:
                assert resp.status == 202 and "Idempotent-Replayed" not in resp.headers
                original = await resp.read()
            async with post(retry, base, key, body, **{"Idempotency-Key": f"k{n}"}) as resp:
                assert resp.status == 202, await resp.text()
                assert resp.headers["Idempotent-Replayed"] == "true"
                assert await resp.read() == original
        stop.set()
        background_sent = sum(await asyncio.gather(*load))
        await busy.close()
        assert len(await consume_all(kafka.bootstrap, topic)) == 40 + background_sent
    finally:
        for s in sessions:
            await s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_sigterm_finishes_in_flight_requests(tmp_path, own_broker, redis_url):
    broker = own_broker()
    proc, base, key, topic = await start_gateway(tmp_path, broker.bootstrap, redis_url, 1)
    async with aiohttp.ClientSession() as session:
        async with post(session, base, key, orjson.dumps(ITEMS[1:])) as warm:
            assert warm.status == 202
        broker.pause()
        try:
            pending = asyncio.create_task(post(session, base, key, orjson.dumps(ITEMS[:1]),
                                               **{"Idempotency-Key": "in-flight"})
                                          .__aenter__())
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert proc.poll() is None  # still waiting for its request
        finally:
            broker.resume()
        resp = await pending
        assert resp.status == 202
        resp.release()
    assert proc.wait(30) == 0
    assert events(await consume_all(broker.bootstrap, topic)) == ITEMS[1:] + ITEMS[:1]


async def test_sigterm_exits_even_with_redis_and_the_broker_gone(tmp_path, own_broker,
                                                                 own_redis):
    """Shutdown must not wait on dependencies that are down: the request outcomes waiting to
    be written are given up (and counted in the logs), the process exits."""
    broker, redis = own_broker(), own_redis()
    proc, base, key, _ = await start_gateway(tmp_path, broker.bootstrap, redis.url, 2)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with post(session, base, key, orjson.dumps(ITEMS)) as resp:
                assert resp.status == 202
        redis.stop()
        async with post(session, base, key, orjson.dumps(ITEMS)) as resp:
            assert resp.status == 503  # and the accounting flush now fails every 50 ms
    await asyncio.sleep(0.5)
    broker.stop()
    code, leftover = stop_gateway(proc)
    assert code == 0 and leftover == [], proc.stdout.read().decode()[-3000:]


async def test_logs_are_json_lines_with_the_request_id(tmp_path, kafka, redis_url):
    proc, base, key, _ = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 1,
                                             SLUICE_ACCESS_LOG="true")
    wrong = key[:-4] + "abcd"
    try:
        async with aiohttp.ClientSession() as session:
            for rid, body, k, status in (("log-ok", orjson.dumps(ITEMS), key, 202),
                                         ("log-bad", b"[{", key, 400),
                                         ("log-key", orjson.dumps(ITEMS), wrong, 401)):
                async with post(session, base, k, body, **{"X-Request-ID": rid}) as resp:
                    assert resp.status == status
        # The key in a header aiohttp cannot parse: answered and logged without quoting it.
        port = int(base.rsplit(":", 1)[1])
        status, headers, answer = await exchange(port, (
            b"POST /v1/datasets/sales/events HTTP/1.1\r\nHost: sluice\r\n"
            b"Authorization: Bearer " + key.encode() + b"\x01\r\nContent-Length: 2\r\n\r\n[]"))
        assert_problem(status, headers, answer, 400, "MALFORMED_REQUEST")
        assert key[len(KEY_PREFIX):].partition("_")[2] not in answer.decode("latin-1")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    output = proc.stdout.read().decode()
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]  # all JSON
    assert lines and all({"ts", "level", "logger", "pid", "msg"} <= line.keys() for line in lines)
    assert any(line["logger"] == "gateway.protocol" and "400 MALFORMED_REQUEST" in line["msg"]
               for line in lines)
    access = {line["request_id"]: line for line in lines if line["logger"] == "sluice.access"
              and line["route"] == "/v1/datasets/{dataset}/events"}
    assert {rid: line["status"] for rid, line in access.items()} == {
        "log-ok": 202, "log-bad": 400, "log-key": 401}
    assert access["log-ok"]["dataset"] == "sales"
    # the secret is everything after the key id (it may itself hold "_": token_urlsafe)
    secret = key[len(KEY_PREFIX):].partition("_")[2]
    assert len(secret) == 32  # 24 random bytes
    leaked = [line for line in output.splitlines()
              if any(text in line for text in (key, wrong, secret))]
    assert not leaked, leaked


async def test_pure_python_parser_broken_framing_mid_body_is_400_not_500(tmp_path, kafka,
                                                                         redis_url):
    """Where aiohttp runs its pure-Python parser (AIOHTTP_NO_EXTENSIONS, or no wheel for the
    platform), chunked framing that breaks after the route began reading reaches the body
    stream as RequestPayloadError: 400 MALFORMED_REQUEST, not a 500 and its traceback."""
    proc, base, key, topic = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 1,
                                                 AIOHTTP_NO_EXTENSIONS="1")
    try:
        head, chunk = chunked_push(key)
        status, headers, answer = await exchange(int(base.rsplit(":", 1)[1]), head, chunk,
                                                 pause=0.2)
        assert_problem(status, headers, answer, 400, "MALFORMED_REQUEST")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "unhandled error" not in proc.stdout.read().decode()
    assert await consume_all(kafka.bootstrap, topic) == []
