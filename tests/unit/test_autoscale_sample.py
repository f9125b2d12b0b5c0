"""One model's autoscaler sample from its replicas' engine figures (``autoscale.sample_of``)."""

from __future__ import annotations

from codefleet.runtime.autoscale import EngineLook, sample_of


def test_sums_running_waiting_means_kv() -> None:
    looks = [("m-0", EngineLook(running=2, waiting=1, kv=0.2)), ("m-1", EngineLook(running=1, kv=0.4)),
             ("m-2", EngineLook())]
    s = sample_of(5.0, ready=3, starting=1, held=4, looks=looks, ttft_seen={})
    assert (s.t, s.ready, s.starting, s.held, s.running, s.waiting) == (5.0, 3, 1, 4, 3.0, 1.0)
    assert s.kv is not None and abs(s.kv - 0.3) < 1e-9 and s.ttft_p95 is None


def test_ttft_since_the_previous_sample() -> None:
    seen: dict[str, dict[float, float]] = {}
    before = {0.1: 10.0, 1.0: 10.0, float("inf"): 10.0}
    first = sample_of(0.0, 1, 0, 0, [("m-0", EngineLook(ttft_buckets=before))], seen)
    assert first.ttft_p95 is not None and first.ttft_p95 <= 0.1
    assert seen == {"m-0": before}
    # ten more first tokens, all slow: the p95 is of these, not of all twenty
    later = sample_of(1.0, 1, 0, 0, [("m-0", EngineLook(ttft_buckets={0.1: 10.0, 1.0: 20.0, float("inf"): 20.0}))],
                      seen)
    assert later.ttft_p95 is not None and later.ttft_p95 > 0.9
    none = sample_of(2.0, 1, 0, 0, [("m-0", EngineLook(ttft_buckets={0.1: 10.0, 1.0: 20.0, float("inf"): 20.0}))],
                     seen)
    assert none.ttft_p95 is None  # no first token in between
