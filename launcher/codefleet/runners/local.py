"""Local runner: every replica as a vLLM OpenAI server process on this host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from codefleet import demo_models
from codefleet.engine import engine_command
from codefleet.errors import RuntimeStartError
from codefleet.metrics import FleetMetrics
from codefleet.observability import write_engine_targets
from codefleet.planner import FleetPlan, ReplicaPlan
from codefleet.procs import free_port, spawn, stop_group, tail
from codefleet.router import Frontend

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
    registered: bool = False

    @property
    def name(self) -> str:
        return f"{self.plan.name}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class LocalFleet:
    """Starts, watches and stops the engines of a plan and the router in front of them.

    Use as a context manager. ``url`` is the fleet's one OpenAI endpoint.
    """

    plan: FleetPlan
    host: str = "127.0.0.1"
    enforce_eager: bool = False
    run_dir: Path = field(default_factory=state_dir)
    say: Say = print
    python: str = sys.executable
    replicas: list[Replica] = field(default_factory=list)
    frontend: Frontend | None = None
    metrics: FleetMetrics = field(default_factory=FleetMetrics)
    metrics_port: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _watcher: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=2.0), repr=False)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state_file(self) -> Path:
        return self.run_dir / "fleet.json"

    @property
    def url(self) -> str:
        """The OpenAI endpoint (gateway -> vllm-router -> engines)."""
        assert self.frontend is not None, "start() first"
        return self.frontend.url

    def _launch(self, r: Replica) -> None:
        single = [x for x in self.replicas if x.plan.tensor_parallel_size == 1]
        slot = single.index(r) if r in single else None
        cmd = engine_command(r.plan, host=r.host, port=r.port, python=self.python,
                             enforce_eager=self.enforce_eager, cpu_slot=slot)
        env = {**cmd.env, **(self.frontend.engine_env if self.frontend else {})}
        r.proc = spawn(cmd.argv, env, r.log)
        r.started_at = time.monotonic()
        r.ready = False

    def start(self, timeout: float = 900.0) -> None:
        """Start the router and every replica; wait until all are healthy and registered.

        On any failure everything started so far is stopped before the error propagates.
        """
        for p in self.plan.models:
            if p.demo is not None:
                demo_models.ensure(p.demo)
        logs = self.run_dir / "logs"
        self._stopping.clear()
        try:
            self.frontend = Frontend.for_plan(self.plan, self.run_dir, self.python, say=self.say)
            m = self.plan.metrics
            try:
                self.metrics_port = self.metrics.serve(m.host, m.launcher_port)
            except OSError as exc:
                raise RuntimeStartError(f"metrics.launcher_port: cannot listen on {m.host}:{m.launcher_port}: "
                                        f"{exc.strerror}; pick another port (0 = any free one)") from None
            for p in self.plan.models:
                self.metrics.replicas_desired.labels(p.name).set(p.replicas)
                self.metrics.replicas_ready.labels(p.name).set(0)
            self.frontend.start()
            self.say(f"  router ready ({self.plan.router.policy}); endpoint {self.frontend.url}/v1")
            for p in self.plan.models:
                for i in range(p.replicas):
                    r = Replica(p, i, self.host, free_port(self.host), logs / f"{p.name}-{i}.log")
                    r.log.unlink(missing_ok=True)
                    self.replicas.append(r)
                    self._launch(r)
            self.write_state()
            self._wait_ready(timeout)
            self.write_state()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        last_report = 0.0
        while True:
            self._tick(starting=True)
            waiting = [r.name for r in self.replicas if not r.registered]
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

    def _tick(self, starting: bool) -> list[Replica]:
        """One pass of the control loop; returns the replicas restarted."""
        assert self.frontend is not None
        restarted: list[Replica] = []
        with self._lock:
            restarted_components = self.frontend.check()
            for name in restarted_components:
                self.metrics.component_restarts.labels(name).inc()
            if "router" in restarted_components:
                for r in self.replicas:
                    r.registered = False
            admin = self.frontend.admin
            for r in self.replicas:
                assert r.proc is not None
                if r.proc.poll() is not None:
                    if starting:
                        raise RuntimeStartError(
                            f"engine {r.name} exited with status {r.proc.returncode} while starting; "
                            f"last lines of {r.log}:\n{tail(r.log)}"
                        )
                    self.say(f"  engine {r.name} exited with status {r.proc.returncode}; restarting")
                    if r.registered:
                        admin.remove(r.url)
                        r.registered = False
                        self.metrics.registrations.labels(r.plan.name, "remove").inc()
                    stop_group(r.proc.pid, grace=5)
                    r.restarts += 1
                    self.metrics.restarts.labels(r.plan.name, str(r.index)).inc()
                    self._launch(r)
                    restarted.append(r)
                    continue
                if not r.ready and _healthy(self._client, r.url):
                    r.ready = True
                    r.startup_seconds = time.monotonic() - r.started_at
                    self.metrics.startup_seconds.labels(r.plan.name, str(r.index)).set(r.startup_seconds)
                    self.say(f"  ready  {r.name:<28} {r.url}  ({r.startup_seconds:.0f} s)")
                if r.ready and not r.registered:
                    admin.add(r.url, r.plan.name)
                    r.registered = True
                    self.metrics.registrations.labels(r.plan.name, "add").inc()
            for p in self.plan.models:
                ready = sum(1 for r in self.replicas if r.plan.name == p.name and r.registered)
                self.metrics.replicas_ready.labels(p.name).set(ready)
        return restarted

    def endpoints(self) -> dict[str, list[str]]:
        """Each model's engine URLs (internal; clients use ``url``)."""
        out: dict[str, list[str]] = {}
        for r in self.replicas:
            out.setdefault(r.plan.name, []).append(r.url)
        return out

    def watch_once(self) -> list[Replica]:
        """Restart what died (engines, router, gateway) and keep registrations current."""
        restarted = self._tick(starting=False)
        if restarted:
            self.write_state()
        return restarted

    def watch_in_background(self, interval: float = 0.5) -> None:
        """Run ``watch_once`` in a daemon thread until ``stop``."""
        def loop() -> None:
            while not self._stopping.wait(interval):
                try:
                    self.watch_once()
                except Exception as exc:  # keep watching; the next pass retries
                    self.say(f"  watch: {exc}")

        self._watcher = threading.Thread(target=loop, name="codefleet-watch", daemon=True)
        self._watcher.start()

    def stop(self, grace: float = 20.0) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=30)
        with self._lock:
            for r in self.replicas:
                if r.proc is not None:
                    try:
                        os.killpg(r.proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            if self.frontend is not None:
                self.frontend.stop()
            for r in self.replicas:
                if r.proc is not None:
                    stop_group(r.proc.pid, grace)
                    try:
                        r.proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        pass
            self.metrics.close()
            self._client.close()
            try:
                self.state_file.unlink()
            except FileNotFoundError:
                pass

    def write_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fe = self.frontend
        state: dict[str, Any] = {
            "launcher_pid": os.getpid(),
            "endpoint": fe.url if fe else None,
            "metrics": {
                "launcher": f"{self.plan.metrics.host}:{self.metrics_port}",
                "gateway": f"{self.plan.metrics.host}:{fe.gateway_metrics_port}" if fe else None,
                "router": f"{self.plan.metrics.host}:{fe.router_metrics_port}" if fe else None,
            },
            "router_url": fe.router_url if fe else None,
            "frontend_pgids": fe.pgids() if fe else [],
            "replicas": [
                {"model": r.plan.name, "index": r.index, "url": r.url,
                 "pgid": r.proc.pid if r.proc else None, "log": str(r.log)}
                for r in self.replicas
            ],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)
        write_engine_targets(self.run_dir, [(r.plan.name, r.index, r.url) for r in self.replicas])


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
