"""``codefleet frontend`` (the chart's frontend pod): engines found by DNS, registered with the real router.

A headless Service resolves to every ready pod's IP, all on the same port; here fake upstreams
listen on 127.0.0.2, 127.0.0.3, ... with one port, standing in for engine pods.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from codefleet.discovery import DnsRegistrar, Target, resolve_dns
from codefleet.manifest import Metrics, Router
from codefleet.metrics import FleetMetrics
from codefleet.procs import free_port, spawn, stop_group, wait_healthy
from codefleet.router import Frontend

UPSTREAM_KEY = "internal-test-key"


def start_pod(run_dir: Path, ip: str, port: int, model: str, adapters: str = "") -> int:
    log = run_dir / f"pod-{ip}.log"
    proc = spawn([sys.executable, "-m", "tests.support.fake_upstream", "--host", ip, "--port", str(port),
                  "--model", model, "--adapters", adapters], {}, log)
    wait_healthy(f"http://{ip}:{port}", 20, proc, log)
    return proc.pid


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[int, dict[str, int]]]:
    port = free_port()
    pgids: dict[str, int] = {}
    try:
        for ip, model in (("127.0.0.2", "alpha"), ("127.0.0.3", "alpha"), ("127.0.0.4", "beta")):
            pgids[ip] = start_pod(tmp_path, ip, port, model)
        yield port, pgids
    finally:
        for pgid in pgids.values():
            stop_group(pgid, grace=2)


def wait_for(cond, timeout: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_registrar_follows_dns_answers(tmp_path: Path, pods: tuple[int, dict[str, int]]) -> None:
    """New addresses are registered under their model, vanished ones removed, all again after a router restart."""
    port, _ = pods
    answers = {"alpha.llm.svc": {f"http://127.0.0.2:{port}"}, "beta.llm.svc": set()}
    fe = Frontend(Router(port=0), Metrics(launcher_port=0, gateway_port=0, router_port=0), ("alpha", "beta"),
                  tmp_path, sys.executable, say=lambda s: None)
    fe.start()
    metrics = FleetMetrics()
    try:
        reg = DnsRegistrar(fe, [Target(model="alpha", host="alpha.llm.svc", port=port),
                                Target(model="beta", host="beta.llm.svc", port=port)],
                           metrics, resolve=lambda host, _port: set(answers[host]), say=lambda s: None)

        def workers() -> dict[str, str]:
            return {w["url"]: w["model_id"] for w in fe.admin.workers()}

        reg.sync()
        assert workers() == {f"http://127.0.0.2:{port}": "alpha"}
        answers["alpha.llm.svc"].add(f"http://127.0.0.3:{port}")
        answers["beta.llm.svc"].add(f"http://127.0.0.4:{port}")
        reg.sync()
        assert workers() == {f"http://127.0.0.2:{port}": "alpha", f"http://127.0.0.3:{port}": "alpha",
                             f"http://127.0.0.4:{port}": "beta"}
        with openai.OpenAI(base_url=fe.url + "/v1", api_key="unused") as client:
            assert client.completions.create(model="beta", prompt="x", max_tokens=2).model == "beta"
        # A pod fails its readiness probe: Kubernetes drops it from the answer.
        answers["alpha.llm.svc"].discard(f"http://127.0.0.2:{port}")
        reg.sync()
        assert set(workers()) == {f"http://127.0.0.3:{port}", f"http://127.0.0.4:{port}"}
        assert metrics.replicas_ready.labels("alpha")._value.get() == 1
        # The router dies: restarted and every worker registered again.
        assert fe.router_proc is not None
        os.killpg(fe.router_proc.pid, signal.SIGKILL)
        fe.router_proc.wait()
        reg.sync()
        assert set(workers()) == {f"http://127.0.0.3:{port}", f"http://127.0.0.4:{port}"}
        assert metrics.component_restarts.labels("router")._value.get() == 1
    finally:
        metrics.close()
        fe.stop()


def test_resolve_dns_gives_worker_urls() -> None:
    assert resolve_dns("127.0.0.5", 8000) == {"http://127.0.0.5:8000"}
    assert resolve_dns("no-such-service.invalid", 8000) == set()


def test_frontend_command_serves_the_pods(tmp_path: Path, pods: tuple[int, dict[str, int]]) -> None:
    """The pod's command with a config shaped like the chart's: models answer, keys enforced, SIGTERM stops all."""
    port, _ = pods
    (tmp_path / "keys").write_text("# client keys\nsk-client-one\n")
    gateway_port = free_port()
    cfg = {
        "router": {"host": "127.0.0.1", "port": gateway_port, "policy": "cache_aware", "max_body_mib": 1,
                   "api_keys": {"file": str(tmp_path / "keys")}},
        "metrics": {"host": "127.0.0.1", "launcher_port": free_port(), "gateway_port": 0, "router_port": 0},
        "targets": [{"model": "alpha", "host": "127.0.0.2", "port": port, "replicas": 2},
                    {"model": "alpha", "host": "127.0.0.3", "port": port, "replicas": 2},
                    {"model": "beta", "host": "127.0.0.4", "port": port, "replicas": 1}],
        "interval": 0.5,
    }
    (tmp_path / "frontend.json").write_text(json.dumps(cfg))
    log = open(tmp_path / "frontend.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "codefleet.cli", "frontend", "--config", str(tmp_path / "frontend.json"),
                             "--run-dir", str(tmp_path / "run")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "CODEFLEET_UPSTREAM_KEY": UPSTREAM_KEY}, start_new_session=True)
    base = f"http://127.0.0.1:{gateway_port}"
    try:
        def registered() -> bool:
            try:
                return httpx.post(f"{base}/v1/completions", timeout=5,
                                   headers={"Authorization": "Bearer sk-client-one"},
                                   json={"model": "beta", "prompt": "x", "max_tokens": 1}).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(registered, 60, "beta to answer through the frontend; log:\n" + (tmp_path / "frontend.log").read_text())
        with openai.OpenAI(base_url=base + "/v1", api_key="sk-client-one") as client:
            assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]
            for model in ("alpha", "beta"):
                for _ in range(4):
                    assert client.completions.create(model=model, prompt="def f():", max_tokens=3).model == model
        with openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong") as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        text = httpx.get(f"http://127.0.0.1:{cfg['metrics']['launcher_port']}/metrics", timeout=2).text
        assert 'codefleet_replicas_desired{model="alpha"} 2.0' in text
        assert 'codefleet_router_registrations_total{action="add",model="alpha"} 2.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            stop_group(proc.pid, grace=2)
            log.close()
    assert proc.returncode == 0, (tmp_path / "frontend.log").read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/health", timeout=1)


def test_frontend_file_gives_the_frontend_settings(tmp_path: Path) -> None:
    """What `codefleet frontend` builds its router and gateway from: the same FrontendSettings as
    `codefleet up`; a hold is the gateway's Hold (validated; no requests held: no hold)."""
    from codefleet.discovery import FrontendConfig
    from codefleet.gateway.config import COLD_START_S, Hold

    cfg = FrontendConfig.model_validate({
        "router": {"port": 0}, "metrics": {"launcher_port": 0, "gateway_port": 0, "router_port": 0},
        "targets": [{"model": "alpha", "host": "a", "hold": {"max_requests": 4, "timeout_s": 30}, "max_waiting": 9},
                    {"model": "beta", "host": "b", "hold": {"max_requests": 0, "timeout_s": 30}},
                    {"model": "alpha", "host": "a2"}],
        "drain_seconds": 42})
    s = cfg.settings(tmp_path)
    assert s.models == ("alpha", "beta") and s.hold == {"alpha": Hold(4, 30, COLD_START_S)}
    assert s.shed == {"alpha": 9} and s.drain_s == 42 and s.manifest_dir == tmp_path
    fe = Frontend.from_settings(s, tmp_path, sys.executable, upstream_key=UPSTREAM_KEY)
    assert fe.gateway_config().hold == s.hold and fe.engine_env == {"VLLM_API_KEY": UPSTREAM_KEY}
    with pytest.raises(ValueError, match="max_requests"):
        FrontendConfig.model_validate({**cfg.model_dump(), "targets": [
            {"model": "alpha", "host": "a", "hold": {"max_requests": -1, "timeout_s": 30}}]})


def test_registrar_routes_each_adapter_to_the_pods_that_have_it(tmp_path: Path) -> None:
    """The chart's pods load their adapters before they are ready: each resolved pod is a worker of
    its model and, at an alias of its address, of each adapter its own /v1/models lists. A pod still
    on an older list (a rollout that adds an adapter) is not routed the new one."""
    from codefleet.lora import alias_url

    port = free_port()
    pgids = [start_pod(tmp_path, "127.0.0.2", port, "alpha", "alpha-a,alpha-b"),
             start_pod(tmp_path, "127.0.0.3", port, "alpha", "alpha-a")]
    pod2, pod3 = f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"
    answers = {"alpha.llm.svc": {pod2, pod3}, "beta.llm.svc": set()}
    fe = Frontend(Router(port=0), Metrics(launcher_port=0, gateway_port=0, router_port=0), ("alpha", "beta"),
                  tmp_path, sys.executable, say=lambda s: None, adapters={"alpha-a": "alpha", "alpha-b": "alpha"})
    fe.start()
    metrics = FleetMetrics()
    try:
        reg = DnsRegistrar(fe, [Target(model="alpha", host="alpha.llm.svc", port=port, adapters=["alpha-a", "alpha-b"]),
                                Target(model="beta", host="beta.llm.svc", port=port)],
                           metrics, resolve=lambda host, _port: set(answers[host]), say=lambda s: None)
        reg.sync()
        got = sorted((w["model_id"], w["url"]) for w in fe.admin.workers())
        assert got == sorted([("alpha", pod2), ("alpha", pod3), ("alpha-a", alias_url(pod2, 1)),
                              ("alpha-b", alias_url(pod2, 2)), ("alpha-a", alias_url(pod3, 1))]), got
        fe.refresh_gateway()
        with openai.OpenAI(base_url=fe.url + "/v1", api_key="unused", max_retries=3) as client:
            assert client.completions.create(model="alpha-b", prompt="x", max_tokens=2).model == "alpha-b"
            listed = {m.id: (m.model_extra or {}).get("parent") for m in client.models.list().data}
        assert listed == {"alpha": None, "beta": None, "alpha-a": "alpha", "alpha-b": "alpha"}
        # a pod leaves DNS: its adapters' workers go with it
        answers["alpha.llm.svc"].discard(pod2)
        reg.sync()
        assert sorted((w["model_id"], w["url"]) for w in fe.admin.workers()) == \
            sorted([("alpha", pod3), ("alpha-a", alias_url(pod3, 1))])
    finally:
        metrics.close()
        fe.stop()
        for pgid in pgids:
            stop_group(pgid, grace=2)
