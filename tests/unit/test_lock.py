"""The dependency locks: every package at one known version, in the virtualenv the tests run
in and in the image, so a release upstream changes nothing until `make lock` takes it in."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
FUZZ = ROOT / "tests" / "fuzz"


def pins(path: Path) -> dict[str, str]:
    """name -> version of each line ``name==version`` (comments and options left out)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: an option in a lock: {line}"
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", line
        out[canonicalize_name(requirement.name)] = spec.version
    return out


def test_every_dependency_is_locked_at_a_version_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = pins(LOCK)
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt locks {name} {locked[name]}, pyproject asks {requirement}")


def test_the_tests_run_with_the_locked_versions():
    locked = pins(LOCK)
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions()}
    differ = {name: (version, installed[name]) for name, version in locked.items()
              if installed.get(name, version) != version}
    missing = set(locked) - set(installed)
    assert not differ, f"installed versions differ from the lock (locked, installed): {differ}"
    assert not missing, f"locked but not installed: {sorted(missing)}"


def test_the_fuzzers_virtualenv_is_locked_too():
    locked = pins(FUZZ / "constraints.txt")
    for line in (FUZZ / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            assert requirement.specifier.contains(locked[canonicalize_name(requirement.name)])


def test_the_makefile_and_the_image_install_with_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[dev\]'", makefile)
    assert re.search(r"pip install .*-c tests/fuzz/constraints\.txt -r tests/fuzz/", makefile)
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install -c constraints\.txt /src", dockerfile, re.M)
