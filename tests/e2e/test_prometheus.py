"""A real Prometheus scraping the real fleet: every target up, every dashboard query answers per model.

Prometheus (the Debian package `make test` installs) runs on 127.0.0.1 with the scrape config and
rules `codefleet prometheus-config` writes, scraping every second. Traffic goes to every model
through the endpoint; then each of ``observability.QUERIES`` (what the dashboard panels run) and
the recording rules must return a series for every model, through Prometheus's HTTP query API.
Also: `codefleet status` shows the live figures read from the engines.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from codefleet.cli import main as cli_main
from codefleet.manifest import load
from codefleet.observability import QUERIES, RECORDING, RULES_FILE, alert_rules_yaml, scrape_config_yaml
from codefleet.procs import free_port, spawn, stop_group
from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY, FLEET

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prometheus(fleet: LocalFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("prometheus")
    assert exe, "prometheus not found: `make test` installs it (Debian package prometheus)"
    d = tmp_path_factory.mktemp("prometheus")
    fe = fleet.frontend
    assert fe is not None
    (d / RULES_FILE).write_text(alert_rules_yaml(load(FLEET)))
    ports = {"launcher": fleet.metrics_port, "gateway": fe.gateway_metrics_port, "router": fe.router_metrics_port}
    (d / "prometheus.yml").write_text(scrape_config_yaml(fleet.plan, fleet.run_dir, interval="1s", ports=ports,
                                                         rule_files=[RULES_FILE]))
    port = free_port()
    proc = spawn([exe, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], {}, d / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (d / "prometheus.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready after 60 s"
            time.sleep(0.2)
        yield url
    finally:
        stop_group(proc.pid, grace=5)


@pytest.fixture(scope="module")
def traffic(fleet: LocalFleet) -> Iterator[None]:
    """A request to every model every ~0.3 s (streaming and not), with a prompt prefix shared per model."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
            i = 0
            while not stop.is_set():
                for p in fleet.plan.models:
                    prompt = f"# {p.name}: shared header for the prefix cache\n" * 4 + f"def f{i}():"
                    try:
                        if i % 2:
                            for _ in client.completions.create(model=p.name, prompt=prompt, max_tokens=8, stream=True):
                                pass
                        else:
                            client.completions.create(model=p.name, prompt=prompt, max_tokens=8)
                    except openai.APIError as exc:
                        errors.append(exc)
                i += 1
                stop.wait(0.3)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=60)
    assert len(errors) <= 2, f"traffic errors: {errors[:3]}"  # a replica may be restarting (test_fault)


def query(url: str, expr: str) -> list[dict[str, object]]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def models_in(result: list[dict[str, object]]) -> set[str]:
    out = set()
    for s in result:
        metric = s["metric"]
        assert isinstance(metric, dict)
        value = s["value"]
        assert isinstance(value, list)
        if value[1] not in ("NaN", "+Inf", "-Inf"):
            out.add(str(metric.get("model_name") or metric.get("model")))
    return out


def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if not last:
            return
        time.sleep(1)
    pytest.fail(f"{what} after {timeout:.0f} s: {last}")


def test_every_target_up(prometheus: str, fleet: LocalFleet) -> None:
    want = sum(p.placement.replicas for p in fleet.plan.models) + 3  # engines + launcher, gateway, router

    def missing() -> list[str]:
        targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        down = [f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}"
                for t in targets if t["health"] != "up"]
        return down + ([f"{len(targets)} targets, want {want}"] if len(targets) != want else [])

    wait_until(missing, 60, "targets not all up")
    engines = query(prometheus, 'up{job="vllm"}')
    labels = {(str(s["metric"]["model"]), str(s["metric"]["replica"])) for s in engines}  # type: ignore[index]
    assert labels == {(p.name, str(i)) for p in fleet.plan.models for i in range(p.placement.replicas)}
    assert all("node" in s["metric"] for s in engines)  # type: ignore[operator]


def test_dashboard_queries_answer_for_every_model(prometheus: str, fleet: LocalFleet, traffic: None) -> None:
    models = {p.name for p in fleet.plan.models}
    exprs = {q.key: q.expr.replace("$model", ".*") for q in QUERIES}
    exprs |= {name: name for name, _ in RECORDING if name.startswith("model_name:")}

    def lacking() -> dict[str, list[str]]:
        out = {}
        for key, expr in exprs.items():
            result = query(prometheus, expr)
            got = models_in(result)
            want = models
            if key == "gateway_errors":
                got &= models  # the gateway also counts rejected requests under model "-"
            if key == "spec_acceptance":
                # only speculating engines export the counters; a random-weight model's noise seldom
                # repeats its context, so the rate may be 0/0 (NaN): the series must exist, for
                # exactly the speculating models
                want = {p.name for p in fleet.plan.models if p.speculative}
                assert want, "the e2e fleet has a speculating model"
                got = {str(r["metric"].get("model_name")) for r in result}  # type: ignore[union-attr]
                assert got <= want, got
            if want - got:
                out[key] = sorted(want - got)
        return out

    wait_until(lacking, 120, "queries without data for some models")
    # vLLM's colon names are stored as they are (Prometheus 2.42); the underscore form does not exist.
    assert query(prometheus, "vllm:num_requests_running")
    assert not query(prometheus, "vllm_num_requests_running")
    hit = {str(s["metric"]["model_name"]): float(s["value"][1])  # type: ignore[index]
           for s in query(prometheus, exprs["prefix_hit_rate"])}
    print("\nprefix-cache hit rate per model:", {k: round(v, 2) for k, v in sorted(hit.items())})
    assert max(hit.values()) > 0, "a shared prompt prefix should hit the prefix cache"
    slo = models_in(query(prometheus, "codefleet:ttft_p95_slo_seconds"))
    assert slo == models


def test_no_alert_fires_on_the_healthy_fleet(prometheus: str, traffic: None) -> None:
    firing = [a for a in httpx.get(prometheus + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing" and a["labels"]["alertname"] != "CodefleetReplicaRestarting"]
    assert firing == []
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
    assert bad == []


def test_status_shows_live_figures(fleet: LocalFleet, traffic: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["status", "--run-dir", str(fleet.run_dir)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"endpoint: {fleet.url}/v1" in out
    for p in fleet.plan.models:
        line = next(ln for ln in out.splitlines() if ln.startswith(p.name + " "))
        ready, running, waiting, kv = line.split()[1:5]
        assert ready == f"{p.placement.replicas}/{p.placement.replicas}", line
        assert running.isdigit() and waiting.isdigit(), line
        assert kv.endswith("%"), line


def test_status_without_a_fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["status", "--run-dir", str(tmp_path)]) == 1
    assert "no fleet is running" in capsys.readouterr().out
