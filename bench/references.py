"""The ceilings the gateway is judged against, served like it (uvloop, N processes, one port).

    python -m bench.references bare  --port P --processes N
    python -m bench.references relay --port P --processes N --bootstrap HOST:PORT --topic T

bare: reads the body and answers 202 (the HTTP ceiling). relay: parses the body with orjson
and publishes it as one record with acks=all before answering 202, and nothing else: no auth,
validation, dedupe, limits or metrics (the ceiling of an aiohttp edge in front of Kafka).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import orjson
import uvloop
from aiohttp import web
from aiokafka import AIOKafkaProducer


async def bare(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


def relay_app(bootstrap: str, topic: str, linger_ms: int) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    producer_key = web.AppKey("producer", AIOKafkaProducer)

    async def producer(app: web.Application):
        kafka = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                 enable_idempotence=False, linger_ms=linger_ms,
                                 max_batch_size=2 * 1024 * 1024,
                                 max_request_size=2 * 1024 * 1024)
        await kafka.start()
        app[producer_key] = kafka
        yield
        await kafka.stop()

    async def relay(request: web.Request) -> web.Response:
        body = await request.read()
        orjson.loads(body)  # a relay must at least refuse what is not JSON
        await request.app[producer_key].send_and_wait(topic, body)
        return web.Response(status=202)

    app.cleanup_ctx.append(producer)
    app.router.add_post("/{tail:.*}", relay)
    return app


def bare_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", bare)
    return app


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bare", "relay"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--linger-ms", type=int, default=0)
    args = parser.parse_args()

    def child() -> None:
        app = (bare_app() if args.kind == "bare"
               else relay_app(args.bootstrap, args.topic, args.linger_ms))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(app, args.port))

    pids = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:
            child()
            os._exit(0)
        pids.append(pid)

    def forward(signum, _frame):
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in pids:
        os.waitpid(pid, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
