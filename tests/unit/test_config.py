"""Settings from the environment: defaults and a clear message for each bad value."""

import os

import pytest
import yaml

from gateway.config import VARIABLES, ConfigError, Settings, check_body_budget, markdown_table
from schemas.metrics_export import MULTIPROC_ENV, prepare_multiprocess
from schemas.redis_client import SentinelUrl, sentinel_url


def test_defaults():
    settings = Settings.from_env({})
    assert settings.port == 8080
    assert settings.kafka_idempotence is True
    assert settings.idempotency_ttl_s == 86400


@pytest.mark.parametrize("name, value", [
    ("SLUICE_PORT", "70000"),
    ("SLUICE_PROCESSES", "zero"),
    ("REDIS_URL", "http://x"),
    ("REDIS_URL", "redis+sentinel://s1:26379"),  # no service name
    ("REDIS_URL", "redis+sentinel://s1:port/sluice"),
    ("KAFKA_BOOTSTRAP_SERVERS", "nohost"),
    ("KAFKA_ENABLE_IDEMPOTENCE", "maybe"),
    ("KAFKA_COMPRESSION", "brotli"),
    ("SLUICE_ADMIN_KEYS", "ops:short"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize("url, expected", [
    ("redis+sentinel://s1:26380,s2/sluice",
     SentinelUrl([("s1", 26380), ("s2", 26379)], "sluice")),
    ("redis+sentinel://:p%40ss@s1/sluice/3?sentinel_password=sp",
     SentinelUrl([("s1", 26379)], "sluice", 3, None, "p@ss", "sp")),
    ("redis+sentinel://app:pw@s1:26379/sluice",
     SentinelUrl([("s1", 26379)], "sluice", 0, "app", "pw")),
])
def test_sentinel_urls(url, expected):
    assert sentinel_url(url) == expected
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url


def test_worker_session_timeout_is_bounded():
    from workers.config import WorkerSettings

    assert WorkerSettings.from_env({}).session_timeout_ms == 10_000
    with pytest.raises(ConfigError, match="WORKER_SESSION_TIMEOUT_MS"):
        WorkerSettings.from_env({"WORKER_SESSION_TIMEOUT_MS": "500"})


def test_lock_must_outlive_publish_timeout():
    with pytest.raises(ConfigError, match="LOCK_TTL"):
        Settings.from_env({"SLUICE_IDEMPOTENCY_LOCK_TTL_S": "5", "KAFKA_PUBLISH_TIMEOUT_S": "10"})


def test_table_lists_every_variable():
    table = markdown_table()
    assert all(f"`{name}`" in table for name in VARIABLES)


def test_readme_documents_every_variable():
    from pathlib import Path

    from workers.config import VARIABLES as WORKER_VARIABLES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in {**VARIABLES, **WORKER_VARIABLES} if f"| `{name}` |" not in readme]
    assert not missing, f"README's configuration tables lack {missing}"


def test_an_empty_metrics_directory_setting_is_dropped_before_prometheus_reads_it(monkeypatch):
    """prometheus-client takes an empty PROMETHEUS_MULTIPROC_DIR as the current directory."""
    monkeypatch.setenv(MULTIPROC_ENV, "")
    prepare_multiprocess("gateway", 1)
    assert MULTIPROC_ENV not in os.environ


def test_a_metrics_directory_is_made_for_one_process_too(monkeypatch, tmp_path):
    directory = tmp_path / "a" / "b"
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    prepare_multiprocess("gateway", 1)
    assert directory.is_dir()


def test_admin_keys_are_checked_like_dataset_keys():
    digest = "ab" * 32
    keys = Settings.from_env({"SLUICE_ADMIN_KEYS": f"ops:{digest.upper()}"}).admin_keys
    assert [(k.key_id, k.sha256) for k in keys] == [("ops", digest)]
    for bad in (f"Ops_1:{digest}", f"ops:{'zz' * 32}", "ops:abc", digest, f"kafka:{digest}"):
        with pytest.raises(ConfigError, match="SLUICE_ADMIN_KEYS"):
            Settings.from_env({"SLUICE_ADMIN_KEYS": bad})


def test_sessions_time_out_before_their_state_is_forgotten(tmp_path, monkeypatch, capsys):
    """A session's hash lives SLUICE_LOG_MAX_AGE_S after its last activity, its timeout
    SLUICE_SESSION_MAX_TIMEOUT_S: with LOG_MAX_AGE 3600 and a 7200 s session idle for over an
    hour, its chunks and reads got 404 SESSION_NOT_FOUND while it was still pending."""
    bad = {"SLUICE_LOG_MAX_AGE_S": "3600", "SLUICE_SESSION_MAX_TIMEOUT_S": "7200"}
    with pytest.raises(ConfigError, match=r"SLUICE_SESSION_MAX_TIMEOUT_S.*SLUICE_LOG_MAX_AGE_S"):
        Settings.from_env(bad)
    with pytest.raises(ConfigError, match="SLUICE_SESSION_MAX_TIMEOUT_S"):  # the default 86400
        Settings.from_env({"SLUICE_LOG_MAX_AGE_S": "3600", "SLUICE_SESSION_TIMEOUT_S": "600"})
    with pytest.raises(ConfigError):
        Settings.from_env({**bad, "SLUICE_SESSION_MAX_TIMEOUT_S": "3600"})  # not even equal
    settings = Settings.from_env({**bad, "SLUICE_SESSION_MAX_TIMEOUT_S": "3599",
                                  "SLUICE_SESSION_TIMEOUT_S": "900"})
    assert (settings.session_max_timeout_s, settings.log_max_age_s) == (3599, 3600)
    # the gateway's commands stop at start with the message (exit code 2)
    from gateway.cli import main

    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert "SLUICE_SESSION_MAX_TIMEOUT_S (7200)" in err and "SLUICE_LOG_MAX_AGE_S (3600)" in err


def _catalogue(tmp_path, **limits):
    from schemas.catalogue import load_catalogue

    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"id": "big", "schema": {"type": "object"},
                                                       **limits}))
    return load_catalogue(tmp_path, Settings.from_env({}).limits, ())


def test_body_budget_defaults_to_admitting_the_largest_default_body(tmp_path):
    settings = Settings.from_env({})
    assert settings.max_inflight_body_bytes >= settings.max_decompressed_bytes
    assert settings.max_inflight_body_bytes >= settings.max_request_bytes
    check_body_budget(settings, _catalogue(tmp_path))


def test_body_budget_smaller_than_a_datasets_limit_is_refused_naming_both(tmp_path):
    catalogue = _catalogue(tmp_path, max_decompressed_bytes=64 * 2**20)
    with pytest.raises(ConfigError, match=r"SLUICE_MAX_INFLIGHT_BODY_BYTES \(16777216\).*"
                                          r"67108864 bytes \(dataset 'big'"):
        check_body_budget(Settings.from_env({}), catalogue)
    check_body_budget(Settings.from_env({"SLUICE_MAX_INFLIGHT_BODY_BYTES": str(64 * 2**20)}),
                      catalogue)
    small = Settings.from_env({"SLUICE_MAX_INFLIGHT_BODY_BYTES": "1000"})
    with pytest.raises(ConfigError, match="SLUICE_MAX_INFLIGHT_BODY_BYTES"):
        check_body_budget(small, catalogue)
    with pytest.raises(ConfigError, match="SLUICE_MAX_INFLIGHT_BODY_BYTES"):
        Settings.from_env({"SLUICE_MAX_INFLIGHT_BODY_BYTES": "0"})


def test_create_app_refuses_a_body_budget_below_a_datasets_limit(tmp_path):
    from gateway.app import create_app

    _catalogue(tmp_path, max_request_bytes=4096, max_decompressed_bytes=8192)
    settings = Settings.from_env({"SLUICE_CATALOGUE_DIR": str(tmp_path),
                                  "SLUICE_MAX_INFLIGHT_BODY_BYTES": "8191"})
    with pytest.raises(ConfigError, match="SLUICE_MAX_INFLIGHT_BODY_BYTES"):
        create_app(settings)
    create_app(Settings.from_env({"SLUICE_CATALOGUE_DIR": str(tmp_path),
                                  "SLUICE_MAX_INFLIGHT_BODY_BYTES": "8192"}))


def test_workers_read_the_gateways_idempotency_retention():
    """An append-only table skips a key's copies for as long as the gateway keeps the key:
    the same variable, with the same default, on both sides."""
    from workers.config import VARIABLES as WORKER_VARIABLES
    from workers.config import WorkerSettings

    name = "SLUICE_IDEMPOTENCY_TTL_S"
    assert WORKER_VARIABLES[name][:2] == VARIABLES[name][:2] == ("idempotency_ttl_s", "86400")
    env = {name: "3600"}
    assert WorkerSettings.from_env(env).idempotency_ttl_s == 3600
    assert Settings.from_env(env).idempotency_ttl_s == 3600
