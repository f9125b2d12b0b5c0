"""Prometheus configuration and alert rules, checked by Prometheus's own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from codefleet.manifest import load
from codefleet.observability import RULES_FILE, alert_rules_yaml, scrape_config_yaml
from codefleet.planner import plan_fleet

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
HERE = Path(__file__).parent


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make test` installs it (Debian package prometheus)"
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_committed_rules_are_current() -> None:
    assert (DEPLOY / RULES_FILE).read_text() == alert_rules_yaml(load(ROOT / "deploy" / "manifests" / "fleet.yaml")), \
        "regenerate: codefleet prometheus-config deploy/manifests/fleet.yaml -o deploy/prometheus/prometheus.yml"


def test_check_committed_config_and_rules() -> None:
    out = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert "1 rule files found" in out
    out = promtool("check", "rules", str(DEPLOY / RULES_FILE))
    assert "SUCCESS" in out


@pytest.mark.parametrize("manifest", ["deploy/manifests/demo-cpu.yaml", "tests/e2e/fleet.yaml"])
def test_check_generated_config(tmp_path: Path, manifest: str) -> None:
    loaded = load(ROOT / manifest)
    (tmp_path / RULES_FILE).write_text(alert_rules_yaml(loaded))
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config_yaml(plan_fleet(loaded), tmp_path, rule_files=[RULES_FILE]))
    promtool("check", "config", str(config))


def test_alert_rules_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yaml")


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((DEPLOY / RULES_FILE).read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((HERE / "rules_test.yaml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"
