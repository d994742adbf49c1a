"""The process supervisor (schemas.runtime) stops every child on SIGTERM, whenever it comes:
during a replacement's back-off, or while a child is still starting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A supervised child that starts slowly (``start_s``) before it handles SIGTERM by exiting 0,
# and whose first incarnation dies at once when ``die_first`` (so that it is replaced).
_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from schemas.runtime import supervise

marks = Path(sys.argv[1])
start_s = float(sys.argv[2])
die_first = sys.argv[3] == "1"

def child():
    n = len(list(marks.glob("child-*")))
    (marks / f"child-{n}-{os.getpid()}").touch()
    if die_first and n == 0:
        os._exit(1)
    time.sleep(start_s)  # starting: no handler of its own yet
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    (marks / f"ready-{os.getpid()}").touch()
    while True:
        signal.pause()

sys.exit(supervise(child, 1, "test"))
"""


def _start(tmp_path: Path, start_s: float, die_first: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path), str(start_s),
                             "1" if die_first else "0"], cwd=ROOT)


def _wait_for(path_glob, tmp_path: Path, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.glob(path_glob))) < count:
        assert time.monotonic() < deadline, f"no {path_glob} in {timeout} s"
        time.sleep(0.02)


def _stops(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)  # children first
        proc.kill()
        proc.wait()
        pytest.fail("the supervisor did not stop within 10 s of SIGTERM")


def test_sigterm_during_a_replacements_back_off_stops_the_group(tmp_path):
    proc = _start(tmp_path, start_s=0.0, die_first=True)
    _wait_for("child-0-*", tmp_path)
    time.sleep(0.5)  # noticed (0.2 s polls), now in the 1 s back-off before the replacement
    proc.send_signal(signal.SIGTERM)
    assert _stops(proc) == 0
    assert len(list(tmp_path.glob("child-*"))) == 1  # no replacement after the SIGTERM


def test_sigterm_while_a_child_is_starting_stops_it(tmp_path):
    proc = _start(tmp_path, start_s=3.0, die_first=False)
    _wait_for("child-*", tmp_path)
    proc.send_signal(signal.SIGTERM)  # the child has no handler of its own yet
    assert _stops(proc) == 0
    assert not list(tmp_path.glob("ready-*"))


def test_sigterm_stops_started_children(tmp_path):
    proc = _start(tmp_path, start_s=0.0, die_first=False)
    _wait_for("ready-*", tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert _stops(proc) == 0


# A supervisor passing SIGHUP on (as `sluice serve` does), whose children take a second to
# reach _child, where they set their own signal actions: the window in which a fresh child
# still holds the supervisor's handlers, widened so that a SIGHUP reliably lands in it.
_HANGUP_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
import schemas.runtime as runtime

marks = Path(sys.argv[1])
forked = runtime._child

def slow_child(target, hangup):
    (marks / f"forked-{os.getpid()}").touch()
    time.sleep(1.0)
    forked(target, hangup)

runtime._child = slow_child

def child():
    n = len(list(marks.glob("child-*")))
    (marks / f"child-{n}-{os.getpid()}").touch()
    if n == 0:
        os._exit(1)  # the first dies: its replacement is forked while the list holds it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()

sys.exit(runtime.supervise(child, 1, "test", hangup=True))
"""


def test_a_sighup_reaching_a_child_before_its_own_handlers_does_not_kill_it(tmp_path):
    """The supervisor passes SIGHUP on to every live child, a replacement just forked
    included. That child ran the supervisor's handler it had inherited, which failed on
    the supervisor's process objects, and the child died (and was replaced, and could die
    again the same way). Signals now stay blocked across the fork until the child has its
    own actions: the SIGHUP is ignored, as it is by a child that has not started serving."""
    proc = subprocess.Popen([sys.executable, "-c", _HANGUP_SCRIPT, str(tmp_path)], cwd=ROOT)
    try:
        _wait_for("forked-*", tmp_path, count=2)  # the replacement, in its window
        proc.send_signal(signal.SIGHUP)  # passed on to the replacement
        _wait_for("child-1-*", tmp_path)
        time.sleep(2.5)  # another replacement would follow the 1 s back-off and its window
        assert sorted(p.name.split("-")[1] for p in tmp_path.glob("child-*")) == ["0", "1"]
        assert len(list(tmp_path.glob("forked-*"))) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert _stops(proc) == 0
