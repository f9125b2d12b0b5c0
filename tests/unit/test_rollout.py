"""One model's step of the loop (``rollout.converge_step``): scaling and rolling replacement."""

from __future__ import annotations

from pathlib import Path

import pytest

from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import ReplicaPlan
from codefleet.runtime.replica import Replica, State
from codefleet.runtime.rollout import Step, converge_step

S, R = State.STARTING, State.READY


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> ReplicaPlan:
    tmp: Path = tmp_path_factory.mktemp("m")
    text = ("defaults: {gpu: cpu}\nmodels:\n  - name: m\n    source: demo://granite-code\n"
            "    max_model_len: 512\n")
    return plan_fleet(parse(text, tmp / "m.yaml")).models[0]


def replicas(plan: ReplicaPlan, *specs: tuple[str, State]) -> list[Replica]:
    return [Replica(plan, i, gen, state=state) for i, (gen, state) in enumerate(specs)]


def names(rs: tuple[Replica, ...]) -> list[str]:
    return [r.name for r in rs]


def test_scale_up_from_nothing(plan: ReplicaPlan) -> None:
    assert converge_step([], "g", 3) == Step(launch=3)


def test_converged_does_nothing(plan: ReplicaPlan) -> None:
    assert converge_step(replicas(plan, ("g", R), ("g", S)), "g", 2) == Step()


def test_scale_down_drains_the_starting_then_the_newest(plan: ReplicaPlan) -> None:
    live = replicas(plan, ("g", R), ("g", R), ("g", S), ("g", R))
    step = converge_step(live, "g", 1)
    assert step.launch == 0 and names(step.drain) == ["m-2", "m-3", "m-1"]


def test_rolling_replace_adds_one_new_replica_first(plan: ReplicaPlan) -> None:
    live = replicas(plan, ("old", R), ("old", R))
    assert converge_step(live, "new", 2) == Step(launch=1)


def test_rolling_replace_waits_for_the_new_one(plan: ReplicaPlan) -> None:
    live = replicas(plan, ("old", R), ("old", R), ("new", S))
    assert converge_step(live, "new", 2) == Step()


def test_rolling_replace_drains_the_oldest_once_a_new_one_serves(plan: ReplicaPlan) -> None:
    live = replicas(plan, ("old", R), ("old", R), ("new", R))
    step = converge_step(live, "new", 2)
    assert step.launch == 1 and names(step.drain) == ["m-0"]


def test_old_replicas_not_serving_go_at_once(plan: ReplicaPlan) -> None:
    live = replicas(plan, ("old", R), ("old", S))
    step = converge_step(live, "new", 2)
    assert names(step.drain_first) == ["m-1"] and step.launch == 1 and step.drain == ()
    only_starting = replicas(plan, ("old", S), ("new", R))
    step = converge_step(only_starting, "new", 2)
    assert names(step.drain_first) == ["m-0"] and step.launch == 1 and step.drain == ()
