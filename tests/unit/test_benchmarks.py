"""The benchmark tooling's own logic: percentiles, goodput, scenario files (no servers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.bench import build_parser, parse_goodput
from codefleet.loadgen import Result, meets, pct, summarize
from codefleet.manifest import load, parse
from codefleet.planner import plan_fleet

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "benchmarks" / "scenarios").glob("*/scenario.yaml"))


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentiles_match_numpy(q: float) -> None:
    values = [0.3, 7.0, 1.5, 2.25, 9.0, 4.0, 0.1]
    assert pct(values, q) == pytest.approx(float(np.percentile(values, q)))


def result(start: float, ttft: float, end: float, tokens: int, ok: bool = True) -> Result:
    return Result(start=start, scheduled=start, ok=ok, ttft=ttft, end=end, output_tokens=tokens,
                  chunk_times=[start + ttft + i * (end - start - ttft) / max(1, tokens - 1) for i in range(tokens)])


def test_tpot_excludes_the_first_token_and_goodput_counts_slos() -> None:
    fast = result(0.0, 0.1, 1.0, 10)    # TPOT (1.0 - 0.1) / 9 = 100 ms
    slow = result(0.5, 0.9, 1.5, 11)    # TTFT 900 ms
    failed = result(0.6, 0.1, 0.7, 0, ok=False)
    assert fast.tpot == pytest.approx(0.1)
    assert meets(fast, {"ttft": 200, "tpot": 100}) and not meets(slow, {"ttft": 200})
    assert not meets(failed, {})
    s = summarize([fast, slow, failed], {"ttft": 200})
    assert (s["requests"], s["ok"], s["good_requests"]) == (3, 2, 1)
    assert s["goodput"] == pytest.approx(1 / 1.5)
    assert s["output_token_throughput"] == pytest.approx(21 / 1.5)
    assert s["ttft_p50_ms"] == pytest.approx(500)


def test_goodput_syntax_is_vllms() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:9000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 9000.0}
    with pytest.raises(SystemExit, match="ttft:MS"):
        parse_goodput(["itl:5"])


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.parent.name)
def test_scenarios_are_complete(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())
    assert (path.parent / "README.md").exists(), f"{path.parent.name}: results README missing"
    if "policies" in spec:  # a benchmarks.multiturn scenario: every policy x replicas measured
        _multiturn_scenario_is_complete(path, spec)
        return
    if "variants" in spec:  # a benchmarks.prefix_routing scenario: every variant x replicas x workload
        _prefix_routing_scenario_is_complete(path, spec)
        return
    if "loads" in spec:  # a benchmarks.editor scenario: every load and the probe, in every pass
        _editor_scenario_is_complete(path, spec)
        return
    if "limits" in spec:  # a benchmarks.migration scenario: every part for every limit
        _migration_scenario_is_complete(path, spec)
        return
    if "candidates" in spec:  # a benchmarks.speculative scenario: every candidate x workload x concurrency
        _speculative_scenario_is_complete(path, spec)
        return
    if "arms" in spec:  # a benchmarks.lora_cost scenario: every arm x concurrency, served where it says
        _lora_scenario_is_complete(path, spec)
        return
    assert spec["description"].strip() and spec["runs"]
    labels = [r["label"] for r in spec["runs"]]
    assert len(set(labels)) == len(labels)
    for run in spec["runs"]:
        argv = ["--base-url", "http://x", *spec["bench"], *run.get("bench", [])]
        build_parser().parse_args(argv)  # the bench arguments are valid
        if "manifest" in run:
            plan = plan_fleet(load(path.parent / run["manifest"]))
            assert all(m.placement.accelerator == "cpu" for m in plan.models)
        else:
            assert run["base_url_env"]


def _migration_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    from benchmarks.migration import manifest

    rows = json.loads((path.parent / "results" / "summary.json").read_text())
    for limit in spec["limits"]:
        plan_fleet(parse(manifest(spec, limit), path))  # the fleet it starts is a valid one
        mine = [r for r in rows if r["limit"] == limit]
        assert sum(r["part"] == "exact" for r in mine) == spec["exact"]["rounds"], limit
        assert sum(r["part"] == "load" for r in mine) == 1, limit
        assert sum(r["part"] == "tokens" for r in mine) == (1 if limit else 0), limit
        for r in mine:
            if r["part"] == "load":
                assert r["requests"] == r.get("ok", 0) + r.get("error", 0) + r.get("cut", 0)
    assert (path.parent / "results" / "migration.png").exists()


def _editor_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    from benchmarks.editor import Editors, manifest

    plan_fleet(parse(manifest(spec), path))  # the fleet it starts is a valid one
    for shape in spec["loads"].values():
        Editors(**{k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()})
    rows = json.loads((path.parent / "results" / "summary.json").read_text())
    passes = {r["pass"] for r in rows}
    for n in passes:
        assert {r["load"] for r in rows if r["pass"] == n} == {*spec["loads"], "probe"}, n
    assert all(r["sent"] == r["kept"] + r["abandoned"] for r in rows if r["load"] != "probe")
    assert (path.parent / "results" / "editor.png").exists()


def _multiturn_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    from benchmarks.multiturn import Shape, manifest
    from codefleet.manifest import parse

    assert spec["description"].strip() and spec["replicas"]
    Shape(**spec.get("shape", {}))
    for replicas in spec["replicas"]:
        text = manifest("round_robin", replicas, spec.get("max_model_len", 4096), spec.get("engine_args"))
        plan = plan_fleet(parse(text, path.parent / "fleet.yaml"))
        assert all(m.placement.accelerator == "cpu" for m in plan.models) and plan.models[0].placement.replicas == replicas
    rows = json.loads((path.parent / "results" / "summary.json").read_text())
    measured = {(r["policy"], r["replicas"], r["workload"]) for r in rows}
    for policy in spec["policies"]:
        for replicas in spec["replicas"]:
            for workload in ("multiturn", "unique"):
                assert (policy, replicas, workload) in measured, (policy, replicas, workload)
    assert all(r["ok"] == r["requests"] for r in rows), "a recorded run has failed requests"


def test_gpu_kv_check_reads_vllms_capacity_line(tmp_path: Path) -> None:
    """benchmarks/gpu_kv_check.py parses the line vLLM logs (v1/core/kv_cache_utils.py's format)."""
    from benchmarks.gpu_kv_check import logged_capacity

    log = tmp_path / "engine.log"
    log.write_text("INFO [gpu_worker.py:300] Available KV cache memory: 63.06 GiB\n"
                   "INFO [kv_cache_utils.py:1300] GPU KV cache size: 206,608 tokens, Maximum concurrency for "
                   "128,000 tokens per request: 1.61x\n")
    assert logged_capacity(log, lambda: True, timeout=5) == (206_608, 63.06)
    log.write_text("ERROR: CUDA out of memory\n")
    assert logged_capacity(log, lambda: False, timeout=5) == (None, None)


def test_multiturn_conversations_grow_with_each_answer() -> None:
    """benchmarks/multiturn.py: every turn repeats the whole conversation (the shared system prompt,
    the conversation's file, the earlier answers) plus a new question; the control shares nothing."""
    import asyncio
    import json as _json
    import threading

    from aiohttp import web

    from benchmarks.multiturn import Shape, run_workload, summarize

    seen: list[dict] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        answer = f"answer{len(seen)}"
        await resp.write(b"data: " + _json.dumps({"choices": [{"index": 0, "delta": {"content": answer}}]}).encode()
                         + b"\n\n")
        usage = {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]), "completion_tokens": 1}
        await resp.write(b"data: " + _json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        shape = Shape(conversations=3, turns=4, system_words=20, file_words=30, think_s=0.01)
        turns = run_workload(f"http://127.0.0.1:{port}", None, "m", shape, "multiturn")
        assert len(turns) == 12 and all(t["ok"] for t in turns)
        by_conv: dict[int, list[dict]] = {}
        for body in seen:
            first_user = body["messages"][1]["content"]
            by_conv.setdefault(hash(first_user), []).append(body)
        assert len(by_conv) == 3
        systems = {b["messages"][0]["content"] for b in seen}
        assert len(systems) == 1  # one system prompt shared by every conversation
        for bodies in by_conv.values():
            bodies.sort(key=lambda b: len(b["messages"]))
            assert [len(b["messages"]) for b in bodies] == [2, 4, 6, 8]
            for earlier, later in zip(bodies, bodies[1:], strict=False):
                assert later["messages"][:len(earlier["messages"])] == earlier["messages"]  # the prefix repeats
                assert later["messages"][len(earlier["messages"])]["role"] == "assistant"
        s = summarize(turns)
        assert s["ok"] == 12 and s["later_turns_ttft_p50_ms"] is not None
        seen.clear()
        control = run_workload(f"http://127.0.0.1:{port}", None, "m", shape, "unique",
                               [t["input_tokens"] for t in turns])
        assert len(control) == 12 and len({b["messages"][0]["content"][:40] for b in seen}) == 12
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def _prefix_routing_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    from benchmarks.prefix_routing import Load, manifest
    from codefleet.manifest import parse

    assert spec["description"].strip() and spec["replicas"]
    Load(**spec.get("load", {}))
    rows = json.loads((path.parent / "results" / "summary.json").read_text())
    measured = {(r["variant"], r["replicas"], r["workload"]) for r in rows}
    for variant in spec["variants"]:
        for replicas in spec["replicas"]:
            text = manifest(spec["model"], spec["source"], variant, replicas, spec)
            plan = plan_fleet(parse(text, path.parent / "fleet.yaml"))
            assert plan.router.policy == variant["policy"] and plan.models[0].placement.replicas == replicas
            for workload in spec["workloads"]:
                assert (variant["name"], replicas, workload) in measured, (variant["name"], replicas, workload)
    assert all(r["ok"] == r["requests"] for r in rows), "a recorded run has failed requests"


def _speculative_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    from codefleet.tune import label, parse_candidate

    plan = plan_fleet(load(path.parent / "fleet.yaml"))
    assert [m.placement.accelerator for m in plan.models] == ["cpu"]
    want = {(label(parse_candidate(c)), w, n) for c in spec["candidates"] for w in spec["workloads"]
            for n in spec["concurrency"]}
    passes = sorted((path.parent / "results").glob("pass-*.json"))
    assert len(passes) == spec["passes"], passes
    for p in passes:
        cells = json.loads(p.read_text())["cells"]
        assert {(c["candidate"], c["workload"], c["concurrency"]) for c in cells} == want, p
        for c in cells:
            assert c["ok"] == c["requests"], (p.name, c["candidate"], c["workload"], c["concurrency"])
            # the engine's own counters: a speculating engine proposed, one that does not never did
            assert (c["draft_tokens"] > 0) == (c["speculative"] is not None), (p.name, c["candidate"])
    assert (path.parent / "results" / "summary.md").exists()
    assert (path.parent / "results" / "speculative.png").exists()


def _lora_scenario_is_complete(path: Path, spec: dict) -> None:
    import json

    plan = plan_fleet(load(path.parent / "fleet.yaml"))
    assert [m.placement.accelerator for m in plan.models] == ["cpu", "cpu"]
    assert [m.name for m in plan.models if m.lora] == [spec["base"]]
    passes = sorted((path.parent / "results").glob("pass-*.json"))
    assert len(passes) == spec["passes"], passes
    for p in passes:
        cells = json.loads(p.read_text())["cells"]
        assert {(c["arm"], c["concurrency"]) for c in cells} == {(a, n) for a in spec["arms"] for n in spec["concurrency"]}
        for c in cells:
            assert c["ok"] == c["requests"], (p.name, c["arm"], c["concurrency"])
            # the engines' own counters: each arm was served by the engine it names, and only there
            engine = spec["plain"] if c["arm"] == "plain base" else spec["base"]
            assert c["served"][engine] == c["requests"] and sum(c["served"].values()) == c["requests"], (p.name, c)
            if c["arm"] == "lora 50/50":
                assert c["adapter_differs"] > 0, (p.name, c["concurrency"], "the adapter changed no answer")
    assert (path.parent / "results" / "summary.md").exists()
