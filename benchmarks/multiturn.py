"""Multi-turn coding conversations, and routing policies compared on them.

A code assistant's traffic: each conversation opens with a shared system prompt and a file of
its own (the code the user is working on), then asks turn after turn; every answer is appended
to the conversation, so each request repeats everything before it plus the new question. Users
think between turns. Several conversations run at once, interleaved. Prompts are synthetic code
words (``benchmarks.workloads.code_context``; the demo tokenizers make about 4.4 tokens of a word,
measured with the engine's /tokenize), seeded, so every policy sees the same conversations.

The no-shared-prefix control sends the same number of requests of the same sizes with nothing in
common (every prompt unique), the same concurrency, no think time: the throughput a policy costs
when there is nothing to reuse.

    python -m benchmarks.multiturn compare benchmarks/scenarios/routing-policies [--repeat 2]

starts, for each policy and replica count of the scenario's ``scenario.yaml``, a fleet of the tiny
demo model behind the endpoint, runs both workloads, and records per run: TTFT p50/p99 (all turns,
and turns after the first), output tokens/s, the engines' own prefix-cache hit rate
(``vllm:prefix_cache_hits_total`` / ``queries_total`` deltas), and the router's CPU seconds.
Results: ``results/<policy>-r<replicas>-<workload>-<n>.json``, ``results/summary.json``,
``results/*.png``; the folder's README holds the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.workloads import _WORDS, code_context
from codefleet.loadgen import Result, _one, pct

QUESTIONS = ("add type hints to {w}", "write a unit test for {w}", "why does {w} raise on empty input",
             "refactor {w} into smaller functions", "explain what {w} returns", "make {w} handle None",
             "rename {w} and update the callers", "add a docstring to {w}")


@dataclass(frozen=True)
class Shape:
    conversations: int = 8
    turns: int = 6
    system_words: int = 150
    file_words: int = 300
    question_words: int = 12
    max_tokens: int = 32
    think_s: float = 0.5
    seed: int = 0


def system_prompt(shape: Shape) -> str:
    rng = random.Random(shape.seed)
    return "You are a coding assistant. Follow the project's conventions:\n" + code_context(rng, shape.system_words)


def conversation_openers(shape: Shape) -> list[str]:
    rng = random.Random(shape.seed + 1)
    return [f"# file conv{c}.py\n{code_context(rng, shape.file_words)}" for c in range(shape.conversations)]


def question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(w=rng.choice(_WORDS))


async def _conversation(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str,
                        shape: Shape, c: int, opener: str, t0: float, out: list[dict[str, Any]]) -> None:
    rng = random.Random(shape.seed * 1000 + c)
    messages = [{"role": "system", "content": system_prompt(shape)}]
    await asyncio.sleep(rng.uniform(0, shape.think_s))  # conversations start staggered
    for turn in range(shape.turns):
        content = (opener + "\n\n" if turn == 0 else "") + question(rng)
        messages.append({"role": "user", "content": content})
        body = {"model": model, "messages": messages, "max_tokens": shape.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        r: Result = await _one(session, url, body, headers, t0, time.perf_counter() - t0)
        out.append({"conversation": c, "turn": turn, "ok": r.ok, "ttft": r.ttft, "latency": r.latency,
                    "output_tokens": r.output_tokens, "input_tokens": r.input_tokens, "start": r.start,
                    "end": r.end, "error": r.error})
        messages.append({"role": "assistant", "content": r.text or "ok"})
        await asyncio.sleep(rng.expovariate(1 / shape.think_s) if shape.think_s else 0)


async def _unique(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str, shape: Shape,
                  sizes: list[int], t0: float, out: list[dict[str, Any]]) -> None:
    """The control: the same request count and prompt sizes, nothing shared, the same concurrency."""
    rng = random.Random(shape.seed + 7)
    queue = list(enumerate(sizes))

    async def worker() -> None:
        while queue:
            i, words = queue.pop(0)
            text = f"# unique {i} {rng.random()}\n" + code_context(rng, max(8, words))
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": shape.max_tokens,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
            r = await _one(session, url, body, headers, t0, time.perf_counter() - t0)
            out.append({"conversation": -1, "turn": i, "ok": r.ok, "ttft": r.ttft, "latency": r.latency,
                        "output_tokens": r.output_tokens, "input_tokens": r.input_tokens, "start": r.start,
                        "end": r.end, "error": r.error})

    await asyncio.gather(*(worker() for _ in range(shape.conversations)))


def run_workload(base_url: str, key: str | None, model: str, shape: Shape, workload: str,
                 unique_sizes: list[int] | None = None) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = base_url.rstrip("/") + "/v1/chat/completions"
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.perf_counter()
            if workload == "multiturn":
                openers = conversation_openers(shape)
                await asyncio.gather(*(_conversation(session, url, headers, model, shape, c, openers[c], t0, out)
                                       for c in range(shape.conversations)))
            else:
                await _unique(session, url, headers, model, shape, unique_sizes or [], t0, out)
        return out

    return asyncio.run(go())


def summarize(turns: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in turns if t["ok"]]
    later = [t["ttft"] * 1000 for t in ok if t["turn"] > 0 and t["conversation"] >= 0]
    ttft = [t["ttft"] * 1000 for t in ok]
    span = max((t["end"] for t in turns), default=0) - min((t["start"] for t in turns), default=0)
    return {"requests": len(turns), "ok": len(ok), "errors": sorted({t["error"] for t in turns if t["error"]}),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "later_turns_ttft_p50_ms": pct(later, 50) if later else None,
            "later_turns_ttft_p99_ms": pct(later, 99) if later else None,
            "output_tokens_per_s": sum(t["output_tokens"] for t in ok) / span if span else 0.0,
            "mean_prompt_tokens": statistics.mean(t["input_tokens"] or 0 for t in ok) if ok else 0}


def engine_prefix_counters(urls: list[str]) -> tuple[float, float]:
    """Prefix-cache hits and queries (tokens) summed over the replicas, by codefleet's /metrics reader."""
    import httpx

    from codefleet.status import engine_look

    looks = [engine_look(httpx.get(u + "/metrics", timeout=10).text) for u in urls]
    return sum(x.prefix_hits or 0.0 for x in looks), sum(x.prefix_queries or 0.0 for x in looks)


def process_cpu_seconds(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(x.cpu_times().user + x.cpu_times().system for x in procs)
    except psutil.NoSuchProcess:
        return 0.0


def manifest(policy: str, replicas: int, max_model_len: int, engine_args: dict[str, Any] | None = None) -> str:
    args = {"enforce_eager": True, **(engine_args or {})}
    return (f"version: 1\ndefaults: {{gpu: cpu, cpu_kv_cache_gib: 1}}\n"
            f"router: {{host: 127.0.0.1, port: 0, policy: {policy}, api_keys: {{env: CODEFLEET_SCENARIO_KEYS}}}}\n"
            f"metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}\n"
            f"models:\n  - {{name: coder, source: \"demo://granite-code\", max_model_len: {max_model_len}, "
            f"replicas: {replicas}, engine_args: {json.dumps(args)}}}\n")


def compare(folder: Path, repeat: int, only: list[str] | None) -> list[dict[str, Any]]:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    spec = yaml.safe_load((folder / "scenario.yaml").read_text())
    shape = Shape(**spec.get("shape", {}))
    results = folder / "results"
    results.mkdir(exist_ok=True)
    os.environ.setdefault("CODEFLEET_SCENARIO_KEYS", "sk-scenario")
    key = os.environ["CODEFLEET_SCENARIO_KEYS"].split(",")[0]
    rows: list[dict[str, Any]] = []
    summary_file = results / "summary.json"
    if summary_file.exists():
        rows = json.loads(summary_file.read_text())
    for n in range(repeat):
        for replicas in spec["replicas"]:
            for policy in spec["policies"]:
                if only and policy not in only:
                    continue
                # kv_aware is not a manifest policy (docs/endpoint.md: why); the plan's router is given it here
                text = manifest("round_robin" if policy == "kv_aware" else policy, replicas,
                                spec.get("max_model_len", 4096), spec.get("engine_args"))
                with tempfile.TemporaryDirectory() as d:
                    (Path(d) / "fleet.yaml").write_text(text)
                    plan = plan_fleet(parse(text, Path(d) / "fleet.yaml"))
                    if policy == "kv_aware":
                        plan = dataclasses.replace(plan, router=plan.router.model_copy(update={"policy": policy}))
                    with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
                        print(f"\n== {policy}, {replicas} replicas (pass {n + 1}/{repeat}): starting the fleet ...",
                              flush=True)
                        fleet.start(timeout=900)
                        fe = fleet.frontend
                        assert fe is not None and fe.router_proc is not None
                        urls = [r.url for r in fleet.replicas if r.url]
                        sizes: list[int] = []
                        for workload in ("multiturn", "unique"):
                            h0, q0 = engine_prefix_counters(urls)
                            cpu0 = process_cpu_seconds(fe.router_proc.pid)
                            print(f"   {workload}: {shape.conversations} conversations x {shape.turns} turns ...",
                                  flush=True)
                            turns = run_workload(fleet.url, key, "coder", shape, workload, sizes)
                            h1, q1 = engine_prefix_counters(urls)
                            cpu = process_cpu_seconds(fe.router_proc.pid) - cpu0
                            if workload == "multiturn":  # the control repeats these prompt sizes
                                sizes = [int((t["input_tokens"] or 0) / 4.4) for t in turns]
                            s = summarize(turns) | {"policy": policy, "replicas": replicas, "workload": workload,
                                                    "pass": n + 1, "prefix_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0
                                                    else 0.0, "router_cpu_s": cpu}
                            print(f"   {workload}: ok {s['ok']}/{s['requests']}, TTFT p50 {s['ttft_p50_ms']:.1f} ms "
                                  f"p99 {s['ttft_p99_ms']:.1f} ms, {s['output_tokens_per_s']:.1f} tok/s, "
                                  f"prefix hits {s['prefix_hit_rate']:.1%}, router CPU {cpu:.2f} s", flush=True)
                            (results / f"{policy}-r{replicas}-{workload}-{n + 1}.json").write_text(
                                json.dumps({"summary": s, "turns": turns}, indent=1))
                            rows = [r for r in rows if (r["policy"], r["replicas"], r["workload"], r["pass"]) !=
                                    (policy, replicas, workload, n + 1)] + [s]
                            summary_file.write_text(json.dumps(rows, indent=1))
    plot(results, rows)
    return rows


def table(rows: list[dict[str, Any]], workload: str) -> str:
    keys = sorted({(r["replicas"], r["policy"]) for r in rows if r["workload"] == workload},
                  key=lambda k: (k[0], k[1]))
    out = ["| replicas | policy | passes | TTFT p50 ms | TTFT p99 ms | later turns TTFT p50 ms | output tok/s | "
           "prefix hits | router CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for replicas, policy in keys:
        rs = [r for r in rows if (r["replicas"], r["policy"], r["workload"]) == (replicas, policy, workload)]

        def f(k: str, fmt: str = "{:.1f}", rs: list[dict[str, Any]] = rs) -> str:
            vals = [r[k] for r in rs if r.get(k) is not None]
            return " / ".join(fmt.format(v) for v in vals) if vals else "-"
        out.append(f"| {replicas} | {policy} | {len(rs)} | {f('ttft_p50_ms')} | {f('ttft_p99_ms')} | "
                   f"{f('later_turns_ttft_p50_ms')} | {f('output_tokens_per_s')} | {f('prefix_hit_rate', '{:.0%}')} | "
                   f"{f('router_cpu_s', '{:.2f}')} |")
    return "\n".join(out)


def plot(results: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for workload in ("multiturn", "unique"):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for replicas, marker in ((2, "o"), (3, "s")):
            sel = [r for r in rows if r["workload"] == workload and r["replicas"] == replicas]
            policies = sorted({r["policy"] for r in sel})
            for ax, k, label in ((axes[0], "ttft_p50_ms", "TTFT p50 (ms)"), (axes[1], "ttft_p99_ms", "TTFT p99 (ms)"),
                                 (axes[2], "output_tokens_per_s", "output tokens/s")):
                xs = [policies.index(r["policy"]) + (0.1 if replicas == 3 else -0.1) for r in sel]
                ax.scatter(xs, [r[k] for r in sel], marker=marker, label=f"{replicas} replicas")
                ax.set_xticks(range(len(policies)), policies, rotation=20)
                ax.set_title(label)
        axes[0].legend()
        fig.suptitle(f"{workload}: each point one run")
        fig.tight_layout()
        fig.savefig(results / f"{workload}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="every policy x replica count of a scenario folder")
    c.add_argument("folder", type=Path)
    c.add_argument("--repeat", type=int, default=1)
    c.add_argument("--only", nargs="*", help="only these policies")
    t = sub.add_parser("tables", help="print the README tables from results/summary.json")
    t.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "compare":
        compare(args.folder, args.repeat, args.only)
    rows = json.loads((args.folder / "results" / "summary.json").read_text())
    for workload in ("multiturn", "unique"):
        print(f"\n{workload}:\n{table(rows, workload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
