"""Scale from zero at the endpoint: requests for a model with no replica are held (bounded, timed),
released in order when a replica is registered, and refused with a Retry-After beyond the bounds.
The real router and gateway; fake upstreams stand in for the replica that arrives."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codefleet.gateway.config import Hold
from tests.router.conftest import KEY, Fakes, start_fakes


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    hold = {"cold": Hold(8, 60, 5), "full": Hold(2, 60, 2), "late": Hold(4, 1, 5)}
    f = start_fakes(tmp_path_factory.mktemp("hold"), ("cold", "full", "late"), KEY, hold=hold)
    try:
        yield f
    finally:
        f.stop()


def gateway_metrics(f: Fakes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{f.frontend.gateway_metrics_port}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(f: Fakes, name: str, **labels: str) -> float:
    return gateway_metrics(f).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond: Any, what: str, timeout: float = 20) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def ask(url: str, model: str, stream: bool, retries: int = 0) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=retries, timeout=60)
    if stream:
        chunks = list(c.completions.create(model=model, prompt="x", max_tokens=4, stream=True))
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)
    return c.completions.create(model=model, prompt="x", max_tokens=4).choices[0].text


def ready_replicas(f: Fakes) -> dict[str, Any]:
    return {m.id: (m.model_extra or {}).get("ready_replicas")
            for m in openai.OpenAI(base_url=f.url + "/v1", api_key=KEY).models.list()}


def test_held_requests_go_when_a_replica_registers(fakes: Fakes) -> None:
    # /v1/models says which models have no replica (what `codefleet smoke` skips rather than wakes),
    # once the gateway has read the router's worker list (every 0.2 s until the router first answers)
    wait_for(lambda: ready_replicas(fakes)["cold"] is not None, "the gateway's first look at the router", 10)
    assert ready_replicas(fakes)["cold"] == 0
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = []
        for i in range(6):  # one at a time, so that the arrival order is known
            futures.append(pool.submit(ask, fakes.url, "cold", stream=i % 2 == 1))
            wait_for(lambda n=i + 1: metric(fakes, "codefleet_gateway_held_requests", model="cold") == n,
                     f"{i + 1} held")
        time.sleep(0.5)
        assert not any(f.done() for f in futures), "a request was answered with no replica"
        t0 = time.monotonic()
        fakes.add_upstream("cold")
        answers = [f.result(timeout=30) for f in futures]
        released_in = time.monotonic() - t0
    assert answers == ["xxxx"] * 6
    assert ready_replicas(fakes)["cold"] == 1
    assert metric(fakes, "codefleet_gateway_hold_total", model="cold", outcome="released") == 6
    assert metric(fakes, "codefleet_gateway_held_requests", model="cold") == 0
    assert metric(fakes, "codefleet_gateway_hold_seconds_count", model="cold") == 6
    print(f"6 held requests answered {released_in:.2f} s after the replica was registered")


def test_full_queue_answers_503_with_retry_after_and_the_sdk_retry_succeeds(fakes: Fakes) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(ask, fakes.url, "full", False) for _ in range(2)]
        wait_for(lambda: metric(fakes, "codefleet_gateway_held_requests", model="full") == 2, "2 held")
        r = httpx.post(fakes.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "full", "prompt": "x", "max_tokens": 4})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_starting"
        assert 1 <= int(r.headers["retry-after"]) <= 2, r.headers  # the configured 2 s cold start, less the wait
        # the SDK's default retries honour Retry-After: refused while the queue is full, then served
        sdk = pool.submit(ask, fakes.url, "full", False, 2)
        wait_for(lambda: metric(fakes, "codefleet_gateway_hold_total", model="full", outcome="overflow") >= 2,
                 "the SDK's first attempt refused")
        fakes.add_upstream("full")
        assert [f.result(timeout=30) for f in held] == ["xxxx"] * 2
        assert sdk.result(timeout=30) == "xxxx"


def test_hold_timeout_answers_503_with_retry_after(fakes: Fakes) -> None:
    t0 = time.monotonic()
    r = httpx.post(fakes.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "late", "messages": [{"role": "user", "content": "x"}], "stream": True},
                   timeout=30)
    waited = time.monotonic() - t0
    assert r.status_code == 503 and "hold timeout" in r.json()["error"]["message"], r.text
    assert int(r.headers["retry-after"]) >= 1
    assert waited >= 1.0, waited  # held for its 1 s first
    assert metric(fakes, "codefleet_gateway_hold_total", model="late", outcome="timeout") == 1


def test_a_client_that_leaves_while_held_is_not_forwarded(fakes: Fakes) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fakes.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "late", "prompt": "x"}, timeout=0.3)
    wait_for(lambda: metric(fakes, "codefleet_gateway_hold_total", model="late", outcome="gone") == 1, "gone")
    assert metric(fakes, "codefleet_gateway_held_requests", model="late") == 0


def test_a_stopping_fleet_answers_held_requests_at_once(tmp_path: Path) -> None:
    f = start_fakes(tmp_path, ("cold",), KEY, hold={"cold": Hold(8, 60, 5)})
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(httpx.post, f.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "cold", "prompt": "x"}, timeout=30)
            wait_for(lambda: metric(f, "codefleet_gateway_held_requests", model="cold") == 1, "1 held")
            assert f.frontend.gateway_proc is not None
            os.kill(f.frontend.gateway_proc.pid, signal.SIGUSR2)  # what Fleet.stop sends
            r = fut.result(timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        r = httpx.post(f.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "cold", "prompt": "x"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
    finally:
        f.stop()
