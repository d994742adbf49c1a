"""`sluice keys create` on a catalogue directory: never writes a catalogue that cannot load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gateway.cli import _append_key, main
from schemas.catalogue import load_catalogue
from schemas.dataset import Limits
from schemas.keys import hash_key, new_key

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"


@pytest.fixture
def catalogue(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "catalogue"
    shutil.copytree(EXAMPLES, directory)
    monkeypatch.delenv("SLUICE_ADMIN_KEYS", raising=False)
    return directory


def create(directory: Path, *args: str) -> int:
    return main(["keys", "create", "--catalogue", str(directory), *args])


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def keys_of(directory: Path, dataset: str) -> list[dict]:
    return yaml.safe_load((directory / f"{dataset}.yaml").read_text())["ingest_keys"]


def test_a_new_key_is_written_and_printed_once(catalogue, capsys):
    assert create(catalogue, "--dataset", "sales", "--id", "pos-terminals", "--write") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk_pos-terminals_")
    assert keys_of(catalogue, "sales") == [{"id": "pos-terminals", "sha256": hash_key(key)}]
    principal = load_catalogue(catalogue, Limits()).authenticate(key)
    assert principal.datasets == {"sales"}


def test_an_existing_key_id_for_another_dataset_is_granted_it_with_its_secret(catalogue,
                                                                             capsys):
    """It got a new secret with another hash, and the catalogue no longer loaded ("declared
    with two different hashes"): the next gateway and workers could not start."""
    assert create(catalogue, "--dataset", "sales", "--id", "pos-terminals", "--write") == 0
    key = capsys.readouterr().out.strip()
    assert create(catalogue, "--dataset", "journal", "--id", "pos-terminals", "--write") == 0
    out = capsys.readouterr().out
    assert "granted the existing key 'pos-terminals'" in out and "sk_" not in out
    assert keys_of(catalogue, "journal") == [{"id": "pos-terminals", "sha256": hash_key(key)}]
    principal = load_catalogue(catalogue, Limits()).authenticate(key)
    assert principal.datasets == {"sales", "journal"}


def test_without_write_the_existing_keys_line_is_printed_and_nothing_created(catalogue,
                                                                            capsys):
    assert create(catalogue, "--dataset", "sales", "--id", "pos-terminals", "--write") == 0
    key = capsys.readouterr().out.strip()
    before = files(catalogue)
    assert create(catalogue, "--dataset", "telemetry", "--id", "pos-terminals") == 0
    printed = capsys.readouterr()
    assert f"sha256: {hash_key(key)}" in printed.err
    assert "no new key was created" in printed.out and "sk_" not in printed.out
    assert files(catalogue) == before


@pytest.mark.parametrize("args, reason", [
    (("--dataset", "sales", "--id", "pos-terminals"), "may write dataset 'sales' already"),
    (("--dataset", "sales", "--id", "pos-terminals", "--write"),
     "may write dataset 'sales' already"),
    (("--dataset", "journal", "--id", "ops", "--write"), "is an admin key"),
    (("--dataset", "nope", "--id", "other", "--write"), "no dataset 'nope'"),
    (("--dataset", "sales", "--id", "kafka", "--write"), "reserved for records written"),
    (("--dataset", "sales", "--id", "Bad_1"), "must match"),
])
def test_what_would_break_the_catalogue_is_refused_and_nothing_written(
        catalogue, capsys, monkeypatch, args, reason):
    assert create(catalogue, "--dataset", "sales", "--id", "pos-terminals", "--write") == 0
    capsys.readouterr()
    monkeypatch.setenv("SLUICE_ADMIN_KEYS", f"ops:{hash_key(new_key('ops'))}")
    before = files(catalogue)
    assert create(catalogue, *args) == 2
    printed = capsys.readouterr()
    assert reason in printed.err and printed.out == ""
    assert files(catalogue) == before
    load_catalogue(catalogue, Limits())  # still loads


def test_a_write_is_checked_against_the_whole_catalogue(catalogue):
    """Replacing a key's hash in one file (as `make run` does for its development key) while
    another file holds the key with its old hash is refused before anything is written."""
    assert main(["keys", "create", "--catalogue", str(catalogue), "--dataset", "sales",
                 "--id", "quickstart", "--write"]) == 0
    assert main(["keys", "create", "--catalogue", str(catalogue), "--dataset", "journal",
                 "--id", "quickstart", "--write"]) == 0
    before = files(catalogue)
    with pytest.raises(Exception, match="two different hashes") as refused:
        _append_key(catalogue, "sales", {"id": "quickstart", "sha256": hash_key("other")})
    assert str(catalogue) in str(refused.value) and "nothing written" in str(refused.value)
    assert files(catalogue) == before
