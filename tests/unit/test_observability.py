"""Scrape configuration and dashboard generation."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from codefleet.manifest import load
from codefleet.observability import QUERIES, dashboard_json, scrape_config_yaml, write_engine_targets
from codefleet.planner import plan_fleet

ROOT = Path(__file__).resolve().parents[2]


def test_committed_dashboard_is_the_generated_one() -> None:
    assert (ROOT / "deploy/grafana/codefleet.json").read_text() == dashboard_json()


def test_every_panel_uses_a_known_query_and_the_model_selector() -> None:
    dash = json.loads(dashboard_json())
    exprs = {q.expr for q in QUERIES}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            assert target["expr"] in exprs
            assert "$model" in target["expr"]
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "model"]


def test_scrape_config_covers_engines_router_gateway_launcher(tmp_path: Path) -> None:
    plan = plan_fleet(load(ROOT / "deploy/manifests/demo-cpu.yaml"))
    cfg = yaml.safe_load(scrape_config_yaml(plan, tmp_path))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"vllm", "codefleet-launcher", "codefleet-gateway", "vllm-router"}
    assert jobs["vllm-router"]["static_configs"][0]["targets"] == ["127.0.0.1:9402"]
    sd_file = Path(jobs["vllm"]["file_sd_configs"][0]["files"][0])
    written = write_engine_targets(tmp_path, [("m", 0, "http://127.0.0.1:1234", "h1"),
                                              ("m", 1, "http://127.0.0.1:1235", "10.0.0.2")])
    assert written == sd_file
    entries = json.loads(sd_file.read_text())
    assert entries[1]["targets"] == ["127.0.0.1:1235"]
    assert entries[1]["labels"]["model"] == "m" and entries[1]["labels"]["replica"] == "1"
    assert entries[1]["labels"]["node"] == "10.0.0.2"
