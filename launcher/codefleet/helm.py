"""Chart values for helm/codefleet from a manifest and its plan (``codefleet helm-values``).

The chart's engines run ``engine.engine_spec``, as the local and Ray runners do: the chart writes
the flags it owns from the spec's fields (model, served name, host, port, tensor parallel size,
chat template path) and appends ``args``, the spec's other flags rendered by ``flags_argv``. The
chat templates the models use travel in the values (``chatTemplates``), read from the package's
one copy, so the chart holds none of its own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from codefleet.engine import MOE_CONFIG_ENV, engine_spec, flags_argv
from codefleet.errors import PlanError
from codefleet.frontend_config import HOLD_VALUES, FrontendSettings, frontend_settings, hold_of
from codefleet.lora import is_hub_id
from codefleet.manifest import LoadedManifest
from codefleet.observability import autoscale_query, held_query
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.sizing import GiB

ENGINE_PORT = 8000
#: NVIDIA GPU feature discovery's ``nvidia.com/gpu.product`` per planner GPU type.
GPU_PRODUCT = {
    "a100-40gb": "NVIDIA-A100-SXM4-40GB",
    "a100-80gb": "NVIDIA-A100-SXM4-80GB",
    "h100-80gb": "NVIDIA-H100-80GB-HBM3",
    "h200-141gb": "NVIDIA-H200",
}
#: Start-up budget: a fixed part (CUDA init, graph capture, compile) plus the weights at a
#: conservative 100 MiB/s from the hub on first start (the PVC cache makes later starts faster).
STARTUP_FIXED_S = 600
STARTUP_S_PER_GIB = 10
STARTUP_PERIOD_S = 10
API_KEYS_SECRET = "codefleet-api-keys"
#: Where an engine pod finds its model's tuned fused-MoE config (VLLM_TUNED_CONFIG_FOLDER).
MOE_CONFIG_MOUNT = "/etc/codefleet/moe-config"


def model_key(name: str) -> str:
    """A DNS-1035 label for a served model name (Kubernetes object names): ``granite-3.0`` -> ``granite-3-0``."""
    key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not key or not key[0].isalpha():
        key = "m-" + key
    return key[:40].rstrip("-")


def startup_failure_threshold(p: ReplicaPlan) -> int:
    seconds = STARTUP_FIXED_S + STARTUP_S_PER_GIB * p.memory.weight_bytes / GiB
    return math.ceil(seconds / STARTUP_PERIOD_S)


#: Where an engine pod's adapters are (a subPath of the weight cache volume).
ADAPTER_MOUNT = "/var/lib/codefleet/adapters"


def _model_values(p: ReplicaPlan, front: FrontendSettings) -> dict[str, Any]:
    if p.placement.accelerator == "cpu":
        raise PlanError(f"{p.name}: the chart serves GPU plans; plan with --gpu TYPE (one of {', '.join(GPU_PRODUCT)})")
    if p.demo is not None:
        raise PlanError(f"{p.name}: source {p.source} is a generated demo checkpoint that exists only on this "
                        f"machine; the chart needs a Hugging Face id or a path inside the image")
    adapters = p.lora.adapters if p.lora else ()
    for a in adapters:
        if not is_hub_id(a.source) or a.path:
            raise PlanError(f"{p.name}: adapter {a.name}: source {a.source} is on this machine; the chart fetches "
                            f"adapters from the Hugging Face hub (REPO, with a revision)")
    # the engine loads them at start from the folder its fetch-adapters init container fills
    spec = engine_spec(p, loopback=False, adapter_paths={a.name: f"{ADAPTER_MOUNT}/{a.name}" for a in adapters})
    at, tp = p.placement, p.placement.tensor_parallel_size
    weights_gib = p.memory.weight_bytes_per_gpu / GiB
    env = dict(spec.env)
    moe_config: dict[str, str] = {}
    if p.moe.config_dir is not None and p.moe.config and p.moe.found == p.moe.config_dir:
        # the tuned kernel config travels in the values; the pod reads it from a ConfigMap
        moe_config = {"file": p.moe.config, "json": (Path(p.moe.config_dir) / p.moe.config).read_text()}
        env[MOE_CONFIG_ENV] = MOE_CONFIG_MOUNT
    else:
        env.pop(MOE_CONFIG_ENV, None)
    values: dict[str, Any] = {
        "name": p.name,
        "key": model_key(p.name),
        "model": spec.model,
        "replicas": at.replicas,
        "tensorParallelSize": spec.tensor_parallel_size,
        "drainSeconds": p.drain_seconds,
        "chatTemplate": spec.chat_template.name,
        # `codefleet smoke` in `helm test` checks the template against the family's format
        "family": p.family,
        **({"revision": p.revision} if p.revision else {}),
        # a per-pod weight cache (modelCache.type perPod) is sized for the weights, with room to spare
        "cacheGiB": math.ceil(p.memory.weight_bytes / GiB * 1.2 + 10),
        "args": flags_argv(spec.flags),
        "env": dict(sorted(env.items())),
        **({"moeConfig": moe_config} if moe_config else {}),
        # CPUs: the plan's (sizing.host_cpus, what Ray reserves too). Host memory: the weights pass
        # through it while loading, plus the API server and tokenizer.
        "resources": {
            "requests": {"cpu": str(at.host_cpus), "memory": f"{math.ceil(weights_gib * tp + 16)}Gi"},
            "limits": {"memory": f"{math.ceil(weights_gib * tp * 1.5 + 32)}Gi"},
        },
        "shmSize": f"{max(2, 2 * tp)}Gi" if tp > 1 else "1Gi",
        "nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCT[at.accelerator]},
        "startupProbe": {"failureThreshold": startup_failure_threshold(p)},
        **({"autoscaling": _autoscaling_values(p)} if p.autoscale is not None else {}),
        **({"maxWaiting": front.shed[p.name]} if p.name in front.shed else {}),
        # the gateway refuses `suffix` for models not filling in the middle (the engines render it)
        **({"fim": front.fim[p.name]} if p.name in front.fim else {}),
        # LoRA adapters: fetched by each pod, loaded at start, routed under their own names
        **({"adapters": [{"name": a.name, "source": a.source, **({"revision": a.revision} if a.revision else {})}
                         for a in adapters]} if adapters else {}),
        "plan": {
            "gpu": at.accelerator,
            "weightsGiBPerGpu": round(weights_gib, 1),
            "kvCacheTokens": p.memory.kv_tokens,
            "fullLengthSequences": round(p.memory.full_length_sequences, 1),
        },
    }
    return values


def _autoscaling_values(p: ReplicaPlan) -> dict[str, Any]:
    """The KEDA ScaledObject of an autoscaled model, on the queries ``observability`` tests."""
    a = p.autoscale
    assert a is not None
    metric_type, query = autoscale_query(p.name, a.signal)
    adapter_names = tuple(x.name for x in p.lora.adapters) if p.lora else ()  # held for the model too
    return {"enabled": True, "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas, "signal": a.signal,
            "metricType": metric_type, "query": query, "threshold": f"{a.target:g}",
            "heldQuery": held_query(p.name, adapter_names),
            "scaleUpWindowSeconds": round(a.scale_up_window_seconds),
            "scaleDownDelaySeconds": min(3600, round(a.scale_down_delay_seconds)),
            "idleSecondsBeforeZero": round(a.idle_seconds_before_zero),
            "hold": {HOLD_VALUES[k]: v for k, v in dataclasses.asdict(hold_of(a)).items()}}


def helm_values(loaded: LoadedManifest, plan: FleetPlan, api_keys_secret: str = API_KEYS_SECRET) -> dict[str, Any]:
    """Chart values; with API keys on, the keys are read from the existing Secret ``api_keys_secret``."""
    front = frontend_settings(plan)  # what `codefleet up` tells its frontend: the chart's frontend too
    r = front.router
    api_keys: dict[str, Any] = {"enabled": r.api_keys is not None}
    if r.api_keys is not None:
        api_keys |= {"existingSecret": api_keys_secret, "secretKey": "keys"}
    values: dict[str, Any] = {
        "frontend": {"policy": r.policy, "maxBodyMiB": r.max_body_mib, "drainSeconds": math.ceil(front.drain_s),
                     **({"limits": limits} if (limits := r.limits.model_dump(exclude_defaults=True)) else {}),
                     **({"cacheAware": ca} if (ca := r.cache_aware.model_dump(exclude_defaults=True)) else {}),
                     **({"prefixAffinity": pa} if (pa := r.prefix_affinity.model_dump(exclude_defaults=True)) else {}),
                     **({"migration": mg} if (mg := r.migration.model_dump(exclude_defaults=True)) else {})},
        "apiKeys": api_keys,
        **({"tenants": {n: t.model_dump(exclude_none=True) for n, t in front.tenants.items()}}
           if front.tenants else {}),
        "models": [_model_values(p, front) for p in plan.models],
    }
    keys = [m["key"] for m in values["models"]]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise PlanError(f"model names map to the same Kubernetes name {dup[0]!r}; rename one of them")
    templates: dict[str, str] = {}
    for p in plan.models:
        template = p.generation.chat_template
        if templates.setdefault(template.name, template.read_text()) != template.read_text():
            raise PlanError(f"two models use different chat templates named {template.name!r}; rename one of the files")
    values["chatTemplates"] = dict(sorted(templates.items()))
    return values


def helm_values_yaml(loaded: LoadedManifest, plan: FleetPlan, api_keys_secret: str = API_KEYS_SECRET) -> str:
    gpus = ", ".join(f"{m.name} {m.placement.replicas}x{m.placement.gpus_per_replica}" for m in plan.models)
    head = (f"# Generated by `codefleet helm-values {loaded.file.name}` from the manifest and its plan.\n"
            f"# GPUs: {plan.total_gpus} in all ({gpus}).\n")
    if plan.router.api_keys is not None:
        head += (f"# API keys are on: kubectl create secret generic {api_keys_secret} --from-file=keys=KEYS_FILE\n"
                 f"#   (one key per line) before installing.\n")
    head += "# Install: helm install codefleet helm/codefleet -f THIS_FILE\n"
    return head + yaml.dump(helm_values(loaded, plan, api_keys_secret), Dumper=_BlockDumper, sort_keys=False, width=120)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the chat templates) as YAML literal blocks, readable in the values file."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_BlockDumper.add_representer(str, _str)
