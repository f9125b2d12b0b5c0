"""The fleet's lifecycle on the command line: ``codefleet up`` (start, serve, reload on ``apply``,
drain on a stop signal), ``codefleet apply`` and ``codefleet down``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import openai

from codefleet import demo_models
from codefleet.cli_plan import format_plan, plan_from_args
from codefleet.errors import CodefleetError
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.procs import stop_group
from codefleet.runtime.core import Fleet
from codefleet.runtime.local import LocalFleet
from codefleet.runtime.state import read_state, remove_state, state_dir


def _show_first_answer(url: str, plan: FleetPlan, stop: threading.Event) -> None:
    """A real question and answer through the endpoint, when the fleet serves a trained demo model.
    Asked from a thread: Ctrl-C while the model answers stops the fleet at once, not after it."""

    trained = [m.name for m in plan.models if m.demo and demo_models.is_trained(m.demo) and m.placement.replicas]
    if not trained or plan.router.api_keys is not None:
        return
    print(f"\nasking {trained[0]} through the endpoint (greedy): {FIRST_QUESTION}", flush=True)
    got: list[str] = []

    def ask() -> None:
        try:
            got.append("\n".join("  | " + line for line in first_answer(url, trained[0]).splitlines()))
        except openai.APIError as exc:  # the fleet is up; a failed demo question must not stop it
            got.append(f"  (no answer: {exc})")

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    while asking.is_alive() and not stop.is_set():
        asking.join(0.2)
    if got:
        print(got[0], flush=True)


class _Signals:
    """``up``'s signals. Starting: SIGINT/SIGTERM/SIGHUP abort the start. Running: the first
    SIGINT, SIGTERM or SIGHUP (Ctrl-C, ``codefleet down``, the terminal closed or the SSH session
    dropped) drains and stops; SIGUSR2 (``down --now``) stops at once; SIGUSR1 (``codefleet
    apply``, which a terminal never sends) reloads. Stopping: any stop signal again ends the drain."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.phase = "starting"
        self.stop = threading.Event()
        self.now = False
        self.reload = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, self._on_stop)
        signal.signal(APPLY_SIGNAL, lambda *_: self.reload.set())

    def _on_stop(self, signum: int, _frame: object) -> None:
        if self.phase == "starting":
            raise KeyboardInterrupt
        if self.phase == "stopping" or signum == signal.SIGUSR2:
            self.fleet.abort_drain.set()
            if self.phase == "stopping":
                print("\nstopping now (the drain is cut short) ...", flush=True)
        self.now = self.now or signum == signal.SIGUSR2
        self.stop.set()


def cmd_up(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    print(format_plan(plan))
    running = read_state()
    if running and _pid_alive(running.launcher_pid):
        print("a fleet is already running here; `codefleet down` first", file=sys.stderr)
        return 2
    loaded = load(args.manifest)
    rt = loaded.manifest.runtime
    fleet: Fleet
    if args.ray or rt.kind == "ray":
        from codefleet.runtime.ray import RayFleet

        address = args.ray or rt.ray_address or "auto"
        fleet = RayFleet(plan, address=address, strict_spread=rt.strict_spread, enforce_eager=args.enforce_eager,
                         run_dir=state_dir())
        where = f"on the Ray cluster at {address}"
    else:
        fleet = LocalFleet(plan, enforce_eager=args.enforce_eager)
        where = f"(logs in {fleet.run_dir / 'logs'})"
    signals = _Signals(fleet)
    print(f"starting {sum(m.placement.replicas for m in plan.models)} engines {where} ...")
    try:
        fleet.start(timeout=args.timeout)
    except KeyboardInterrupt:
        print("\nstart interrupted; everything started was stopped")
        return 130
    signals.phase = "running"
    print(f"\nfleet ready. One OpenAI endpoint for every model: {fleet.url}/v1")
    for model, urls in fleet.endpoints().items():
        print(f"  {model:<26} {len(urls)} replica(s): {' '.join(urls)}")
    m = plan.metrics
    fe = fleet.frontend
    assert fe is not None
    print(f"metrics: launcher http://{m.host}:{fleet.metrics_port}/metrics, gateway "
          f"http://{m.host}:{fe.gateway_metrics_port}/metrics, router http://{m.host}:{fe.router_metrics_port}/metrics")
    if plan.router.api_keys is not None:
        print("API keys are on: send 'Authorization: Bearer <key>'.")
    _show_first_answer(fleet.url, plan, signals.stop)
    print("\n`codefleet apply MANIFEST` changes the running fleet; Ctrl-C (or `codefleet down`) drains and stops it,\n"
          "a second Ctrl-C (or `codefleet down --now`) stops at once.", flush=True)
    try:
        while not signals.stop.wait(0.5):
            fleet.reconcile()
            if signals.reload.is_set():
                signals.reload.clear()
                _reload(fleet)
    finally:
        signals.phase = "stopping"
        if signals.now:
            print("\nstopping now ...", flush=True)
        else:
            budget = max(p.drain_seconds for p in fleet.plan.models)
            print(f"\ndraining (new requests get 503 + Retry-After; at most {budget} s; Ctrl-C again to stop now) ...",
                  flush=True)
        fleet.stop(drain=not signals.now)
        print("all engines stopped")
    return 0


APPLY_REQUEST = "apply-request.json"
APPLY_RESULT = "apply-result.json"
#: How `codefleet apply` tells the launcher to read APPLY_REQUEST: a signal no terminal sends (SIGHUP means
#: the terminal is gone, and stops the fleet like SIGTERM).
APPLY_SIGNAL = signal.SIGUSR1


def _reload(fleet: Fleet) -> None:
    """``codefleet apply``: plan the manifest it names (as ``up`` plans); a manifest that fails changes nothing."""
    try:
        req = json.loads((fleet.run_dir / APPLY_REQUEST).read_text())
    except (OSError, ValueError) as exc:  # a stray SIGUSR1, not `codefleet apply`
        print(f"reload signal without a readable apply request ({exc}); nothing changed", file=sys.stderr, flush=True)
        return
    result: dict[str, object] = {"id": req["id"]}
    try:
        new = plan_fleet(load(req["manifest"]))
        changes = fleet.apply(new)
        result.update(ok=True, changes=changes)
        print(f"applied {req['manifest']}: " + ("; ".join(changes) or "no change"), flush=True)
    except CodefleetError as exc:
        result.update(ok=False, error=str(exc))
        print(f"apply refused, the running fleet is unchanged:\n{exc}", file=sys.stderr, flush=True)
    tmp = fleet.run_dir / (APPLY_RESULT + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(fleet.run_dir / APPLY_RESULT)


def cmd_apply(args: argparse.Namespace) -> int:
    plan_from_args(args)  # a manifest that does not validate or plan is refused here, with its location
    state = read_state()
    if not state or not _pid_alive(state.launcher_pid):
        print("no fleet is running; `codefleet up MANIFEST` starts one", file=sys.stderr)
        return 1
    run = state_dir()
    rid = f"{os.getpid()}-{time.time()}"
    (run / APPLY_REQUEST).write_text(json.dumps({"id": rid, "manifest": str(Path(args.manifest).resolve())}))
    os.kill(state.launcher_pid, APPLY_SIGNAL)
    deadline = time.monotonic() + 30
    while True:
        try:
            result = json.loads((run / APPLY_RESULT).read_text())
            if result.get("id") == rid:
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            print("the running fleet did not answer in 30 s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    if not result["ok"]:
        print(f"error: {result['error']}", file=sys.stderr)
        return 2
    print("changes: " + ("; ".join(result["changes"]) or "none"))
    if args.no_wait or not result["changes"]:
        return 0
    t0 = time.monotonic()
    time.sleep(1.0)
    while True:
        state = read_state()
        if state and state.converged:
            print(f"converged in {time.monotonic() - t0:.0f} s")
            return 0
        if time.monotonic() - t0 > args.timeout:
            print(f"not converged after {args.timeout:.0f} s; see `codefleet status`", file=sys.stderr)
            return 1
        states = ", ".join(f"{r.name} {r.state}" for r in (state.replicas if state else ()))
        print(f"  [{time.monotonic() - t0:4.0f} s] {states}", flush=True)
        time.sleep(5)


def cmd_down(args: argparse.Namespace) -> int:
    state = read_state()
    if not state:
        print("no fleet is running")
        return 0
    pid = state.launcher_pid
    if pid != os.getpid() and _pid_alive(pid):
        budget = max((m.drain_seconds or 0 for m in state.models), default=0)
        os.kill(pid, signal.SIGUSR2 if args.now else signal.SIGTERM)
        print("stopping now ..." if args.now else f"draining (at most {budget} s; `codefleet down --now` stops at once) ...",
              flush=True)
        t0 = last = time.monotonic()
        while _pid_alive(pid) and time.monotonic() - t0 < budget + 60:
            time.sleep(0.2)
            if time.monotonic() - last >= 5:
                last = time.monotonic()
                now = read_state()
                print(f"  [{last - t0:4.0f} s] " + ", ".join(f"{r.name} {r.state or '?'}"
                                                            for r in (now.replicas if now else ())), flush=True)
    for r in state.replicas:  # whatever a launcher that died left behind
        if r.pgid:
            stop_group(r.pgid, grace=10)
    for pgid in state.frontend_pgids:
        stop_group(pgid, grace=5)
    remove_state()
    print("fleet stopped")
    return 0


def _pid_alive(pid: int) -> bool:
    """Running: a process that has exited but is not yet reaped by its parent (a zombie, which
    ``kill(pid, 0)`` still finds) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(pid, 0)
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


FIRST_QUESTION = "Write a Python function that returns the sum of a list."


def first_answer(base_url: str, model: str, api_key: str | None = None, max_tokens: int = 160) -> str:
    """One real question to a trained model through the endpoint (``codefleet up`` shows it)."""
    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0,
                           timeout=120)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": FIRST_QUESTION}],
                                       max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content or ""
