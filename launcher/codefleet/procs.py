"""Child processes: own process group, die with the launcher, stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM when the launcher dies, so nothing is orphaned.

    If the launcher died between fork and prctl, the signal will never come: exit at once.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != parent:
        os._exit(1)


class _Reaper:
    """This process's watchdog (``codefleet.reaper``): told every group spawned and stopped, it
    kills the ones left when this process is gone. One per process, like the parent-death signal
    it completes; started with the first spawn."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def tell(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._pid != os.getpid():  # none yet, or inherited across a fork
                self._pid = os.getpid()
                self._proc = subprocess.Popen([sys.executable, "-m", "codefleet.reaper"], stdin=subprocess.PIPE,
                                              stdout=subprocess.DEVNULL, start_new_session=True)
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(line.encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):  # the watchdog is gone: the parent-death signal remains
                pass


_reaper = _Reaper()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a process group of its own that dies with this process (SIGTERM from the
    kernel, then SIGKILL from the watchdog after its grace)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    _reaper.tell(f"+{proc.pid}")
    return proc


def group_alive(pgid: int) -> bool:
    """A member of the group is still running. Zombies do not count: where PID 1 does not reap
    orphans (seen on these machines), an engine's killed EngineCore and workers stay in its group
    as zombies, and ``killpg(pgid, 0)`` alone would wait for them forever."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split(" ", 3)[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def stop_group(pgid: int, grace: float = 20.0) -> None:
    """SIGTERM the whole process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    _reaper.tell(f"-{pgid}")
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        _reap()
        if not group_alive(pgid):
            return
        time.sleep(0.1)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before by this process. The kernel may give a port it
    just released to the next bind(0): two replicas of one fleet once got the same port in CI
    (granite-code-tiny-1 and stable-code-tiny-0 both "ready" on :60559, and the router sent
    granite-code requests to the stable-code engine)."""
    with _handed_out_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                 log: Path | None = None) -> None:
    """Wait until ``url``/health answers 200; RuntimeError with the log's tail if ``proc`` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}" + (f":\n{tail(log)}" if log else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy after {timeout:.0f} s" + (f":\n{tail(log)}" if log else ""))
        time.sleep(0.05)

