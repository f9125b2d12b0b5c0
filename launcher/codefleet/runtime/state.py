"""The state file: what a running fleet's launcher tells the other commands (``status``, ``apply``,
``down``, ``usage``, ``smoke``, ``prometheus-config``) and the tests and benchmarks that watch it.

One writer (``write_state``, called by the reconcile loop) and one reader (``read_state``); the
file is JSON, ``fleet.json`` in the run directory, replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "fleet.json"


def state_dir() -> Path:
    """The run directory of the fleet ``codefleet up`` starts ($CODEFLEET_HOME/run)."""
    base = os.environ.get("CODEFLEET_HOME") or os.path.join(Path.home(), ".cache", "codefleet")
    return Path(base) / "run"


def state_path(run_dir: Path | None = None) -> Path:
    return (run_dir or state_dir()) / STATE_FILE


@dataclass(frozen=True)
class AutoscaleRange:
    """An autoscaled model's bounds and target."""

    min: int
    max: int
    signal: str
    target: float


@dataclass(frozen=True)
class LastDecision:
    """An autoscaler's last decision (``from`` and ``to`` in the file)."""

    at: float
    """Wall-clock time (time.time())."""
    previous: int
    desired: int
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.previous, "to": self.desired, "reason": self.reason,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LastDecision:
        return cls(float(d["at"]), int(d["from"]), int(d["to"]), str(d["reason"]), str(d["detail"]))


@dataclass(frozen=True)
class ModelState:
    model: str
    desired: int | None = None
    drain_seconds: int | None = None
    generation: str = ""
    autoscale: AutoscaleRange | None = None
    last_decision: LastDecision | None = None

    def to_dict(self) -> dict[str, Any]:
        a = self.autoscale
        return {"model": self.model, "desired": self.desired, "drain_seconds": self.drain_seconds,
                "generation": self.generation,
                "autoscale": ({"min": a.min, "max": a.max, "signal": a.signal, "target": a.target} if a else None),
                "last_decision": self.last_decision.to_dict() if self.last_decision else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelState:
        a, last = d.get("autoscale"), d.get("last_decision")
        return cls(str(d["model"]), desired=d.get("desired"), drain_seconds=d.get("drain_seconds"),
                   generation=str(d.get("generation", "")),
                   autoscale=AutoscaleRange(int(a["min"]), int(a["max"]), str(a["signal"]), float(a["target"]))
                   if a else None,
                   last_decision=LastDecision.from_dict(last) if last else None)


@dataclass(frozen=True)
class ReplicaState:
    """A replica that has an address (one not yet placed is not in the file)."""

    model: str
    index: int
    url: str
    state: str = ""
    """starting, ready, draining."""
    generation: str = ""
    node_ip: str | None = None
    """The node it runs on, when the backend has nodes (Ray)."""
    node_id: str | None = None
    restarts: int = 0
    pgid: int | None = None
    """Its engine's process group, when on this host (local backend)."""
    log: str | None = None
    adapters: tuple[str, ...] = ()
    """LoRA adapters loaded on it and routed to it."""

    @property
    def name(self) -> str:
        return f"{self.model}-{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "index": self.index, "url": self.url, "state": self.state,
                "generation": self.generation, "node_ip": self.node_ip, "node_id": self.node_id,
                "restarts": self.restarts, "pgid": self.pgid, "log": self.log, "adapters": list(self.adapters)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaState:
        return cls(str(d["model"]), int(d["index"]), str(d["url"]), state=str(d.get("state", "")),
                   generation=str(d.get("generation", "")), node_ip=d.get("node_ip"), node_id=d.get("node_id"),
                   restarts=int(d.get("restarts", 0)), pgid=d.get("pgid"), log=d.get("log"),
                   adapters=tuple(str(a) for a in d.get("adapters", ())))


@dataclass(frozen=True)
class MetricsAddresses:
    """host:port of each component's /metrics (None: not started)."""

    launcher: str | None = None
    gateway: str | None = None
    router: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"launcher": self.launcher, "gateway": self.gateway, "router": self.router}

    def ports(self) -> dict[str, int]:
        """Component -> port, for the components that have an address."""
        return {k: int(v.rsplit(":", 1)[1]) for k, v in self.to_dict().items() if v}


@dataclass(frozen=True)
class FleetState:
    launcher_pid: int
    runtime: str = ""
    endpoint: str | None = None
    metrics: MetricsAddresses = field(default_factory=MetricsAddresses)
    router_url: str | None = None
    frontend_pgids: tuple[int, ...] = ()
    converged: bool = False
    models: tuple[ModelState, ...] = ()
    replicas: tuple[ReplicaState, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"launcher_pid": self.launcher_pid, "runtime": self.runtime, "endpoint": self.endpoint,
                           "metrics": self.metrics.to_dict(), "router_url": self.router_url,
                           "frontend_pgids": list(self.frontend_pgids), "converged": self.converged,
                           "models": [m.to_dict() for m in self.models],
                           "replicas": [r.to_dict() for r in self.replicas]}, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FleetState:
        m = d.get("metrics") or {}
        return cls(int(d["launcher_pid"]), runtime=str(d.get("runtime", "")), endpoint=d.get("endpoint"),
                   metrics=MetricsAddresses(m.get("launcher"), m.get("gateway"), m.get("router")),
                   router_url=d.get("router_url"),
                   frontend_pgids=tuple(int(p) for p in d.get("frontend_pgids", [])),
                   converged=bool(d.get("converged", False)),
                   models=tuple(ModelState.from_dict(x) for x in d.get("models", [])),
                   replicas=tuple(ReplicaState.from_dict(x) for x in d.get("replicas", [])))

    def model(self, name: str) -> ModelState | None:
        return next((m for m in self.models if m.model == name), None)


def write_state(run_dir: Path, state: FleetState, previous: str = "") -> str:
    """Write the state file (atomically) unless its text is ``previous`` and it exists; returns the text."""
    text = state.to_json()
    path = state_path(run_dir)
    if text == previous and path.exists():
        return text  # the loop runs every 0.5 s; the file changes far less often
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def read_state(run_dir: Path | None = None) -> FleetState | None:
    """The running fleet's state; None when there is no file, or none that can be read."""
    try:
        data = json.loads(state_path(run_dir).read_text())
        return FleetState.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove_state(run_dir: Path | None = None) -> None:
    state_path(run_dir).unlink(missing_ok=True)
