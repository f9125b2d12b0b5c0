"""Ray scenarios run inside a network namespace of their own (``unshare -n``): Ray 2.60 does not stay
on loopback otherwise. Each scenario prints one JSON line starting with ``RESULT `` that
tests/ray/test_ray.py asserts on; progress goes to stderr.

    unshare -n bash -c 'ip link set lo up; python -m tests.ray.cluster_scenarios placement'
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray.cluster_utils import Cluster

from codefleet.errors import PlanError
from codefleet.manifest import load, parse
from codefleet.planner import plan_fleet
from codefleet.runtime.ray import RayFleet, bundle, check_feasible
from codefleet.runtime.replica import State

ROOT = Path(__file__).resolve().parents[2]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cluster(workers: list[dict[str, Any]], head_cpus: int = 1) -> Cluster:
    t0 = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0,
                                                      "node_ip_address": "127.0.0.1"})
    for w in workers:
        c.add_node(node_ip_address="127.0.0.1", **w)
    c.wait_for_nodes()
    say(f"cluster of {1 + len(workers)} nodes up in {time.monotonic() - t0:.1f} s")
    return c


def result(**data: Any) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def placement() -> None:
    """The H100 plan of the seed fleet on three logical 4-GPU nodes; placement only, no engines."""
    c = cluster([{"num_cpus": 8, "num_gpus": 4} for _ in range(3)])
    ray.init(address=c.address, log_to_driver=False)
    plan = plan_fleet(load(ROOT / "deploy" / "manifests" / "fleet.yaml"), gpu="h100-80gb")
    out: dict[str, Any] = {"models": {}}
    try:
        for strict in (False, True):
            fleet = RayFleet(plan, address=c.address, strict_spread=strict, placement_timeout=5, say=say)
            placed: dict[str, list[dict[str, Any]]] = {}
            for p in plan.models[-2:]:  # starcoder (TP 1) and codefuse-34b (TP 2)
                for i in range(p.placement.replicas):
                    pg = fleet.place_group(p, i)
                    table = ray.util.placement_group_table(pg)
                    placed.setdefault(p.name, []).append({"node": table["bundles_to_node_id"][0],
                                                          "bundle": table["bundles"][0]})
            out["models"]["strict" if strict else "spread"] = placed
            out.setdefault("tp", {}).update({p.name: p.placement.tensor_parallel_size for p in plan.models[-2:]})
            # A third replica of codefuse-34b (TP 2): spread puts it on the third node; strict too.
            p = plan.models[-1]
            pg = fleet.place_group(p, 2)
            out.setdefault("third", {})["strict" if strict else "spread"] = \
                ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
            # A fourth: spread shares a node (none is free of the model); strict is refused up front
            # (the feasibility check `scale` runs) and by the placement itself.
            fourth = out.setdefault("fourth", {})
            if not strict:
                fleet.place_group(p, 3)
                fourth["spread"] = "placed"
            else:
                t0 = time.monotonic()
                try:
                    check_feasible(p, 4, True, ray.nodes())
                except PlanError as exc:
                    fourth["strict"] = {"error": str(exc), "seconds": time.monotonic() - t0}
                try:
                    fleet.place_group(p, 3)
                    fourth["strict_placement"] = "placed"
                except PlanError as exc:
                    fourth["strict_placement"] = str(exc)
            for r in fleet.replicas:
                ray.util.remove_placement_group(r.handle["pg"])
        # TP 8 cannot fit a 4-GPU node.
        big = parse("""version: 1
defaults: {gpu: h100-80gb}
models: [{name: big, source: codefuse-ai/CodeFuse-CodeLlama-34B, tensor_parallel_size: 8, replicas: 1}]
""", ROOT / "inline.yaml")
        t0 = time.monotonic()
        try:
            RayFleet(plan_fleet(big), address=c.address, say=say).start()
        except PlanError as exc:
            out["tp8"] = {"error": str(exc), "seconds": time.monotonic() - t0}
        out["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")]
        out["bundle_codefuse"] = bundle(plan.models[-1])
    finally:
        ray.shutdown()
        c.shutdown()
    result(**out)


def serve() -> None:
    """A real vLLM engine (tiny checkpoint) in Ray actors on a 3-node cluster, through the router."""
    import openai

    c = cluster([{"num_cpus": 1}, {"num_cpus": 1}], head_cpus=1)
    manifest = ROOT / "tests" / "ray" / "fleet.yaml"
    os.environ.setdefault("CODEFLEET_RAY_TEST_KEYS", "sk-ray-test")
    plan = plan_fleet(load(manifest))
    run_dir = Path(os.environ.get("RUN_DIR", "/tmp/codefleet-ray"))
    out: dict[str, Any] = {}
    fleet = RayFleet(plan, address=c.address, strict_spread=True, enforce_eager=True, run_dir=run_dir, say=say)
    try:
        t0 = time.monotonic()
        fleet.start(timeout=600)
        out["start_s"] = time.monotonic() - t0
        out["status"] = fleet.status()
        client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-ray-test", max_retries=0)

        def chat() -> str:
            r = client.chat.completions.create(model="granite-code-tiny", max_tokens=4,
                                               messages=[{"role": "user", "content": "def add(a, b):"}])
            return r.choices[0].finish_reason or ""

        out["chat"] = [chat() for _ in range(4)]
        # `codefleet smoke` through the Ray fleet's endpoint, as after any deploy
        from codefleet.smoke import Smoke, run
        reports, unknown = run(Smoke(fleet.url, "sk-ray-test"), {})
        out["smoke"] = {"failed": [(r.model, c.name, c.detail) for r in reports for c in r.failed],
                        "checks": sum(len(r.checks) for r in reports), "unknown": unknown.ok,
                        "template": [c.detail for r in reports for c in r.checks if c.name == "template"]}
        # 1. The engine process dies: the actor exits, Ray restarts it, the replica comes back.
        victim = fleet.replicas[0]
        old = dict(victim.handle, url=victim.url)
        os.kill(old["pid"], 9)
        out["after_engine_kill"] = _wait_back(fleet, victim, old, client, chat)
        # 2. The actor itself dies (Ray restarts it).
        old = dict(victim.handle, url=victim.url)
        ray.kill(victim.handle["actor"], no_restart=False)
        out["after_actor_kill"] = _wait_back(fleet, victim, old, client, chat)
        # 3. Scale 2 -> 1 while streams are in flight (`codefleet apply`): the streams finish, the
        #    drained replica goes; then 1 -> 2. The untouched replica keeps its engine.
        keep = fleet.replicas[0]
        keep_pid = keep.handle["pid"]
        edited = manifest.read_text()
        one = edited.replace("replicas: 2", "replicas: 1")
        fleet.watch_in_background()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream, client) for _ in range(8)]
            time.sleep(1.0)
            t0 = time.monotonic()
            out["applied"] = fleet.apply(plan_fleet(parse(one, manifest)))
            _converge(fleet, 300)
            out["scale_down_s"] = time.monotonic() - t0
            out["streams_during_scale_down"] = [f.result() for f in streams]
        out["after_scale_down"] = [r.name for r in fleet.replicas]
        out["metrics_after_scale_down"] = httpx.get(f"http://127.0.0.1:{fleet.metrics_port}/metrics", timeout=5).text
        out["targets_after_scale_down"] = json.loads((run_dir / "prometheus" / "engines.json").read_text())
        out["applied"] += fleet.apply(plan_fleet(parse(edited, manifest)))
        _converge(fleet, 600)
        out["after_scale_up"] = fleet.status()
        out["kept_pid"] = keep.handle["pid"] == keep_pid
        out["chat_after_scale"] = [chat() for _ in range(4)]
        out["registered"] = sorted(w["url"] for w in fleet.frontend.admin.workers())  # type: ignore[union-attr]
        out["targets"] = json.loads((run_dir / "prometheus" / "engines.json").read_text())
        out["state"] = json.loads((run_dir / "fleet.json").read_text())
    finally:
        fleet.stop()
        ray.shutdown()
        c.shutdown()
    result(**out)


def _converge(fleet: RayFleet, timeout: float) -> None:
    t0 = time.monotonic()
    while not fleet.converged():
        assert time.monotonic() - t0 < timeout, "the fleet did not converge"
        time.sleep(0.5)


def _stream(client: Any) -> dict[str, Any]:
    """One long streamed completion: its finish reason and whether it ended cleanly."""
    finish, chunks = None, 0
    try:
        for chunk in client.completions.create(model="granite-code-tiny", prompt="def f(x):", max_tokens=200,
                                               stream=True, extra_body={"ignore_eos": True}):
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except Exception as exc:  # counted as a cut stream
        return {"finish": None, "chunks": chunks, "error": repr(exc)}
    return {"finish": finish, "chunks": chunks, "error": None}


def _wait_back(fleet: RayFleet, victim: Any, old: dict[str, Any], client: Any, chat: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    saw_down = False
    while time.monotonic() - t0 < 400:
        fleet.watch_once()
        ready = victim.state is State.READY
        saw_down = saw_down or not ready
        if ready and victim.handle.get("actor_pid") != old["actor_pid"]:
            break
        # the other replica keeps serving meanwhile
        time.sleep(0.5)
    back = time.monotonic() - t0
    served = [chat() for _ in range(4)]
    return {"seconds": back, "saw_down": saw_down, "new_actor": victim.handle.get("actor_pid") != old["actor_pid"],
            "new_url": victim.url, "old_url": old["url"], "ready": victim.state is State.READY,
            "restarts": victim.restarts, "chat": served}


if __name__ == "__main__":
    {"placement": placement, "serve": serve}[sys.argv[1]]()
