"""The one endpoint in front of the real fleet: OpenAI errors, API keys, metrics, registration."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    out: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def router_requests(fleet: LocalFleet) -> float:
    fe = fleet.frontend
    assert fe is not None
    samples = scrape(f"http://127.0.0.1:{fe.router_metrics_port}/metrics")
    return sum(v for k, v in samples.items() if k.startswith("vllm_router_requests_total"))


def post(fleet: LocalFleet, path: str, content: bytes, key: str | None = API_KEY,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(fleet.url + path, content=content, headers=h, timeout=30)


def test_unknown_model_is_an_openai_404_that_reaches_no_engine(fleet: LocalFleet) -> None:
    before = router_requests(fleet)
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.code == "model_not_found"
    assert "gpt-4o" in info.value.message and "granite-code-tiny" in info.value.message
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    assert router_requests(fleet) == before, "the unknown model reached the router"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "granite-code-tiny", "prompt": ', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"prompt": "x"}', 400, "missing_model"),
    (b'{"model": 7, "prompt": "x"}', 400, "missing_model"),
])
def test_malformed_requests_are_4xx_in_openai_shape(fleet: LocalFleet, body: bytes, status: int, code: str) -> None:
    resp = post(fleet, "/v1/completions", body)
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


def test_oversized_body_is_a_413(fleet: LocalFleet) -> None:
    big = b'{"model": "granite-code-tiny", "prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # max_body_mib: 1
    resp = post(fleet, "/v1/completions", big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_router_rejections_never_become_5xx(fleet: LocalFleet) -> None:
    """Bodies that pass the gateway but that vllm-router refuses keep a 4xx, wrapped in OpenAI's shape."""
    resp = post(fleet, "/v1/chat/completions", b'{"model": "granite-code-tiny", "messages": "not a list"}')
    assert 400 <= resp.status_code < 500, resp.text
    assert "error" in resp.json()
    resp = post(fleet, "/v1/embeddings", b'{"model": "granite-code-tiny", "input": "x"}')
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"


def test_requests_without_a_valid_key_get_401(fleet: LocalFleet) -> None:
    resp = httpx.post(fleet.url + "/v1/completions", json={"model": "granite-code-tiny", "prompt": "x"}, timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="granite-code-tiny", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_every_configured_key_works(fleet: LocalFleet) -> None:
    c = openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-second-key", max_retries=0)
    out = c.completions.create(model="granite-moe-tiny", prompt="x", max_tokens=2)
    assert out.choices[0].text is not None


def test_engines_refuse_requests_that_go_around_the_router(fleet: LocalFleet) -> None:
    """Engines listen on 127.0.0.1 and, with keys on, accept only the gateway's internal key."""
    r = fleet.replicas[0]
    assert r.url is not None and r.url.startswith("http://127.0.0.1:")
    body = {"model": r.plan.name, "prompt": "x", "max_tokens": 2}
    assert httpx.post(r.url + "/v1/completions", json=body, timeout=30).status_code == 401
    resp = httpx.post(r.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert resp.status_code == 401, "a client key must not open an engine directly"


def test_launcher_metrics(fleet: LocalFleet) -> None:
    m = scrape(f"http://127.0.0.1:{fleet.metrics_port}/metrics")
    for p in fleet.plan.models:
        assert m[f'codefleet_replicas_desired{{model="{p.name}"}}'] == p.placement.replicas
        assert m[f'codefleet_replicas_ready{{model="{p.name}"}}'] == p.placement.replicas
        assert m[f'codefleet_router_registrations_total{{action="add",model="{p.name}"}}'] >= p.placement.replicas
    assert any(k.startswith("codefleet_replica_startup_seconds{") and v > 0 for k, v in m.items())


def test_router_gateway_and_engine_metrics_are_scrapeable(fleet: LocalFleet) -> None:
    fe = fleet.frontend
    assert fe is not None
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0)
    client.completions.create(model="stable-code-tiny", prompt="x", max_tokens=2)
    router = scrape(f"http://127.0.0.1:{fe.router_metrics_port}/metrics")
    assert any(k.startswith("vllm_router_requests_total") for k in router)
    gateway = scrape(f"http://127.0.0.1:{fe.gateway_metrics_port}/metrics")
    assert gateway['codefleet_gateway_requests_total{model="stable-code-tiny",status="200"}'] >= 1
    for r in fleet.replicas:
        text = httpx.get(r.url + "/metrics", timeout=10).text
        assert re.search(rf'vllm:num_requests_running\{{[^}}]*model_name="{re.escape(r.plan.name)}"', text), r.name


def test_every_replica_is_registered_under_its_model(fleet: LocalFleet) -> None:
    fe = fleet.frontend
    assert fe is not None
    workers = {(w["url"], w["model_id"]) for w in fe.admin.workers()}
    assert workers == {(r.url, r.plan.name) for r in fleet.replicas}
