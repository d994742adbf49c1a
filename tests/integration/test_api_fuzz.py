"""The served gateway against its OpenAPI description, fuzzed by schemathesis.

schemathesis (in its own virtualenv, `make fuzz-venv`) generates requests from
docs/openapi.yaml, valid and invalid, sends them to a real gateway process (real Redis and
Tansu) and checks every answer: no 5xx, status codes, content types, headers and bodies as
documented, invalid requests refused and valid ones accepted. Then the events in the entry
topic must be exactly those the answers acknowledged. The seed is fixed so that a failure
reproduces; SLUICE_FUZZ_SEED and SLUICE_FUZZ_EXAMPLES explore further.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.integration.test_push import events
from tests.integration.test_server import start_gateway, stop_gateway
from tests.services import consume_all

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FUZZER = ROOT / ".venv" / "schemathesis" / "bin" / "st"
SPEC = ROOT / "docs" / "openapi.yaml"
# Requests reach real data: the dataset, connector and ingestion session that exist. A push or
# chunk that schemathesis calls valid may still get a 400: it cannot write gzip bodies for the
# Content-Encoding it picks, and any X-Item-Key is refused by a dataset without an item key.
# It also sends one Idempotency-Key with different bodies, which is refused with 422, and log
# cursors (`after`) of its own making, which name no entry: 400.
# (One worker: hypothesis describes its strategies with ast.parse, which CPython 3.11 does not
# make safe across threads.)
CONFIG = """\
headers = {{ Authorization = "Bearer {key}" }}

[parameters]
"path.dataset" = "other"
"path.connector" = "crm"
"path.ingestion_id" = "{session}"

[[operations]]
include-name = ["POST /v1/datasets/{{dataset}}/events",
                "POST /v1/ingestions/{{ingestion_id}}/chunks"]
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404, 409, 422, 429]

[[operations]]
include-name = "GET /v1/connectors/{{connector}}/logs"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 403, 404]

[[operations]]
include-name = "POST /v1/ingestions"
checks.positive_data_acceptance.expected-statuses = ["2xx", 401, 403, 404, 409, 422, 429]
"""


RATE_LIMITED = {"SLUICE_RATE_LIMIT_RPS": "5", "SLUICE_RATE_LIMIT_BURST": "5"}


@pytest.mark.parametrize("env", [{}, RATE_LIMITED], ids=["unlimited", "rate-limited"])
async def test_the_api_answers_as_its_openapi_description_says(tmp_path, kafka, redis_url, env):
    """Rate-limited too, so that most pushes, chunks and opens get the 429 answer (with its
    Retry-After and RateLimit-* headers) or carry the RateLimit-* headers of a 2xx."""
    if not FUZZER.exists():
        pytest.fail(f"{FUZZER} is missing: `make fuzz-venv` installs it (`make test` does)")
    # The append-only dataset whose schema takes any object: generated bodies are valid.
    proc, base, key, topic = await start_gateway(tmp_path, kafka.bootstrap, redis_url, 1,
                                                 dataset="other", **env)
    async with aiohttp.ClientSession() as client, client.post(
            f"{base}/v1/ingestions", json={"dataset": "other"},
            headers={"Authorization": f"Bearer {key}"}) as opened:
        assert opened.status == 201, await opened.text()
        session = (await opened.json())["ingestion_id"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(key=key, session=session))
    try:
        fuzzer = await asyncio.create_subprocess_exec(
            str(FUZZER), "--no-color", "--config-file", str(config), "run", str(SPEC),
            "--url", base, "--checks", "all", "--workers", "1",
            # how often hypothesis discards header values (its efficiency, not the API's)
            "--suppress-health-check", "filter_too_much",
            "--max-examples", os.environ.get("SLUICE_FUZZ_EXAMPLES", "20"),
            "--seed", os.environ.get("SLUICE_FUZZ_SEED", "1"),
            "--request-timeout", "10", "--output-truncate", "false",
            "--report", "har", "--report-har-path", str(tmp_path / "fuzz.har"),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(fuzzer.communicate(), 300)
    finally:
        code, leftover = stop_gateway(proc)
    report = output.decode(errors="replace")
    assert fuzzer.returncode == 0, report[-60000:]
    assert code == 0 and leftover == []
    # Whatever the requests were, what the gateway acknowledged is exactly what it published.
    published = events(await consume_all(kafka.bootstrap, topic))
    assert len(published) == acknowledged(tmp_path / "fuzz.har") > 0


def acknowledged(har: Path) -> int:
    """Events acknowledged in the fuzzer's recorded exchanges: ``items_accepted`` of every push
    answered 202 and chunk answered 201, except replays (they publish nothing)."""
    total = 0
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path, status = urlsplit(entry["request"]["url"]).path, entry["response"]["status"]
        headers = {h["name"].lower(): h["value"] for h in entry["response"]["headers"]}
        if entry["request"]["method"] != "POST" or headers.get("idempotent-replayed"):
            continue
        if (path.endswith("/events") and status == 202) or (
                path.endswith("/chunks") and status == 201):
            total += json.loads(entry["response"]["content"]["text"])["items_accepted"]
    return total
