"""The load generator's own ceiling: how many requests/s it sends on time against a fast fake upstream.

    python -m benchmarks.loadgen_ceiling --rates 1000,2000,3000 --requests 20000

The fake upstream answers at once (one short non-streamed completion; ``--stream`` for 4-token
streams). The generator runs in this process, pinned to one core, the upstream to the other
(``--no-isolate`` turns this off). For each rate: achieved requests/s, the send lag (actual send
minus scheduled send) p50/p99/max, errors. The generator is not the bottleneck at a rate where
achieved == offered and the send lag p99 stays under 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.bench import environment
from codefleet.loadgen import run_sync, summarize
from codefleet.procs import free_port, spawn, stop_group, wait_healthy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1000,2000,3000")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--poisson", action="store_true")
    p.add_argument("--no-isolate", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    port = free_port()
    log = Path(f"/tmp/codefleet-ceiling-{port}.log")
    up = spawn([sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), "--model", "fake"], {}, log)
    out = {"environment": environment(), "stream": args.stream, "poisson": args.poisson, "points": []}
    try:
        if not args.no_isolate and len(cores) >= 2:
            os.sched_setaffinity(up.pid, {cores[-1]})
            os.sched_setaffinity(0, {cores[0]})
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 20, up, log)
        body = {"model": "fake", "prompt": "x", "max_tokens": 4, "stream": args.stream}
        print(f"{'offered':>8} {'achieved':>9} {'lag p50':>8} {'lag p99':>8} {'lag max':>8} {'errors':>7}  (req/s, ms)")
        for rate in (float(r) for r in args.rates.split(",")):
            n = max(args.requests, int(rate * 3))
            results = run_sync(url, "/v1/completions", [body] * n, rate=rate, poisson=args.poisson)
            s = summarize(results)
            sent_span = max(r.start for r in results) - min(r.start for r in results)
            achieved = (n - 1) / sent_span if sent_span else 0.0
            errors = sum(s["errors"].values())
            print(f"{rate:8.0f} {achieved:9.0f} {s['send_lag_p50_ms']:8.3f} {s['send_lag_p99_ms']:8.3f} "
                  f"{s['send_lag_max_ms']:8.2f} {errors:7d}", flush=True)
            out["points"].append({"offered_rps": rate, "achieved_send_rps": achieved,
                                  "completed_rps": s["request_throughput"], "requests": n,
                                  "send_lag_p50_ms": s["send_lag_p50_ms"], "send_lag_p99_ms": s["send_lag_p99_ms"],
                                  "send_lag_max_ms": s["send_lag_max_ms"], "errors": s["errors"],
                                  "latency_p50_ms": s["latency_p50_ms"], "latency_p99_ms": s["latency_p99_ms"]})
    finally:
        stop_group(up.pid, grace=2)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
