"""Plots ``router_overhead --part engine`` runs side by side: output tokens/s and TTFT p50/p99 of each
target relative to the engine directly (the mean of ``direct`` and ``direct-again`` when the run
has the A/A control), one group of bars per run.

    python -m benchmarks.plot_overhead OUT.png RUN.json [RUN.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGETS = ("router", "endpoint", "direct-again")


def relative(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    s = run["engine"]["summaries"]
    base = [s["direct"]] + ([s["direct-again"]] if "direct-again" in s else [])

    def mean(k: str) -> float:
        return sum(b[k] for b in base) / len(base)

    return {t: {"tokens/s": s[t]["output_token_throughput"] / mean("output_token_throughput"),
                "TTFT p50 +ms": s[t]["ttft_p50_ms"] - mean("ttft_p50_ms"),
                "TTFT p99 +ms": s[t]["ttft_p99_ms"] - mean("ttft_p99_ms")} for t in TARGETS if t in s}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 2:
        print(__doc__)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = Path(args[0]), [Path(a) for a in args[1:]]
    runs = [(f.stem, relative(json.loads(f.read_text()))) for f in files]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(TARGETS)
    for ax, metric in zip(axes, ("tokens/s", "TTFT p50 +ms", "TTFT p99 +ms"), strict=True):
        for i, t in enumerate(TARGETS):
            xs = [j + (i - 1) * width for j in range(len(runs))]
            ax.bar(xs, [r[1].get(t, {}).get(metric, 0.0) for r in runs], width, label=t)
        ax.set_xticks(range(len(runs)), [r[0] for r in runs], rotation=25, ha="right", fontsize=7)
        ax.set_title(metric + (" (1 = direct)" if metric == "tokens/s" else " over direct"))
        if metric == "tokens/s":
            ax.axhline(0.98, color="grey", linestyle="--", linewidth=0.8)
            ax.set_ylim(0.85, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
