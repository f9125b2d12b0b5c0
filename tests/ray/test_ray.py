"""Ray: placement over a simulated multi-node cluster, and a real vLLM engine in Ray actors.

Each scenario of tests/ray/cluster_scenarios.py runs in a network namespace of its own
(``unshare -n``, loopback only; Ray 2.60 otherwise binds the machine's interface address), with
token authentication on, and reports one JSON result that the tests here check.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Ray clusters (placement) and real engines in Ray actors: slow.
pytestmark = pytest.mark.e2e


def run_scenario(name: str, tmp_path: Path, timeout: float) -> dict[str, Any]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("unshare and ip (util-linux, iproute2) are needed to keep Ray on loopback")
    # Ray's socket paths must stay under 107 bytes: a short temp dir of our own (not a stale /tmp/ray).
    ray_tmp = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_TMPDIR": ray_tmp, "RUN_DIR": str(tmp_path / "run"), "PYTHONUNBUFFERED": "1"}
    cmd = f"ip link set lo up && exec {sys.executable} -m tests.ray.cluster_scenarios {name}"
    log = tmp_path / f"{name}.log"
    with open(log, "w") as err:
        proc = subprocess.run(["unshare", "-n", "bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=timeout, start_new_session=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    tail = "\n".join(log.read_text().splitlines()[-40:])
    assert proc.returncode == 0 and lines, f"scenario {name} failed ({proc.returncode}):\n{tail}"
    print(tail)
    return dict(json.loads(lines[-1][len("RESULT "):]))


def test_placement(tmp_path: Path) -> None:
    out = run_scenario("placement", tmp_path, timeout=300)
    nodes = set(out["nodes"])
    assert len(nodes) == 3
    for mode in ("spread", "strict"):
        for model, replicas in out["models"][mode].items():
            where = [r["node"] for r in replicas]
            assert len(set(where)) == len(where), f"{mode}: {model} replicas share a node: {where}"
            for r in replicas:
                # one bundle = one replica = its GPUs on one node
                assert r["bundle"]["GPU"] == out["tp"][model]
        codefuse = [r["node"] for r in out["models"][mode]["codefuse-codellama-34b"]]
        assert out["third"][mode] in nodes - set(codefuse), "the third replica goes to the free node"
    assert out["fourth"]["spread"] == "placed"
    strict = out["fourth"]["strict"]
    assert "strict_spread needs 4 nodes" in strict["error"] and "the cluster has 3" in strict["error"]
    assert "cannot be placed" in out["fourth"]["strict_placement"]
    assert "without another replica of the model" in out["fourth"]["strict_placement"]
    assert "no Ray node can hold one replica" in out["tp8"]["error"]
    assert out["bundle_codefuse"] == {"GPU": 2.0, "CPU": 4.0}  # sizing.host_cpus: 2 + TP


def test_real_engine_in_ray_actors(tmp_path: Path) -> None:
    out = run_scenario("serve", tmp_path, timeout=1500)
    status = out["status"]
    assert len(status) == 2 and all(s["ready"] for s in status)
    assert len({s["node_id"] for s in status}) == 2, "strict_spread: the two replicas on distinct nodes"
    assert out["chat"] == ["length"] * 4
    smoke = out["smoke"]
    assert smoke["failed"] == [] and smoke["unknown"] is True and smoke["checks"] >= 7, smoke
    assert smoke["template"] == ["granite-code (recognised; no expectation given)"], smoke
    for step in ("after_engine_kill", "after_actor_kill"):
        s = out[step]
        assert s["saw_down"] and s["new_actor"] and s["ready"], (step, s)
        assert s["chat"] == ["length"] * 4, (step, s)
        print(f"{step}: back in {s['seconds']:.0f} s at {s['new_url']} (was {s['old_url']})")
    assert out["applied"] == ["granite-code-tiny: 2 -> 1 replicas", "granite-code-tiny: 1 -> 2 replicas"]
    assert out["after_scale_down"] == ["granite-code-tiny-0"]
    streams = out["streams_during_scale_down"]
    # a finish reason ("stop": the family's stop strings may turn up in the tiny model's random text)
    assert all(s["finish"] in ("length", "stop") for s in streams) and not any(s["error"] for s in streams), streams
    print(f"scale 2 -> 1 with 8 streams in flight: drained in {out['scale_down_s']:.1f} s, no stream cut")
    # The launcher's metrics and the Prometheus targets, as under the local runtime.
    metrics = out["metrics_after_scale_down"]
    assert 'codefleet_replicas_ready{model="granite-code-tiny"} 1.0' in metrics
    assert 'codefleet_replicas_desired{model="granite-code-tiny"} 1.0' in metrics
    (target,) = out["targets_after_scale_down"]
    assert target["labels"]["model"] == "granite-code-tiny" and target["labels"]["replica"] == "0"
    assert target["labels"]["node"] == status[0]["node_ip"] or target["labels"]["node"] == status[1]["node_ip"]
    assert sorted(t["targets"][0] for t in out["targets"]) == sorted(u.removeprefix("http://")
                                                                      for u in out["registered"])
    assert out["state"]["runtime"] == "ray" and out["state"]["converged"]
    assert len(out["after_scale_up"]) == 2 and all(s["ready"] for s in out["after_scale_up"])
    assert out["kept_pid"], "scaling restarted the replica it did not touch"
    assert out["chat_after_scale"] == ["length"] * 4
    assert sorted(s["url"] for s in out["after_scale_up"]) == out["registered"]
