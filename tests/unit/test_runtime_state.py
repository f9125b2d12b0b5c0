"""The state file: what the loop writes is what ``status``, ``apply`` and ``down`` read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codefleet.runtime.state import (
    AutoscaleRange,
    FleetState,
    LastDecision,
    MetricsAddresses,
    ModelState,
    ReplicaState,
    read_state,
    remove_state,
    state_dir,
    state_path,
    write_state,
)

STATE = FleetState(
    launcher_pid=123, runtime="ray", endpoint="http://127.0.0.1:8000",
    metrics=MetricsAddresses("127.0.0.1:9400", "127.0.0.1:9401", None), router_url="http://127.0.0.1:9000",
    frontend_pgids=(11, 12), converged=True,
    models=(ModelState("m", desired=2, drain_seconds=30, generation="abc",
                       autoscale=AutoscaleRange(0, 3, "waiting", 4.0),
                       last_decision=LastDecision(1.5, 1, 2, "scale_up", "9 waiting")),
            ModelState("n", desired=1, drain_seconds=60, generation="def")),
    replicas=(ReplicaState("m", 0, "http://10.0.0.2:8001", state="ready", generation="abc", node_ip="10.0.0.2",
                           node_id="f00d" * 8, restarts=1, log="/run/logs/m-0.log"),
              ReplicaState("n", 0, "http://127.0.0.1:8002", state="starting", generation="def", pgid=4242)),
)


def test_round_trip(tmp_path: Path) -> None:
    text = write_state(tmp_path, STATE)
    assert state_path(tmp_path).read_text() == text
    assert read_state(tmp_path) == STATE


def test_the_files_keys(tmp_path: Path) -> None:
    """What other readers (benchmarks, Ray scenarios reading the JSON) rely on."""
    write_state(tmp_path, STATE)
    data = json.loads((tmp_path / "fleet.json").read_text())
    assert list(data) == ["launcher_pid", "runtime", "endpoint", "metrics", "router_url", "frontend_pgids",
                          "converged", "models", "replicas"]
    assert data["metrics"] == {"launcher": "127.0.0.1:9400", "gateway": "127.0.0.1:9401", "router": None}
    assert data["models"][0]["autoscale"] == {"min": 0, "max": 3, "signal": "waiting", "target": 4.0}
    assert data["models"][0]["last_decision"] == {"at": 1.5, "from": 1, "to": 2, "reason": "scale_up",
                                                  "detail": "9 waiting"}
    assert data["models"][1]["autoscale"] is None and data["models"][1]["last_decision"] is None
    assert list(data["replicas"][0]) == ["model", "index", "url", "state", "generation", "node_ip", "node_id",
                                         "restarts", "pgid", "log", "adapters"]
    assert data["replicas"][1]["pgid"] == 4242 and data["frontend_pgids"] == [11, 12]


def test_unchanged_text_is_not_rewritten(tmp_path: Path) -> None:
    text = write_state(tmp_path, STATE)
    state_path(tmp_path).write_text("changed by hand")
    write_state(tmp_path, STATE, previous=text)
    assert state_path(tmp_path).read_text() == "changed by hand"
    state_path(tmp_path).unlink()
    write_state(tmp_path, STATE, previous=text)  # gone: written again
    assert read_state(tmp_path) == STATE


def test_missing_or_unreadable(tmp_path: Path) -> None:
    assert read_state(tmp_path) is None
    (tmp_path / "fleet.json").write_text("{not json")
    assert read_state(tmp_path) is None
    (tmp_path / "fleet.json").write_text('{"runtime": "local"}')  # no launcher_pid
    assert read_state(tmp_path) is None
    remove_state(tmp_path)
    remove_state(tmp_path)
    assert not (tmp_path / "fleet.json").exists()


def test_optional_fields_may_be_absent(tmp_path: Path) -> None:
    (tmp_path / "fleet.json").write_text(json.dumps(
        {"launcher_pid": 7, "replicas": [{"model": "m", "index": 0, "url": "http://h:1"}], "models": [{"model": "m"}]}))
    s = read_state(tmp_path)
    assert s is not None and s.launcher_pid == 7 and not s.converged and s.metrics.ports() == {}
    assert s.replicas[0].name == "m-0" and s.replicas[0].pgid is None and s.models[0].desired is None


def test_ports_and_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert STATE.metrics.ports() == {"launcher": 9400, "gateway": 9401}
    monkeypatch.setenv("CODEFLEET_HOME", str(tmp_path))
    assert state_dir() == tmp_path / "run" and state_path() == tmp_path / "run" / "fleet.json"
