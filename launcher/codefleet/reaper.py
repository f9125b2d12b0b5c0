"""The watchdog that makes sure nothing outlives the launcher: ``python -m codefleet.reaper``.

``procs.spawn`` starts one per launcher process, in a session of its own (a terminal's Ctrl-C or
hangup does not reach it), and tells it on its stdin every process group it starts (``+PGID``)
and stops (``-PGID``). When its stdin closes (the launcher exited, cleanly or by SIGKILL), it
sends SIGTERM to every group still listed, waits ``GRACE_S``, then SIGKILLs what is left: an
engine stuck in its shutdown cannot survive the launcher. Children already get SIGTERM from the
kernel when the launcher dies (PR_SET_PDEATHSIG); that signal alone does not reach their own
children (vLLM's EngineCore and workers) nor end an engine that hangs while shutting down.
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE_S = 5.0


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_all(groups: set[int], sig: signal.Signals) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass


def reap(groups: set[int], grace: float = GRACE_S) -> None:
    _signal_all(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(g) for g in groups):
        time.sleep(0.1)
    _signal_all({g for g in groups if _alive(g)}, signal.SIGKILL)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        op, pgid = line[:1], line[1:].strip()
        if pgid.isdigit():
            (groups.add if op == "+" else groups.discard)(int(pgid))
    if groups:
        reap(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
