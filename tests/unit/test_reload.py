"""gateway.reload: a catalogue replaces the serving one only whole and checked; files that fail
are reported once; SIGHUP reloads whatever the files look like."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gateway.config import Settings, load_checked_catalogue
from gateway.reload import CatalogueReloads
from gateway.state import STATE
from schemas import metrics
from schemas.catalogue import catalogue_stamp, load_catalogue
from schemas.dataset import Limits
from schemas.keys import hash_key, new_key

DATASET = {
    "id": "sales",
    "schema": {"type": "object"},
    "max_request_bytes": 4096,
    "max_decompressed_bytes": 4096,
}


def _write(directory: Path, **changes) -> None:
    path = directory / "sales.yaml"
    path.write_text(yaml.safe_dump({**DATASET, **changes}))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))  # a new stamp for certain


def _reloads(directory: Path, **env: str) -> tuple[CatalogueReloads, SimpleNamespace]:
    """Reloads of a catalogue in ``directory`` (not started), and a State serving it."""
    _write(directory)
    settings = Settings.from_env(
        {"SLUICE_CATALOGUE_DIR": str(directory), "SLUICE_CATALOGUE_RELOAD_S": "0", **env}
    )
    stamp = catalogue_stamp(directory)
    state = SimpleNamespace(catalogue=load_checked_catalogue(settings), reload_failed=False)
    return CatalogueReloads(settings, stamp), state


async def test_a_catalogue_the_gateway_would_not_start_with_leaves_the_old_one(tmp_path, caplog):
    """Loading is not all: start-up's body budget check refuses a limit above
    SLUICE_MAX_INFLIGHT_BODY_BYTES, and so does a reload; once, for the same files."""
    reloads, state = _reloads(tmp_path, SLUICE_MAX_INFLIGHT_BODY_BYTES="8192")
    serving = state.catalogue
    _write(tmp_path, max_request_bytes=10_000)
    for _ in range(3):
        await reloads.reload(state)
    assert state.catalogue is serving and state.reload_failed
    assert metrics.CATALOGUE_RELOAD_FAILED._value.get() == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "SLUICE_MAX_INFLIGHT_BODY_BYTES (8192)" in errors[0] and "'sales'" in errors[0]
    reloads.hangup()  # asked for: tried (and reported) again
    await reloads.reload(state)
    assert state.catalogue is serving
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    _write(tmp_path, max_request_bytes=8192)
    await reloads.reload(state)
    assert state.catalogue.get("sales").max_request_bytes == 8192
    assert not state.reload_failed and metrics.CATALOGUE_RELOAD_FAILED._value.get() == 0


async def test_unchanged_files_are_not_read_again_unless_sighup_asks(tmp_path, caplog):
    caplog.set_level(logging.INFO, "gateway.reload")
    reloads, state = _reloads(tmp_path)
    serving = state.catalogue
    await reloads.reload(state)
    assert state.catalogue is serving
    reloads.hangup()
    await reloads.reload(state)
    assert state.catalogue is not serving
    assert [r.getMessage().rsplit(": ", 1)[1] for r in caplog.records] == ["no change"]


async def test_sighup_reloads_at_once_also_while_the_process_starts(tmp_path):
    """With the periodic checks off: a SIGHUP before the process has started is a reload as
    soon as it has, and one while it runs wakes the reloads."""
    reloads, state = _reloads(tmp_path)
    _write(tmp_path, title="Renamed")
    reloads.hangup()  # no State yet: remembered
    running = reloads.running({STATE: state})
    await anext(running)
    await _until(lambda: state.catalogue.get("sales").title == "Renamed")
    _write(tmp_path, title="Again")
    reloads.hangup()
    await _until(lambda: state.catalogue.get("sales").title == "Again")
    with pytest.raises(StopAsyncIteration):
        await anext(running)


async def _until(condition, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_changes_name_datasets_and_key_ids_only(tmp_path):
    key, other = new_key("pos"), new_key("crm")
    _write(tmp_path, ingest_keys=[{"id": "pos", "sha256": hash_key(key)}])
    before = load_catalogue(tmp_path, Limits())
    _write(tmp_path, ingest_keys=[{"id": "crm", "sha256": hash_key(other)}], title="T")
    (tmp_path / "new.yaml").write_text(yaml.safe_dump({**DATASET, "id": "new"}))
    after = load_catalogue(tmp_path, Limits())
    assert after.changes_from(before) == [
        "datasets added: new",
        "datasets changed: sales",
        "keys added: crm",
        "keys removed: pos",
    ]
    assert after.changes_from(after) == []


async def test_a_half_written_file_is_a_failed_reload_reported_once(tmp_path, caplog):
    """A definition file read while it is being written (cut short) can parse as YAML with a
    field holding null or a string where a mapping belongs: that is a file that fails to
    load (the old catalogue serving, the gauge, one ERROR), not an exception out of the
    reload logged with its traceback at every check."""
    reloads, state = _reloads(tmp_path)
    serving = state.catalogue
    path = tmp_path / "sales.yaml"
    full = yaml.safe_dump({**DATASET, "schema": {"type": "object",
                                                 "properties": {"a": {"type": "string"}}}})
    for cut in ("properties:", "properties: {a: ", "required:"):
        text = full.split("properties:")[0] + cut if cut != "required:" else (
            yaml.safe_dump({**DATASET, "schema": {"type": "object", "required": None}}))
        path.write_text(text)
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
        caplog.clear()
        for _ in range(2):
            await reloads.reload(state)
        assert state.catalogue is serving and state.reload_failed, text
        assert metrics.CATALOGUE_RELOAD_FAILED._value.get() == 1
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(path) in errors[0].getMessage(), text



async def test_an_edit_keeping_the_size_and_the_mtime_is_seen(tmp_path):
    """A key rotated in place (one hash for another: the same size) within the file system's
    timestamp granularity of the previous write, or by a tool that keeps the modification
    time (cp -p, rsync -t, tar): the old key must stop working all the same."""
    old, new = new_key("pos"), new_key("pos")
    reloads, state = _reloads(tmp_path)
    _write(tmp_path, ingest_keys=[{"id": "pos", "sha256": hash_key(old)}])
    await reloads.reload(state)
    assert state.catalogue.authenticate(old) is not None
    path = tmp_path / "sales.yaml"
    before = path.stat()
    path.write_text(path.read_text().replace(hash_key(old), hash_key(new)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
    assert path.stat().st_size == before.st_size
    await reloads.reload(state)
    assert state.catalogue.authenticate(old) is None
    assert state.catalogue.authenticate(new) is not None
