"""codefleet command line: parse, call, print. The only module that exits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from codefleet import demo_models, discovery
from codefleet.cli_fleet import cmd_apply, cmd_down, cmd_up
from codefleet.cli_plan import cmd_plan, cmd_validate
from codefleet.errors import CodefleetError
from codefleet.helm import helm_values_yaml
from codefleet.manifest import load
from codefleet.observability import RULES_FILE, alert_rules_yaml, scrape_config_yaml
from codefleet.planner import plan_fleet
from codefleet.runtime.state import read_state, state_dir
from codefleet.status import fleet_status, format_status, format_usage, tenant_usage

DEFAULT_MANIFEST = "deploy/manifests/demo-cpu.yaml"


def cmd_demo_models(args: argparse.Namespace) -> int:
    for name in demo_models.NAMES:
        cached = (demo_models.model_dir(name) / "config.json").exists()
        path = demo_models.ensure(name)
        kind = "trained" if demo_models.is_trained(name) else "random weights"
        print(f"{demo_models.SCHEME}{name:<22} {path} ({kind}, {'cached' if cached else 'built'})", flush=True)
    return 0


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
              + ", ".join(f"{m.name} {m.placement.replicas}x TP{m.placement.tensor_parallel_size}"
                          for m in plan.models) + ")")
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
    from codefleet.router import first_key

    base_url = args.base_url
    if base_url is None:
        state = read_state()
        if not state:
            raise CodefleetError("no BASE_URL given and no local fleet is running")
        base_url = str(state.endpoint)
    expects = smoke.expects_from_manifest(args.manifest) if args.manifest else {}
    expects.update(smoke.parse_expect(e) for e in args.expect)
    key = first_key(args.api_key_file) if args.api_key_file else (
        os.environ.get("CODEFLEET_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    quiet = args.json
    checker = smoke.Smoke(base_url, key, timeout=args.timeout,
                          progress=lambda line: None if quiet else print(line, file=sys.stderr, flush=True))
    reports, unknown = smoke.run(checker, expects)
    print(smoke.report_json(reports, unknown) if args.json else smoke.format_report(base_url, reports, unknown))
    failed = any(r.failed for r in reports) or unknown.ok is False
    return 1 if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from codefleet import tune

    loaded = load(args.manifest)
    return tune.main(loaded, plan_fleet(loaded).models, args)


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
    sp = sub.add_parser("tune", help="measure speculative decoding settings per model on its own engine and print "
                        "the winner as a manifest fragment")
    manifest_arg(sp)
    sp.add_argument("--model", action="append", help="a model of the manifest (repeatable; default: all)")
    sp.add_argument("--candidate", action="append",
                    help="off, ngram:K[:MIN[:MAX]] or suffix[:K] (repeatable; default: off ngram:4:2:4 "
                         "ngram:8:3:5 suffix:16)")
    sp.add_argument("--workload", nargs="+", default=["edits", "chat"], help="edits (copies its input), chat (little)")
    sp.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    sp.add_argument("--requests", type=int, help="per cell (default: max(8, 2 x concurrency))")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--max-slowdown", type=float, default=0.05,
                    help="a winner loses no cell by more than this fraction of off's tokens/s")
    sp.add_argument("--enforce-eager", action="store_true", help="eager on a GPU too (default: eager on the CPU only)")
    sp.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES of the candidate engines (GPUs the fleet does not hold)")
    sp.add_argument("--out", help="write every cell as JSON here")
    sp.set_defaults(func=cmd_tune)
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
