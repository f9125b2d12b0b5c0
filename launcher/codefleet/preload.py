"""Fill the weight cache (HF_HOME) for one model before its engines start, or wait until it is filled.

``python -m codefleet.preload MODEL [--revision R]`` (the chart's preload Job, engine image):
downloads what vLLM would download at start (the weight files its loader picks, through vLLM's
own ``download_weights_from_hf``, plus config and tokenizer files) and then writes a marker.
``python -m codefleet.preload --wait MODEL [--revision R]`` (the engines' init container) waits for
that marker, printing how much of the model is in the cache every 15 s.

The marker is ``$HF_HOME/codefleet-preloaded/<model>@<revision>``: a marker, not the hub's cache
layout, so a half-finished download is never taken for a finished one.
``python -m codefleet.preload --adapters-into DIR NAME=REPO[@REVISION] ...`` (the engines' fetch-adapters
init container) downloads each LoRA adapter's PEFT files into DIR/NAME, which the engine loads at
start (``--lora-modules``): megabytes, fetched by every pod.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: vLLM's loader (load_format auto) takes the first of these the repository has.
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt"]
#: What transformers and vLLM read besides the weights (config, tokenizer, generation config).
SIDE_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]
#: vLLM's DefaultModelLoader skips these (consolidated checkpoints some repositories also carry).
IGNORE_PATTERNS = ["original/**/*"]
PROGRESS_S = 15.0


def hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def marker(model: str, revision: str | None, home: Path | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._@-]+", "--", f"{model}@{revision or 'main'}")
    return (home or hf_home()) / "codefleet-preloaded" / safe


def cached_bytes(model: str, home: Path | None = None) -> int:
    """Bytes of the model in the hub cache so far (blobs, finished or in progress)."""
    repo = (home or hf_home()) / "hub" / ("models--" + model.replace("/", "--"))
    return sum(f.stat().st_size for f in repo.rglob("*") if f.is_file()) if repo.is_dir() else 0


def preload(model: str, revision: str | None, download: Callable[..., str] | None = None,
            snapshot: Callable[..., str] | None = None) -> Path:
    """Download the model's weights and side files; write and return the marker."""
    if download is None:
        from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf
        download = download_weights_from_hf
    if snapshot is None:
        from huggingface_hub import snapshot_download
        snapshot = snapshot_download
    started = time.monotonic()
    print(f"preload {model} (revision {revision or 'main'}) into {hf_home()} ...", flush=True)
    snapshot(model, revision=revision, allow_patterns=SIDE_PATTERNS)
    download(model, cache_dir=None, allow_patterns=WEIGHT_PATTERNS, revision=revision,
             ignore_patterns=IGNORE_PATTERNS)
    done = marker(model, revision)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(f"{time.time():.0f}\n")
    print(f"preload {model}: {cached_bytes(model) / 2**30:.1f} GiB cached in {time.monotonic() - started:.0f} s",
          flush=True)
    return done


def wait(model: str, revision: str | None, timeout: float, poll_s: float = 2.0,
         progress_s: float = PROGRESS_S) -> bool:
    """Wait for the model's marker; True when it is there, False after ``timeout`` seconds."""
    done = marker(model, revision)
    started = last = time.monotonic()
    print(f"waiting for the preload of {model} ({done}) ...", flush=True)
    while not done.exists():
        now = time.monotonic()
        if now - started > timeout:
            print(f"{model}: no preload after {timeout:.0f} s; is the preload Job running "
                  f"(kubectl get jobs -l codefleet.dev/model)?", file=sys.stderr, flush=True)
            return False
        if now - last >= progress_s:
            last = now
            print(f"  [{now - started:5.0f} s] {cached_bytes(model) / 2**30:.1f} GiB of {model} cached so far",
                  flush=True)
        time.sleep(poll_s)
    print(f"{model}: preloaded ({cached_bytes(model) / 2**30:.1f} GiB) after {time.monotonic() - started:.0f} s",
          flush=True)
    return True


#: What vLLM reads of a LoRA adapter (vllm/lora/peft_helper.py, lora_model.py).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt"]


def fetch_adapters(specs: list[str], into: Path, snapshot: Callable[..., str] | None = None) -> None:
    """Each ``NAME=REPO[@REVISION]`` into ``into/NAME``."""
    if snapshot is None:
        from huggingface_hub import snapshot_download
        snapshot = snapshot_download
    for spec in specs:
        name, sep, ref = spec.partition("=")
        repo, _, revision = ref.partition("@")
        if not sep or not name or not repo:
            raise SystemExit(f"adapter {spec!r}: write NAME=REPO or NAME=REPO@REVISION")
        print(f"adapter {name}: {repo} (revision {revision or 'main'}) into {into / name} ...", flush=True)
        snapshot(repo, revision=revision or None, local_dir=str(into / name), allow_patterns=ADAPTER_PATTERNS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codefleet.preload", description=__doc__)
    p.add_argument("model", nargs="+", help="Hugging Face id (with --adapters-into: NAME=REPO[@REVISION] ...)")
    p.add_argument("--adapters-into", type=Path, help="fetch LoRA adapters into this folder")
    p.add_argument("--revision")
    p.add_argument("--wait", action="store_true", help="wait for the preload instead of doing it")
    p.add_argument("--timeout", type=float, default=7200.0, help="--wait: give up after this many seconds")
    args = p.parse_args(argv)
    if args.adapters_into is not None:
        fetch_adapters(args.model, args.adapters_into)
        return 0
    if len(args.model) != 1:
        p.error("one model")
    if args.wait:
        return 0 if wait(args.model[0], args.revision, args.timeout) else 1
    preload(args.model[0], args.revision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
