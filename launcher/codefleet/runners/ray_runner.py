"""Replicas as Ray actors: one placement-group bundle per replica, the replicas of a model spread over nodes.

Each replica is an ``EngineReplica`` actor that owns one vLLM OpenAI server process on its node.
The actor's bundle holds the replica's GPUs (``tensor_parallel_size``; CPUs for a CPU plan) on a
single node, as a bundle never spans nodes. Each replica has its own placement group, so adding or
removing a replica never touches the others; the replicas of a model are spread with a bundle label
selector on Ray's ``ray.io/node-id`` label: a new replica goes to a node that holds none of the
model's replicas (``strict_spread``: or fails), else (spread, the default) to any node that fits.

Crashes: when the engine process exits, the actor exits too, and Ray restarts the actor
(``max_restarts=-1``), which starts a new engine. The driver's watch loop removes a replica from
the router while it is down and registers it again, at its new address, when it is healthy.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from codefleet import demo_models
from codefleet.engine import engine_command
from codefleet.errors import PlanError, RuntimeStartError
from codefleet.metrics import FleetMetrics
from codefleet.planner import FleetPlan, ReplicaPlan
from codefleet.procs import free_port, spawn, stop_group
from codefleet.router import Frontend

Say = Callable[[str], None]
NODE_LABEL = "ray.io/node-id"
#: CPUs a GPU replica reserves besides its GPUs (API server, tokenizer, scheduler).
CPUS_PER_GPU_REPLICA = 2


def bundle(p: ReplicaPlan) -> dict[str, float]:
    """One replica's resources, all on one node."""
    if p.accelerator == "cpu":
        return {"CPU": float(p.tensor_parallel_size)}
    return {"GPU": float(p.tensor_parallel_size), "CPU": float(CPUS_PER_GPU_REPLICA)}


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
                        f"{p.tensor_parallel_size} needs its GPUs on a single node); the largest node has {biggest:g}")
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
        if plan.accelerator == "cpu":
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
        threading.Thread(target=self._exit_with_engine, daemon=True).start()

    def _exit_with_engine(self) -> None:
        code = self.proc.wait()
        print(f"engine exited with status {code}; the actor exits so that Ray restarts it", flush=True)
        stop_group(self.proc.pid, grace=5)  # the engine's own children (EngineCore, workers)
        os._exit(1)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"url": f"http://{self.host}:{self.port}", "pid": self.proc.pid, "node_id": ctx.get_node_id(),
                "node_ip": self.host, "actor_pid": os.getpid(), "log": self.log,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def stop(self) -> None:
        stop_group(self.proc.pid, grace=10)
        self.pidfile.unlink(missing_ok=True)


@dataclass
class RayReplica:
    plan: ReplicaPlan
    index: int
    pg: PlacementGroup
    actor: Any
    url: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    registered: bool = False
    ready: bool = False
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.plan.name}-{self.index}"


@dataclass
class RayFleet:
    """The fleet on a Ray cluster: engines as actors, vllm-router and the gateway on the driver's host."""

    plan: FleetPlan
    address: str
    strict_spread: bool = False
    enforce_eager: bool = False
    run_dir: Path = field(default_factory=lambda: Path.cwd() / ".codefleet-run")
    say: Say = print
    placement_timeout: float = 60.0
    replicas: list[RayReplica] = field(default_factory=list)
    frontend: Frontend | None = None
    metrics: FleetMetrics = field(default_factory=FleetMetrics)
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=2.0), repr=False)

    @property
    def url(self) -> str:
        assert self.frontend is not None
        return self.frontend.url

    def __enter__(self) -> RayFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)

    def start(self, timeout: float = 900.0) -> None:
        self.connect()
        nodes = ray.nodes()
        for p in self.plan.models:  # every model checked before anything is placed
            check_feasible(p, p.replicas, self.strict_spread, nodes)
        try:
            self.frontend = Frontend.for_plan(self.plan, self.run_dir, sys.executable, say=self.say)
            self.frontend.start()
            for p in self.plan.models:
                self.metrics.replicas_desired.labels(p.name).set(p.replicas)
                for i in range(p.replicas):
                    self.replicas.append(self._place(p, i))
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _nodes_of(self, model: str) -> list[str]:
        return [r.info["node_id"] for r in self.replicas if r.plan.name == model and r.info.get("node_id")]

    def place_group(self, p: ReplicaPlan, index: int) -> PlacementGroup:
        """A placement group of one bundle for one replica, away from the model's other replicas."""
        taken = sorted({n for r in self.replicas if r.plan.name == p.name
                        if (n := ray.util.placement_group_table(r.pg).get("bundles_to_node_id", {}).get(0))})
        selectors: list[list[dict[str, str]] | None] = [[{NODE_LABEL: f"!in({','.join(taken)})"}]] if taken else [None]
        if taken and not self.strict_spread:
            selectors.append(None)  # spread: a node of its own if one fits, else any node that fits
        for n, sel in enumerate(selectors):
            pg = placement_group([bundle(p)], strategy="STRICT_PACK", name=f"codefleet-{p.name}-{index}",
                                 bundle_label_selector=sel)
            if _ready(pg, self.placement_timeout if n == len(selectors) - 1 else 5.0):
                return cast(PlacementGroup, pg)
            remove_placement_group(pg)
        raise PlanError(f"{p.name}: replica {index} cannot be placed ({bundle(p)} on one node"
                        + (", on a node without another replica of the model" if self.strict_spread else "")
                        + f"); the cluster's free resources: {ray.available_resources()}")

    def _place(self, p: ReplicaPlan, index: int) -> RayReplica:
        pg = self.place_group(p, index)
        env = {**(self.frontend.engine_env if self.frontend else {}), "PYTHONUNBUFFERED": "1"}
        actor = EngineReplica.options(  # type: ignore[attr-defined]
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            num_gpus=bundle(p).get("GPU", 0), num_cpus=0, name=f"codefleet-{p.name}-{index}",
        ).remote(p, index, env, str(self.run_dir / "logs"), self.enforce_eager)
        node = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        self.say(f"  {p.name}-{index}: placed on node {node[:8]} "
                 f"({', '.join(f'{v:g} {k}' for k, v in bundle(p).items())})")
        return RayReplica(p, index, pg, actor)

    def scale(self, model: str, replicas: int) -> None:
        """Add or remove replicas of one model; the others keep running."""
        p = next((m for m in self.plan.models if m.name == model), None)
        if p is None:
            raise PlanError(f"no model {model!r} in the fleet")
        mine = [r for r in self.replicas if r.plan.name == model]
        if replicas > len(mine):
            check_feasible(p, replicas, self.strict_spread, ray.nodes())
            next_index = max((r.index for r in mine), default=-1) + 1
            for i in range(next_index, next_index + replicas - len(mine)):
                self.replicas.append(self._place(p, i))
        for r in sorted(mine, key=lambda r: r.index)[replicas:]:
            self._retire(r)
        self.metrics.replicas_desired.labels(model).set(replicas)

    def apply(self, new: FleetPlan) -> list[str]:
        """Follow an edited manifest's replica counts; returns what changed. Other edits need a restart."""
        changed = []
        for m in new.models:
            if not any(p.name == m.name for p in self.plan.models):
                continue
            have = sum(1 for r in self.replicas if r.plan.name == m.name)
            if have != m.replicas:
                self.scale(m.name, m.replicas)
                changed.append(f"{m.name}: {have} -> {m.replicas} replicas")
        return changed

    def _retire(self, r: RayReplica) -> None:
        self._deregister(r)
        try:
            ray.get(r.actor.stop.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the actor may already be gone
            pass
        ray.kill(r.actor, no_restart=True)
        remove_placement_group(r.pg)
        self.replicas.remove(r)
        self.say(f"  {r.name}: removed")

    def _deregister(self, r: RayReplica) -> None:
        if r.registered and r.url and self.frontend is not None:
            try:
                self.frontend.admin.remove(r.url)
            except (httpx.HTTPError, RuntimeStartError):
                pass
            self.metrics.registrations.labels(r.plan.name, "remove").inc()
        r.registered = False
        r.ready = False

    def watch_once(self) -> None:
        """Follow each actor: register healthy replicas, remove those that are down or restarting."""
        assert self.frontend is not None
        if "router" in self.frontend.check():
            for r in self.replicas:
                r.registered = False
        for r in self.replicas:
            try:
                info = ray.get(r.actor.info.remote(), timeout=2)
            except Exception:  # noqa: BLE001 - RayActorError while Ray restarts it, or a timeout
                if r.ready:
                    self.say(f"  {r.name}: actor down; Ray restarts it")
                    r.restarts += 1
                    self.metrics.restarts.labels(r.plan.name, str(r.index)).inc()
                self._deregister(r)
                continue
            if info["url"] != r.url:
                if r.url is not None and info["actor_pid"] != r.info.get("actor_pid") and r.ready:
                    # restarted between two looks
                    r.restarts += 1
                    self.metrics.restarts.labels(r.plan.name, str(r.index)).inc()
                self._deregister(r)
                r.url, r.info = info["url"], info
            healthy = _healthy(self._client, r.url)
            if healthy and not r.registered and r.url is not None:
                self.frontend.admin.add(r.url, r.plan.name)
                self.metrics.registrations.labels(r.plan.name, "add").inc()
                r.registered = r.ready = True
                self.say(f"  ready  {r.name:<26} {r.url}  node {info['node_ip']} ({info['node_id'][:8]})")
            elif not healthy and r.registered:
                self._deregister(r)
        for p in self.plan.models:
            self.metrics.replicas_ready.labels(p.name).set(sum(r.ready for r in self.replicas if r.plan.name == p.name))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = 0.0
        while not all(r.ready for r in self.replicas):
            if time.monotonic() > deadline:
                raise RuntimeStartError("not healthy after {:.0f} s: {}".format(
                    timeout, ", ".join(r.name for r in self.replicas if not r.ready)))
            self.watch_once()
            if time.monotonic() - last > 10:
                last = time.monotonic()
                self.say(f"  {sum(r.ready for r in self.replicas)}/{len(self.replicas)} replicas ready")
            time.sleep(0.5)

    def write_state(self, path: Path) -> None:
        """The state file `codefleet status` and `down` read (the local runner's format, plus nodes)."""
        fe = self.frontend
        state = {"launcher_pid": os.getpid(), "runtime": "ray", "ray_address": self.address,
                 "endpoint": fe.url if fe else None, "router_url": fe.router_url if fe else None,
                 "frontend_pgids": fe.pgids() if fe else [],
                 "replicas": [{**s, "pgid": None} for s in self.status() if s["url"]]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    def status(self) -> list[dict[str, Any]]:
        return [{"model": r.plan.name, "index": r.index, "url": r.url, "ready": r.ready, "restarts": r.restarts,
                 "node_id": r.info.get("node_id"), "node_ip": r.info.get("node_ip"), "gpus": r.info.get("gpus")}
                for r in self.replicas]

    def stop(self) -> None:
        for r in list(self.replicas):
            try:
                ray.get(r.actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001
                pass
            ray.kill(r.actor, no_restart=True)
            try:
                remove_placement_group(r.pg)
            except Exception:  # noqa: BLE001
                pass
        self.replicas.clear()
        if self.frontend is not None:
            self.frontend.stop()
            self.frontend = None
        self.metrics.close()
        self._client.close()


def _ready(pg: PlacementGroup, timeout: float) -> bool:
    try:
        ray.get(pg.ready(), timeout=timeout)
        return True
    except GetTimeoutError:
        return False


def _healthy(client: httpx.Client, url: str | None) -> bool:
    if url is None:
        return False
    try:
        return client.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False
