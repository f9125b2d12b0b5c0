"""``codefleet tune``: which speculative setting wins for a model, measured, never guessed.

For each candidate (``off``, ``ngram:K:MIN:MAX``, ``suffix[:K]``) it starts one engine of the model
from the manifest's own plan (the same engine mapping the fleet uses, only ``speculative`` changed)
beside whatever runs, sends each workload at each concurrency (streaming chat, greedy), and reads
the engine's own counters (``vllm:spec_decode_num_accepted_tokens_total`` / ``_draft_tokens_total``
/ ``_drafts_total``) before and after each cell. The winner has the best geometric-mean output
tokens/s over ``off`` across the cells, and loses no cell by more than ``max_slowdown``; if no
candidate qualifies, ``off`` wins. The fleet's replicas are not touched: apply the printed fragment
with ``codefleet apply``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from codefleet import demo_models, procs
from codefleet.engine import engine_command
from codefleet.loadgen import pct, run, summarize
from codefleet.plans import ReplicaPlan
from codefleet.speculative import Speculative, suffix_available
from codefleet.status import engine_look
from codefleet.tune_workloads import WORKLOADS

SPEC_COUNTERS = ("accepted", "draft_tokens", "drafts")
DEFAULT_CANDIDATES = ("off", "ngram:4:2:4", "ngram:8:3:5", "suffix:16")
WARM_UP = "Say hello in one sentence."


def parse_candidate(text: str) -> Speculative:
    """``off``, ``ngram:K[:MIN[:MAX]]`` or ``suffix[:K]`` (vLLM's keys, checked as the manifest is)."""
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"candidate {text!r}: numbers after the method, e.g. ngram:4:2:4 or suffix:16") from None
    if parts[0] == "off" and not nums:
        return Speculative(method="off")
    if parts[0] == "ngram" and 1 <= len(nums) <= 3:
        keys = ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")
        return Speculative(method="ngram", **dict(zip(keys, nums, strict=False)))
    if parts[0] == "suffix" and len(nums) <= 1:
        return Speculative(method="suffix", **({"num_speculative_tokens": nums[0]} if nums else {}))
    raise ValueError(f"candidate {text!r}: use off, ngram:K[:MIN[:MAX]] or suffix[:K]")


def label(sp: Speculative) -> str:
    if sp.method == "ngram":
        lo, hi = sp.lookup
        return f"ngram k{sp.tokens} {lo}-{hi}"
    return f"suffix k{sp.tokens}" if sp.on else "off"


def spec_counters(text: str) -> dict[str, float]:
    """The engine's speculative counters summed over its engine cores (0 when it does not speculate)."""
    look = engine_look(text)
    return {"accepted": look.spec_accepted or 0.0, "draft_tokens": look.spec_draft_tokens or 0.0,
            "drafts": look.spec_drafts or 0.0}


class CandidateFailed(RuntimeError):
    """A candidate's engine did not start, or failed while it was measured."""


@contextmanager
def candidate_engine(plan: ReplicaPlan, sp: Speculative, log_dir: Path, *, enforce_eager: bool,
                     timeout: float, say: Callable[[str], None], env: dict[str, str] | None = None) -> Iterator[str]:
    """One engine of ``plan`` with ``sp``, on a free loopback port; stopped (its process group) on exit."""
    p = dataclasses.replace(plan, speculative=sp.vllm_config())
    if p.demo is not None:
        demo_models.ensure(p.demo)
    port = procs.free_port()
    cmd = engine_command(p, host="127.0.0.1", port=port, enforce_eager=enforce_eager)
    log = log_dir / f"{plan.name}-{label(sp).replace(' ', '_')}.log"
    proc = procs.spawn(cmd.argv, {**cmd.env, **(env or {})}, log)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        say(f"  starting {plan.name} with speculative {label(sp)} on :{port} (log {log}) ...")
        try:
            procs.wait_healthy(url, timeout, proc, log)
        except RuntimeError as exc:  # it exited, or never answered /health
            raise CandidateFailed(f"did not start: {exc}") from None
        say(f"  ready after {time.monotonic() - t0:.0f} s")
        yield url
    finally:
        procs.stop_group(proc.pid)


def measure_cell(url: str, model: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    before = spec_counters(httpx.get(url + "/metrics", timeout=10).text)
    results = asyncio.run(run(url, "/v1/chat/completions", bodies, concurrency=concurrency))
    after = spec_counters(httpx.get(url + "/metrics", timeout=10).text)
    s = summarize(results)
    d = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    tpot = [t for r in results if r.ok and (t := r.tpot) is not None]
    return {"requests": s["requests"], "ok": s["ok"], "errors": s["errors"],
            "output_tokens_per_s": s["output_token_throughput"], "output_tokens": s["output_tokens"],
            "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p99_ms": s["ttft_p99_ms"],
            "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
            "draft_tokens": d["draft_tokens"], "accepted_tokens": d["accepted"], "drafts": d["drafts"],
            "acceptance_rate": d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None,
            "mean_acceptance_length": 1 + d["accepted"] / d["drafts"] if d["drafts"] else None,
            "texts": [r.text for r in sorted(results, key=lambda r: r.start)]}


def bodies_for(model: str, workload: str, n: int, max_tokens: int, offset: int = 0) -> list[dict[str, Any]]:
    """``n`` requests of ``workload`` from item ``offset`` on: each cell gets items no earlier cell
    sent, so suffix decoding's cache of earlier answers gains nothing from the benchmark repeating
    itself."""
    return [{"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}} for msgs in WORKLOADS[workload](n, offset)]


def compare(plan: ReplicaPlan, candidates: list[Speculative], workloads: list[str], concurrencies: list[int], *,
            requests: int | None = None, max_tokens: int = 256, enforce_eager: bool | None = None,
            timeout: float = 600, log_dir: Path | None = None, env: dict[str, str] | None = None,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every candidate x workload x concurrency cell, measured on one engine per candidate. A
    candidate whose engine does not start is said and left out (its cells are missing; ``choose``
    then cannot pick it). ``enforce_eager`` None: eager on the CPU only."""
    cells: list[dict[str, Any]] = []
    logs = log_dir or Path(tempfile.mkdtemp(prefix="codefleet-tune-"))
    eager = plan.placement.accelerator == "cpu" if enforce_eager is None else enforce_eager
    for sp in candidates:
        mine: list[dict[str, Any]] = []
        try:
            with candidate_engine(plan, sp, logs, enforce_eager=eager, timeout=timeout, env=env or {}, say=say) as url:
                # warm-up, on a prompt of neither workload: the first requests pay one-time costs
                # (ngram's numba JIT, allocator growth)
                measure_cell(url, plan.name, [{"model": plan.name, "messages": [{"role": "user", "content": WARM_UP}],
                                               "max_tokens": 32, "temperature": 0, "stream": True}] * 2, 2)
                for w in workloads:
                    offset = 0
                    for c in concurrencies:
                        n = requests or max(8, 2 * c)
                        try:
                            cell = measure_cell(url, plan.name, bodies_for(plan.name, w, n, max_tokens, offset), c)
                        except httpx.HTTPError as exc:  # /metrics unreachable: the engine died mid-cell
                            raise CandidateFailed(f"failed while measured: {exc}") from None
                        offset += n
                        cell.update(model=plan.name, candidate=label(sp), speculative=sp.vllm_config(), workload=w,
                                    concurrency=c)
                        mine.append(cell)
                        say("  " + row(cell))
        except CandidateFailed as exc:
            say(f"  {label(sp)}: {exc}; left out")
            continue
        cells += mine
    return cells


def row(c: dict[str, Any]) -> str:
    acc = "-" if c["acceptance_rate"] is None else f"{c['acceptance_rate']:.0%}"
    return (f"{c['candidate']:<15} {c['workload']:<6} c={c['concurrency']:<3} {c['output_tokens_per_s']:7.1f} tok/s  "
            f"TPOT p50 {c['tpot_p50_ms']:6.1f} p99 {c['tpot_p99_ms']:6.1f} ms  TTFT p50 {c['ttft_p50_ms']:6.0f} "
            f"p99 {c['ttft_p99_ms']:6.0f} ms  accepted {acc} ({c['accepted_tokens']:.0f}/{c['draft_tokens']:.0f})"
            f"  ok {c['ok']}/{c['requests']}")


def choose(cells: list[dict[str, Any]], max_slowdown: float = 0.05) -> dict[str, Any]:
    """The winner: the best geometric-mean speed-up over ``off`` (output tokens/s, per cell), among
    candidates whose worst cell is at most ``max_slowdown`` slower than ``off``; else ``off``."""
    base = {(c["workload"], c["concurrency"]): c["output_tokens_per_s"] for c in cells if c["speculative"] is None}
    if not base:
        raise ValueError("the comparison needs the candidate off (the baseline)")
    scores: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c["speculative"] is None or (c["workload"], c["concurrency"]) not in base or not c["ok"]:
            continue
        s = scores.setdefault(c["candidate"], {"speculative": c["speculative"], "ratios": {}})
        s["ratios"][f"{c['workload']} c={c['concurrency']}"] = c["output_tokens_per_s"] / base[(c["workload"],
                                                                                                  c["concurrency"])]
    best: dict[str, Any] = {"candidate": "off", "speculative": None, "speedup": 1.0, "worst": 1.0, "scores": scores}
    for name, s in scores.items():
        ratios = list(s["ratios"].values())
        s["speedup"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        s["worst"] = min(ratios)
        if len(ratios) == len(base) and s["worst"] >= 1 - max_slowdown and s["speedup"] > best["speedup"]:
            best.update(candidate=name, speculative=s["speculative"], speedup=s["speedup"], worst=s["worst"])
    return best


def fragment(model: str, best: dict[str, Any], note: str) -> str:
    sp = best["speculative"] if best["speculative"] is not None else False
    body = yaml.safe_dump({"models": [{"name": model, "speculative": sp}]}, sort_keys=False,
                          default_flow_style=None).rstrip()
    return f"# {note}\n{body}\n"


def main(loaded: Any, plans: list[ReplicaPlan], args: Any) -> int:
    names = args.model or [p.name for p in plans]
    unknown = [n for n in names if n not in {p.name for p in plans}]
    if unknown:
        print(f"error: {', '.join(unknown)} not in {loaded.file}; models: {', '.join(p.name for p in plans)}",
              file=sys.stderr)
        return 2
    try:
        candidates = [parse_candidate(c) for c in (args.candidate or DEFAULT_CANDIDATES)]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(not c.on for c in candidates):
        candidates.insert(0, Speculative(method="off"))
    bad = [w for w in args.workload if w not in WORKLOADS]
    if bad:
        print(f"error: unknown workload {', '.join(bad)}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"workloads": args.workload, "concurrency": args.concurrency, "models": {}}
    for plan in (p for p in plans if p.name in names):
        print(f"{plan.name}: {len(candidates)} candidates x {len(args.workload)} workloads x "
              f"{len(args.concurrency)} concurrencies, one engine at a time ...", flush=True)
        # the candidates run on this machine, GPU or not
        if any(c.method == "suffix" for c in candidates) and not suffix_available():
            print("error: candidate suffix needs arctic-inference, which does not import here (docs/install.md)",
                  file=sys.stderr)
            return 2
        try:  # every cell's items exist before any engine starts
            for w in args.workload:
                bodies_for(plan.name, w, sum(args.requests or max(8, 2 * c) for c in args.concurrency), 1)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            cells = compare(plan, candidates, args.workload, args.concurrency, requests=args.requests,
                            max_tokens=args.max_tokens, enforce_eager=True if args.enforce_eager else None,
                            env={"CUDA_VISIBLE_DEVICES": args.gpus} if args.gpus else None,
                            say=lambda s: print(s, flush=True))
        except ValueError as exc:  # a workload asked for more items than it has
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not any(c["speculative"] is None for c in cells):
            print(f"error: {plan.name}: the baseline (off) could not be measured; see the engine logs above",
                  file=sys.stderr)
            return 1
        best = choose(cells, args.max_slowdown)
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in best["scores"].get(best["candidate"], {}).get("ratios", {}).items())
        note = (f"codefleet tune: {best['candidate']} wins for {plan.name} ({args.workload and '+'.join(args.workload)}, "
                f"concurrency {','.join(map(str, args.concurrency))}): output tokens/s vs off {ratios or 'baseline'}")
        print(fragment(plan.name, best, note))
        for c in cells:
            c.pop("texts", None)
        out["models"][plan.name] = {"cells": cells, "winner": {k: v for k, v in best.items() if k != "scores"},
                                    "scores": best["scores"]}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"results: {args.out}")
    return 0


def summary_table(cells: list[dict[str, Any]]) -> str:
    """A markdown table of the cells (the scenario's README)."""
    head = ("| candidate | workload | conc. | output tok/s | vs off | output tokens | TPOT p50 / p99 ms | "
            "TTFT p50 / p99 ms | accepted |\n|---|---|---|---|---|---|---|---|---|")
    base = {(c["workload"], c["concurrency"]): c["output_tokens_per_s"] for c in cells if c["speculative"] is None}
    lines = [head]
    for c in cells:
        b = base.get((c["workload"], c["concurrency"]))
        acc = "-" if c["acceptance_rate"] is None else (f"{c['acceptance_rate']:.0%} ({c['accepted_tokens']:.0f}/"
                                                        f"{c['draft_tokens']:.0f})")
        if not b:
            continue
        lines.append(f"| {c['candidate']} | {c['workload']} | {c['concurrency']} | {c['output_tokens_per_s']:.1f} | "
                     f"{c['output_tokens_per_s'] / b:.2f}x | {c['output_tokens']:,} | "
                     f"{c['tpot_p50_ms']:.1f} / {c['tpot_p99_ms']:.1f} | "
                     f"{c['ttft_p50_ms']:.0f} / {c['ttft_p99_ms']:.0f} | {acc} |")
    return "\n".join(lines)

