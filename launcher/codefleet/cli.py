"""codefleet command line: parse, call, print. The only module that exits."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai

from codefleet import demo_models, discovery
from codefleet.errors import CodefleetError
from codefleet.helm import helm_values_yaml
from codefleet.manifest import load
from codefleet.observability import RULES_FILE, alert_rules_yaml, scrape_config_yaml
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.procs import stop_group
from codefleet.runtime.core import Fleet
from codefleet.runtime.local import LocalFleet
from codefleet.runtime.state import read_state, remove_state, state_dir
from codefleet.sizing import GiB
from codefleet.status import fleet_status, format_status, format_usage, tenant_usage

DEFAULT_MANIFEST = "deploy/manifests/demo-cpu.yaml"


def _plan(args: argparse.Namespace) -> FleetPlan:
    loaded = load(args.manifest)
    return plan_fleet(loaded, gpu=getattr(args, "gpu", None), gpus_per_node=getattr(args, "gpus_per_node", None))


def cmd_validate(args: argparse.Namespace) -> int:
    plan = _plan(args)
    print(f"{args.manifest}: valid; {len(plan.models)} models, "
          f"{sum(m.replicas for m in plan.models)} replicas")
    return 0


def replicas(m: ReplicaPlan) -> str:
    return f"{m.autoscale.min_replicas}-{m.autoscale.max_replicas}" if m.autoscale else str(m.replicas)


def format_plan(plan: FleetPlan) -> str:
    head = (f"{'model':<34} {'gpu':<10} {'TP':>2} {'repl':>5} {'max_len':>7} {'wGiB/gpu':>8} "
            f"{'kvGiB/gpu':>9} {'KV tokens':>10} {'full seqs':>9} {'drain s':>7} {'decode tok/s b1|bmax (est.)':>28}")
    rows = [head, "-" * len(head)]
    for m in plan.models:
        est = m.estimate
        tps = (f"{est.decode_tokens_per_s_batch1:,.0f} | {est.decode_tokens_per_s_max_batch:,.0f} (b={est.max_batch})"
               if est else "n/a on cpu")
        rows.append(
            f"{m.name:<34} {m.accelerator:<10} {m.tensor_parallel_size:>2} {replicas(m):>5} {m.max_model_len:>7} "
            f"{m.weight_bytes_per_gpu / GiB:>8.2f} {m.kv_bytes_per_gpu / GiB:>9.2f} {m.kv_tokens:>10,} "
            f"{m.full_length_sequences:>9.1f} {m.drain_seconds:>7} {tps:>28}"
        )
    at_max = sum(m.gpus_per_replica * m.max_replicas for m in plan.models)
    rows.append(f"GPUs: {plan.total_gpus} ({plan.gpus_per_node} per node)"
                + (f", {at_max} at max_replicas" if at_max != plan.total_gpus else "")
                + ". Decode figures are roofline upper bounds from memory bandwidth, full-length sequences.")
    if any(m.autoscale for m in plan.models):
        rows.append("repl: autoscaled models show min-max (start at the first number unless `replicas` is set).")
    for m in plan.models:
        if m.accelerator != "cpu":
            extra = [f"kv cache {m.kv_cache_dtype}"] if m.kv_cache_dtype != "auto" else []
            extra += [f"weights {m.quantization}"] if m.quantization else []
            rows.append(f"  {m.name}: max_num_seqs {m.max_num_seqs}, max_num_batched_tokens {m.max_num_batched_tokens}"
                        + "".join(f", {e}" for e in extra))
    rows += [f"warning: {w}" for m in plan.models for w in m.warnings]
    return "\n".join(rows)


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if args.explain:
        from codefleet.explain import explain
        from codefleet.resolve import resolve

        names = [m.name for m in plan.models]
        if args.explain not in names:
            raise CodefleetError(f"--explain {args.explain!r}: no such model in {args.manifest}; its models: "
                                 f"{', '.join(names)}")
        resolved = next(r for r in resolve(load(args.manifest)) if r.spec.name == args.explain)
        print(explain(resolved, next(m for m in plan.models if m.name == args.explain)))
        return 0
    if args.json:
        print(json.dumps({"gpus_per_node": plan.gpus_per_node, "total_gpus": plan.total_gpus,
                          "models": [m.to_json() for m in plan.models]}, indent=2))
    else:
        print(format_plan(plan))
    return 0


def cmd_demo_models(args: argparse.Namespace) -> int:
    for name in demo_models.NAMES:
        cached = (demo_models.model_dir(name) / "config.json").exists()
        path = demo_models.ensure(name)
        kind = "trained" if demo_models.is_trained(name) else "random weights"
        print(f"{demo_models.SCHEME}{name:<22} {path} ({kind}, {'cached' if cached else 'built'})", flush=True)
    return 0


def _show_first_answer(url: str, plan: FleetPlan) -> None:
    """A real question and answer through the endpoint, when the fleet serves a trained demo model."""
    from codefleet.smoke import FIRST_QUESTION, first_answer

    trained = [m.name for m in plan.models if m.demo and demo_models.is_trained(m.demo) and m.replicas]
    if not trained or plan.router.api_keys is not None:
        return
    print(f"\nasking {trained[0]} through the endpoint (greedy): {FIRST_QUESTION}", flush=True)
    try:
        answer = first_answer(url, trained[0])
    except openai.APIError as exc:  # the fleet is up; a failed demo question must not stop it
        print(f"  (no answer: {exc})")
        return
    print("\n".join("  | " + line for line in answer.splitlines()))


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
    plan = _plan(args)
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
    print(f"starting {sum(m.replicas for m in plan.models)} engines {where} ...")
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
    _show_first_answer(fleet.url, plan)
    print("\n`codefleet apply MANIFEST` changes the running fleet; Ctrl-C (or `codefleet down`) drains and stops it,\n"
          "a second Ctrl-C (or `codefleet down --now`) stops at once.")
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
    _plan(args)  # a manifest that does not validate or plan is refused here, with its location
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


def cmd_prometheus_config(args: argparse.Namespace) -> int:
    loaded = load(args.manifest)
    plan = plan_fleet(loaded)
    state = read_state()
    # A running fleet: its real ports (the manifest may say 0, a free port).
    ports = state.metrics.ports() if state else {}
    if not args.output:
        print(scrape_config_yaml(plan, state_dir(), interval=args.interval, ports=ports), end="")
        return 0
    out = Path(args.output)
    rules = out.with_name(RULES_FILE)
    rules.write_text(alert_rules_yaml(loaded))
    out.write_text(scrape_config_yaml(plan, state_dir(), interval=args.interval, ports=ports, rule_files=[rules.name]))
    print(f"wrote {out} and {rules}")
    return 0


def cmd_helm_values(args: argparse.Namespace) -> int:
    loaded = load(args.manifest)
    plan = plan_fleet(loaded, gpu=args.gpu, gpus_per_node=args.gpus_per_node)
    text = helm_values_yaml(loaded, plan, args.api_keys_secret)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({plan.total_gpus} GPUs: "
              + ", ".join(f"{m.name} {m.replicas}x TP{m.tensor_parallel_size}" for m in plan.models) + ")")
    else:
        print(text, end="")
    return 0


def cmd_frontend(args: argparse.Namespace) -> int:
    return discovery.run(args.config, Path(args.run_dir))


def cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    state = read_state(run_dir)
    if not state:
        print("no fleet is running")
        return 1
    print(format_status(state, fleet_status(state)))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    state = read_state(run_dir)
    if not state:
        print("no fleet is running")
        return 1
    addr = state.metrics.gateway
    host, _, port = str(addr).rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        text = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
    except httpx.HTTPError as exc:
        print(f"cannot read the gateway's metrics at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    rows = tenant_usage(text)
    if args.json:
        print(json.dumps([{"tenant": t, "model": m, **r} for (t, m), r in sorted(rows.items())], indent=2))
    else:
        print(format_usage(rows))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from codefleet import smoke

    base_url = args.base_url
    if base_url is None:
        state = read_state()
        if not state:
            raise CodefleetError("no BASE_URL given and no local fleet is running")
        base_url = str(state.endpoint)
    expects = smoke.expects_from_manifest(args.manifest) if args.manifest else {}
    expects.update(smoke.parse_expect(e) for e in args.expect)
    key = smoke.first_key(args.api_key_file) if args.api_key_file else (
        os.environ.get("CODEFLEET_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    quiet = args.json
    checker = smoke.Smoke(base_url, key, timeout=args.timeout,
                          progress=lambda line: None if quiet else print(line, file=sys.stderr, flush=True))
    reports, unknown = smoke.run(checker, expects)
    print(smoke.report_json(reports, unknown) if args.json else smoke.format_report(base_url, reports, unknown))
    failed = any(r.failed for r in reports) or unknown.ok is False
    return 1 if failed else 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codefleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def manifest_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("manifest", nargs="?", default=DEFAULT_MANIFEST, help="fleet manifest (YAML)")

    sp = sub.add_parser("validate", help="check a manifest")
    manifest_arg(sp)
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("plan", help="capacity plan per model")
    manifest_arg(sp)
    sp.add_argument("--gpu", help="plan every model on this GPU type")
    sp.add_argument("--gpus-per-node", type=int)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--explain", metavar="MODEL", help="print the whole arithmetic of one model's plan, with sources")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("up", help="start every replica and wait until healthy")
    manifest_arg(sp)
    sp.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    sp.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for health")
    sp.add_argument("--ray", metavar="ADDRESS",
                    help="run the replicas as Ray actors on this cluster ('auto': the local one)")
    sp.set_defaults(func=cmd_up)

    sp = sub.add_parser("prometheus-config", help="Prometheus scrape config for the fleet of a manifest")
    manifest_arg(sp)
    sp.add_argument("-o", "--output", help="write here instead of stdout")
    sp.add_argument("--interval", default="15s", help="scrape interval")
    sp.set_defaults(func=cmd_prometheus_config)

    sp = sub.add_parser("helm-values", help="values for helm/codefleet from a manifest and its plan")
    manifest_arg(sp)
    sp.add_argument("--gpu", help="plan every model on this GPU type")
    sp.add_argument("--gpus-per-node", type=int)
    sp.add_argument("-o", "--output", help="write here instead of stdout")
    sp.add_argument("--api-keys-secret", default="codefleet-api-keys",
                    help="existing Secret with the client keys (key `keys`, one per line) when the manifest enables them")
    sp.set_defaults(func=cmd_helm_values)

    sp = sub.add_parser("frontend", help="router + gateway with DNS discovery of engines (the chart's frontend pod)")
    sp.add_argument("--config", required=True, help="frontend JSON config (the chart renders it)")
    sp.add_argument("--run-dir", default="/tmp/codefleet", help="logs of the router and gateway")
    sp.set_defaults(func=cmd_frontend)

    sp = sub.add_parser("status", help="per model: ready replicas, running/waiting requests, KV-cache usage")
    sp.add_argument("--run-dir", help="the fleet's run directory (default: $CODEFLEET_HOME/run)")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("usage", help="per tenant and model: requests, rejections, prompt and completion tokens "
                                      "(since the endpoint started)")
    sp.add_argument("--run-dir", help="the fleet's run directory (default: $CODEFLEET_HOME/run)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_usage)
    sp = sub.add_parser("smoke", help="post-deploy check of every model behind an endpoint (exit 1 on a failure)")
    sp.add_argument("base_url", nargs="?", metavar="BASE_URL",
                    help="the endpoint, e.g. http://127.0.0.1:8000 (default: the running local fleet's)")
    sp.add_argument("--manifest", help="expect the chat template each model of this manifest should apply")
    sp.add_argument("--expect", action="append", default=[], metavar="MODEL=FAMILY[:TEMPLATE]",
                    help="expect this family's template (or this template file) for MODEL; repeatable")
    sp.add_argument("--api-key-file", help="send the first key of this file (else $CODEFLEET_API_KEY or "
                                           "$OPENAI_API_KEY)")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    sp.add_argument("--json", action="store_true", help="the report as JSON")
    sp.set_defaults(func=cmd_smoke)
    sp = sub.add_parser("down", help="drain and stop the running fleet")
    sp.add_argument("--now", action="store_true", help="stop at once, without draining")
    sp.set_defaults(func=cmd_down)
    sp = sub.add_parser("apply", help="change the running fleet to a manifest (scale, rolling replace)")
    manifest_arg(sp)
    sp.add_argument("--no-wait", action="store_true", help="return once the change is accepted")
    sp.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the fleet to converge")
    sp.set_defaults(func=cmd_apply)
    sp = sub.add_parser("demo-models", help="build the tiny demo checkpoints")
    sp.set_defaults(func=cmd_demo_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CodefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
