"""A fleet change under steady load, counted: every request's outcome and the ready replicas over time.

``rollout`` drives a running fleet: a closed-loop load through the endpoint (half streamed, half
not, the official OpenAI SDK, no retries), a steady phase, then ``fleet.apply(new_plan)`` and the
loop until the fleet has converged, then a steady phase again. Each request ends as

* ``ok``: an answer with a finish reason (a stream: its last chunk before ``[DONE]``);
* ``cut``: a stream that ended without a finish reason and without an error event (a silent close);
* ``error``: an HTTP error or an error event (``APIError``).

The scenario ``benchmarks/scenarios/rolling-update-under-load`` runs it on the CPU demo model and
writes the numbers and a plot:

    python -m benchmarks.rolling_update benchmarks/scenarios/rolling-update-under-load
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openai

from codefleet.plans import FleetPlan
from codefleet.runtime.core import Fleet
from codefleet.runtime.replica import State


@dataclass
class Outcome:
    start: float
    end: float
    stream: bool
    result: str  # ok | cut | error
    ttft: float | None = None
    detail: str = ""


@dataclass
class Rollout:
    outcomes: list[Outcome] = field(default_factory=list)
    ready: list[tuple[float, int, int]] = field(default_factory=list)  # (t, ready, draining)
    applied_at: float = 0.0
    converged_at: float = 0.0
    changes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "cut": 0, "error": 0}
        for o in self.outcomes:
            out[o.result] += 1
        return out

    def ttft(self, during: bool) -> dict[str, float | None]:
        """TTFT of the streams that started during the change (or outside it), ms."""
        vals = [o.ttft * 1000 for o in self.outcomes if o.stream and o.ttft is not None
                and (self.applied_at <= o.start <= self.converged_at) == during]
        if not vals:
            return {"n": 0, "p50_ms": None, "p99_ms": None}
        return {"n": len(vals), "p50_ms": float(np.percentile(vals, 50)), "p99_ms": float(np.percentile(vals, 99))}

    def summary(self) -> dict[str, Any]:
        during = [r for t, r, _ in self.ready if self.applied_at <= t <= self.converged_at]
        return {"requests": len(self.outcomes), **self.counts(), "changes": self.changes,
                "rollout_seconds": round(self.converged_at - self.applied_at, 1),
                "min_ready_during_rollout": min(during) if during else None,
                "ttft_steady": self.ttft(during=False), "ttft_during_rollout": self.ttft(during=True)}


def _one(client: openai.OpenAI, model: str, stream: bool, max_tokens: int) -> Outcome:
    t0 = time.monotonic()
    try:
        if not stream:
            r = client.completions.create(model=model, prompt="def fib(n):", max_tokens=max_tokens,
                                          extra_body={"ignore_eos": True})
            ok = bool(r.choices and r.choices[0].finish_reason)
            return Outcome(t0, time.monotonic(), False, "ok" if ok else "cut")
        ttft, finish = None, None
        for chunk in client.completions.create(model=model, prompt="def fib(n):", max_tokens=max_tokens,
                                               stream=True, extra_body={"ignore_eos": True}):
            if ttft is None and chunk.choices:
                ttft = time.monotonic() - t0
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return Outcome(t0, time.monotonic(), True, "ok" if finish else "cut", ttft)
    except openai.APIError as exc:
        return Outcome(t0, time.monotonic(), stream, "error", detail=f"{type(exc).__name__}: {exc}"[:300])


def rollout(fleet: Fleet, new_plan: FleetPlan, api_key: str, *, concurrency: int = 4, max_tokens: int = 32,
            steady_s: float = 10.0, think_s: float = 0.0, timeout: float = 900.0) -> Rollout:
    """Apply ``new_plan`` to a running fleet (watched in the background) under a steady load."""
    model = new_plan.models[0].name
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    out = Rollout()
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        i = n
        while not stop.is_set():
            o = _one(client, model, stream=i % 2 == 0, max_tokens=max_tokens)
            with lock:
                out.outcomes.append(o)
            i += 1
            stop.wait(think_s)

    def sampler() -> None:
        while not stop.wait(0.2):
            with lock:
                out.ready.append((time.monotonic(), fleet.ready_count(model),
                                  sum(r.state is State.DRAINING for r in fleet.replicas)))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    try:
        time.sleep(steady_s)
        out.applied_at = time.monotonic()
        out.changes = fleet.apply(new_plan)
        time.sleep(1.0)
        while not fleet.converged():
            if time.monotonic() - out.applied_at > timeout:
                raise TimeoutError(f"the fleet did not converge in {timeout:.0f} s")
            time.sleep(0.5)
        out.converged_at = time.monotonic()
        time.sleep(steady_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    return out


def plot(r: Rollout, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = r.applied_at
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.step([t - t0 for t, _, _ in r.ready], [n for _, n, _ in r.ready], where="post", label="ready (registered)")
    a.step([t - t0 for t, _, _ in r.ready], [d for _, _, d in r.ready], where="post", label="draining")
    a.axvspan(0, r.converged_at - t0, color="0.9", zorder=0, label="rolling replace")
    a.set_ylabel("replicas")
    a.legend(loc="lower left")
    for result, color in (("ok", "tab:green"), ("cut", "tab:red"), ("error", "tab:orange")):
        pts = [(o.end - t0, (o.end - o.start) * 1000) for o in r.outcomes if o.result == result]
        if pts:
            b.scatter(*zip(*pts, strict=True), s=8, color=color, zorder=2, label=f"{result} ({len(pts)})")
    b.axvspan(0, r.converged_at - t0, color="0.9", zorder=0)
    b.set_ylabel("request latency, ms (at its end)")
    b.set_xlabel("seconds since `apply`")
    b.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from codefleet.manifest import load
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="scenario folder with before.yaml and after.yaml")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steady", type=float, default=15.0, help="seconds of load before and after the change")
    p.add_argument("--think", type=float, default=2.0, help="seconds each client waits between its requests")
    a = p.parse_args(argv)
    os.environ.setdefault("CODEFLEET_BENCH_KEYS", "sk-bench")
    before = plan_fleet(load(a.folder / "before.yaml"))
    after = plan_fleet(load(a.folder / "after.yaml"))
    with tempfile.TemporaryDirectory() as d, LocalFleet(before, enforce_eager=True, run_dir=Path(d)) as fleet:
        fleet.start(timeout=900)
        fleet.watch_in_background()
        r = rollout(fleet, after, "sk-bench", concurrency=a.concurrency, max_tokens=a.max_tokens, steady_s=a.steady,
                    think_s=a.think)
        fleet.stop()
    results = a.folder / "results"
    results.mkdir(exist_ok=True)
    summary = r.summary()
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "outcomes.json").write_text(json.dumps([asdict(o) | {"start": o.start - r.applied_at,
                                                                     "end": o.end - r.applied_at}
                                                       for o in r.outcomes], indent=1))
    (results / "ready.json").write_text(json.dumps([(t - r.applied_at, n, d) for t, n, d in r.ready]))
    plot(r, results / "rollout.png")
    print(json.dumps(summary, indent=2))
    return 0 if summary["cut"] == 0 and summary["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
