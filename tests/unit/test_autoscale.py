"""The autoscaler's rules on samples with their times (no engines): each decision, its timing and
the arithmetic behind it; and the readers of the signals (vLLM's /metrics, the gateway's)."""

from __future__ import annotations

import math

import pytest

from codefleet.plans import Autoscale
from codefleet.runtime.autoscale import Autoscaler, Sample, bucket_delta, engine_look, held_requests, histogram_quantile


def policy(**kw: object) -> Autoscale:
    base: dict[str, object] = dict(min_replicas=1, max_replicas=4, signal="waiting", target=4.0,
                                   scale_up_window_seconds=10, scale_down_delay_seconds=60,
                                   idle_seconds_before_zero=120, hold_requests=8, hold_timeout_seconds=60,
                                   cold_start_seconds=30)
    base.update(kw)
    return Autoscale(**base)  # type: ignore[arg-type]


def s(t: float, ready: int = 1, waiting: float = 0, running: float = 0, held: int = 0, starting: int = 0,
      kv: float | None = None, ttft: float | None = None) -> Sample:
    return Sample(t, ready, starting, running, waiting, held, kv, ttft)


def feed(a: Autoscaler, samples: list[Sample]) -> list[tuple[float, int, str]]:
    out = []
    for x in samples:
        d = a.observe(x)
        if d is not None:
            out.append((d.t, d.desired, d.reason))
    return out


def test_scale_up_needs_the_whole_window_and_goes_to_the_lowest_recommendation() -> None:
    a = Autoscaler(policy(), 1, now=0)
    # 12 waiting -> 3 replicas; 9 waiting -> 3; 6 -> 2: the window's lowest recommendation is 2
    got = feed(a, [s(t, waiting=12 if t < 6 else 6) for t in range(0, 12)])
    assert got == [(10, 2, "scale_up")], got
    assert a.desired == 2


def test_a_dip_inside_the_window_holds_the_scale_up_back() -> None:
    a = Autoscaler(policy(), 1, now=0)
    samples = [s(t, waiting=0 if t == 5 else 20) for t in range(0, 20)]
    # the dip at t=5 is in every window [t-10, t] up to t=15; 20 waiting / 4 = 5, clamped to max 4
    assert feed(a, samples) == [(16, 4, "scale_up")]


def test_no_second_scale_up_while_a_replica_is_starting() -> None:
    a = Autoscaler(policy(scale_up_window_seconds=0), 1, now=0)
    assert feed(a, [s(0, waiting=8)]) == [(0, 2, "scale_up")]
    assert feed(a, [s(t, waiting=16, starting=1) for t in range(1, 30)]) == []
    assert feed(a, [s(30, ready=2, waiting=16)]) == [(30, 4, "scale_up")]


def test_scale_down_after_the_delay_to_the_highest_recommendation() -> None:
    a = Autoscaler(policy(), 3, now=0)
    # 5 waiting (ceil(5/4) = 2 replicas) for 20 s, then none: at 60 s (the delay covered) the window's
    # highest recommendation is 2; the next step waits a whole new delay, then the floor (1)
    got = feed(a, [s(t, ready=3, waiting=5 if t < 20 else 0) for t in range(0, 130)])
    assert got == [(60, 2, "scale_down"), (120, 1, "scale_down")], got


def test_within_tolerance_nothing_moves() -> None:
    a = Autoscaler(policy(signal="kv_cache", target=0.5, scale_up_window_seconds=0, scale_down_delay_seconds=0), 2,
                   now=0)
    assert feed(a, [s(t, ready=2, kv=0.54) for t in range(5)]) == []  # 8% over: tolerance 10%
    assert feed(a, [s(5, ready=2, kv=0.8)]) == [(5, 4, "scale_up")]  # ceil(2 x 0.8 / 0.5) = 4


def test_ttft_signal_against_the_slo() -> None:
    a = Autoscaler(policy(signal="ttft", target=1.6, scale_up_window_seconds=0), 1, now=0)  # 0.8 x a 2 s SLO
    assert feed(a, [s(0, ttft=1.0)]) == []
    assert feed(a, [s(1, ttft=3.5)]) == [(1, 3, "scale_up")]  # ceil(1 x 3.5 / 1.6) = 3


def test_from_zero_at_once_and_to_zero_after_the_idle_time() -> None:
    a = Autoscaler(policy(min_replicas=0, idle_seconds_before_zero=30, scale_down_delay_seconds=5), 0, now=0)
    assert feed(a, [s(t, ready=0) for t in range(10)]) == []
    assert feed(a, [s(10, ready=0, held=20)]) == [(10, 1, "from_zero")]  # one replica, however many held
    assert feed(a, [s(t, ready=0, held=20, starting=1) for t in range(11, 50)]) == []  # no more while it starts
    busy = [s(t, running=1) for t in range(50, 60)]
    idle = [s(t) for t in range(60, 100)]
    assert feed(a, busy + idle) == [(89, 0, "to_zero")]  # the last busy sample at 59, + 30 s


def test_the_range_holds() -> None:
    a = Autoscaler(policy(max_replicas=2, scale_up_window_seconds=0), 1, now=0)
    assert feed(a, [s(0, waiting=100)]) == [(0, 2, "scale_up")]
    assert feed(a, [s(t, ready=2, waiting=100) for t in range(1, 20)]) == []
    b = Autoscaler(policy(min_replicas=2, scale_down_delay_seconds=0), 3, now=0)
    assert feed(b, [s(t, ready=3) for t in range(5)]) == [(0, 2, "scale_down")]


def test_an_operator_count_restarts_the_windows() -> None:
    a = Autoscaler(policy(), 1, now=0)
    feed(a, [s(t, waiting=20) for t in range(9)])
    a.set(3, now=9)
    assert a.desired == 3
    assert feed(a, [s(t, ready=3, waiting=20) for t in range(9, 19)]) == []  # a new 10 s window from t=9
    assert feed(a, [s(19, ready=3, waiting=20)]) == [(19, 4, "scale_up")]


def test_histogram_quantile_as_prometheus() -> None:
    # 100 observations: 50 in (0, 0.1], 40 in (0.1, 0.5], 10 in (0.5, 1]
    b = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, b) == pytest.approx(0.1)
    assert histogram_quantile(0.95, b) == pytest.approx(0.5 + 0.5 * (95 - 90) / 10)
    assert histogram_quantile(0.95, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {1.0: 0.0, math.inf: 5.0}) == 1.0  # all above the last finite bound


def test_bucket_delta_and_an_engine_restart() -> None:
    before = {0.1: 5.0, math.inf: 10.0}
    assert bucket_delta({0.1: 7.0, math.inf: 13.0}, before) == {0.1: 2.0, math.inf: 3.0}
    assert bucket_delta({0.1: 1.0, math.inf: 1.0}, before) == {0.1: 1.0, math.inf: 1.0}  # counters reset


VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 3.2
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 4.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 6.0
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 300.0
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 120.0
"""


def test_engine_look_reads_vllm_metrics() -> None:
    look = engine_look(VLLM_METRICS)
    assert (look.running, look.waiting, look.kv) == (3.0, 7.0, 0.25)
    assert look.ttft_buckets == {0.1: 4.0, 1.0: 9.0, math.inf: 10.0}
    assert look.finished == 10.0  # every finish reason: the rate the queue drains at (shedding)
    assert (look.prefix_hits, look.prefix_queries) == (120.0, 300.0)  # the routing benchmarks' hit rate
    from codefleet.status import engine_figures

    assert engine_figures(VLLM_METRICS) == {"running": 3.0, "waiting": 7.0, "kv_usage": 0.25}
    assert engine_figures("") == {}  # an engine exporting nothing shows "-", not 0


def test_held_requests_from_the_gateway() -> None:
    text = ('# TYPE codefleet_gateway_held_requests gauge\n'
            'codefleet_gateway_held_requests{model="a"} 3.0\ncodefleet_gateway_held_requests{model="b"} 0.0\n')
    assert held_requests(text) == {"a": 3, "b": 0}


def test_status_shows_desired_ready_and_the_last_decision() -> None:
    from codefleet.runtime.state import AutoscaleRange, FleetState, LastDecision
    from codefleet.status import ModelStatus, ReplicaStatus, format_status

    state = FleetState(launcher_pid=1, endpoint="http://127.0.0.1:8000", converged=False)
    m = ModelStatus("m", [ReplicaStatus(0, "http://127.0.0.1:1", ready=True, state="ready"),
                          ReplicaStatus(1, "http://127.0.0.1:2", ready=False, state="starting")],
                    desired=2, drain_seconds=60, autoscale=AutoscaleRange(0, 3, "waiting", 4.0),
                    last_decision=LastDecision(0.0, 1, 2, "scale_up", "9 waiting"))
    text = format_status(state, [m])
    assert "     1/2     " in text  # ready / desired
    assert "autoscaling 0..3 on waiting (target 4); last: 1 -> 2 (scale_up, " in text and "9 waiting" in text
    assert "starting" in text


def test_usage_table_from_the_gateway_metrics() -> None:
    from codefleet.status import format_usage, tenant_usage

    text = ('# TYPE codefleet_tenant_requests_total counter\n'
            'codefleet_tenant_requests_total{tenant="ide",model="m",status="200"} 5.0\n'
            'codefleet_tenant_requests_total{tenant="ide",model="m",status="429"} 2.0\n'
            '# TYPE codefleet_tenant_prompt_tokens_total counter\n'
            'codefleet_tenant_prompt_tokens_total{tenant="ide",model="m"} 1200.0\n'
            '# TYPE codefleet_tenant_completion_tokens_total counter\n'
            'codefleet_tenant_completion_tokens_total{tenant="ide",model="m"} 340.0\n'
            '# TYPE codefleet_tenant_rejections_total counter\n'
            'codefleet_tenant_rejections_total{tenant="ide",model="m",reason="rate_limit_requests"} 2.0\n')
    rows = tenant_usage(text)
    assert rows == {("ide", "m"): {"requests": 7.0, "ok": 5.0, "prompt": 1200.0, "completion": 340.0,
                                   "rejected": 2.0}}
    table = format_usage(rows)
    assert "ide" in table and "1,200" in table and "340" in table
