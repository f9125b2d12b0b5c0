"""Prefix routing through the endpoint, read from vllm-router's and the engines' own counters.

The e2e fleet's default policy, cache_aware, gets each prompt's token ids from the engines' render
endpoints (they start with ``--enable-scale-out``) and sends a prompt to the replica that already
holds its prefix. Two ways it can silently stop, each a test here: the router gets no tokens (it
then routes on load alone and, with sequential traffic, everything lands on one replica; the
router counts such decisions ``missing_tokens``), or the balance thresholds let one replica take
all the traffic while another idles.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.workloads import code_context, shared_prefix_prompts
from codefleet.runtime.local import LocalFleet
from codefleet.status import engine_look
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

MODEL = "granite-code-tiny"


def router_counts(fleet: LocalFleet) -> Counter[str]:
    """The router's decisions by outcome, token inputs by result, requests by worker (cumulative)."""
    fe = fleet.frontend
    assert fe is not None
    out: Counter[str] = Counter()
    text = httpx.get(f"http://127.0.0.1:{fe.router_metrics_port}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm_router_prefix_routing_decisions_total":
                out[f"decision:{s.labels['outcome']}"] += s.value
            elif s.name == "vllm_router_kv_routing_inputs_total":
                out[f"inputs:{s.labels['result']}"] += s.value
            elif s.name == "vllm_router_processed_requests_total":
                out[f"worker:{s.labels['worker']}"] += s.value
    return out


def prefix_counters(fleet: LocalFleet) -> tuple[float, float]:
    urls = [r.url for r in fleet.replicas if r.plan.name == MODEL and r.url]
    looks = [engine_look(httpx.get(u + "/metrics", timeout=10).text) for u in urls]
    return sum(x.prefix_hits or 0.0 for x in looks), sum(x.prefix_queries or 0.0 for x in looks)


def served_by(before: Counter[str], after: Counter[str]) -> str:
    moved = [k for k in after if k.startswith("worker:") and after[k] > before[k]]
    assert len(moved) == 1, f"one request, {len(moved)} workers counted it: {moved}"
    return moved[0]


def test_requests_sharing_a_prefix_go_where_it_is_cached(fleet: LocalFleet) -> None:
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    start = router_counts(fleet)
    h0, q0 = prefix_counters(fleet)
    where: dict[int, list[str]] = {}
    for group, prompt in shared_prefix_prompts(groups=6, per_group=4, prefix_words=300, seed=303):
        before = router_counts(fleet)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        where.setdefault(group, []).append(served_by(before, router_counts(fleet)))
    end = router_counts(fleet)
    h1, q1 = prefix_counters(fleet)
    delta = {k: end[k] - start[k] for k in end if end[k] != start[k]}
    print(f"\nrouter: {delta}\nplacement: {where}\nengine prefix hits {(h1 - h0) / (q1 - q0):.1%}")
    # the router had every prompt's tokens and matched them against what it sent where
    assert delta.get("inputs:preparation_rejected", 0) == 0 and delta.get("decision:missing_tokens", 0) == 0
    assert delta.get("decision:prefix_hit", 0) >= 6 * 3  # every request after a prefix's first
    # ... and each prefix stayed on the replica that first computed it
    for group, workers in where.items():
        assert len(set(workers)) == 1, f"prefix {group} went to {workers}"
    # the engines' own counters: the 300-word prefixes were found in the cache
    assert (h1 - h0) / (q1 - q0) > 0.5


def test_concurrent_load_reaches_every_replica(fleet: LocalFleet) -> None:
    """Distinct prompts at once: the balance thresholds spread them (no replica idles while one queues)."""
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    import random

    rng = random.Random(7)
    prompts = [f"# job {i}\n{code_context(rng, 150)}" for i in range(24)]
    before = router_counts(fleet)

    def ask(p: str) -> str | None:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert all(f == "length" for f in pool.map(ask, prompts))
    after = router_counts(fleet)
    per_worker = {k: after[k] - before[k] for k in after if k.startswith("worker:")}
    per_worker = {k: v for k, v in per_worker.items() if v}
    print(f"\nper worker: {per_worker}")
    assert len(per_worker) == 2, per_worker
    assert min(per_worker.values()) >= 24 // 4, per_worker
