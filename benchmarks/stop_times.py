"""How long `codefleet up` takes to stop, and what it leaves behind, per way of stopping it.

    python -m benchmarks.stop_times [--manifest deploy/manifests/demo-cpu.yaml] \
        [--methods sigint,down,sigterm,sighup,sigkill] [--rounds 1] [--streams 0] [--json FILE]

Each round of each method starts the whole fleet (`codefleet up`, a run directory of its own, free
ports), waits until it has converged, optionally opens ``--streams`` long streamed chats to the
trained model (or the first model), then stops it: SIGINT (Ctrl-C), `codefleet down`, SIGTERM,
SIGHUP (the terminal closed), or SIGKILL of the launcher (nothing may outlive it). It prints the
time from the signal to the launcher's exit (for SIGKILL: to the last process of the fleet
gone), how the streams ended, and every process of the fleet's process groups still alive 3 s
after the launcher exited. SIGINT is sent to the launcher itself (a background process started
from a script would otherwise have it ignored, see platform-facts): the same handler as Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from codefleet.procs import free_port, group_alive
from codefleet.runtime.state import read_state

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sigint", "down", "sigterm", "sighup", "sigkill")
SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP, "sigkill": signal.SIGKILL}


def _manifest(src: Path, dst: Path) -> list[str]:
    data = yaml.safe_load(src.read_text())
    data.setdefault("router", {})["port"] = free_port()
    data["metrics"] = {"launcher_port": 0, "gateway_port": 0, "router_port": 0}
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return [m["name"] for m in data["models"]]


def _streams(url: str, model: str, n: int, out: list[str]) -> list[threading.Thread]:
    import openai

    def one() -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        reason = "cut"
        try:
            for chunk in c.chat.completions.create(model=model, stream=True, max_tokens=400, temperature=0,
                                                   messages=[{"role": "user", "content": "Explain Python lists."}]):
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = "finished"
        except openai.APIError as exc:
            reason = f"error event ({exc.__class__.__name__})"
        out.append(reason)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def one_stop(manifest: Path, method: str, streams: int, workdir: Path) -> dict[str, Any]:
    home = workdir / "home"
    (home).mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("CODEFLEET_HOME") or Path.home() / ".cache" / "codefleet") / "demo-models"
    if cache.is_dir() and not (home / "demo-models").exists():
        (home / "demo-models").symlink_to(cache)  # the demo checkpoints, built once
    env = {**os.environ, "CODEFLEET_HOME": str(home)}
    names = _manifest(manifest, workdir / "m.yaml")
    with open(workdir / "up.log", "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "codefleet.cli", "up", str(workdir / "m.yaml"), "--enforce-eager"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    while not ((s := read_state(home / "run")) and s.converged):
        if up.poll() is not None or time.monotonic() - t0 > 900:
            raise SystemExit(f"the fleet did not start; see {workdir / 'up.log'}")
        time.sleep(0.5)
    # ... and has said so (after the demo's first question and answer): the fleet a user sees idle
    while b"changes the running fleet" not in (workdir / "up.log").read_bytes():
        if up.poll() is not None or time.monotonic() - t0 > 900:
            raise SystemExit(f"the launcher did not report the fleet ready; see {workdir / 'up.log'}")
        time.sleep(0.2)
    state = read_state(home / "run")
    if state is None:
        raise SystemExit(f"the fleet's state file went away; see {workdir / 'up.log'}")
    groups = [r.pgid for r in state.replicas if r.pgid] + list(state.frontend_pgids)
    print(f"  {method}: fleet ready in {time.monotonic() - t0:.0f} s ({len(groups)} process groups)", flush=True)
    ends: list[str] = []
    threads: list[threading.Thread] = []
    if streams:
        model = next((n for n in names if "smollm2" in n), names[0])
        threads = _streams(str(state.endpoint), model, streams, ends)
        time.sleep(3)
    log_at = (workdir / "up.log").stat().st_size
    t1 = time.monotonic()
    if method == "down":
        subprocess.run([sys.executable, "-m", "codefleet.cli", "down"], env=env, capture_output=True, timeout=600)
    else:
        os.kill(up.pid, SIGNALS[method])
    try:
        up.wait(timeout=600)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait()
    stopped = time.monotonic() - t1
    if method == "sigkill":  # the fleet's end, not the launcher's
        while any(group_alive(g) for g in groups) and time.monotonic() - t1 < 60:
            time.sleep(0.1)
        stopped = time.monotonic() - t1
    for t in threads:
        t.join(timeout=30)
    time.sleep(3)
    left = [g for g in groups if group_alive(g)]
    for g in left:  # measured; now clean up so the next round starts on an empty machine
        os.killpg(g, signal.SIGKILL)
    print(f"  {method}: stopped in {stopped:.1f} s; streams {sorted(ends)}; left running: {left or 'nothing'}",
          flush=True)
    with open(workdir / "up.log", "rb") as f:  # what the launcher said while it stopped
        f.seek(log_at)
        said = [line for line in f.read().decode(errors="replace").splitlines() if line.startswith("  ")][:80]
    return {"method": method, "stop_s": round(stopped, 2), "streams": ends, "left_running": left,
            "exit_status": up.returncode, "stop_log": said}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, default=ROOT / "deploy/manifests/demo-cpu.yaml")
    p.add_argument("--methods", default=",".join(METHODS[:4]), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=1, help="stops per method")
    p.add_argument("--streams", type=int, default=0, help="long streams in flight at the stop")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    results: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        for method in methods:
            print(f"round {rnd + 1}/{a.rounds}, {method} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="stop-times-") as d:
                results.append(one_stop(a.manifest, method, a.streams, Path(d)))
    print("\nmethod    stops  p50 s   max s   left running")
    for method in methods:
        times = [r["stop_s"] for r in results if r["method"] == method]
        left = sum(len(r["left_running"]) for r in results if r["method"] == method)
        print(f"{method:<9} {len(times):>5}  {statistics.median(times):6.1f}  {max(times):6.1f}   {left}")
    if a.json:
        a.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "manifest": str(a.manifest),
                                      "streams": a.streams, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
