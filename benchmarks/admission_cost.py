"""What admission adds to a request on the gateway's own path, without a network: the key's tenant
(SHA-256), the tenant's buckets and slot, the usage read from a non-streamed answer, the tenant's
counters. Microseconds per request, median and p99 of ``--rounds`` timings of ``--n`` requests.

    python -m benchmarks.admission_cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson

from codefleet.gateway.admission import Admission

ANSWER = orjson.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "text": "x" * 16, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}})


def main(argv: list[str] | None = None) -> int:
    import hashlib

    from prometheus_client import CollectorRegistry, Counter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    adm = Admission({"t": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent": 10**6}})
    keys = {hashlib.sha256(b"sk-bench-key-0001").digest(): "t"}
    reg = CollectorRegistry()
    req = Counter("r", "r", ["tenant", "model", "status"], registry=reg).labels("t", "m", "200")
    pt = Counter("p", "p", ["tenant", "model"], registry=reg).labels("t", "m")
    ct = Counter("c", "c", ["tenant", "model"], registry=reg).labels("t", "m")
    per_req = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for _ in range(a.n):
            tenant = keys.get(hashlib.sha256(b"sk-bench-key-0001").digest(), "default")
            assert adm.admit(tenant, "m") is None
            usage = orjson.loads(ANSWER)["usage"]
            adm.finish(tenant, usage["prompt_tokens"] + usage["completion_tokens"], 0.01)
            req.inc()
            pt.inc(usage["prompt_tokens"])
            ct.inc(usage["completion_tokens"])
        per_req.append((time.perf_counter() - t0) / a.n * 1e6)
    per_req.sort()
    print(f"admission per request: median {statistics.median(per_req):.2f} us, "
          f"p99 of rounds {per_req[int(0.99 * (len(per_req) - 1))]:.2f} us, min {per_req[0]:.2f} us "
          f"({a.rounds} rounds of {a.n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
