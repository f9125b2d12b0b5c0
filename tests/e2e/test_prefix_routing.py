"""Prefix routing on real engines, read from the gateway's, vllm-router's and the engines' own counters.

Both prefix-aware policies run in front of the e2e fleet's two replicas of one model (the fleet
itself runs the default, round robin): prefix_affinity as `codefleet up` starts it (a gateway that
keys each request by its prompt's prefix, a sticky_least_loaded router), and cache_aware (a router
that gets token ids from the engines' render endpoints; these replicas serve them: fleet.yaml).
Each way prefix routing can silently stop is a test: requests sharing a prefix scattered over
replicas, the router without tokens, and one replica taking all the traffic while another idles.
"""

from __future__ import annotations

import concurrent.futures
import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.workloads import code_context, shared_prefix_prompts
from codefleet.gateway.config import UPSTREAM_KEY_ENV, GatewayConfig
from codefleet.manifest import Router
from codefleet.procs import free_port, spawn, stop_group
from codefleet.router import RouterAdmin, gateway_affinity, router_argv, router_env
from codefleet.runtime.local import LocalFleet
from codefleet.status import engine_look

pytestmark = pytest.mark.e2e

MODEL = "granite-code-tiny"


def counts(*urls: str) -> Counter[str]:
    """Cumulative: the router's requests by worker and decisions by outcome, the gateway's keys by outcome."""
    out: Counter[str] = Counter()
    for url in urls:
        for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for s in fam.samples:
                if s.name == "vllm_router_processed_requests_total":
                    out[f"worker:{s.labels['worker']}"] += s.value
                elif s.name == "vllm_router_prefix_routing_decisions_total":
                    out[f"decision:{s.labels['outcome']}"] += s.value
                elif s.name == "vllm_router_kv_routing_inputs_total":
                    out[f"inputs:{s.labels['result']}"] += s.value
                elif s.name == "codefleet_gateway_prefix_affinity_total" and s.labels["model"] == MODEL:
                    out[f"affinity:{s.labels['outcome']}"] += s.value
    return out


def delta(before: Counter[str], after: Counter[str]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def hit_rate(fleet: LocalFleet) -> tuple[float, float]:
    urls = [r.url for r in fleet.replicas if r.plan.name == MODEL and r.url]
    looks = [engine_look(httpx.get(u + "/metrics", timeout=10).text) for u in urls]
    return sum(x.prefix_hits or 0.0 for x in looks), sum(x.prefix_queries or 0.0 for x in looks)


class Front:
    """Where requests go (base URL and key) and where the counters are read."""

    def __init__(self, base: str, key: str, metrics: tuple[str, ...]) -> None:
        self.base, self.key, self.metrics = base, key, metrics

    def client(self, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.key, max_retries=0, timeout=timeout)


def side_router(fleet: LocalFleet, policy: str, log: Path) -> tuple[subprocess.Popen[bytes], RouterAdmin, int]:
    """A router of ``policy`` (codefleet's settings) in front of the fleet's two replicas of MODEL."""
    port, metrics = free_port(), free_port()
    proc = spawn(router_argv(fleet.python, policy, port, "127.0.0.1", metrics), router_env(Router(policy=policy)), log)
    admin = RouterAdmin(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while not admin.healthy():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    for r in fleet.replicas:
        if r.plan.name == MODEL and r.url:
            admin.add(r.url, MODEL)
    return proc, admin, metrics


@pytest.fixture(scope="module")
def endpoint(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """prefix_affinity as `codefleet up` runs it: a gateway with prefix affinity on in front of a
    sticky_least_loaded router, in front of the same two replicas (the e2e fleet runs round robin)."""
    fe = fleet.frontend
    assert fe is not None and fe.upstream_key
    d = tmp_path_factory.mktemp("prefix-affinity")
    proc, admin, metrics = side_router(fleet, "prefix_affinity", d / "router.log")
    gw_port, gw_metrics = free_port(), free_port()
    cfg = GatewayConfig(router_url=admin.url, models=(MODEL,), port=gw_port, metrics_port=gw_metrics,
                        affinity=gateway_affinity(Router(policy="prefix_affinity")))
    (d / "gateway.json").write_text(cfg.to_json())
    gw = spawn([fleet.python, "-m", "codefleet.gateway", "--config", str(d / "gateway.json")],
               {UPSTREAM_KEY_ENV: fe.upstream_key}, d / "gateway.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (d / "gateway.log").read_text()
            time.sleep(0.1)
        yield Front(f"http://127.0.0.1:{gw_port}", "unused", (f"http://127.0.0.1:{metrics}/metrics",
                                                              f"http://127.0.0.1:{gw_metrics}/metrics"))
        admin.close()
    finally:
        stop_group(gw.pid, grace=5)
        stop_group(proc.pid, grace=5)


@pytest.fixture(scope="module")
def cache_aware(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """A cache_aware router (codefleet's thresholds) in front of the same two replicas."""
    fe = fleet.frontend
    assert fe is not None and fe.upstream_key
    proc, admin, metrics = side_router(fleet, "cache_aware", tmp_path_factory.mktemp("cache-aware") / "router.log")
    try:
        yield Front(admin.url, fe.upstream_key, (f"http://127.0.0.1:{metrics}/metrics",))
        admin.close()
    finally:
        stop_group(proc.pid, grace=5)


def served_by(before: Counter[str], after: Counter[str]) -> str:
    moved = [k for k in after if k.startswith("worker:") and after[k] > before[k]]
    assert len(moved) == 1, f"one request, {len(moved)} workers counted it: {moved}"
    return moved[0]


def place_shared_prefixes(front: Front, fleet: LocalFleet, seed: int) -> tuple[dict[int, list[str]], dict[str, float],
                                                                                 float]:
    """6 long prefixes x 4 requests, one after another: where each went, the counters' deltas, the hit rate."""
    client = front.client()
    start = counts(*front.metrics)
    h0, q0 = hit_rate(fleet)
    where: dict[int, list[str]] = {}
    for group, prompt in shared_prefix_prompts(groups=6, per_group=4, prefix_words=300, seed=seed):
        before = counts(*front.metrics)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        where.setdefault(group, []).append(served_by(before, counts(*front.metrics)))
    h1, q1 = hit_rate(fleet)
    d = delta(start, counts(*front.metrics))
    print(f"\ncounters: {d}\nplacement: {where}\nengine prefix hits {(h1 - h0) / (q1 - q0):.1%}")
    return where, d, (h1 - h0) / (q1 - q0)


def test_prefix_affinity_keeps_each_prefix_where_it_is_cached(endpoint: Front, fleet: LocalFleet) -> None:
    where, d, hits = place_shared_prefixes(endpoint, fleet, seed=303)
    assert d.get("affinity:new") == 6 and d.get("affinity:prefix") == 18  # the gateway knew each prefix again
    for group, workers in where.items():
        assert len(set(workers)) == 1, f"prefix {group} went to {workers}"
    assert hits > 0.5  # the engines' own counters: the 300-word prefixes were found in the cache


def test_cache_aware_gets_tokens_and_keeps_each_prefix_where_it_is_cached(cache_aware: Front,
                                                                           fleet: LocalFleet) -> None:
    where, d, hits = place_shared_prefixes(cache_aware, fleet, seed=404)
    # the router had every prompt's token ids (the engines' render endpoints answered) ...
    assert d.get("inputs:preparation_rejected", 0) == 0 and d.get("decision:missing_tokens", 0) == 0
    assert d.get("decision:prefix_hit", 0) >= 6 * 3  # ... and matched every request after a prefix's first
    for group, workers in where.items():
        assert len(set(workers)) == 1, f"prefix {group} went to {workers}"
    assert hits > 0.5


@pytest.mark.parametrize("which", ["endpoint", "cache_aware"])
def test_concurrent_load_reaches_every_replica(which: str, request: pytest.FixtureRequest) -> None:
    """Distinct prompts at once: no replica idles while the other queues."""
    front: Front = request.getfixturevalue(which)
    client = front.client(timeout=120)
    rng = random.Random(7)
    prompts = [f"# job {i} {which}\n{code_context(rng, 150)}" for i in range(24)]
    before = counts(*front.metrics)

    def ask(p: str) -> str | None:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert all(f == "length" for f in pool.map(ask, prompts))
    per_worker = {k: v for k, v in delta(before, counts(*front.metrics)).items() if k.startswith("worker:")}
    print(f"\n{which}: requests per worker {per_worker}")
    assert len(per_worker) == 2 and min(per_worker.values()) >= 24 // 4, per_worker
