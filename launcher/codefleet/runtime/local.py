"""Local backend: every replica is a vLLM OpenAI server process (group) on this host."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from codefleet.engine import engine_command
from codefleet.plans import FleetPlan
from codefleet.procs import free_port, group_alive, spawn, stop_group
from codefleet.runtime.backend import Host, Say, Seen
from codefleet.runtime.core import Fleet
from codefleet.runtime.replica import Replica
from codefleet.runtime.state import state_dir


class LocalBackend:
    name = "local"
    relaunches = True
    watch_health = False

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host

    def prepare(self, plan: FleetPlan) -> None:
        pass

    def check(self, plan: FleetPlan) -> None:
        pass  # no resource model for one host's CPU

    def launch(self, fleet: Host, r: Replica) -> None:
        # Single-rank CPU engines are bound one core each, round robin over the live ones.
        single = [x for x in fleet.replicas if x.plan.placement.tensor_parallel_size == 1 and x.live]
        slot = single.index(r) if r in single else None
        port = free_port(self.host)
        cmd = engine_command(r.plan, host=self.host, port=port, python=fleet.python,
                             enforce_eager=fleet.enforce_eager, cpu_slot=slot)
        env = {**cmd.env, **(fleet.frontend.engine_env if fleet.frontend else {})}
        assert r.log is not None
        r.log.unlink(missing_ok=True)
        r.proc = spawn(cmd.argv, env, r.log)
        bind = cmd.env.get("VLLM_CPU_OMP_THREADS_BIND", "")
        if slot is not None and bind.isdigit() and hasattr(os, "sched_setaffinity"):
            # The whole engine on its core, not only its OpenMP rank: vLLM's engine core busy-waits
            # (sched_yield) between steps, and unbound it took the other core from an engine
            # starting there (one start took 414 s beside a loaded engine; bound: 24 s, in
            # tests/runtime/test_autoscale.py). Set before the API server has started its children,
            # which inherit it.
            try:
                os.sched_setaffinity(r.proc.pid, {int(bind)})
            except OSError:
                pass  # exited already: observe() sees it
        r.url = f"http://{self.host}:{port}"
        r.incarnation = r.proc.pid

    def observe(self, r: Replica) -> Seen:
        if r.proc is None:
            return Seen(running=False)
        code = r.proc.poll()
        return Seen(running=code is None, url=r.url, incarnation=r.proc.pid, exit_status=code)

    def terminate(self, r: Replica) -> None:
        _signal_group(r, signal.SIGTERM)

    def stopped(self, r: Replica) -> bool:
        return r.proc is None or (r.proc.poll() is not None and not group_alive(r.proc.pid))

    def kill(self, r: Replica, grace: float) -> None:
        if r.proc is not None:
            stop_group(r.proc.pid, grace=grace)
            try:
                r.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def signal_kill(self, r: Replica) -> None:
        _signal_group(r, signal.SIGKILL)

    def close(self) -> None:
        pass

    def node_of(self, r: Replica) -> str | None:
        return None  # every engine on this host


def _signal_group(r: Replica, sig: signal.Signals) -> None:
    """Signal the engine's whole process group (API server, engine core, workers)."""
    if r.proc is not None:
        try:
            os.killpg(r.proc.pid, sig)
        except ProcessLookupError:
            pass


class LocalFleet(Fleet):
    """The fleet as processes on this host."""

    def __init__(self, plan: FleetPlan, *, host: str = "127.0.0.1", enforce_eager: bool = False,
                 run_dir: Path | None = None, say: Say = print, python: str = "") -> None:
        super().__init__(plan=plan, backend=LocalBackend(host), run_dir=run_dir or state_dir(),
                         enforce_eager=enforce_eager, say=say, python=python)

