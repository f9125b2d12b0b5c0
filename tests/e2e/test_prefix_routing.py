"""The default policy (cache_aware) keeps shared prefixes on one replica; round robin scatters them.

Both routers front the same two real replicas; each phase uses prefixes of its own, and the
prefix-cache hit rate is read from the engines' own counters (vllm:prefix_cache_*).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.workloads import shared_prefix_prompts
from codefleet.procs import free_port, spawn, stop_group
from codefleet.router import RouterAdmin, router_argv
from codefleet.runtime.local import LocalFleet
from codefleet.runtime.replica import Replica
from codefleet.status import engine_look

pytestmark = pytest.mark.e2e

MODEL = "granite-code-tiny"


def prefix_counters(replicas: list[Replica]) -> tuple[float, float]:
    looks = [engine_look(httpx.get(r.url + "/metrics", timeout=10).text) for r in replicas]
    return sum(x.prefix_hits or 0.0 for x in looks), sum(x.prefix_queries or 0.0 for x in looks)


@dataclass
class Phase:
    policy: str
    hit_rate: float
    ttft_p50_ms: float
    ttft_mean_ms: float


def run_phase(policy: str, router_url: str, key: str | None, replicas: list[Replica], seed: int) -> Phase:
    h0, q0 = prefix_counters(replicas)
    ttfts = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=60, headers=headers) as client:
        for _, prompt in shared_prefix_prompts(groups=7, per_group=4, prefix_words=300, seed=seed):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True, "temperature": 0}
            t0 = time.perf_counter()
            with client.stream("POST", router_url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200, resp.read()
                first = None
                for line in resp.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - t0
                assert first is not None
                ttfts.append(first * 1000)
    h1, q1 = prefix_counters(replicas)
    return Phase(policy, (h1 - h0) / max(q1 - q0, 1.0), statistics.median(ttfts), statistics.fmean(ttfts))


def test_cache_aware_beats_round_robin_on_shared_prefixes(fleet: LocalFleet, tmp_path: Path) -> None:
    fe = fleet.frontend
    assert fe is not None and fleet.plan.router.policy == "cache_aware"
    replicas = [r for r in fleet.replicas if r.plan.name == MODEL]
    assert len(replicas) == 2
    port = free_port()
    proc = spawn(router_argv(fleet.python, "round_robin", port, "127.0.0.1", free_port()), {}, tmp_path / "rr.log")
    try:
        rr = RouterAdmin(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while not rr.healthy():
            assert time.monotonic() < deadline, (tmp_path / "rr.log").read_text()
            time.sleep(0.1)
        for r in replicas:
            rr.add(r.url, MODEL)
        aware = run_phase("cache_aware", fe.router_url, fe.upstream_key, replicas, seed=101)
        robin = run_phase("round_robin", rr.url, fe.upstream_key, replicas, seed=202)
        rr.close()
    finally:
        stop_group(proc.pid, grace=5)
    for p in (aware, robin):
        print(f"\n{p.policy:<12} prefix-cache hit rate {p.hit_rate:.1%}  TTFT p50 {p.ttft_p50_ms:.1f} ms "
              f"mean {p.ttft_mean_ms:.1f} ms")
    # 7 prefixes x 4 requests (odd, so round robin sends each prefix to both replicas): cache_aware
    # misses each prefix once, round robin once per replica.
    assert aware.hit_rate > robin.hit_rate + 0.10
