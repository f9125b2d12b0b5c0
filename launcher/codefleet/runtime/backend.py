"""What the reconcile loop (``core.Fleet``) needs of a backend: start, locate, stop engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from codefleet.plans import FleetPlan
from codefleet.router import Frontend
from codefleet.runtime.replica import Replica

Say = Callable[[str], None]


@dataclass
class Seen:
    """What a backend sees of one replica's engine."""

    running: bool
    url: str | None = None
    node: str = ""
    incarnation: Any = None
    """Changes when the engine was restarted underneath the loop (Ray restarts a dead actor)."""
    exit_status: int | None = None


class Host(Protocol):
    """What a backend reads of the fleet it launches into (``core.Fleet``)."""

    replicas: list[Replica]
    python: str
    enforce_eager: bool
    run_dir: Path

    @property
    def frontend(self) -> Frontend | None: ...

    def say(self, line: str) -> None: ...


class Backend(Protocol):
    name: str
    #: True: the loop relaunches an engine that exited (local); False: the backend does (Ray).
    relaunches: bool
    #: Check a ready replica's /health on every pass (Ray: an actor may lose its engine quietly).
    watch_health: bool

    def prepare(self, plan: FleetPlan) -> None: ...
    def check(self, plan: FleetPlan) -> None:
        """Refuse (PlanError) a plan the backend cannot hold, before anything changes."""
        ...
    def launch(self, fleet: Host, r: Replica) -> None: ...
    def observe(self, r: Replica) -> Seen: ...
    def terminate(self, r: Replica) -> None: ...
    def stopped(self, r: Replica) -> bool: ...
    def kill(self, r: Replica, grace: float) -> None:
        """SIGTERM what is left of the engine, SIGKILL after ``grace`` seconds, free its resources."""
        ...
    def signal_kill(self, r: Replica) -> None:
        """SIGKILL what is left of the engine now, without waiting for it to be gone (``stopped``
        says when): several late engines are killed in one pass, and exit together."""
        ...
    def close(self) -> None: ...
    def node_of(self, r: Replica) -> str | None:
        """The node ``r`` runs on, to show; None when every engine is on this host."""
        ...
