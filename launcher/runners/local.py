"""Local runner: every replica as a vLLM OpenAI server process on this host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from codefleet import demo_models
from codefleet.engine import engine_command
from codefleet.errors import RuntimeStartError
from codefleet.planner import FleetPlan, ReplicaPlan
from codefleet.procs import free_port, spawn, stop_group, tail

Say = Callable[[str], None]


def state_dir() -> Path:
    base = os.environ.get("CODEFLEET_HOME") or os.path.join(Path.home(), ".cache", "codefleet")
    return Path(base) / "run"


@dataclass
class Replica:
    plan: ReplicaPlan
    index: int
    host: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    started_at: float = 0.0
    startup_seconds: float | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.plan.name}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class LocalFleet:
    """Starts, watches and stops the engines of a plan. Use as a context manager."""

    plan: FleetPlan
    host: str = "127.0.0.1"
    enforce_eager: bool = False
    run_dir: Path = field(default_factory=state_dir)
    say: Say = print
    python: str = sys.executable
    replicas: list[Replica] = field(default_factory=list)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state_file(self) -> Path:
        return self.run_dir / "fleet.json"

    def _launch(self, r: Replica) -> None:
        cmd = engine_command(r.plan, host=r.host, port=r.port, python=self.python,
                             enforce_eager=self.enforce_eager)
        r.proc = spawn(cmd.argv, cmd.env, r.log)
        r.started_at = time.monotonic()
        r.ready = False

    def start(self, timeout: float = 900.0) -> None:
        """Start every replica and wait until all are healthy; on failure stop everything."""
        for p in self.plan.models:
            if p.demo is not None:
                demo_models.ensure(p.demo)
        logs = self.run_dir / "logs"
        try:
            for p in self.plan.models:
                for i in range(p.replicas):
                    r = Replica(p, i, self.host, free_port(self.host), logs / f"{p.name}-{i}.log")
                    r.log.unlink(missing_ok=True)
                    self.replicas.append(r)
                    self._launch(r)
            self.write_state()
            self._wait_healthy(timeout)
            self.write_state()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        t0 = time.monotonic()
        last_report = 0.0
        with httpx.Client(timeout=2.0) as client:
            while True:
                for r in self.replicas:
                    if r.ready:
                        continue
                    assert r.proc is not None
                    if r.proc.poll() is not None:
                        raise RuntimeStartError(
                            f"engine {r.name} exited with status {r.proc.returncode} while starting; "
                            f"last lines of {r.log}:\n{tail(r.log)}"
                        )
                    if _healthy(client, r.url):
                        r.ready = True
                        r.startup_seconds = time.monotonic() - r.started_at
                        self.say(f"  ready  {r.name:<28} {r.url}  ({r.startup_seconds:.0f} s)")
                waiting = [r.name for r in self.replicas if not r.ready]
                elapsed = time.monotonic() - t0
                if not waiting:
                    return
                if elapsed > timeout:
                    raise RuntimeStartError(
                        f"engines not healthy after {timeout:.0f} s: {', '.join(waiting)}; logs in {self.run_dir / 'logs'}"
                    )
                if elapsed - last_report >= 10:
                    last_report = elapsed
                    done = len(self.replicas) - len(waiting)
                    self.say(f"  [{elapsed:4.0f} s] {done}/{len(self.replicas)} engines ready; "
                             f"loading: {', '.join(waiting)}")
                time.sleep(0.5)

    def endpoints(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.replicas:
            out.setdefault(r.plan.name, []).append(r.url)
        return out

    def watch_once(self) -> list[Replica]:
        """Restart replicas whose engine died; return the ones restarted."""
        restarted = []
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is not None:
                self.say(f"  engine {r.name} exited with status {r.proc.returncode}; restarting")
                stop_group(r.proc.pid, grace=5)
                r.restarts += 1
                self._launch(r)
                restarted.append(r)
        return restarted

    def stop(self, grace: float = 20.0) -> None:
        for r in self.replicas:
            if r.proc is not None:
                try:
                    os.killpg(r.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for r in self.replicas:
            if r.proc is not None:
                stop_group(r.proc.pid, grace)
                try:
                    r.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass

    def write_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "launcher_pid": os.getpid(),
            "replicas": [
                {"model": r.plan.name, "index": r.index, "url": r.url,
                 "pgid": r.proc.pid if r.proc else None, "log": str(r.log)}
                for r in self.replicas
            ],
        }
        self.state_file.write_text(json.dumps(state, indent=2))


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False


def read_state(run_dir: Path | None = None) -> dict[str, Any] | None:
    path = (run_dir or state_dir()) / "fleet.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None
