"""One replica's record and its few named states."""

from __future__ import annotations

import enum
import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codefleet.engine import engine_spec
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.runtime.adapters import ReplicaAdapters


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


def generation(plan: ReplicaPlan) -> str:
    """What an engine runs (model, revision, flags, template text, environment): replicas of an
    older generation are replaced one by one. Replica counts are not part of it."""
    spec = engine_spec(plan, loopback=True)
    text = json.dumps({"model": spec.model, "tp": spec.tensor_parallel_size, "flags": spec.flags,
                       "template": spec.chat_template.read_text(), "env": spec.env}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_generations(plan: FleetPlan) -> dict[str, str]:
    """Each model's generation (read once per plan: it reads the template files)."""
    return {p.name: generation(p) for p in plan.models}


@dataclass
class Replica:
    plan: ReplicaPlan
    index: int
    generation: str
    state: State = State.STARTING
    url: str | None = None
    node: str = ""
    log: Path | None = None
    registered: bool = False
    started_at: float = 0.0
    startup_seconds: float | None = None
    restarts: int = 0
    #: Local backend: the engine's process (its process group).
    proc: subprocess.Popen[bytes] | None = None
    #: Ray backend: the actor, its placement group, and what the actor last reported (``node_id``).
    handle: dict[str, Any] = field(default_factory=dict)
    incarnation: Any = None
    #: LoRA adapters loaded on this replica's engine and registered with the router.
    adapters: ReplicaAdapters = field(default_factory=ReplicaAdapters)
    # draining
    drain_started: float = 0.0
    drain_deadline: float = 0.0
    terminated_at: float | None = None
    #: SIGTERM was sent once the engine was seen idle: it gets a short grace, not the drain budget.
    terminated_idle: bool = False
    killed_at: float | None = None
    """When what was left of its engine got SIGKILL (the loop then waits for it with the others)."""

    @property
    def name(self) -> str:
        return f"{self.plan.name}-{self.index}"

    @property
    def live(self) -> bool:
        return self.state in (State.STARTING, State.READY)
