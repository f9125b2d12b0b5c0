"""Ray runtime without a cluster: bundles from the plan, feasibility errors, the deploy examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from codefleet.errors import PlanError
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.runtime.ray import bundle, check_feasible

ROOT = Path(__file__).resolve().parents[2]


def nodes(*gpus: int) -> list[dict[str, object]]:
    return [{"Alive": True, "Resources": {"GPU": float(g), "CPU": 16.0}} for g in gpus]


@pytest.fixture(scope="module")
def plans():  # type: ignore[no-untyped-def]
    return {p.name: p for p in plan_fleet(load(ROOT / "deploy" / "manifests" / "fleet-ray.yaml")).models}


def test_bundle_is_the_planned_tensor_parallel_size(plans) -> None:  # type: ignore[no-untyped-def]
    for p in plans.values():
        assert bundle(p) == {"GPU": float(p.placement.tensor_parallel_size), "CPU": float(p.placement.host_cpus)}
    assert bundle(plans["codefuse-codellama-34b"])["GPU"] == 2


def test_feasibility(plans) -> None:  # type: ignore[no-untyped-def]
    p = plans["codefuse-codellama-34b"]
    check_feasible(p, 2, True, nodes(8, 8))
    check_feasible(p, 3, False, nodes(8, 8))  # spread: sharing a node is allowed
    with pytest.raises(PlanError, match=r"strict_spread needs 3 nodes with 2 GPU, 4 CPU each.*has 2"):
        check_feasible(p, 3, True, nodes(8, 8))
    with pytest.raises(PlanError, match="no Ray node can hold one replica.*largest node has 1"):
        check_feasible(p, 1, False, nodes(1, 1, 1))
    dead = [{"Alive": False, "Resources": {"GPU": 8.0, "CPU": 16.0}}]
    with pytest.raises(PlanError, match="1 nodes alive"):
        check_feasible(p, 2, True, nodes(8) + dead)


def test_kuberay_example_matches_the_manifest() -> None:
    rc = yaml.safe_load((ROOT / "deploy" / "ray" / "raycluster.yaml").read_text())
    man = load(ROOT / "deploy" / "manifests" / "fleet-ray.yaml").manifest
    assert rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"] == "2.60.0"
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert int(group["rayStartParams"]["num-gpus"]) == man.defaults.gpus_per_node
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == man.defaults.gpus_per_node
    assert group["minReplicas"] >= 2, "strict_spread: two replicas of a model need two nodes"
    assert man.runtime.kind == "ray" and man.runtime.strict_spread
