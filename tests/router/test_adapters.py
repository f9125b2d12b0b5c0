"""How an adapter's name reaches its base model's replicas through vllm-router 0.1.17's IGW mode,
shown on the real router and gateway over fake upstreams (which count the requests they get).

vllm-router keys workers by URL, one model id each: registering an engine's URL again under an
adapter's name takes it away from the base model. codefleet registers each (replica, adapter) at
an alias of the replica's URL (codefleet.lora.alias_url) that the router keeps as a worker of its
own and that reaches the same engine."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from codefleet.lora import alias_url
from tests.router.conftest import KEY, Fakes, start_fakes

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    f = start_fakes(tmp_path_factory.mktemp("adapters"), ("base", "other"), KEY, adapters={"base-team": "base"})
    try:
        f.add_upstream("base")
        f.add_upstream("base")
        f.add_upstream("other")
        yield f
    finally:
        f.stop()


def requests_seen(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("fake_requests_total")))


def chat(f: Fakes, model: str) -> httpx.Response:
    return httpx.post(f.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def workers(f: Fakes) -> list[tuple[str, str]]:
    return sorted((w["model_id"], w["url"]) for w in f.frontend.admin.workers())


def test_the_same_url_under_another_name_replaces_the_first(front: Fakes) -> None:
    """Why aliases: one model id per worker URL (re-registered, then put back). The name it was moved
    to keeps a stale entry for it in the router's model index (which is why codefleet never moves a
    URL between names), so this uses a name of its own."""
    (url, _), = front.upstreams["other"]
    front.frontend.admin.add(url, "scratch")
    try:
        assert ("other", url) not in workers(front) and ("scratch", url) in workers(front)
    finally:
        front.frontend.admin.add(url, "other")
    assert ("other", url) in workers(front)


def test_an_adapter_is_routed_to_its_base_models_replicas_only(front: Fakes) -> None:
    base_urls = [u for u, _ in front.upstreams["base"]]
    (other_url, _), = front.upstreams["other"]
    for u in base_urls:
        front.frontend.admin.add(alias_url(u, 1), "base-team")
    front.frontend.refresh_gateway()
    front.wait_ready("base-team", 2)
    assert ("base", base_urls[0]) in workers(front), "the base model keeps its workers"
    listed = {m["id"]: m for m in httpx.get(front.url + "/v1/models", headers=AUTH, timeout=5).json()["data"]}
    assert listed["base-team"]["parent"] == "base" and listed["base-team"]["ready_replicas"] == 2
    before = {u: requests_seen(u) for u in [*base_urls, other_url]}
    for _ in range(20):
        r = chat(front, "base-team")
        assert r.status_code == 200 and r.json()["model"] == "base-team", r.text
    got = {u: requests_seen(u) - before[u] for u in before}
    assert got[other_url] == 0, got
    assert sum(got[u] for u in base_urls) == 20 and all(got[u] > 0 for u in base_urls), got

    # one replica's alias leaves (the launcher unroutes before it unloads): no request goes there
    front.frontend.admin.remove(alias_url(base_urls[0], 1))
    front.frontend.refresh_gateway()
    front.wait_ready("base-team", 1)
    before = {u: requests_seen(u) for u in base_urls}
    for _ in range(6):
        assert chat(front, "base-team").status_code == 200
    assert requests_seen(base_urls[0]) == before[base_urls[0]]
    assert requests_seen(base_urls[1]) == before[base_urls[1]] + 6


def test_an_adapter_the_gateway_does_not_know_is_404(front: Fakes) -> None:
    r = chat(front, "base-nobody")
    assert r.status_code == 404 and "base-team" in r.text, r.text
