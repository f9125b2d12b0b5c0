"""Replicas as Ray actors: one placement-group bundle per replica, the replicas of a model spread over nodes.

Each replica is an ``EngineReplica`` actor that owns one vLLM OpenAI server process on its node.
The actor's bundle holds the replica's GPUs (``tensor_parallel_size``; CPUs for a CPU plan) on a
single node, as a bundle never spans nodes. Each replica has its own placement group, so adding or
removing a replica never touches the others; the replicas of a model are spread with a bundle label
selector on Ray's ``ray.io/node-id`` label: a new replica goes to a node that holds none of the
model's replicas (``strict_spread``: or fails), else (spread, the default) to any node that fits.

Crashes: when the engine process exits, the actor exits too, and Ray restarts the actor
(``max_restarts=-1``), which starts a new engine. The runtime's loop (``core.Fleet``) removes a
replica from the router while it is down and registers it again, at its new address, when it is
healthy. A replica leaving service is drained by the same loop; the actor is told first
(``drain``), so that its engine's exit does not count as a crash.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, cast

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from codefleet import demo_models
from codefleet.engine import engine_command
from codefleet.errors import PlanError
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.procs import free_port, spawn, stop_group
from codefleet.runtime.backend import Host, Say, Seen
from codefleet.runtime.core import Fleet
from codefleet.runtime.replica import Replica, State

NODE_LABEL = "ray.io/node-id"


def bundle(p: ReplicaPlan) -> dict[str, float]:
    """One replica's resources, all on one node; its CPUs are the plan's (``sizing.host_cpus``)."""
    if p.placement.accelerator == "cpu":
        return {"CPU": float(p.placement.host_cpus)}
    return {"GPU": float(p.placement.tensor_parallel_size), "CPU": float(p.placement.host_cpus)}


def fits(node: dict[str, Any], need: dict[str, float]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(k, 0.0) >= v for k, v in need.items())


def check_feasible(p: ReplicaPlan, replicas: int, strict: bool, nodes: list[dict[str, Any]]) -> None:
    """Fail before anything is placed when the cluster cannot hold the model as planned."""
    need = bundle(p)
    alive = [n for n in nodes if n.get("Alive")]
    ok = [n for n in alive if fits(n, need)]
    wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
    if not ok:
        biggest = max((n.get("Resources", {}).get("GPU" if "GPU" in need else "CPU", 0) for n in alive), default=0)
        raise PlanError(f"{p.name}: no Ray node can hold one replica ({wanted} on one node; tensor_parallel_size "
                        f"{p.placement.tensor_parallel_size} needs its GPUs on a single node); the largest node has "
                        f"{biggest:g}")
    if strict and len(ok) < replicas:
        raise PlanError(f"{p.name}: runtime.strict_spread needs {replicas} nodes with {wanted} each, one replica per "
                        f"node; the cluster has {len(ok)} ({len(alive)} nodes alive)")


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class EngineReplica:
    """Owns one vLLM OpenAI server process on this node; exits (and is restarted by Ray) when it dies."""

    def __init__(self, plan: ReplicaPlan, index: int, env: dict[str, str], log_dir: str, enforce_eager: bool) -> None:
        if plan.demo is not None:
            demo_models.ensure(plan.demo)  # a node may not have built the demo checkpoint yet
        self.host = ray.util.get_node_ip_address()
        self.port = free_port(self.host)
        cmd = engine_command(plan, host=self.host, port=self.port, python=sys.executable, enforce_eager=enforce_eager)
        log = Path(log_dir) / f"{plan.name}-{index}.log"
        full_env = {**cmd.env, **env}
        if plan.placement.accelerator == "cpu":
            full_env.pop("CUDA_VISIBLE_DEVICES", None)
        # A previous incarnation of this actor (killed, or OOM-killed by Ray) may have left its engine
        # running: its process group is recorded on this node, where the bundle keeps the replica.
        self.pidfile = Path(log_dir) / f"{plan.name}-{index}.{ray.get_runtime_context().get_node_id()[:12]}.pgid"
        try:
            stop_group(int(self.pidfile.read_text()), grace=5)
        except (OSError, ValueError):
            pass
        self.proc = spawn(cmd.argv, full_env, log)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(str(self.proc.pid))
        self.log = str(log)
        self.draining = False
        threading.Thread(target=self._exit_with_engine, daemon=True).start()

    def _exit_with_engine(self) -> None:
        code = self.proc.wait()
        if self.draining:
            return  # asked to leave: not a crash
        print(f"engine exited with status {code}; the actor exits so that Ray restarts it", flush=True)
        stop_group(self.proc.pid, grace=5)  # the engine's own children (EngineCore, workers)
        os._exit(1)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"url": f"http://{self.host}:{self.port}", "pid": self.proc.pid, "node_id": ctx.get_node_id(),
                "node_ip": self.host, "actor_pid": os.getpid(), "log": self.log,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "engine_alive": self.proc.poll() is None}

    def drain(self) -> None:
        """SIGTERM the engine (vLLM drains up to its --shutdown-timeout); the actor stays."""
        self.draining = True
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 5.0) -> None:
        self.draining = True
        stop_group(self.proc.pid, grace=grace)
        self.pidfile.unlink(missing_ok=True)


class RayBackend:
    """Replicas as ``EngineReplica`` actors, each in a placement group of its own."""

    name = "ray"
    relaunches = False  # Ray restarts a dead actor, which starts a new engine
    watch_health = True

    def __init__(self, address: str, strict_spread: bool = False, placement_timeout: float = 60.0) -> None:
        self.address = address
        self.strict_spread = strict_spread
        self.placement_timeout = placement_timeout

    def prepare(self, plan: FleetPlan) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)
        self.check(plan)

    def check(self, plan: FleetPlan) -> None:
        """Every model checked, at its most replicas, before anything is placed."""
        nodes = ray.nodes()
        for p in plan.models:
            check_feasible(p, p.max_replicas, self.strict_spread, nodes)

    def _nodes_of(self, fleet: Host, r: Replica) -> list[str]:
        return sorted({n for x in fleet.replicas if x.plan.name == r.plan.name and x is not r and x.live
                       and (n := x.handle.get("bundle_node"))})

    def place_group(self, fleet: Host, r: Replica) -> PlacementGroup:
        """A placement group of one bundle for one replica, away from the model's other replicas."""
        p = r.plan
        taken = self._nodes_of(fleet, r)
        selectors: list[list[dict[str, str]] | None] = [[{NODE_LABEL: f"!in({','.join(taken)})"}]] if taken else [None]
        if taken and not self.strict_spread:
            selectors.append(None)  # spread: a node of its own if one fits, else any node that fits
        for n, sel in enumerate(selectors):
            pg = placement_group([bundle(p)], strategy="STRICT_PACK", name=f"codefleet-{r.name}",
                                 bundle_label_selector=sel)
            if _ready(pg, self.placement_timeout if n == len(selectors) - 1 else 5.0):
                return cast(PlacementGroup, pg)
            remove_placement_group(pg)
        raise PlanError(f"{p.name}: replica {r.index} cannot be placed ({bundle(p)} on one node"
                        + (", on a node without another replica of the model" if self.strict_spread else "")
                        + f"); the cluster's free resources: {ray.available_resources()}")

    def launch(self, fleet: Host, r: Replica) -> None:
        p = r.plan
        pg = self.place_group(fleet, r)
        env = {**(fleet.frontend.engine_env if fleet.frontend else {}), "PYTHONUNBUFFERED": "1"}
        actor = EngineReplica.options(  # type: ignore[attr-defined]
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            num_gpus=bundle(p).get("GPU", 0), num_cpus=0, name=f"codefleet-{r.name}",
        ).remote(p, r.index, env, str(fleet.run_dir / "logs"), fleet.enforce_eager)
        node = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        r.handle = {"actor": actor, "pg": pg, "bundle_node": node}
        fleet.say(f"  {r.name}: placed on node {node[:8]} ({', '.join(f'{v:g} {k}' for k, v in bundle(p).items())})")

    def _info(self, r: Replica) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = ray.get(r.handle["actor"].info.remote(), timeout=2)
        except Exception:  # RayActorError while Ray restarts it, or a timeout
            return None
        r.handle.update(node_id=info["node_id"], gpus=info["gpus"], pid=info["pid"], actor_pid=info["actor_pid"])
        return info

    def observe(self, r: Replica) -> Seen:
        info = self._info(r)
        if info is None or not info["engine_alive"]:
            return Seen(running=False)
        return Seen(running=True, url=info["url"], node=info["node_ip"], incarnation=info["actor_pid"])

    def terminate(self, r: Replica) -> None:
        try:
            ray.get(r.handle["actor"].drain.remote(), timeout=10)
        except Exception:  # the actor may already be gone
            pass

    def stopped(self, r: Replica) -> bool:
        info = self._info(r)
        return info is None or not info["engine_alive"]

    def kill(self, r: Replica, grace: float) -> None:
        actor, pg = r.handle.get("actor"), r.handle.get("pg")
        if actor is not None:
            try:
                ray.get(actor.stop.remote(grace), timeout=30)
            except Exception:
                pass
            ray.kill(actor, no_restart=True)
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        r.handle.pop("actor", None)
        r.handle.pop("pg", None)

    def signal_kill(self, r: Replica) -> None:
        self.kill(r, grace=0)  # the actor and its placement group go at once

    def close(self) -> None:
        pass

    def node_of(self, r: Replica) -> str | None:
        return r.node or None  # the node's IP, as the actor reports it


class RayFleet(Fleet):
    """The fleet on a Ray cluster: engines as actors, vllm-router and the gateway on the driver's host."""

    def __init__(self, plan: FleetPlan, *, address: str, strict_spread: bool = False, enforce_eager: bool = False,
                 run_dir: Path | None = None, say: Say = print, placement_timeout: float = 60.0) -> None:
        super().__init__(plan=plan, backend=RayBackend(address, strict_spread, placement_timeout),
                         run_dir=run_dir or Path.cwd() / ".codefleet-run", enforce_eager=enforce_eager, say=say)

    def place_group(self, p: ReplicaPlan, index: int) -> PlacementGroup:
        """Place one replica's group only (no actor), as ``launch`` does; it counts as live for the
        spread of the model's later replicas."""
        backend = self.backend
        assert isinstance(backend, RayBackend)
        r = Replica(p, index, "placement-only")
        pg = backend.place_group(self, r)
        r.handle = {"pg": pg, "bundle_node": ray.util.placement_group_table(pg)["bundles_to_node_id"][0]}
        self.replicas.append(r)
        return pg

    def status(self) -> list[dict[str, Any]]:
        return [{"model": r.plan.name, "index": r.index, "url": r.url, "ready": r.state is State.READY,
                 "restarts": r.restarts, "node_id": r.handle.get("node_id"), "node_ip": r.node or None,
                 "gpus": r.handle.get("gpus")}
                for r in self.replicas]


def _ready(pg: PlacementGroup, timeout: float) -> bool:
    try:
        ray.get(pg.ready(), timeout=timeout)
        return True
    except GetTimeoutError:
        return False
