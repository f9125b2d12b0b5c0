"""The real front (vllm-router + gateway) over fast fake upstreams: routing logic, faults, load.

The fakes stand in for engines only here, where the layers in front of an engine are under test.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from codefleet.gateway.config import Hold
from codefleet.gateway.metrics import READY
from codefleet.manifest import ApiKeys, Metrics, Router, Tenant
from codefleet.procs import free_port, spawn, stop_group, wait_healthy
from codefleet.router import Frontend

KEY = "sk-router-test"


@dataclass
class Fakes:
    frontend: Frontend
    run_dir: Path
    upstreams: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # model -> [(url, pgid)]

    @property
    def url(self) -> str:
        return self.frontend.url

    def add_upstream(self, model: str, *args: str) -> str:
        port = free_port()
        log = self.run_dir / f"fake-{model}-{port}.log"
        proc = spawn([sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), "--model", model, *args],
                     {}, log)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 20, proc, log)
        self.frontend.admin.add(url, model)
        # as the launcher does on a registration: the gateway reads the router's workers now (else a
        # request in the next poll interval finds the model without a worker and gets 503)
        self.frontend.refresh_gateway()
        self.upstreams.setdefault(model, []).append((url, proc.pid))
        self.wait_ready(model, len(self.upstreams[model]))
        return url

    def wait_ready(self, model: str, n: int, timeout: float = 10) -> None:
        """Until the gateway has seen ``n`` workers of ``model`` in the router (its own gauge)."""
        deadline = time.monotonic() + timeout
        while (seen := self.gateway_ready(model)) != n:
            assert time.monotonic() < deadline, f"the gateway saw {seen} workers of {model}, not {n}"
            time.sleep(0.05)

    def gateway_ready(self, model: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.frontend.gateway_metrics_port}/metrics", timeout=5).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == READY and s.labels.get("model") == model:
                    return s.value
        return 0.0

    def stop(self) -> None:
        for ups in self.upstreams.values():
            for _, pgid in ups:
                stop_group(pgid, grace=2)
        self.frontend.stop()


def start_fakes(run_dir: Path, models: tuple[str, ...], keys: str | None, monkeypatch: pytest.MonkeyPatch | None = None,
                max_body_mib: int = 1, hold: dict[str, Hold] | None = None,
                tenants: dict[str, Tenant] | None = None, adapters: dict[str, str] | None = None) -> Fakes:
    api_keys = None
    if keys is not None:
        key_file = run_dir / "keys.txt"
        key_file.write_text(f"# test keys\n{keys}\n")
        api_keys = ApiKeys(file=str(key_file))
    fe = Frontend(Router(port=0, api_keys=api_keys, max_body_mib=max_body_mib),
                  Metrics(launcher_port=0, gateway_port=0, router_port=0), models, run_dir, sys.executable,
                  hold=hold or {}, tenants=tenants or {}, adapters=adapters or {})
    fe.start()
    return Fakes(fe, run_dir)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    f = start_fakes(tmp_path_factory.mktemp("front"), ("alpha", "beta", "empty"), KEY)
    try:
        f.add_upstream("alpha")
        f.add_upstream("beta")
        yield f
    finally:
        f.stop()
