"""Autoscaling, counted: a burst at zero replicas and a load ramp, with the fleet's state over time.

* ``burst``: a model at zero replicas gets ``n`` requests at once (half streamed) and ``overflow``
  more once the endpoint's hold queue is full (the OpenAI SDK with its default retries, which
  honour Retry-After). Each request's first token is timed against the moment the first replica
  was registered.
* ``ramp``: closed-loop load that rises (until the autoscaler has a second replica ready and a
  while after) and falls; every request's outcome (ok / cut / error, as in ``rolling_update``) and
  TTFT; then the wait until the autoscaler is back at one replica.
* ``Timeline``: every 0.5 s the desired, ready, starting and draining replicas, the requests the
  endpoint holds and the engines' waiting requests.

Scenarios (a ``fleet.yaml`` in the folder; results, a plot and the numbers are written there):

    python -m benchmarks.autoscale burst benchmarks/scenarios/scale-from-zero
    python -m benchmarks.autoscale ramp benchmarks/scenarios/autoscale-ramp
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

from benchmarks.rolling_update import Outcome, _one
from codefleet.runtime.autoscale import engine_look, held_requests
from codefleet.runtime.core import Fleet
from codefleet.runtime.replica import State


@dataclass
class Point:
    t: float
    desired: int
    ready: int
    starting: int
    draining: int
    held: int
    waiting: float


class Timeline:
    """Samples one model's replicas and queues every ``every`` seconds in a thread, until ``stop``."""

    def __init__(self, fleet: Fleet, model: str, every: float = 0.5) -> None:
        self.fleet, self.model, self.every = fleet, model, every
        self.points: list[Point] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._client = httpx.Client(timeout=1.0)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()

    def _run(self) -> None:
        f, m = self.fleet, self.model
        fe = f.frontend
        assert fe is not None
        while not self._stop.wait(self.every):
            mine = [r for r in list(f.replicas) if r.plan.name == m]
            waiting = 0.0
            for r in mine:
                if r.state is State.READY and r.url:
                    try:
                        waiting += engine_look(self._client.get(r.url + "/metrics").text).waiting or 0.0
                    except httpx.HTTPError:
                        pass
            try:
                held = held_requests(self._client.get(f"http://127.0.0.1:{fe.gateway_metrics_port}/metrics").text)
            except httpx.HTTPError:
                held = {}
            self.points.append(Point(time.monotonic(), f.desired.get(m, 0), f.ready_count(m),
                                     sum(r.state is State.STARTING for r in mine),
                                     sum(r.state is State.DRAINING for r in mine), held.get(m, 0), waiting))


class Registrations:
    """A ``say`` for the fleet that also notes when each replica became ready (then registered)."""

    def __init__(self, echo: bool = True) -> None:
        self.ready_at: list[float] = []
        self.lines: list[tuple[float, str]] = []
        self.echo = echo

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        self.lines.append((now, line))
        if line.lstrip().startswith("ready "):
            self.ready_at.append(now)
        if self.echo:
            print(line, flush=True)


# -- burst at zero ---------------------------------------------------------------------------------

@dataclass
class Asked:
    stream: bool
    sent: float
    first: float | None = None
    """First token (a stream's first chunk, or the whole answer)."""
    end: float = 0.0
    result: str = ""
    statuses: list[int] = field(default_factory=list)
    """Every HTTP status the client saw (retries included)."""
    detail: str = ""


def _ask(url: str, key: str, model: str, stream: bool, retries: int, max_tokens: int) -> Asked:
    a = Asked(stream, time.monotonic())
    hooks = {"response": [lambda r: a.statuses.append(r.status_code)]}
    with openai.DefaultHttpxClient(event_hooks=hooks) as http:  # the SDK's own HTTP client, hooked
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=600, http_client=http)
        try:
            if stream:
                finish = None
                for ch in c.completions.create(model=model, prompt="def f(x):", max_tokens=max_tokens, stream=True,
                                               extra_body={"ignore_eos": True}):
                    if a.first is None and ch.choices:
                        a.first = time.monotonic()
                    if ch.choices and ch.choices[0].finish_reason:
                        finish = ch.choices[0].finish_reason
                a.result = "ok" if finish else "cut"
            else:
                r = c.completions.create(model=model, prompt="def f(x):", max_tokens=max_tokens,
                                         extra_body={"ignore_eos": True})
                a.first = time.monotonic()
                a.result = "ok" if r.choices and r.choices[0].finish_reason else "cut"
        except openai.APIError as exc:
            a.result, a.detail = "error", f"{type(exc).__name__}: {exc}"[:300]
    a.end = time.monotonic()
    return a


@dataclass
class Burst:
    held: list[Asked]
    overflow: list[Asked]
    registered_at: float | None
    started_at: float

    def summary(self) -> dict[str, Any]:
        reg = self.registered_at
        after = [a.first - reg for a in self.held if a.first is not None and reg is not None]
        def pct(v: list[float], q: float) -> float | None:
            return round(float(np.percentile(v, q)), 3) if v else None
        return {
            "held": len(self.held), "held_ok": sum(a.result == "ok" for a in self.held),
            "overflow": len(self.overflow), "overflow_ok": sum(a.result == "ok" for a in self.overflow),
            "overflow_statuses": [a.statuses for a in self.overflow],
            "first_replica_registered_s": round(reg - self.started_at, 1) if reg is not None else None,
            "first_token_after_registration_s": {"min": pct(after, 0), "p50": pct(after, 50), "p99": pct(after, 99),
                                                 "max": pct(after, 100)},
            "errors": [a.detail for a in self.held + self.overflow if a.result != "ok"][:5],
        }


def burst(fleet: Fleet, key: str, model: str, regs: Registrations, n: int = 20, overflow: int = 2,
          max_tokens: int = 16) -> Burst:
    """``n`` requests at once to a model at zero replicas, then ``overflow`` more (SDK default retries)."""
    assert fleet.ready_count(model) == 0, "the model has a ready replica already"
    before = len(regs.ready_at)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n + overflow) as pool:
        held = [pool.submit(_ask, fleet.url, key, model, i % 2 == 1, 0, max_tokens) for i in range(n)]
        extra = []
        if overflow:
            deadline = time.monotonic() + 60
            while fleet.held().get(model, 0) < n and time.monotonic() < deadline:
                time.sleep(0.1)
            extra = [pool.submit(_ask, fleet.url, key, model, False, 2, max_tokens) for _ in range(overflow)]
        got_held = [f.result() for f in held]
        got_extra = [f.result() for f in extra]
    reg = regs.ready_at[before] if len(regs.ready_at) > before else None
    return Burst(got_held, got_extra, reg, t0)


# -- ramp -----------------------------------------------------------------------------------------

@dataclass
class Ramp:
    outcomes: list[Outcome] = field(default_factory=list)
    phases: list[tuple[str, float, int]] = field(default_factory=list)  # (name, start, concurrency)
    peak_ready: int = 0
    back_at: float | None = None

    def summary(self) -> dict[str, Any]:
        counts = {"ok": 0, "cut": 0, "error": 0}
        for o in self.outcomes:
            counts[o.result] += 1
        ttft = [o.ttft * 1000 for o in self.outcomes if o.ttft is not None]
        t0 = self.phases[0][1] if self.phases else 0.0
        return {"requests": len(self.outcomes), **counts, "peak_ready": self.peak_ready,
                "phases": [(n, round(s - t0, 1), c) for n, s, c in self.phases],
                "back_to_one_s": round(self.back_at - t0, 1) if self.back_at else None,
                "ttft_ms": {"p50": float(np.percentile(ttft, 50)) if ttft else None,
                            "p99": float(np.percentile(ttft, 99)) if ttft else None},
                "errors": [o.detail for o in self.outcomes if o.result != "ok"][:5]}


def ramp(fleet: Fleet, key: str, model: str, *, low: int = 1, high: int = 6, low_s: float = 15, after_s: float = 20,
         max_tokens: int = 32, timeout: float = 900) -> Ramp:
    """Load at ``low``, then ``high`` until a second replica is ready and ``after_s`` more, then
    ``low`` again, then none; returns once the autoscaler is back at one ready replica."""
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0, timeout=300)
    out = Ramp()
    active = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        i = n
        while not stop.is_set():
            if n >= active[0]:
                stop.wait(0.1)
                continue
            o = _one(client, model, stream=i % 2 == 0, max_tokens=max_tokens)
            with lock:
                out.outcomes.append(o)
            i += 1

    def phase(name: str, conc: int) -> None:
        out.phases.append((name, time.monotonic(), conc))
        active[0] = conc

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(high)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        phase("low", low)
        time.sleep(low_s)
        phase("high", high)
        while fleet.ready_count(model) < 2:
            assert time.monotonic() - t0 < timeout, "no second replica"
            time.sleep(0.5)
        out.peak_ready = 2
        time.sleep(after_s)
        out.peak_ready = max(out.peak_ready, fleet.ready_count(model))
        phase("low", low)
        time.sleep(low_s)
        phase("none", 0)
        while not (fleet.desired.get(model) == 1 and fleet.converged()):
            assert time.monotonic() - t0 < timeout, "not back at one replica"
            time.sleep(0.5)
        out.back_at = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    return out


# -- plots and the scenarios -----------------------------------------------------------------------

def plot(points: list[Point], requests: list[tuple[float, float | None, str]], t0: float, path: Path,
         title: str) -> None:
    """Replicas, queue depth and TTFT over time; ``requests``: (sent, first token or None, result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ts = [p.t - t0 for p in points]
    a.step(ts, [p.desired for p in points], where="post", label="desired", linestyle="--")
    a.step(ts, [p.ready for p in points], where="post", label="ready")
    a.step(ts, [p.starting for p in points], where="post", label="starting")
    a.step(ts, [p.draining for p in points], where="post", label="draining")
    a.set_ylabel("replicas")
    a.legend(loc="upper right")
    a.set_title(title)
    b.plot(ts, [p.held for p in points], label="held at the endpoint")
    b.plot(ts, [p.waiting for p in points], label="waiting in the engines")
    b.set_ylabel("requests")
    b.legend(loc="upper right")
    for result, color in (("ok", "tab:green"), ("cut", "tab:red"), ("error", "tab:orange")):
        pts = [(s - t0, (f - s)) for s, f, r in requests if r == result and f is not None]
        if pts:
            c.scatter(*zip(*pts, strict=True), s=8, color=color, label=f"{result} ({len(pts)})")
    c.set_ylabel("TTFT, s (at its send time)")
    firsts = [f - s for s, f, _ in requests if f is not None]
    if firsts and max(firsts) > 20 * max(min(firsts), 1e-3):
        c.set_yscale("log")
    c.set_xlabel("seconds")
    c.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from codefleet.manifest import load
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["burst", "ramp"])
    p.add_argument("folder", type=Path, help="scenario folder with fleet.yaml")
    p.add_argument("--requests", type=int, default=20, help="burst: requests at zero replicas")
    p.add_argument("--overflow", type=int, default=2, help="burst: requests beyond the hold queue")
    p.add_argument("--high", type=int, default=6, help="ramp: clients at the peak")
    a = p.parse_args(argv)
    os.environ.setdefault("CODEFLEET_BENCH_KEYS", "sk-bench")
    plan = plan_fleet(load(a.folder / "fleet.yaml"))
    model = plan.models[0].name
    regs = Registrations()
    results = a.folder / "results"
    results.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d, LocalFleet(plan, enforce_eager=True, run_dir=Path(d), say=regs) as fleet:
        fleet.start(timeout=900)
        fleet.watch_in_background()
        t0 = time.monotonic()
        with Timeline(fleet, model) as tl:
            if a.kind == "burst":
                b = burst(fleet, "sk-bench", model, regs, n=a.requests, overflow=a.overflow)
                time.sleep(5)
                summary = b.summary()
                reqs = [(x.sent, x.first, x.result) for x in b.held + b.overflow]
                raw: Any = [asdict(x) | {"sent": x.sent - t0, "first": x.first - t0 if x.first else None,
                                         "end": x.end - t0} for x in b.held + b.overflow]
            else:
                fleet_ready = fleet.ready_count(model)
                assert fleet_ready == 1, f"the ramp starts at one replica (min_replicas 1); {fleet_ready} ready"
                r = ramp(fleet, "sk-bench", model, high=a.high)
                summary = r.summary()
                reqs = [(o.start, o.start + o.ttft if o.ttft is not None else None, o.result) for o in r.outcomes]
                raw = [asdict(o) | {"start": o.start - t0, "end": o.end - t0} for o in r.outcomes]
        decisions = [(round(t - t0, 1), line.strip()) for t, line in regs.lines if "scale " in line]
        summary["decisions"] = decisions
        fleet.stop()
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    (results / "requests.json").write_text(json.dumps(raw, indent=1))
    (results / "timeline.json").write_text(json.dumps([asdict(x) | {"t": x.t - t0} for x in tl.points]))
    plot(tl.points, reqs, t0, results / "timeline.png", f"{a.folder.name}: {model}")
    print(json.dumps(summary, indent=2))
    bad = summary.get("cut", 0) + summary.get("error", 0)
    if a.kind == "burst":
        bad = summary["held"] - summary["held_ok"] + summary["overflow"] - summary["overflow_ok"]
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
