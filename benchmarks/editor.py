"""Code completion as an editor sends it: fill-in-the-middle requests, the stale ones abandoned.

Each editor types through a real source file (Python standard-library modules, the same bytes on
every run with Python 3.11): at every pause in typing it sends a fill request, the text before the
cursor as ``prompt`` and the text after it as ``suffix`` (short ``max_tokens``, low temperature,
streamed), and when the next pause comes before the answer is complete it closes that request's
connection, as Continue and Tabby do with a request the user typed past. Per run: TTFT and
latency p50/p99 of the requests that were kept, the share abandoned, and the engines' own counts
(``vllm:request_success_total`` by finished reason, ``abort`` for an abandoned request the engine
saw; prefix-cache hits, which successive fills of one file share).

A probe after the editors: one long fill at a time, abandoned (its connection closed) after its
first streamed token, or 0.3 s into a non-streamed one; then the engine's
``vllm:num_requests_running`` is read every 10 ms until it is 0 again: how long the engine kept
working on a request nobody wanted any more.

    python -m benchmarks.editor run benchmarks/scenarios/editor    # the scenario folder's scenario.yaml
    python -m benchmarks.editor tables benchmarks/scenarios/editor
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from codefleet.loadgen import Result, _one, pct

#: Files the editors type through (the opening ``file_chars`` characters of each).
FILES = ("textwrap", "shlex", "fnmatch", "heapq", "bisect", "colorsys", "difflib", "calendar")


@dataclass(frozen=True)
class Editors:
    editors: int = 4
    """Editors typing at once (each in its own file)."""
    pauses: int = 24
    """Fill requests per editor (one per pause in typing)."""
    file_chars: int = 6000
    prefix_chars: int = 1500
    """Text before the cursor sent at most (editors send a window around the cursor)."""
    suffix_chars: int = 500
    typed_chars: tuple[int, int] = (3, 12)
    """Characters typed between two pauses (uniform)."""
    pause_s: tuple[float, float] = (0.15, 0.9)
    """Time from one pause to the next (uniform): a request older than this is abandoned."""
    max_tokens: int = 24
    temperature: float = 0.2
    seed: int = 0


def source(name: str, chars: int) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{name}.py"
    return path.read_text()[:chars]


def engine_counts(urls: list[str]) -> dict[str, float]:
    """Summed over the engines: finished requests by reason, prefix-cache hits and queries."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for u in urls:
        for fam in text_string_to_metric_families(httpx.get(u + "/metrics", timeout=10).text):
            for s in fam.samples:
                if s.name == "vllm:request_success_total":
                    k = "finished:" + s.labels.get("finished_reason", "?")
                elif s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
                    k = s.name.split(":")[1].removesuffix("_total")
                else:
                    continue
                out[k] = out.get(k, 0.0) + s.value
    return out


def running(urls: list[str]) -> float:
    from codefleet.status import engine_look

    return sum(engine_look(httpx.get(u + "/metrics", timeout=5).text).running or 0.0 for u in urls)


async def _editor(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str, text: str,
                  e: Editors, rng: random.Random, t0: float, kept: list[Result], abandoned: list[float]) -> None:
    cursor = rng.randrange(e.prefix_chars // 2, len(text) // 2)
    pending: asyncio.Task[Result] | None = None
    for _ in range(e.pauses):
        if pending is not None and not pending.done():
            pending.cancel()  # the user typed on: the connection is closed (aiohttp releases it)
            abandoned.append(time.perf_counter() - t0)
        elif pending is not None:
            kept.append(pending.result())
        body = {"model": model, "prompt": text[max(0, cursor - e.prefix_chars):cursor],
                "suffix": text[cursor:cursor + e.suffix_chars], "max_tokens": e.max_tokens,
                "temperature": e.temperature, "stream": True, "stream_options": {"include_usage": True}}
        pending = asyncio.ensure_future(_one(session, url, body, headers, t0, time.perf_counter() - t0))
        await asyncio.sleep(rng.uniform(*e.pause_s))
        cursor = min(len(text) - 1, cursor + rng.randint(*e.typed_chars))
    if pending is not None:
        kept.append(await pending)  # the last one is read to its end


async def editors(base_url: str, key: str, model: str, e: Editors) -> tuple[list[Result], list[float], float]:
    rng = random.Random(e.seed)
    texts = [source(FILES[i % len(FILES)], e.file_chars) for i in range(e.editors)]
    kept: list[Result] = []
    abandoned: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    # a connection per request, as the editors' HTTP clients do when they abort one
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(_editor(session, base_url + "/v1/completions", headers, model, t, e,
                                       random.Random(rng.random()), t0, kept, abandoned) for t in texts))
        span = time.perf_counter() - t0
    return kept, abandoned, span


async def _abandon(base_url: str, key: str, model: str, stream: bool, text: str) -> None:
    body = {"model": model, "prompt": text[:1200], "suffix": text[1200:1500], "max_tokens": 400,
            "temperature": 0, "stream": stream, "ignore_eos": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:

        async def send() -> None:
            async with s.post(base_url + "/v1/completions", json=body) as r:
                await r.content.readline()  # streamed: the first event, the engine is decoding

        if stream:
            await send()
        else:  # the head of a non-streamed answer comes with the whole answer: leave while waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(send(), 0.3)


def probe(base_url: str, key: str, model: str, urls: list[str], rounds: int) -> dict[str, list[float]]:
    """Seconds from a client's close to the engines' running count back at 0, per round."""
    text = source(FILES[0], 4000)
    out: dict[str, list[float]] = {"stream": [], "non-stream": []}
    for _ in range(rounds):
        for kind in out:
            while running(urls):
                time.sleep(0.05)
            asyncio.run(_abandon(base_url, key, model, kind == "stream", text))
            closed = time.perf_counter()
            while running(urls) and time.perf_counter() - closed < 30:
                time.sleep(0.01)
            out[kind].append(time.perf_counter() - closed)
    return out


def summarize(kept: list[Result], abandoned: list[float], span: float, before: dict[str, float],
              after: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in kept if r.ok]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    lat = [r.latency * 1000 for r in ok]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    sent = len(kept) + len(abandoned)
    return {"sent": sent, "kept": len(kept), "kept_ok": len(ok), "errors": sorted({r.error for r in kept if r.error}),
            "abandoned": len(abandoned), "abandoned_share": len(abandoned) / sent if sent else 0.0,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / span if span else 0.0,
            "mean_prompt_tokens": sum(r.input_tokens or 0 for r in ok) / max(len(ok), 1),
            "engine_finished": {k.split(":", 1)[1]: v for k, v in delta.items() if k.startswith("finished:") and v},
            # requests the engine did not finish: aborted when their connection closed (vLLM counts
            # no abort in request_success_total)
            "engine_unfinished": sent - sum(v for k, v in delta.items() if k.startswith("finished:")),
            "prefix_hit_rate": (delta.get("prefix_cache_hits", 0.0) / delta["prefix_cache_queries"]
                                if delta.get("prefix_cache_queries") else 0.0)}


def manifest(spec: dict[str, Any]) -> str:
    doc = {"version": 1, "defaults": {"gpu": "cpu", "cpu_kv_cache_gib": 1},
           "router": {"host": "127.0.0.1", "port": 0, "api_keys": {"env": "CODEFLEET_SCENARIO_KEYS"}},
           "metrics": {"launcher_port": 0, "gateway_port": 0, "router_port": 0},
           "models": [{"name": spec["model"], "source": spec["source"], "max_model_len": spec.get("max_model_len", 2048),
                       "replicas": spec.get("replicas", 1), **({"fim": spec["fim"]} if "fim" in spec else {}),
                       "engine_args": {"enforce_eager": True, **spec.get("engine_args", {})}}]}
    return yaml.safe_dump(doc, sort_keys=False)


def run(folder: Path, passes: int) -> list[dict[str, Any]]:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    spec = yaml.safe_load((folder / "scenario.yaml").read_text())
    results = folder / "results"
    results.mkdir(exist_ok=True)
    os.environ.setdefault("CODEFLEET_SCENARIO_KEYS", "sk-scenario")
    key = os.environ["CODEFLEET_SCENARIO_KEYS"].split(",")[0]
    rows = []
    text = manifest(spec)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "fleet.yaml").write_text(text)
        plan = plan_fleet(parse(text, Path(d) / "fleet.yaml"))
        with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
            print(f"== {spec['model']}: starting the fleet ...", flush=True)
            fleet.start(timeout=900)
            urls = [r.url for r in fleet.replicas if r.url]
            # a new engine's first requests are slow (measured: TTFT p50 722 ms in a first pass without
            # this, 95% of the fills overtaken; 297 ms and 59% with it): warm it up, unmeasured
            print("   warm-up: 2 editors x 8 pauses (not measured) ...", flush=True)
            asyncio.run(editors(fleet.url, key, spec["model"], Editors(editors=2, pauses=8, seed=99)))
            for n in range(1, passes + 1):
                for name, load in spec["loads"].items():
                    e = Editors(**{k: tuple(v) if isinstance(v, list) else v for k, v in load.items()})
                    # each pass a new visit (other cursors): the same requests again would find the
                    # first pass's prompts in the prefix cache (measured: 95% hits against 16%)
                    e = dataclasses.replace(e, seed=e.seed + 1000 * n)
                    print(f"   {name}, pass {n}: {e.editors} editors x {e.pauses} pauses ...", flush=True)
                    before = engine_counts(urls)
                    kept, abandoned, span = asyncio.run(editors(fleet.url, key, spec["model"], e))
                    time.sleep(1.0)  # the engines count an abort when they notice it
                    s = summarize(kept, abandoned, span, before, engine_counts(urls)) | {"load": name, "pass": n}
                    print(f"   {name}: sent {s['sent']}, abandoned {s['abandoned_share']:.0%}, kept ok {s['kept_ok']}, "
                          f"TTFT p50 {s['ttft_p50_ms']:.0f} p99 {s['ttft_p99_ms']:.0f} ms, latency p50 "
                          f"{s['latency_p50_ms']:.0f} p99 {s['latency_p99_ms']:.0f} ms, engine {s['engine_finished']}, "
                          f"prefix hits {s['prefix_hit_rate']:.0%}", flush=True)
                    rows.append(s)
                print(f"   probe, pass {n}: abandoned requests, the engine's running count afterwards ...", flush=True)
                p = probe(fleet.url, key, spec["model"], urls, spec.get("probe_rounds", 8))
                row = {"load": "probe", "pass": n,
                       **{f"{k}_freed_p50_ms": pct([x * 1000 for x in v], 50) for k, v in p.items()},
                       **{f"{k}_freed_max_ms": max(v) * 1000 for k, v in p.items()}, "samples": p}
                print(f"   probe: freed after stream p50 {row['stream_freed_p50_ms']:.0f} ms (max "
                      f"{row['stream_freed_max_ms']:.0f}), non-stream p50 {row['non-stream_freed_p50_ms']:.0f} ms "
                      f"(max {row['non-stream_freed_max_ms']:.0f})", flush=True)
                rows.append(row)
    (results / "summary.json").write_text(json.dumps(rows, indent=1))
    plot(results, rows)
    return rows


def plot(results: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [r for r in rows if r["load"] != "probe"]
    names = sorted({r["load"] for r in loads})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (keys, title) in zip(axes, ((("ttft_p50_ms", "ttft_p99_ms"), "kept fills: TTFT ms"),
                                        (("latency_p50_ms", "latency_p99_ms"), "kept fills: latency ms"),
                                        (("abandoned_share",), "share abandoned")), strict=True):
        for k in keys:
            ax.scatter([names.index(r["load"]) for r in loads], [r[k] for r in loads], label=k)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(results / "editor.png", dpi=100)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| load | pass | sent | abandoned | kept ok | TTFT p50 / p99 ms | latency p50 / p99 ms | output tok/s | "
           "engine finished / not | prefix hits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["load"] == "probe":
            continue
        fin = ", ".join(f"{k} {int(v)}" for k, v in sorted(r["engine_finished"].items()))
        out.append(f"| {r['load']} | {r['pass']} | {r['sent']} | {r['abandoned_share']:.0%} | {r['kept_ok']} | "
                   f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['latency_p50_ms']:.0f} / "
                   f"{r['latency_p99_ms']:.0f} | {r['output_tokens_per_s']:.1f} | {fin} / {r['engine_unfinished']:.0f} | "
                   f"{r['prefix_hit_rate']:.0%} |")
    out += ["", "| pass | abandoned stream: engine free after, p50 / max ms | non-stream: p50 / max ms |",
            "|---|---|---|"]
    out += [f"| {r['pass']} | {r['stream_freed_p50_ms']:.0f} / {r['stream_freed_max_ms']:.0f} | "
            f"{r['non-stream_freed_p50_ms']:.0f} / {r['non-stream_freed_max_ms']:.0f} |" for r in rows
            if r["load"] == "probe"]
    return "\n".join(out)


def render_cost(repeat: int = 2000) -> dict[str, float]:
    """Microseconds per fill body (1,500 characters before the cursor, 500 after): what rendering
    would add to the gateway (a second serialization of the body, besides its parse) against what
    it adds inside the engine's middleware (which parses and re-serializes every body already)."""
    import timeit

    import orjson

    from codefleet.fim import get_format

    text = source(FILES[0], 4000)
    body = {"model": "m", "prompt": text[:1500], "suffix": text[1500:2000], "max_tokens": 24, "temperature": 0.2,
            "stream": True}
    raw = orjson.dumps(body)
    fim = get_format("starcoder")

    def gateway() -> bytes:
        payload = orjson.loads(raw)
        payload["prompt"] = fim.render(payload["prompt"], payload.pop("suffix"))
        return orjson.dumps(payload)

    def middleware_render() -> str:
        return fim.render(body["prompt"], body["suffix"])  # type: ignore[arg-type]

    def us(f: Any) -> float:
        return min(timeit.repeat(f, number=repeat, repeat=5)) / repeat * 1e6

    out = {"gateway_parse_only_us": us(lambda: orjson.loads(raw)), "gateway_parse_render_serialize_us": us(gateway),
           "middleware_render_us": us(middleware_render),
           "middleware_json_roundtrip_us": us(lambda: json.dumps(json.loads(raw)))}
    for k, v in out.items():
        print(f"  {k:<36} {v:8.2f} us")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start the scenario's fleet, run its loads and the probe")
    r.add_argument("folder", type=Path)
    r.add_argument("--passes", type=int, default=2)
    t = sub.add_parser("tables", help="print the README tables from results/summary.json")
    t.add_argument("folder", type=Path)
    sub.add_parser("render-cost", help="what rendering a fill costs in the gateway against in the engine's middleware")
    args = p.parse_args(argv)
    if args.cmd == "render-cost":
        render_cost()
        return 0
    rows = run(args.folder, args.passes) if args.cmd == "run" else json.loads(
        (args.folder / "results" / "summary.json").read_text())
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
