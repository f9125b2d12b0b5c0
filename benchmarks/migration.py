"""A replica lost under load: what the client sees, with the gateway's migration on and off.

The scenario folder's ``scenario.yaml`` names the model and its loads. For each setting of
``router.migration.limit`` (the default 2, and 0: no migration, as before) it starts a fleet of two
replicas, warms it up, then:

* **exact**: rounds of 8 greedy streams; each round first runs them uninterrupted (the reference),
  then again with one replica's engine killed (SIGKILL of its process group) once every stream has
  20 chunks; per stream whether its full text equals the reference's, its usage, its finish;
* **load**: a steady load (``clients`` at once, each sending streamed chat requests one after
  another) while a replica is killed every ``kill_every_s`` seconds (the fleet restarts it; the next
  kill waits until both are ready again). Per request: ok (a ``finish_reason`` and ``[DONE]``),
  error (an error event or an HTTP error), cut (neither: a silent close). The gap a client saw at a
  kill: the longest wait between two events of a stream that spans a kill instant (p50/p99);
* **tokens**: how often the continuation's prompt, re-tokenized from the text the client had, is
  exactly the first prompt's token ids plus the generated ones (read with ``/tokenize`` on an
  engine after every chunk of greedy answers to code prompts).

Counts are confirmed by the gateway's ``codefleet_gateway_migrations_total``, read before and after.

    python -m benchmarks.migration run benchmarks/scenarios/migration
    python -m benchmarks.migration tables benchmarks/scenarios/migration
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from benchmarks.workloads import humaneval_prompts

KEY = "sk-scenario"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def migrations(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("codefleet_gateway_migrations_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            how = line.split('how="', 1)[1].split('"', 1)[0] if 'how="' in line else ""
            outcome = f"{outcome}/{how}" if how else outcome
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 first: threading.Event | asyncio.Event | None = None) -> dict[str, Any]:
    """One streamed chat request, read raw: its text, finish, usage, event times, ending."""
    t0 = time.time()
    times, parts, finish, usage, ending = [], [], None, None, "cut"
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as r:
            if r.status != 200:
                return {"ending": f"http {r.status}", "start": t0, "times": [], "text": ""}
            buf = b""
            async for data in r.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    times.append(time.time())
                    if ev == b"data: [DONE]":
                        if ending == "cut":
                            ending = "ok" if finish else "no finish"
                        continue
                    obj = json.loads(ev[6:])
                    if "error" in obj:
                        ending = "error"
                        continue
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for c in obj.get("choices") or []:
                        parts.append(c.get("delta", {}).get("content") or "")
                        finish = c.get("finish_reason") or finish
                    if first is not None and len(times) == 20:
                        first.set()
    except aiohttp.ClientError as exc:
        ending = f"cut ({type(exc).__name__})"
    return {"ending": ending, "start": t0, "times": times, "text": "".join(parts), "finish": finish, "usage": usage}


def chat_body(model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}


def kill(replica: Any) -> None:
    os.killpg(replica.proc.pid, signal.SIGKILL)


def wait_ready(fleet: Any, model: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.registered and r.proc is not None and r.proc.poll() is None
                  for r in fleet.replicas if r.plan.name == model):
        assert time.monotonic() < deadline, "a killed replica did not come back"
        time.sleep(0.5)


def running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


async def exact_round(fleet: Any, model: str, replicas: list[Any], prompts: list[str],
                      max_tokens: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        ref = await asyncio.gather(*(stream(s, fleet.url, chat_body(model, p, max_tokens)) for p in prompts))
        firsts = [asyncio.Event() for _ in prompts]
        tasks = [asyncio.create_task(stream(s, fleet.url, chat_body(model, p, max_tokens), e))
                 for p, e in zip(prompts, firsts, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 300)
        kill(max(replicas, key=lambda r: running(r.url)))  # the replica with the most of these streams
        got = await asyncio.gather(*tasks)
    def first_difference(a: str, b: str) -> dict[str, Any] | None:
        if a == b:
            return None
        k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        return {"at_char": k, "of": len(a), "reference": a[max(0, k - 40):k + 40], "got": b[max(0, k - 40):k + 40]}

    def longest_gap(g: dict[str, Any]) -> float:
        ts = [g["start"], *g["times"]]
        return max((b - a for a, b in zip(ts[1:], ts[2:], strict=False)), default=0.0)

    return [{"ending": g["ending"], "same_text": g["text"] == r["text"], "finish": g["finish"],
             "usage_same": g["usage"] == r["usage"], "ref_tokens": (r["usage"] or {}).get("completion_tokens"),
             "longest_gap_s": longest_gap(g), "difference": first_difference(r["text"], g["text"])}
            for g, r in zip(got, ref, strict=True)]


async def load(fleet: Any, model: str, spec: dict[str, Any], seed: int) -> tuple[list[dict[str, Any]], list[float]]:
    rng = random.Random(seed)
    prompts = humaneval_prompts()
    stop_at = time.time() + spec["duration_s"]
    kills: list[float] = []
    results: list[dict[str, Any]] = []
    replicas = [r for r in fleet.replicas if r.plan.name == model]

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            while time.time() < stop_at:
                body = chat_body(model, rng.choice(prompts), rng.randint(*spec["max_tokens"]), temperature=0.7)
                results.append(await stream(s, fleet.url, body))

    async def killer() -> None:
        i = 0
        while True:
            await asyncio.sleep(spec["kill_every_s"])
            if time.time() > stop_at - 5:
                return
            await asyncio.to_thread(wait_ready, fleet, model)
            kills.append(time.time())
            kill(replicas[i % len(replicas)])
            print(f"   killed {replicas[i % len(replicas)].name}", flush=True)
            i += 1

    k = asyncio.create_task(killer())
    await asyncio.gather(*(client(n) for n in range(spec["clients"])))
    k.cancel()
    return results, kills


def gaps_at_kills(results: list[dict[str, Any]], kills: list[float]) -> list[float]:
    out = []
    for r in results:
        ts = [r["start"], *r["times"]]
        for a, b in zip(ts, ts[1:], strict=False):
            if any(a <= k < b for k in kills):
                out.append(b - a)
    return out


def token_exactness(engine_url: str, key: str | None, model: str, prompts: list[str],
                    max_tokens: int) -> dict[str, int]:
    """Per cut point: is the continuation's prompt (re-tokenized from the text so far) exactly the
    first prompt's ids + the generated ids (``exact``), the ids up to an earlier token (``lagging``:
    text held back), or different (``differs``)?"""
    counts = {"exact": 0, "lagging": 0, "differs": 0}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=120, headers=headers) as c:
        for p in prompts:
            msgs = [{"role": "user", "content": p}]
            body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "return_token_ids": True}
            prompt_ids: list[int] = []
            ids: list[int] = []
            text = ""
            with c.stream("POST", engine_url + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    ev = json.loads(line[6:])
                    prompt_ids = ev.get("prompt_token_ids") or prompt_ids
                    for ch in ev.get("choices") or []:
                        ids += ch.get("token_ids") or []
                        text += ch.get("delta", {}).get("content") or ""
                    if not text or not ids:
                        continue
                    tok = c.post(engine_url + "/tokenize", json={
                        "model": model, "messages": [*msgs, {"role": "assistant", "content": text}],
                        "add_generation_prompt": False, "continue_final_message": True}).json()["tokens"]
                    if tok == prompt_ids + ids:
                        counts["exact"] += 1
                    elif any(tok == prompt_ids + ids[:j] for j in range(len(ids))):
                        counts["lagging"] += 1
                    else:
                        counts["differs"] += 1
    return counts


def manifest(spec: dict[str, Any], limit: int) -> str:
    doc = {"version": 1, "defaults": {"gpu": "cpu", "cpu_kv_cache_gib": 1},
           "router": {"host": "127.0.0.1", "port": 0, "api_keys": {"env": "CODEFLEET_SCENARIO_KEYS"},
                      "migration": {"limit": limit}},
           "metrics": {"launcher_port": 0, "gateway_port": 0, "router_port": 0},
           "models": [{"name": spec["model"], "source": spec["source"], "max_model_len": spec["max_model_len"],
                       "replicas": 2, "engine_args": {"enforce_eager": True}}]}
    return yaml.safe_dump(doc, sort_keys=False)


def run(folder: Path, limits: list[int] | None = None) -> list[dict[str, Any]]:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    spec = yaml.safe_load((folder / "scenario.yaml").read_text())
    model = spec["model"]
    os.environ["CODEFLEET_SCENARIO_KEYS"] = KEY
    out = folder / "results"
    kept = json.loads((out / "summary.json").read_text()) if limits and (out / "summary.json").exists() else []
    rows: list[dict[str, Any]] = [r for r in kept if r["limit"] not in limits] if limits else []
    for limit in limits or spec["limits"]:
        with tempfile.TemporaryDirectory() as d:
            text = manifest(spec, limit)
            (Path(d) / "fleet.yaml").write_text(text)
            plan = plan_fleet(parse(text, Path(d) / "fleet.yaml"))
            with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
                print(f"== migration limit {limit}: starting 2 replicas of {model} ...", flush=True)
                fleet.start(timeout=900)
                fleet.watch_in_background()
                assert fleet.frontend is not None
                metrics_url = f"http://127.0.0.1:{fleet.frontend.gateway_metrics_port}/metrics"
                print("   warm-up (not measured) ...", flush=True)
                asyncio.run(exact_round_warm(fleet, model))
                replicas = [r for r in fleet.replicas if r.plan.name == model]
                e = spec["exact"]
                if limit:
                    print(f"   tokens: re-tokenized continuations after every chunk of {e['token_prompts']} answers",
                          flush=True)
                    counts = token_exactness(replicas[0].url, fleet.frontend.upstream_key, model,
                                             humaneval_prompts()[:e["token_prompts"]], e["max_tokens"])
                    rows.append({"part": "tokens", "limit": limit, **counts})
                    print(f"   tokens: {counts}", flush=True)
                for n in range(e["rounds"]):
                    before = migrations(metrics_url)
                    prompts = humaneval_prompts()[8 * n: 8 * n + 8]
                    print(f"   exact, round {n + 1}: 8 greedy streams, reference then with a kill ...", flush=True)
                    got = asyncio.run(exact_round(fleet, model, replicas, prompts, e["max_tokens"]))
                    time.sleep(1.0)
                    row = {"part": "exact", "limit": limit, "round": n + 1, "streams": got,
                           "gateway": delta(migrations(metrics_url), before)}
                    print(f"   exact: endings {[g['ending'] for g in got]}, same text "
                          f"{sum(g['same_text'] for g in got)}/8, same usage {sum(g['usage_same'] for g in got)}/8, "
                          f"gateway {row['gateway']}", flush=True)
                    rows.append(row)
                    wait_ready(fleet, model)
                ld = spec["load"]
                before = migrations(metrics_url)
                print(f"   load: {ld['clients']} clients for {ld['duration_s']} s, a kill every "
                      f"{ld['kill_every_s']} s ...", flush=True)
                results, kills = asyncio.run(load(fleet, model, ld, seed=limit))
                time.sleep(1.0)
                endings: dict[str, int] = {}
                kinds: dict[str, int] = {}
                for r in results:
                    # error: an error event or an HTTP error status; cut: neither (a silent close)
                    key = ("ok" if r["ending"] == "ok" else "error" if r["ending"] == "error"
                           or r["ending"].startswith("http") else "cut")
                    endings[key] = endings.get(key, 0) + 1
                    kinds[r["ending"]] = kinds.get(r["ending"], 0) + 1
                gaps = gaps_at_kills(results, kills)
                row = {"part": "load", "limit": limit, "requests": len(results), "kills": len(kills), **endings,
                       "endings": kinds,
                       "gap_p50_s": pct(gaps, 50), "gap_p99_s": pct(gaps, 99), "gaps": len(gaps),
                       "gateway": delta(migrations(metrics_url), before)}
                print(f"   load: {row}", flush=True)
                rows.append(row)
                wait_ready(fleet, model)
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot(out, rows)
    return rows


async def exact_round_warm(fleet: Any, model: str) -> None:
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(stream(s, fleet.url, chat_body(model, p, 32)) for p in humaneval_prompts()[:8]))


def plot(results: Path, rows: list[dict[str, Any]]) -> None:
    """Per limit: how the requests ended under the killing load, and how the greedy streams of the
    exact rounds ended (results/migration.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part, title in ((axes[0], "load", "steady load, a replica killed every 20 s"),
                            (axes[1], "exact", "8 greedy streams per round, one replica killed")):
        limits = sorted({r["limit"] for r in rows if r["part"] == part}, reverse=True)
        counts = {k: [] for k in ("ok", "error", "cut")}  # type: dict[str, list[float]]
        for lim in limits:
            sel = [r for r in rows if r["part"] == part and r["limit"] == lim]
            if part == "load":
                for k in counts:
                    counts[k].append(sum(r.get(k, 0) for r in sel))
            else:
                streams = [x for r in sel for x in r["streams"]]
                counts["ok"].append(sum(x["ending"] == "ok" for x in streams))
                counts["error"].append(sum(x["ending"] == "error" for x in streams))
                counts["cut"].append(sum(x["ending"] not in ("ok", "error") for x in streams))
        bottom = [0.0] * len(limits)
        for k, color in (("ok", "tab:green"), ("error", "tab:orange"), ("cut", "tab:red")):
            ax.bar([f"migration limit {lim}" for lim in limits], counts[k], bottom=bottom, label=k, color=color)
            bottom = [b + c for b, c in zip(bottom, counts[k], strict=True)]
        ax.set_title(title)
        ax.set_ylabel("requests")
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "migration.png", dpi=100)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| limit | part | requests | ok | error | cut | gap at the kill p50 / p99 s | gateway's migrations |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "load":
            lines.append(f"| {r['limit']} | load ({r['kills']} kills) | {r['requests']} | {r.get('ok', 0)} | "
                         f"{r.get('error', 0)} | {r.get('cut', 0)} | {r['gap_p50_s']:.2f} / {r['gap_p99_s']:.2f} "
                         f"({r['gaps']}) | {r['gateway']} |")
        elif r["part"] == "exact":
            s = r["streams"]
            lines.append(f"| {r['limit']} | exact, round {r['round']} | 8 | {sum(x['ending'] == 'ok' for x in s)} | "
                         f"{sum(x['ending'] == 'error' for x in s)} | "
                         f"{sum(x['ending'] not in ('ok', 'error') for x in s)} | same text "
                         f"{sum(x['same_text'] for x in s)}/8, same usage {sum(x['usage_same'] for x in s)}/8 | "
                         f"{r['gateway']} |")
        else:
            n = r["exact"] + r["lagging"] + r["differs"]
            lines.append(f"| {r['limit']} | tokens | {n} cut points | exact {r['exact']} | lagging {r['lagging']} | "
                         f"differs {r['differs']} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start the fleets and measure (results/summary.json)")
    r.add_argument("folder", type=Path)
    r.add_argument("--limits", nargs="*", type=int, help="only these migration limits (the others' rows are kept)")
    sub.add_parser("tables").add_argument("folder", type=Path)
    args = p.parse_args(argv)
    summary = args.folder / "results" / "summary.json"
    rows = run(args.folder, args.limits) if args.cmd == "run" else json.loads(summary.read_text())
    if args.cmd == "tables":
        plot(summary.parent, rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
