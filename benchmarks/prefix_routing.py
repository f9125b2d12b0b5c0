"""Prefix-aware routing, measured by the router's and the engines' own counters.

Three workloads through the endpoint, on a fleet of 2 or 3 replicas of one model (the trained
SmolLM2-135M-Instruct by default):

* ``shared``: many users asking about the same few files. Each request is a short shared system
  prompt, then one of ``files`` real source files (the first ``file_chars`` characters of Python
  standard-library modules, so every policy sees the same text), then a question about one of its
  functions. ``users`` users at once (``concurrent``) or one request at a time (``sequential``).
* ``multiturn``: ``benchmarks.multiturn``'s coding conversations (a shared system prompt, a file
  per conversation, every answer appended, think time).
* ``unique``: the control: the same request count and prompt sizes as ``shared``, nothing in common.

Per run: the engines' prefix-cache hit rate (``vllm:prefix_cache_hits_total`` /
``queries_total`` deltas, summed over the replicas), each replica's share of the requests (its
``vllm:request_success_total`` delta), vllm-router's decisions by outcome
(``vllm_router_prefix_routing_decisions_total``) and its token inputs by result
(``vllm_router_kv_routing_inputs_total``), TTFT p50/p99, output tokens/s.

    python -m benchmarks.prefix_routing compare benchmarks/scenarios/prefix-routing [--repeat 2]
    python -m benchmarks.prefix_routing tables benchmarks/scenarios/prefix-routing

The scenario folder's ``scenario.yaml`` names the variants (a policy and its router settings),
the replica counts, the model and the cache size per replica; results go to ``results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.multiturn import Shape
from benchmarks.multiturn import run_workload as multiturn_workload
from benchmarks.workloads import code_context
from codefleet.loadgen import Result, _one, pct

#: Standard-library modules whose opening text makes the shared files (the same bytes for every run
#: on Python 3.11).
FILES = ("textwrap", "shlex", "fnmatch", "glob", "heapq", "bisect", "colorsys", "gettext", "difflib",
         "calendar", "string", "tokenize")
SYSTEM = "You are a coding assistant. Answer briefly, with code where it helps."
QUESTIONS = ("Explain what `{f}` does.", "Write a unit test for `{f}`.", "Add type hints to `{f}`.",
             "What does `{f}` return on empty input?", "Suggest a clearer name for `{f}`.")


@dataclass(frozen=True)
class Load:
    files: int = 8
    file_chars: int = 3600
    users: int = 8
    requests: int = 96
    max_tokens: int = 24
    seed: int = 0


def source_files(load: Load) -> list[tuple[str, str, list[str]]]:
    """(name, text, function names) of the shared files."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in FILES[:load.files]:
        text = (lib / f"{name}.py").read_text()[:load.file_chars]
        funcs = re.findall(r"^def (\w+)", text, re.M) or re.findall(r"def (\w+)", text) or [name]
        out.append((f"{name}.py", text, funcs))
    return out


def shared_requests(load: Load) -> list[list[dict[str, str]]]:
    rng = random.Random(load.seed)
    files = source_files(load)
    msgs = []
    for _ in range(load.requests):
        name, text, funcs = rng.choice(files)
        q = rng.choice(QUESTIONS).format(f=rng.choice(funcs))
        msgs.append([{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"# {name}\n```python\n{text}\n```\n\n{q}"}])
    return msgs


def unique_requests(load: Load) -> list[list[dict[str, str]]]:
    """As many requests as ``shared``, about as long, with nothing in common."""
    rng = random.Random(load.seed + 7)
    words = max(8, load.file_chars // 8)
    return [[{"role": "system", "content": f"{SYSTEM} ({i} {rng.random()})"},
             {"role": "user", "content": f"# unique {i}\n{code_context(rng, words)}\n\nExplain it."}]
            for i in range(load.requests)]


def send_all(base_url: str, key: str, model: str, requests: list[list[dict[str, str]]], concurrency: int,
             max_tokens: int) -> list[Result]:
    async def go() -> list[Result]:
        url = base_url.rstrip("/") + "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {key}"}
        queue = list(requests)
        out: list[Result] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.perf_counter()

            async def worker() -> None:
                while queue:
                    messages = queue.pop(0)
                    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
                    out.append(await _one(session, url, body, headers, t0, time.perf_counter() - t0))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    return asyncio.run(go())


def router_counters(*metrics_urls: str) -> dict[str, float]:
    """vllm-router's decisions by outcome and token inputs by result, and the gateway's prefix
    affinity outcomes (cumulative)."""
    out: dict[str, float] = {}
    for url in metrics_urls:
        for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for s in fam.samples:
                if s.name == "vllm_router_prefix_routing_decisions_total":
                    k = f"decision:{s.labels.get('outcome')}"
                elif s.name == "vllm_router_kv_routing_inputs_total":
                    k = f"inputs:{s.labels.get('result')}"
                elif s.name == "codefleet_gateway_prefix_affinity_total":
                    k = f"affinity:{s.labels.get('outcome')}"
                else:
                    continue
                out[k] = out.get(k, 0.0) + s.value
    return out


def engine_counters(urls: list[str]) -> list[tuple[float, float, float]]:
    """Per replica: (prefix hits, prefix queries, finished requests)."""
    from codefleet.status import engine_look

    looks = [engine_look(httpx.get(u + "/metrics", timeout=10).text) for u in urls]
    return [(x.prefix_hits or 0.0, x.prefix_queries or 0.0, x.finished or 0.0) for x in looks]


def summarize(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    span = max((r.end for r in results), default=0) - min((r.start for r in results), default=0)
    return {"requests": len(results), "ok": len(ok), "errors": sorted({r.error for r in results if r.error}),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / span if span else 0.0,
            "mean_prompt_tokens": sum(r.input_tokens or 0 for r in ok) / max(len(ok), 1)}


def manifest(model: str, source: str, variant: dict[str, Any], replicas: int, spec: dict[str, Any]) -> str:
    router: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "policy": variant["policy"],
                              "api_keys": {"env": "CODEFLEET_SCENARIO_KEYS"}}
    if variant.get("cache_aware"):
        router["cache_aware"] = variant["cache_aware"]
    doc = {"version": 1, "defaults": {"gpu": "cpu", "cpu_kv_cache_gib": 1}, "router": router,
           "metrics": {"launcher_port": 0, "gateway_port": 0, "router_port": 0},
           "models": [{"name": model, "source": source, "max_model_len": spec.get("max_model_len", 2048),
                       "replicas": replicas, "engine_args": {"enforce_eager": True, **spec.get("engine_args", {})}}]}
    return yaml.safe_dump(doc, sort_keys=False)


def run_one(spec: dict[str, Any], variant: dict[str, Any], replicas: int, n: int, results: Path) -> list[dict[str, Any]]:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    model, source = spec.get("model", "smollm2-135m-instruct"), spec.get("source", "demo://smollm2-135m-instruct")
    load = Load(**spec.get("load", {}))
    shape = Shape(**spec.get("multiturn", {}))
    key = os.environ["CODEFLEET_SCENARIO_KEYS"].split(",")[0]
    rows = []
    text = manifest(model, source, variant, replicas, spec)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "fleet.yaml").write_text(text)
        plan = plan_fleet(parse(text, Path(d) / "fleet.yaml"))
        with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
            print(f"\n== {variant['name']}, {replicas} replicas (pass {n}): starting the fleet ...", flush=True)
            fleet.start(timeout=900)
            fe = fleet.frontend
            assert fe is not None
            urls = [r.url for r in fleet.replicas if r.url]
            router_metrics = (f"http://{plan.metrics.host}:{fe.router_metrics_port}/metrics",
                              f"http://{plan.metrics.host}:{fe.gateway_metrics_port}/metrics")
            for workload in spec.get("workloads", ["shared", "shared-sequential", "multiturn", "unique"]):
                e0, r0 = engine_counters(urls), router_counters(*router_metrics)
                print(f"   {workload} ...", flush=True)
                if workload == "multiturn":
                    turns = multiturn_workload(fleet.url, key, model, shape, "multiturn")
                    base = summarize([Result(start=t["start"], scheduled=0, ok=t["ok"], ttft=t["ttft"], end=t["end"],
                                             output_tokens=t["output_tokens"], input_tokens=t["input_tokens"],
                                             error=t["error"] or "") for t in turns])
                else:
                    reqs = unique_requests(load) if workload == "unique" else shared_requests(load)
                    conc = 1 if workload.endswith("sequential") else load.users
                    base = summarize(send_all(fleet.url, key, model, reqs, conc, load.max_tokens))
                e1, r1 = engine_counters(urls), router_counters(*router_metrics)
                hits = sum(b[0] - a[0] for a, b in zip(e0, e1, strict=True))
                queries = sum(b[1] - a[1] for a, b in zip(e0, e1, strict=True))
                per_replica = [b[2] - a[2] for a, b in zip(e0, e1, strict=True)]
                router = {k: v - r0.get(k, 0.0) for k, v in r1.items() if v - r0.get(k, 0.0)}
                s = base | {"variant": variant["name"], "policy": variant["policy"], "replicas": replicas,
                            "workload": workload, "pass": n, "prefix_hit_rate": hits / queries if queries else 0.0,
                            "per_replica_requests": per_replica, "router": router}
                print(f"   {workload}: ok {s['ok']}/{s['requests']}, TTFT p50 {s['ttft_p50_ms']:.1f} ms p99 "
                      f"{s['ttft_p99_ms']:.1f} ms, {s['output_tokens_per_s']:.1f} tok/s, prefix hits "
                      f"{s['prefix_hit_rate']:.1%}, per replica {[int(x) for x in per_replica]}, router {router}",
                      flush=True)
                rows.append(s)
                (results / f"{variant['name']}-r{replicas}-{workload}-{n}.json").write_text(json.dumps(s, indent=1))
    return rows


def compare(folder: Path, repeat: int, only: list[str] | None, workloads: list[str] | None = None,
            first_pass: int = 1, replica_counts: list[int] | None = None) -> list[dict[str, Any]]:
    spec = yaml.safe_load((folder / "scenario.yaml").read_text())
    if workloads:
        spec["workloads"] = workloads
    results = folder / "results"
    results.mkdir(exist_ok=True)
    os.environ.setdefault("CODEFLEET_SCENARIO_KEYS", "sk-scenario")
    summary_file = results / "summary.json"
    rows: list[dict[str, Any]] = json.loads(summary_file.read_text()) if summary_file.exists() else []
    for n in range(first_pass, first_pass + repeat):
        for replicas in replica_counts or spec["replicas"]:
            for variant in spec["variants"]:
                if only and variant["name"] not in only:
                    continue
                new = run_one(spec, variant, replicas, n, results)
                keys = {(r["variant"], r["replicas"], r["workload"], r["pass"]) for r in new}
                rows = [r for r in rows if (r["variant"], r["replicas"], r["workload"], r["pass"]) not in keys] + new
                summary_file.write_text(json.dumps(rows, indent=1))
    plot(results, rows)
    return rows


def table(rows: list[dict[str, Any]], workload: str) -> str:
    keys = sorted({(r["replicas"], r["variant"]) for r in rows if r["workload"] == workload})
    out = ["| replicas | variant | passes | prefix hits | requests per replica | TTFT p50 ms | TTFT p99 ms | "
           "output tok/s | router decisions | router token inputs / gateway keys |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for replicas, variant in keys:
        rs = [r for r in rows if (r["replicas"], r["variant"], r["workload"]) == (replicas, variant, workload)]

        def f(k: str, fmt: str = "{:.1f}", rs: list[dict[str, Any]] = rs) -> str:
            return " / ".join(fmt.format(r[k]) for r in rs if r.get(k) is not None) or "-"

        split = " / ".join(":".join(str(int(x)) for x in r["per_replica_requests"]) for r in rs)
        dec = " / ".join(", ".join(f"{k.split(':')[1]} {int(v)}" for k, v in sorted(r["router"].items())
                                   if k.startswith("decision:")) or "-" for r in rs)
        inp = " / ".join(", ".join(f"{k.split(':')[1]} {int(v)}" for k, v in sorted(r["router"].items())
                                   if k.startswith(("inputs:", "affinity:"))) or "-" for r in rs)
        out.append(f"| {replicas} | {variant} | {len(rs)} | {f('prefix_hit_rate', '{:.0%}')} | {split} | "
                   f"{f('ttft_p50_ms')} | {f('ttft_p99_ms')} | {f('output_tokens_per_s')} | {dec} | {inp} |")
    return "\n".join(out)


def plot(results: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows})
    variants = sorted({r["variant"] for r in rows})
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 3.6 * len(workloads)), squeeze=False)
    for i, w in enumerate(workloads):
        for j, (k, label) in enumerate((("prefix_hit_rate", "prefix-cache hit rate"), ("ttft_p50_ms", "TTFT p50 ms"),
                                        ("ttft_p99_ms", "TTFT p99 ms"))):
            ax = axes[i][j]
            for replicas, marker in ((2, "o"), (3, "s")):
                sel = [r for r in rows if r["workload"] == w and r["replicas"] == replicas]
                ax.scatter([variants.index(r["variant"]) + (0.1 if replicas == 3 else -0.1) for r in sel],
                           [r[k] for r in sel], marker=marker, label=f"{replicas} replicas")
            ax.set_xticks(range(len(variants)), variants, rotation=15)
            ax.set_title(f"{w}: {label}")
        axes[i][0].legend()
    fig.tight_layout()
    fig.savefig(results / "prefix_routing.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="every variant x replica count of a scenario folder")
    c.add_argument("folder", type=Path)
    c.add_argument("--repeat", type=int, default=1)
    c.add_argument("--only", nargs="*", help="only these variants")
    c.add_argument("--workloads", nargs="*", help="only these workloads")
    c.add_argument("--replicas", nargs="*", type=int, help="only these replica counts")
    c.add_argument("--pass", dest="first_pass", type=int, default=1, help="number the passes from this one")
    t = sub.add_parser("tables", help="print the README tables from results/summary.json")
    t.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "compare":
        compare(args.folder, args.repeat, args.only, args.workloads, args.first_pass, args.replicas)
    rows = json.loads((args.folder / "results" / "summary.json").read_text())
    for workload in sorted({r["workload"] for r in rows}):
        print(f"\n{workload}:\n{table(rows, workload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
