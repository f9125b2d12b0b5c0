"""``apply``'s comparison of the running plan with a new one (no fleet, no processes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from codefleet.errors import PlanError
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.runtime.changes import PlanDiff, diff_plans, follow
from codefleet.runtime.replica import plan_generations


def make(tmp_path: Path, replicas: int = 2, seqs: int = 16, extra: str = "") -> FleetPlan:
    text = (f"defaults: {{gpu: cpu, drain_seconds: 30}}\nmodels:\n  - name: m\n    source: demo://granite-code\n"
            f"    max_model_len: 512\n    replicas: {replicas}\n    engine_args: {{max_num_seqs: {seqs}}}\n"
            f"  - name: n\n    source: demo://granite-code\n    max_model_len: 512\n{extra}")
    return plan_fleet(parse(text, tmp_path / "m.yaml"))


def diff(old: FleetPlan, new: FleetPlan) -> PlanDiff:
    return diff_plans(old, new, plan_generations(old), plan_generations(new))


def test_no_change(tmp_path: Path) -> None:
    d = diff(make(tmp_path), make(tmp_path))
    assert [c.name for c in d.models] == ["m", "n"]
    assert not any(c.replace or c.replicas_changed or c.autoscale_changed for c in d.models)
    assert not d.tenants_changed


def test_replicas_only_scale(tmp_path: Path) -> None:
    m, n = diff(make(tmp_path), make(tmp_path, replicas=3)).models
    assert m.replicas_changed and not m.replace and not m.autoscale_changed
    assert not n.replicas_changed


def test_what_an_engine_runs_replaces(tmp_path: Path) -> None:
    m, n = diff(make(tmp_path), make(tmp_path, seqs=8)).models
    assert m.replace and not m.replicas_changed
    assert not n.replace


def test_generations_are_the_callers(tmp_path: Path) -> None:
    """The diff compares the generations it is given (computed once per plan), not the plans' flags."""
    old = make(tmp_path)
    d = diff_plans(old, old, {"m": "a", "n": "b"}, {"m": "a", "n": "c"})
    assert [c.replace for c in d.models] == [False, True]


def test_autoscaling_turned_on(tmp_path: Path) -> None:
    new = make(tmp_path, extra="    autoscaling: {min_replicas: 0, max_replicas: 2, target: 2}\n")
    m, n = diff(make(tmp_path), new).models
    assert n.autoscale_changed and not m.autoscale_changed
    assert not n.replace  # autoscaling is not part of what an engine runs


def test_models_added_removed_or_renamed_are_refused(tmp_path: Path) -> None:
    old = make(tmp_path)
    with pytest.raises(PlanError, match="adding, removing or renaming a model"):
        diff(old, replace(old, models=[replace(old.models[0], name="x"), old.models[1]]))
    with pytest.raises(PlanError, match="adding, removing or renaming a model"):
        diff(old, replace(old, models=old.models[:1]))


def test_router_or_metrics_changes_are_refused(tmp_path: Path) -> None:
    old = make(tmp_path)
    with pytest.raises(PlanError, match="router or metrics settings changed"):
        diff(old, replace(old, router=old.router.model_copy(update={"port": old.router.port + 1})))
    with pytest.raises(PlanError, match="router or metrics settings changed"):
        diff(old, replace(old, metrics=old.metrics.model_copy(update={"host": "0.0.0.0"})))


def test_tenants_changed(tmp_path: Path) -> None:
    old = make(tmp_path)
    assert diff(old, replace(old, tenants={"ide": object()})).tenants_changed  # type: ignore[dict-item]


AUTO = "    autoscaling: {min_replicas: 0, max_replicas: 3, target: 2}\n"
"""Without ``replicas`` an autoscaled model's plan starts at min_replicas."""


def test_follow_scales_and_reports(tmp_path: Path) -> None:
    old, new = make(tmp_path), make(tmp_path, replicas=3)
    f = follow(diff(old, new), {"m": 2, "n": 1}, {}, now=0.0)
    assert f.desired == {"m": 3, "n": 1} and f.autoscalers == {}
    assert f.changes == ["m: 2 -> 3 replicas"]


def test_follow_reports_a_rolling_replace_at_the_count_it_ends_with(tmp_path: Path) -> None:
    f = follow(diff(make(tmp_path), make(tmp_path, replicas=1, seqs=8)), {"m": 2, "n": 1}, {}, now=0.0)
    assert f.changes == ["m: rolling replace of 2 replica(s) (then 1)"] and f.desired["m"] == 1


def test_follow_turns_autoscaling_on_at_the_new_count(tmp_path: Path) -> None:
    f = follow(diff(make(tmp_path), make(tmp_path, extra=AUTO)), {"m": 2, "n": 1}, {}, now=0.0)
    assert f.desired["n"] == 0  # replicas changed (1 -> min_replicas): the autoscaler starts there
    assert f.changes == ["n: autoscaling 0..3 on waiting (target 2); now 0", "n: 1 -> 0 replicas"]


def test_follow_turns_autoscaling_on_and_off(tmp_path: Path) -> None:
    old, auto = make(tmp_path), make(tmp_path, extra=AUTO + "    replicas: 1\n")
    desired = {"m": 2, "n": 1}
    on = follow(diff(old, auto), desired, {}, now=0.0)
    assert list(on.autoscalers) == ["n"] and on.desired["n"] == 1  # starts at the current count
    assert on.changes == ["n: autoscaling 0..3 on waiting (target 2); now 1"]
    assert desired == {"m": 2, "n": 1}, "the running fleet's targets are not changed"
    same = follow(diff(auto, auto), on.desired, on.autoscalers, now=1.0)
    assert same.changes == [] and same.autoscalers["n"] is on.autoscalers["n"]
    off = follow(diff(auto, old), on.desired, on.autoscalers, now=2.0)
    assert off.autoscalers == {} and off.desired["n"] == 1 and off.changes == []


def test_follow_tells_the_autoscaler_a_new_count(tmp_path: Path) -> None:
    auto = make(tmp_path, extra=AUTO + "    replicas: 1\n")
    on = follow(diff(make(tmp_path), auto), {"m": 2, "n": 1}, {}, now=0.0)
    more = make(tmp_path, extra=AUTO + "    replicas: 2\n")
    f = follow(diff(auto, more), on.desired, on.autoscalers, now=1.0)
    assert f.autoscalers["n"] is on.autoscalers["n"] and f.desired["n"] == 2
    assert f.changes == ["n: 1 -> 2 replicas"]
