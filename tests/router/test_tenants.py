"""Admission per tenant through the real gateway and router (fake upstreams): keys to tenants,
401/403/429 with OpenAI's headers, usage counted from every answer (a stream's usage asked of the
upstream and kept from a client that did not ask), a reload, `codefleet usage`'s reader."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from codefleet.manifest import ApiKeys, Metrics, Router, Tenant
from codefleet.router import Frontend
from codefleet.status import tenant_usage
from tests.router.conftest import KEY, Fakes, start_fakes

A, B = "sk-team-a-0001", "sk-team-b-0002"
TENANTS = {"team-a": Tenant(requests_per_minute=6, models=["alpha"]), "team-b": Tenant(max_concurrent=4),
           "default": Tenant()}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    f = start_fakes(tmp_path_factory.mktemp("tenants"), ("alpha", "beta"), f"team-a:{A}\nteam-b:{B}\n{KEY}",
                    tenants=TENANTS)
    try:
        f.add_upstream("alpha")
        f.add_upstream("beta")
        yield f
    finally:
        f.stop()


def post(f: Fakes, key: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=30)


def usage(f: Fakes) -> dict[tuple[str, str], dict[str, float]]:
    return tenant_usage(httpx.get(f"http://127.0.0.1:{f.frontend.gateway_metrics_port}/metrics").text)


def test_unknown_key_401_and_a_model_the_tenant_may_not_use_403(fakes: Fakes) -> None:
    r = post(fakes, "sk-nobody", {"model": "alpha", "prompt": "x"})
    assert r.status_code == 401
    r = post(fakes, A, {"model": "beta", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", r.text
    assert r.json()["error"]["param"] == "model"


def test_request_rate_429_with_openai_headers(fakes: Fakes) -> None:
    codes = [post(fakes, A, {"model": "alpha", "prompt": "x", "max_tokens": 1}).status_code for _ in range(6)]
    assert codes == [200] * 6
    r = post(fakes, A, {"model": "alpha", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "requests-per-minute" in r.json()["error"]["message"]
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "6" and h["x-ratelimit-remaining-requests"] == "0"
    # the next request in 10 s (6 a minute) less what has refilled while the 6 were answered
    assert 5000 <= int(h["retry-after-ms"]) <= 10000, h
    assert h["retry-after"] == str(-(-int(h["retry-after-ms"]) // 1000))
    assert usage(fakes)[("team-a", "alpha")]["rejected"] >= 1


def test_usage_counted_from_every_answer_and_kept_from_streams_that_did_not_ask(fakes: Fakes) -> None:
    before = usage(fakes).get(("team-b", "beta"), {"prompt": 0.0, "completion": 0.0})
    c = openai.OpenAI(base_url=fakes.url + "/v1", api_key=B, max_retries=0)
    r = c.completions.create(model="beta", prompt="x", max_tokens=5)
    assert r.usage is not None and r.usage.completion_tokens == 5
    chunks = list(c.completions.create(model="beta", prompt="x", max_tokens=7, stream=True))
    assert all(ch.usage is None for ch in chunks), "the client did not ask for usage: it gets none"
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "x" * 7
    asked = list(c.completions.create(model="beta", prompt="x", max_tokens=3, stream=True,
                                      stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 3  # asked: kept
    after = usage(fakes)[("team-b", "beta")]
    assert after["completion"] - before["completion"] == 5 + 7 + 3
    assert after["prompt"] - before["prompt"] == 3  # the fake counts one prompt token a request


def test_reload_changes_limits_without_a_restart(fakes: Fakes) -> None:
    fakes.frontend.reload_gateway({**TENANTS, "team-b": Tenant(max_concurrent=4, models=["alpha"])})
    for _ in range(50):
        r = post(fakes, B, {"model": "beta", "prompt": "x", "max_tokens": 1})
        if r.status_code == 403:
            break
    assert r.status_code == 403, "the reloaded limits did not take effect"
    fakes.frontend.reload_gateway(TENANTS)
    for _ in range(50):
        r = post(fakes, B, {"model": "beta", "prompt": "x", "max_tokens": 1})
        if r.status_code == 200:
            break
    assert r.status_code == 200
    log = (fakes.run_dir / "logs" / "gateway.log").read_text()
    assert "reloaded 3 keys, 3 tenants" in log
    assert A not in log and B not in log and A not in (fakes.run_dir / "gateway.json").read_text()


def test_a_bad_reload_keeps_the_running_configuration(fakes: Fakes) -> None:
    cfg = fakes.run_dir / "gateway.json"
    good = cfg.read_text()
    try:
        data = json.loads(good)
        data["key_tenants"] = {"zz-not-hex": "team-a"}
        cfg.write_text(json.dumps(data))
        assert fakes.frontend.gateway_proc is not None
        os.kill(fakes.frontend.gateway_proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert post(fakes, B, {"model": "beta", "prompt": "x", "max_tokens": 1}).status_code == 200
        assert "reload of" in (fakes.run_dir / "logs" / "gateway.log").read_text()
    finally:
        cfg.write_text(good)


def test_overload_sheds_the_tenant_over_its_fair_share(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A model whose engines hold more waiting requests than its max_waiting: the flooding tenant's
    next request gets 429 with a Retry-After; another tenant, below its fair share, gets in."""
    run = tmp_path_factory.mktemp("shed")
    (run / "keys.txt").write_text(f"team-a:{A}\nteam-b:{B}\n")
    fe = Frontend(Router(port=0, api_keys=ApiKeys(file=str(run / "keys.txt"))),
                  Metrics(launcher_port=0, gateway_port=0, router_port=0), ("slow",), run, sys.executable,
                  tenants={"team-a": Tenant(), "team-b": Tenant()}, shed={"slow": 1})
    fe.start()
    f = Fakes(fe, run)
    try:
        f.add_upstream("slow", "--token-delay-ms", "500", "--capacity", "2")
        body = {"model": "slow", "prompt": "x", "max_tokens": 40}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            flood = [pool.submit(post, f, A, body) for _ in range(5)]  # 20 s each; 3 beyond capacity 2
            for _ in range(20):  # the gateway reads the queue every second
                time.sleep(0.25)
                r = post(f, A, body | {"max_tokens": 1})
                if r.status_code == 429:
                    break
            assert r.status_code == 429 and r.json()["error"]["code"] == "model_overloaded", \
                (r.text, httpx.get(fe.router_url + "/workers").text, [x.result().text for x in flood if x.done()])
            assert 1 <= int(r.headers["retry-after"]) <= 60 and "waiting in its engines" in r.json()["error"]["message"]
            other = post(f, B, body | {"max_tokens": 1})
            assert other.status_code == 200, "a tenant with nothing in flight is under its fair share"
            answers = [x.result() for x in flood]
            assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert usage(f)[("team-a", "slow")]["rejected"] == 1  # only the one over the limit
    finally:
        f.stop()
