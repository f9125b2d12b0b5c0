"""The Prometheus queries the chart's KEDA triggers run (``observability.autoscale_query`` and
``held_query``), evaluated by promtool on series shaped like vLLM's and the gateway's: the values
KEDA would compare with each threshold, including a model at zero replicas (no vLLM series at all)."""

from __future__ import annotations

from pathlib import Path

import yaml

from codefleet.observability import autoscale_query, held_query
from tests.prometheus.test_promtool import promtool

M, OTHER, COLD = "granite-code", "stable-code", "codefuse"


def expr_test(query: str, value: float) -> dict[str, object]:
    return {"expr": query, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": value}]}


def test_autoscale_queries(tmp_path: Path) -> None:
    def series(name: str, labels: str, values: str) -> dict[str, str]:
        return {"series": f"{name}{{{labels}}}", "values": values}

    inputs = [
        # two engines of M: 3 + 2 waiting; 10 waiting on another model (not counted)
        series("vllm:num_requests_waiting", f'model_name="{M}",pod="a"', "3x6"),
        series("vllm:num_requests_waiting", f'model_name="{M}",pod="b"', "2x6"),
        series("vllm:num_requests_waiting", f'model_name="{OTHER}",pod="c"', "10x6"),
        # two frontend pods hold 1 request of M and 4 of COLD (which has no engine)
        series("codefleet_gateway_held_requests", f'model="{M}",pod="fe1"', "1x6"),
        series("codefleet_gateway_held_requests", f'model="{M}",pod="fe2"', "0x6"),
        series("codefleet_gateway_held_requests", f'model="{COLD}",pod="fe1"', "3x6"),
        series("codefleet_gateway_held_requests", f'model="{COLD}",pod="fe2"', "1x6"),
        series("vllm:kv_cache_usage_perc", f'model_name="{M}",pod="a"', "0.5x6"),
        series("vllm:kv_cache_usage_perc", f'model_name="{M}",pod="b"', "0.7x6"),
    ]
    # TTFT per minute and engine: 50 under 0.1 s, 40 in (0.1, 0.5], 10 in (0.5, 1] -> p95 = 0.75 s
    for pod in ("a", "b"):
        for le, per_min in (("0.1", 50), ("0.5", 90), ("1", 100), ("+Inf", 100)):
            inputs.append(series("vllm:time_to_first_token_seconds_bucket", f'model_name="{M}",pod="{pod}",le="{le}"',
                                 f"0+{per_min}x6"))
    tests = [
        expr_test(autoscale_query(M, "waiting")[1], 6),  # 5 waiting + 1 held
        expr_test(autoscale_query(COLD, "waiting")[1], 4),  # at zero: the held requests alone
        expr_test(autoscale_query("idle-model", "waiting")[1], 0),
        expr_test(held_query(COLD), 4),
        expr_test(held_query("idle-model"), 0),
        expr_test(autoscale_query(M, "kv_cache")[1], 0.6),
        expr_test(f"round({autoscale_query(M, 'ttft')[1]}, 0.001)", 0.75),  # rate() leaves 0.7499999...
    ]
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    doc = {"rule_files": [str(tmp_path / "empty.yaml")], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": tests}]}
    (tmp_path / "queries_test.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert "SUCCESS" in promtool("test", "rules", str(tmp_path / "queries_test.yaml"))
