"""A replica killed mid-stream cuts no stream: the gateway continues each of its streams on the other
replica (gateway/migrate.py). Real engines (the trained model, two replicas), the real router, the
official openai client; the gateway's own counter says how many streams were continued."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from codefleet.runtime.local import LocalFleet
from codefleet.runtime.replica import Replica
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Write a Python function named {name} that returns the {what} of a list of numbers, with a docstring."
           for name, what in [("total", "sum"), ("average", "mean"), ("middle", "median"), ("spread", "variance"),
                              ("largest", "maximum"), ("smallest", "minimum"), ("product", "product"),
                              ("span", "range")]]
MAX_TOKENS = 120


def client(fleet: LocalFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def gateway_migrations(fleet: LocalFleet) -> dict[str, float]:
    assert fleet.frontend is not None
    text = httpx.get(f"http://127.0.0.1:{fleet.frontend.gateway_metrics_port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("codefleet_gateway_migrations_total{") and f'model="{MODEL}"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def running(r: Replica) -> float:
    assert r.url is not None
    text = httpx.get(r.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


def stream(fleet: LocalFleet, prompt: str, out: dict[str, Any], chunks: threading.Event | None = None,
           **kw: Any) -> None:
    s = client(fleet).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=kw.pop("max_tokens", MAX_TOKENS), temperature=0, stream=True,
                                         stream_options={"include_usage": True}, **kw)
    parts: list[str] = []
    finish = usage = None
    try:
        for c in s:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
                if chunks is not None and len(parts) == 20:
                    chunks.set()
            if c.usage is not None:
                usage = c.usage
    except openai.APIError as exc:
        out["error"] = exc
    out.update(text="".join(parts), finish=finish, usage=usage)


def run_all(fleet: LocalFleet, prompts: list[str], kill_replica: list[Replica] | None = None
            ) -> list[dict[str, Any]]:
    outs: list[dict[str, Any]] = [{} for _ in prompts]
    events = [threading.Event() for _ in prompts]
    threads = [threading.Thread(target=stream, args=(fleet, p, o, e)) for p, o, e in zip(prompts, outs, events, strict=True)]
    for t in threads:
        t.start()
    if kill_replica is not None:
        for e in events:
            assert e.wait(300), "a stream sent no 20 chunks"
        victim = max(kill_replica, key=running)  # the replica with the most streams on it
        assert running(victim) > 0
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(600)
    return outs


def wait_back(replicas: list[Replica], restarts: int) -> None:
    """Until the replicas have restarted ``restarts`` times in all and each is registered again."""
    deadline = time.monotonic() + 420
    while not (sum(r.restarts for r in replicas) >= restarts and all(r.registered for r in replicas)):
        assert time.monotonic() < deadline, "a killed replica was not restarted and registered again in 420 s"
        time.sleep(0.5)


def test_a_killed_replicas_streams_continue_on_the_other_with_the_same_text(fleet: LocalFleet) -> None:
    replicas = [r for r in fleet.replicas if r.plan.name == MODEL]
    assert len(replicas) == 2
    restarts = sum(r.restarts for r in replicas)
    reference = run_all(fleet, PROMPTS)
    assert all(o["finish"] and "error" not in o for o in reference)
    before = gateway_migrations(fleet)
    got = run_all(fleet, PROMPTS, kill_replica=replicas)
    after = gateway_migrations(fleet)
    continued = after.get("continued", 0) - before.get("continued", 0)
    print(f"\nmigration: {continued:.0f} of 8 streams continued on the other replica; gateway {after}")
    assert continued >= 1, "the kill continued no stream (no stream was on the killed replica?)"
    for ref, o in zip(reference, got, strict=True):
        assert "error" not in o, f"a stream ended with an error: {o['error']!r}"
        assert o["finish"] in ("stop", "length"), "a stream ended without its finish_reason"
        # greedy: the continued text is the uninterrupted text, no word lost or repeated; usage counts
        # the prompt once and every generated token once (the moved tokens as completion tokens)
        assert o["text"] == ref["text"]
        assert o["usage"].prompt_tokens == ref["usage"].prompt_tokens
        assert o["usage"].completion_tokens == ref["usage"].completion_tokens
    wait_back(replicas, restarts + 1)


def test_a_client_that_leaves_during_the_continuation_frees_the_other_engine(fleet: LocalFleet) -> None:
    replicas = [r for r in fleet.replicas if r.plan.name == MODEL]
    restarts = sum(r.restarts for r in replicas)
    before = gateway_migrations(fleet).get("continued", 0)
    s = client(fleet).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True})
    it = iter(s)
    for _ in range(20):
        next(it)
    victim = max(replicas, key=running)
    survivor = next(r for r in replicas if r is not victim)
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    for _ in range(20):  # the continuation's chunks arrive
        next(it)
    assert gateway_migrations(fleet).get("continued", 0) == before + 1
    assert running(survivor) >= 1
    s.close()  # the client leaves
    deadline = time.monotonic() + 10
    while running(survivor) > 0:
        assert time.monotonic() < deadline, "the surviving engine still runs the continuation 10 s after the client left"
        time.sleep(0.1)
    wait_back(replicas, restarts + 1)


def test_with_no_other_replica_the_stream_ends_with_the_error_event(fleet: LocalFleet) -> None:
    model = "stable-code-tiny"
    (replica,) = [r for r in fleet.replicas if r.plan.name == model]
    restarts = replica.restarts
    s = client(fleet).completions.create(model=model, prompt="def f(x):", max_tokens=1500, stream=True,
                             extra_body={"ignore_eos": True})
    it = iter(s)
    for _ in range(5):
        next(it)
    assert replica.proc is not None
    os.killpg(replica.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for _ in it:
            pass
    waited = time.monotonic() - t0
    # within the fleet's migration.timeout_s (10 s in tests/e2e/fleet.yaml) no replica took it
    assert "interrupted" in str(err.value) and waited < 30, (err.value, waited)
    wait_back([replica], restarts + 1)
