"""Run a benchmark scenario folder: start the fleet(s) it names, load them, compare, plot.

    python -m benchmarks.scenario benchmarks/scenarios/tp1-vs-tp2

A scenario folder holds ``scenario.yaml``::

    description: ...
    bench: [--workload, humaneval, --num-requests, "64", --concurrency, "1,2,4,8", ...]
    runs:
      - {label: direct, manifest: fleet.yaml, target: engine}     # the first replica, not the endpoint
      - {label: endpoint, manifest: fleet.yaml, target: endpoint}
      - {label: h100, base_url_env: CODEFLEET_URL}                # an already running fleet elsewhere

Runs with the same manifest share one fleet, started with ``--enforce-eager`` on this machine and
stopped afterwards. Results go to ``<folder>/results/<label>/`` (JSON, CSV, PNG per run, from
``benchmarks.bench``), plus ``comparison.csv``, ``comparison.png`` and ``summary.md`` comparing the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.bench import environment
from benchmarks.bench import main as bench_main

KEY_ENV = "CODEFLEET_SCENARIO_KEYS"


def run_scenario(folder: Path, only: list[str] | None = None) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / "scenario.yaml").read_text())
    results = folder / "results"
    results.mkdir(exist_ok=True)
    runs = [r for r in spec["runs"] if not only or r["label"] in only]
    points: list[dict[str, Any]] = []
    i = 0
    while i < len(runs):
        run = runs[i]
        if "base_url_env" in run:
            url = os.environ.get(run["base_url_env"])
            if not url:
                raise SystemExit(f"{folder.name}: run {run['label']} needs ${run['base_url_env']} (the fleet's URL)")
            points += _bench(run, url, os.environ.get("OPENAI_API_KEY"), spec["bench"], results)
            i += 1
            continue
        j = i
        while j < len(runs) and "base_url_env" not in runs[j] and runs[j].get("manifest") == run["manifest"]:
            j += 1
        points += _with_fleet(folder / run["manifest"], runs[i:j], spec["bench"], results)
        i = j
    _compare(folder, spec, points)
    return points


def _with_fleet(manifest: Path, group: list[dict[str, Any]], bench: list[str], results: Path) -> list[dict[str, Any]]:
    from codefleet.manifest import load
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    os.environ.setdefault(KEY_ENV, "sk-scenario")
    plan = plan_fleet(load(manifest))
    out: list[dict[str, Any]] = []
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as d, LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
        fleet.start(timeout=900)
        fe = fleet.frontend
        assert fe is not None
        cores = sorted(os.sched_getaffinity(0))
        if sum(m.placement.tensor_parallel_size * m.placement.replicas for m in plan.models) == 1 and len(cores) > 1:
            # One single-rank engine computes on core 0: keep the client, router and gateway off it
            # (as on a GPU host, where they do not share the engine's CPU).
            # this process itself (not its children: the engine is one, bound to its core by
            # LocalFleet), and the router's and the gateway's process trees
            os.sched_setaffinity(0, cores[1:])
            for pid in fe.pgids():
                for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                    os.sched_setaffinity(proc.pid, cores[1:])
            print(f"client, router and gateway pinned to cores {cores[1:]}; the engine computes on core {cores[0]}")
        for run in group:
            if run.get("target", "endpoint") == "engine":
                url, key = fleet.replicas[0].url, fe.upstream_key
            else:
                url, key = fleet.url, os.environ[KEY_ENV].split(",")[0]
            out += _bench(run, url, key, bench + run.get("bench", []), results)
    os.sched_setaffinity(0, affinity)
    return out


def _bench(run: dict[str, Any], url: str, key: str | None, bench: list[str], results: Path) -> list[dict[str, Any]]:
    out = results / run["label"]
    argv = ["--base-url", url, *bench, "--out", str(out)]
    if key:
        argv += ["--api-key", key]
    print(f"\n== {run['label']}: python -m benchmarks.bench {' '.join(a for a in argv if a != key)}", flush=True)
    bench_main(argv)
    points = []
    for f in sorted(out.glob("*.json"), key=lambda p: float(p.stem.split("-", 1)[1])):
        s = json.loads(f.read_text())["summary"]
        points.append({"run": run["label"], **{k: s.get(k) for k in (
            "concurrency", "rate", "ok", "requests", "request_throughput", "output_token_throughput", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "latency_p50_ms", "latency_p99_ms")}})
    return points


def _compare(folder: Path, spec: dict[str, Any], points: list[dict[str, Any]]) -> None:
    results = folder / "results"
    if not points:
        return
    with open(results / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(points[0]))
        w.writeheader()
        w.writerows(points)
    by = "rate" if points[0]["rate"] else "concurrency"
    runs = list(dict.fromkeys(p["run"] for p in points))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("output_token_throughput", "ttft_p50_ms", "tpot_p50_ms"),
                              ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        for r in runs:
            pts = [p for p in points if p["run"] == r]
            ax.plot([p[by] for p in pts], [p[key] for p in pts], "o-", label=r)
        ax.set_xlabel(by)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{folder.name}: {spec.get('description', '').strip().splitlines()[0] if spec.get('description') else ''}")
    fig.tight_layout()
    fig.savefig(results / "comparison.png", dpi=110)
    plt.close(fig)
    env = environment()
    lines = [f"# {folder.name}: results", "",
             f"{env['date']}, {env['cores']} cores ({env['cpu']}), Python {env['python']}, "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), "",
             f"| run | {by} | ok | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | latency p50 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['run']} | {p[by]:g} | {p['ok']}/{p['requests']} | {p['request_throughput']:.2f} | "
                     f"{p['output_token_throughput']:.0f} | {p['ttft_p50_ms']:.1f} | {p['ttft_p99_ms']:.1f} | "
                     f"{p['tpot_p50_ms']:.2f} | {p['latency_p50_ms']:.0f} |")
    if len(runs) == 2:
        a, b = runs
        lines += ["", f"Ratio {b} / {a} at each {by}:", "", f"| {by} | output tok/s | TTFT p50 | TPOT p50 |",
                  "|---|---|---|---|"]
        for pa in (p for p in points if p["run"] == a):
            pb = next((p for p in points if p["run"] == b and p[by] == pa[by]), None)
            if pb:
                lines.append(f"| {pa[by]:g} | {pb['output_token_throughput'] / pa['output_token_throughput']:.3f} | "
                             f"{pb['ttft_p50_ms'] / pa['ttft_p50_ms']:.3f} | {pb['tpot_p50_ms'] / pa['tpot_p50_ms']:.3f} |")
    (results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--only", nargs="*", help="run only these labels")
    args = p.parse_args(argv)
    if not (args.folder / "scenario.yaml").exists():
        raise SystemExit(f"error: {args.folder}/scenario.yaml not found")
    points = run_scenario(args.folder, args.only)
    return 0 if all(pt["ok"] == pt["requests"] for pt in points) else 1


if __name__ == "__main__":
    sys.exit(main())
