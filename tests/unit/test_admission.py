"""Per-tenant admission on a fake clock: each limit, the 429's numbers and headers, booked slots
for a refused burst, tokens charged from usage, a share per frontend pod, a reload."""

from __future__ import annotations

import orjson
import pytest

from codefleet.gateway.admission import Admission


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def headers(rej: object) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in rej.headers}  # type: ignore[attr-defined]


def test_requests_per_minute_books_successive_slots() -> None:
    clock = Clock()
    a = Admission({"t": {"requests_per_minute": 6}}, clock=clock)  # one request every 10 s
    assert [a.admit("t", "m") for _ in range(6)] == [None] * 6  # the bucket's 6
    waits = []
    for _ in range(3):
        rej = a.admit("t", "m")
        assert rej is not None and rej.status == 429 and rej.reason == "rate_limit_requests"
        h = headers(rej)
        waits.append(int(h["retry-after-ms"]))
        assert h["x-ratelimit-limit-requests"] == "6" and h["x-ratelimit-remaining-requests"] == "0"
        assert h["retry-after"] == str(-(-int(h["retry-after-ms"]) // 1000))
    assert waits == [10000, 20000, 30000]  # each refused request gets its own later slot
    body = orjson.loads(rej.body)["error"]
    assert body["code"] == "rate_limit_exceeded" and body["type"] == "requests"
    clock.t += 9.9
    assert a.admit("t", "m") is not None  # not before the bucket holds a request
    clock.t += 0.1
    assert a.admit("t", "m") is None
    clock.t += 10
    assert a.admit("t", "m") is None  # the second booked slot


def test_tokens_per_minute_charged_from_usage() -> None:
    clock = Clock()
    a = Admission({"t": {"tokens_per_minute": 600}}, clock=clock)  # 10 tokens a second
    assert a.admit("t", "m") is None
    a.finish("t", 900)  # a large answer: 300 tokens of debt
    rej = a.admit("t", "m")
    assert rej is not None and rej.reason == "rate_limit_tokens"
    h = headers(rej)
    assert h["x-ratelimit-remaining-tokens"] == "0" and int(h["retry-after-ms"]) == 30100  # to reach +1 token
    assert h["x-ratelimit-reset-tokens"] == "1m30s"
    clock.t += 30.1
    assert a.admit("t", "m") is None


def test_concurrency_models_and_unknown_tenants() -> None:
    a = Admission({"t": {"max_concurrent": 2, "models": ["m"]}}, clock=Clock())
    assert a.admit("t", "m") is None and a.admit("t", "m") is None
    rej = a.admit("t", "m")
    assert rej is not None and rej.status == 429 and rej.reason == "rate_limit_concurrent"
    assert headers(rej)["retry-after-ms"] == "500"  # a 1 s mean duration (the first guess), 2 in flight
    a.finish("t", 0, seconds=6.0)  # mean 0.8 x 1 + 0.2 x 6 = 2 s
    assert a.admit("t", "m") is None
    rej = a.admit("t", "m")
    assert rej is not None and headers(rej)["retry-after-ms"] == "1000"  # 2 s / 2 in flight
    a.finish("t", 0)
    assert a.admit("t", "m") is None
    rej = a.admit("t", "other")
    assert rej is not None and rej.status == 403 and b"may not use model `other`" in rej.body
    assert a.admit("unlimited-tenant", "other") is None


def test_each_frontend_pod_enforces_its_share() -> None:
    a = Admission({"t": {"requests_per_minute": 60, "max_concurrent": 4}}, pods=2, clock=Clock())
    assert sum(a.admit("t", "m") is None for _ in range(40)) == 2  # concurrency 4 / 2 pods
    b = Admission({"t": {"requests_per_minute": 60}}, pods=2, clock=Clock())
    assert sum(b.admit("t", "m") is None for _ in range(40)) == 30  # 60 / 2 pods


def test_reload_keeps_what_was_used() -> None:
    clock = Clock()
    a = Admission({"t": {"requests_per_minute": 10}}, clock=clock)
    for _ in range(10):
        assert a.admit("t", "m") is None
    a.configure({"t": {"requests_per_minute": 20}})  # a larger bucket, still empty
    assert a.admit("t", "m") is not None
    a.configure({})
    assert a.admit("t", "m") is None and not a.enabled


@pytest.mark.parametrize("seconds,text", [(0.02, "20ms"), (1.0, "1s"), (59.2, "1m0s"), (90, "1m30s")])
def test_reset_format(seconds: float, text: str) -> None:
    from codefleet.gateway.admission import _duration

    assert _duration(seconds) == text
