"""Nothing outlives the launcher: children spawned through procs.spawn die when it is SIGKILLed, even
a child that ignores SIGTERM (as an engine stuck in its shutdown does); a zombie launcher is not running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from codefleet.cli_fleet import _pid_alive
from codefleet.procs import group_alive

PARENT = """
import sys, time
from pathlib import Path
from codefleet.procs import spawn
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
procs = [spawn([sys.executable, "-c", stubborn], {}, Path(sys.argv[1]) / f"child{i}.log") for i in range(2)]
Path(sys.argv[1], "pids").write_text(" ".join(str(p.pid) for p in procs))
time.sleep(600)
"""


def _wait(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_children_that_ignore_sigterm_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], start_new_session=True)
    try:
        assert _wait(lambda: (tmp_path / "pids").exists(), 30), "the parent did not start its children"
        children = [int(p) for p in (tmp_path / "pids").read_text().split()]
        time.sleep(0.5)  # the children have set their SIGTERM handler
        assert all(group_alive(c) for c in children)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        # The kernel's SIGTERM is ignored; the watchdog's SIGKILL comes after its 5 s grace.
        assert _wait(lambda: not any(group_alive(c) for c in children), 15), \
            f"still alive after the parent's SIGKILL: {[c for c in children if group_alive(c)]}"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)


def test_a_zombie_is_not_a_running_launcher() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _wait(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z", 10)
    assert not _pid_alive(child.pid)  # exited, not yet reaped: kill(pid, 0) alone would say alive
    child.wait()
    assert not _pid_alive(child.pid)
    assert _pid_alive(os.getpid())
