"""The real front (vllm-router + gateway) over fast fake upstreams: routing logic, faults, load.

The fakes stand in for engines only here, where the layers in front of an engine are under test.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from codefleet.gateway.config import Hold
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
        time.sleep(0.3)
        self.upstreams.setdefault(model, []).append((url, proc.pid))
        return url

    def stop(self) -> None:
        for ups in self.upstreams.values():
            for _, pgid in ups:
                stop_group(pgid, grace=2)
        self.frontend.stop()


def start_fakes(run_dir: Path, models: tuple[str, ...], keys: str | None, monkeypatch: pytest.MonkeyPatch | None = None,
                max_body_mib: int = 1, hold: dict[str, Hold] | None = None,
                tenants: dict[str, Tenant] | None = None) -> Fakes:
    api_keys = None
    if keys is not None:
        key_file = run_dir / "keys.txt"
        key_file.write_text(f"# test keys\n{keys}\n")
        api_keys = ApiKeys(file=str(key_file))
    fe = Frontend(Router(port=0, api_keys=api_keys, max_body_mib=max_body_mib),
                  Metrics(launcher_port=0, gateway_port=0, router_port=0), models, run_dir, sys.executable,
                  hold=hold or {}, tenants=tenants or {})
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
