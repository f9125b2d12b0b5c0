"""The reconcile loop's decisions with a fake backend and a fake router (no processes): scaling,
rolling replace one at a time with a ready replica all along, crash restarts, drain phases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from codefleet.errors import PlanError
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.runtime import core
from codefleet.runtime.backend import Seen
from codefleet.runtime.core import Fleet
from codefleet.runtime.probe import Answer
from codefleet.runtime.replica import Replica, State


class FakeBackend:
    name = "fake"
    relaunches = True
    watch_health = False

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.terminated: list[str] = []
        self.killed: list[str] = []
        self.signalled: list[str] = []
        self.exit: dict[str, int] = {}
        self.healthy: set[str] = set()

    def prepare(self, plan: FleetPlan) -> None: ...
    def check(self, plan: FleetPlan) -> None: ...

    def launch(self, fleet: Fleet, r: Replica) -> None:
        self.launched.append(r.name)
        self.exit.pop(r.name, None)
        r.url = f"http://fake/{r.name}/{len(self.launched)}"
        r.incarnation = len(self.launched)

    def observe(self, r: Replica) -> Seen:
        code = self.exit.get(r.name)
        return Seen(running=code is None, url=r.url, incarnation=r.incarnation, exit_status=code)

    def terminate(self, r: Replica) -> None:
        self.terminated.append(r.name)

    def stopped(self, r: Replica) -> bool:
        return r.name in self.terminated

    def kill(self, r: Replica, grace: float) -> None:
        self.killed.append(r.name)

    def signal_kill(self, r: Replica) -> None:
        self.signalled.append(r.name)

    def close(self) -> None: ...

    def node_of(self, r: Replica) -> str | None:
        return None


class FakeProbe:
    """/health: the replicas the backend calls healthy; /metrics: what each engine (by replica
    name) and the gateway (``gateway``) export; a name in ``down`` does not answer."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.engines: dict[str, str] = {}
        self.gateway = ""
        self.down: set[str] = set()

    @staticmethod
    def name(url: str) -> str:
        return url.removeprefix("http://fake/").split("/")[0]

    def health(self, url: str) -> bool:
        return self.name(url) in self.backend.healthy

    def metrics(self, url: str, timeout: float) -> Answer | None:
        if not url.startswith("http://fake/"):
            return Answer(200, self.gateway)
        name = self.name(url)
        return None if name in self.down else Answer(200, self.engines.get(name, ""))

    def close(self) -> None: ...


def busy(running: int = 0, waiting: int = 0) -> str:
    """An engine's /metrics with these requests running and waiting."""
    return (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running {running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {waiting}\n")


class FakeAdmin:
    def __init__(self) -> None:
        self.workers: dict[str, str] = {}

    def add(self, url: str, model: str) -> None:
        self.workers[url] = model

    def remove(self, url: str) -> None:
        self.workers.pop(url, None)


class FakeFrontend:
    def __init__(self) -> None:
        self.admin = FakeAdmin()
        self.url = "http://fake-endpoint"
        self.router_url = "http://fake-router"
        self.gateway_metrics_port = self.router_metrics_port = 0
        self.hold = False

    def check(self) -> list[str]:
        return []

    def refresh_gateway(self) -> None: ...

    def reload_gateway(self, tenants: object, fim: object = None, adapters: object = None,
                       hold: object = None) -> None: ...

    def pgids(self) -> list[int]:
        return []


def make(tmp_path: Path, replicas: int = 2, seqs: int = 16) -> FleetPlan:
    text = (f"defaults: {{gpu: cpu, drain_seconds: 30}}\nmodels:\n  - name: m\n    source: demo://granite-code\n"
            f"    max_model_len: 512\n    replicas: {replicas}\n    engine_args: {{max_num_seqs: {seqs}}}\n")
    return plan_fleet(parse(text, tmp_path / "m.yaml"))


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Fleet, FakeBackend]:
    backend = FakeBackend()
    f = Fleet(plan=make(tmp_path), backend=backend, run_dir=tmp_path / "run", say=lambda s: None,
              probe=FakeProbe(backend))
    f.frontend = FakeFrontend()  # type: ignore[assignment]
    return f, backend


def probe(f: Fleet) -> FakeProbe:
    assert isinstance(f.probe, FakeProbe)
    return f.probe


def workers(f: Fleet) -> dict[str, str]:
    """The fake router's workers: URL -> model."""
    fe: object = f.frontend
    assert isinstance(fe, FakeFrontend)
    return fe.admin.workers


def states(f: Fleet) -> list[tuple[str, str]]:
    return [(r.name, r.state.value) for r in f.replicas]


def test_start_scale_up_and_down(fleet: tuple[Fleet, FakeBackend], tmp_path: Path) -> None:
    f, b = fleet
    f.reconcile()
    assert b.launched == ["m-0", "m-1"]
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    assert states(f) == [("m-0", "ready"), ("m-1", "ready")] and f.converged()
    assert len(workers(f)) == 2
    f.apply(make(tmp_path, replicas=3))
    f.reconcile()
    assert b.launched[-1] == "m-2" and not f.converged()
    b.healthy.add("m-2")
    f.reconcile()
    assert f.converged()
    f.apply(make(tmp_path, replicas=1))
    f.reconcile()
    # the newest leave, out of the router at once
    assert states(f) == [("m-0", "ready"), ("m-1", "draining"), ("m-2", "draining")]
    assert list(workers(f).values()) == ["m"]
    for r in f.replicas:  # idle engines (nothing running or waiting)
        r.drain_started -= core.ROUTER_QUIET_S
    f.reconcile()
    assert b.terminated == ["m-1", "m-2"]
    f.reconcile()
    assert states(f) == [("m-0", "ready")] and b.killed == ["m-1", "m-2"] and f.converged()


def test_rolling_replace_adds_before_it_removes(fleet: tuple[Fleet, FakeBackend], tmp_path: Path) -> None:
    f, b = fleet
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    assert "m: rolling replace" in f.apply(make(tmp_path, seqs=8))[0]
    ready_counts = []
    for step in range(40):
        f.reconcile()
        ready_counts.append(f.ready_count("m"))
        starting = [r.name for r in f.replicas if r.state is State.STARTING]
        assert len(starting) <= 1, "one new replica at a time"
        b.healthy |= set(starting) if step % 2 else set()
        for r in f.replicas:
            r.drain_started -= core.ROUTER_QUIET_S
        if f.converged():
            break
    assert f.converged()
    assert min(ready_counts) >= 2, ready_counts  # never fewer ready replicas than before
    assert [r.name for r in f.replicas] == ["m-2", "m-3"] and b.killed == ["m-0", "m-1"]


def test_crash_restarts_and_reregisters(fleet: tuple[Fleet, FakeBackend]) -> None:
    f, b = fleet
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    old_url = f.replicas[0].url
    b.exit["m-0"] = -9
    f.reconcile()
    r0 = f.replicas[0]
    assert r0.restarts == 1 and r0.state is State.STARTING and r0.url != old_url
    assert old_url not in workers(f)
    f.reconcile()
    assert r0.state is State.READY and r0.url in workers(f)


def test_drain_budget_spent_then_killed(fleet: tuple[Fleet, FakeBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    f, b = fleet
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    probe(f).engines["m-1"] = busy(running=3)  # busy all along
    monkeypatch.setattr(b, "stopped", lambda r: False)  # and ignoring SIGTERM
    r = f.replicas[1]
    f.drain(r, budget=0)
    f._drain_step(r, r.drain_started + 0.5)
    assert b.terminated == ["m-1"] and r.state is State.DRAINING
    term = r.drain_started + 0.5
    f._drain_step(r, term + core.KILL_GRACE_S - 1)
    assert not b.killed
    f._drain_step(r, term + core.KILL_GRACE_S + 0.1)
    assert b.signalled == ["m-1"] and not b.killed and r.state is State.DRAINING  # SIGKILL, not yet gone
    f._drain_step(r, term + core.KILL_GRACE_S + 0.1 + core.KILL_WAIT_S + 0.1)
    assert b.killed == ["m-1"] and r.state is State.STOPPED  # reaped and forgotten after the wait


def test_late_engines_are_killed_together_not_one_by_one(fleet: tuple[Fleet, FakeBackend]) -> None:
    # Two idle engines hung in their shutdown: both get SIGKILL in the same pass, and each is done
    # with as soon as it is gone (a blocking kill waits up to 5 s per engine, one after another).
    f, b = fleet
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    gone: set[str] = set()
    b.stopped = lambda r: r.name in gone  # type: ignore[method-assign]
    for r in f.replicas:
        f.drain(r)
    t0 = max(r.drain_started for r in f.replicas)
    for r in list(f.replicas):
        f._drain_step(r, t0 + core.ROUTER_QUIET_S + 0.1)  # idle: SIGTERM
    assert sorted(b.terminated) == ["m-0", "m-1"] and all(r.terminated_idle for r in f.replicas)
    late = t0 + core.ROUTER_QUIET_S + 0.1 + core.IDLE_STOP_GRACE_S + 0.1
    for r in list(f.replicas):
        f._drain_step(r, late)
    assert sorted(b.signalled) == ["m-0", "m-1"] and not b.killed
    gone |= {"m-0", "m-1"}
    for r in list(f.replicas):
        f._drain_step(r, late + 0.2)
    assert sorted(b.killed) == ["m-0", "m-1"] and not f.replicas


def test_apply_refuses_model_set_changes(fleet: tuple[Fleet, FakeBackend], tmp_path: Path) -> None:
    f, _ = fleet
    other = make(tmp_path)
    renamed = replace(other, models=[replace(other.models[0], name="n")])
    with pytest.raises(PlanError, match="adding, removing or renaming a model"):
        f.apply(renamed)


def test_autoscaler_decisions_drive_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("defaults: {gpu: cpu, drain_seconds: 30}\nmodels:\n  - name: m\n    source: demo://granite-code\n"
            "    max_model_len: 512\n    autoscaling: {min_replicas: 0, max_replicas: 2, target: 2, "
            "scale_up_window_seconds: 0, scale_down_delay_seconds: 0, idle_seconds_before_zero: 3600}\n")
    backend = FakeBackend()
    monkeypatch.setattr(core, "AUTOSCALE_INTERVAL_S", 0.0)
    fake = FakeProbe(backend)

    def held(n: int) -> None:  # the gateway's gauge of the requests it holds
        fake.gateway = f'# TYPE codefleet_gateway_held_requests gauge\ncodefleet_gateway_held_requests{{model="m"}} {n}\n'

    def waiting(n: int) -> None:  # every engine's
        fake.engines = {r: busy(waiting=n) for r in backend.launched}

    f = Fleet(plan=plan_fleet(parse(text, tmp_path / "m.yaml")), backend=backend, run_dir=tmp_path / "run",
              say=lambda s: None, probe=fake)
    fe = FakeFrontend()
    fe.hold = True
    refreshed: list[int] = []
    fe.refresh_gateway = lambda: refreshed.append(1)  # type: ignore[method-assign]
    f.frontend = fe  # type: ignore[assignment]
    f.reconcile()
    assert b_launched(backend) == [] and f.converged()  # starts at zero
    held(3)  # the endpoint holds three requests: one replica at once
    f.reconcile()
    assert b_launched(backend) == ["m-0"] and f.desired["m"] == 1
    assert f.decisions["m"].reason == "from_zero"
    backend.healthy.add("m-0")
    held(0)
    f.reconcile()
    assert states(f) == [("m-0", "ready")] and refreshed, "the gateway is told when a replica registers"
    waiting(5)  # ceil(5 / 2) = 3 -> max 2
    f.reconcile()
    assert b_launched(backend) == ["m-0", "m-1"] and f.decisions["m"].reason == "scale_up"
    backend.healthy.add("m-1")
    waiting(0)
    f.reconcile()  # m-1 ready; a sample with m-1 starting restarted the windows, this one decides
    f.reconcile()
    assert f.desired["m"] == 1 and f.decisions["m"].reason == "scale_down"
    assert states(f) == [("m-0", "ready"), ("m-1", "draining")]  # the newest leaves by draining
    text_metrics = f.metrics.registry.get_sample_value("codefleet_autoscaler_decisions_total",
                                                       {"model": "m", "reason": "scale_up"})
    assert text_metrics == 1.0
    assert f.metrics.registry.get_sample_value("codefleet_autoscaler_desired_replicas", {"model": "m"}) == 1.0


def b_launched(b: FakeBackend) -> list[str]:
    return b.launched


def test_drain_reads_the_engines_metrics(fleet: tuple[Fleet, FakeBackend]) -> None:
    """Idle: nothing running or waiting; busy or answering non-200: not idle; not answering: idle
    only when the backend sees the engine gone."""
    f, b = fleet
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    p = probe(f)
    r = f.replicas[0]
    assert f._idle(r)
    p.engines["m-0"] = busy(waiting=1)
    assert not f._idle(r)
    p.down.add("m-0")
    assert not f._idle(r)  # the backend still sees it running
    b.exit["m-0"] = 0
    assert f._idle(r)


def test_generations_are_computed_once_per_plan(fleet: tuple[Fleet, FakeBackend], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass compares replicas with the plan's generations; the template file is read once per plan."""
    from codefleet.runtime import replica

    f, b = fleet
    calls: list[str] = []
    real = replica.generation

    def counted(p: ReplicaPlan) -> str:
        calls.append(p.name)
        return real(p)

    monkeypatch.setattr(replica, "generation", counted)
    for _ in range(5):
        f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    assert f.converged() and calls == ["m"]
    f.apply(make(tmp_path, seqs=8))
    for _ in range(3):
        f.reconcile()
    assert calls == ["m", "m"]
    assert {r.generation for r in f.replicas if r.state is State.STARTING} == {f.generations()["m"]}


def test_the_state_file_shows_the_backends_nodes(fleet: tuple[Fleet, FakeBackend], monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    from codefleet.runtime.state import read_state

    f, b = fleet
    said: list[str] = []
    f.say = said.append
    monkeypatch.setattr(b, "node_of", lambda r: f"10.0.0.{r.index + 1}")
    f.reconcile()
    b.healthy |= {"m-0", "m-1"}
    f.reconcile()
    assert any(line.startswith("  ready  m-0") and line.endswith("node 10.0.0.1") for line in said), said
    s = read_state(f.run_dir)
    assert s is not None and s.converged and s.runtime == "fake"
    assert [(r.name, r.state, r.node_ip) for r in s.replicas] == [("m-0", "ready", "10.0.0.1"),
                                                                   ("m-1", "ready", "10.0.0.2")]
    assert s.models[0].desired == 2 and s.models[0].generation == f.generations()["m"]
