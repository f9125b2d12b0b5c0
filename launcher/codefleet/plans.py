"""What a plan is: the planner's output (planner.py makes them; the runtime, router, chart and CLI read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codefleet.manifest import Metrics, Router, Tenant
from codefleet.sizing import GiB


@dataclass(frozen=True)
class Term:
    """One number of a model's plan, recorded where the plan computes it: ``plan --explain`` shows
    these and recomputes none of them."""

    name: str
    value: float
    unit: str
    """``bytes`` (shown in GiB), ``count`` (thousands grouped), ``int`` (as is) or ``ratio`` (one decimal)."""
    how: str
    """How the number is made and where its inputs come from."""

    @property
    def shown(self) -> str:
        if self.unit == "bytes":
            return f"{self.value / GiB:,.2f} GiB"
        if self.unit == "ratio":
            return f"{self.value:.1f}"
        if self.unit == "int":
            return str(int(self.value))
        return f"{int(self.value):,}"



@dataclass(frozen=True)
class Estimate:
    """Roofline upper bounds, not measurements."""

    decode_tokens_per_s_batch1: float
    decode_tokens_per_s_max_batch: float
    max_batch: int
    prefill_seconds: float
    prefill_prompt_tokens: int


@dataclass(frozen=True)
class ReplicaPlan:
    """One model's plan; every replica of it is the same."""

    name: str
    source: str
    model_ref: str
    family: str
    accelerator: str
    dtype: str
    tensor_parallel_size: int
    replicas: int
    max_model_len: int
    gpu_memory_utilization: float
    chat_template: Path
    parameters: int
    weight_bytes: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_bytes_per_gpu: int
    kv_tokens: int
    full_length_sequences: float
    replicas_per_node: int
    nodes: int
    cpu_kv_cache_gib: int
    estimate: Estimate | None
    #: Sampling defaults for --override-generation-config.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    stop_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    demo: str | None = None
    #: Drain budget (seconds) of a replica leaving service; vLLM's --shutdown-timeout.
    drain_seconds: int = 120
    #: None: ``replicas`` is fixed; else replicas follow load and ``replicas`` is the starting count.
    autoscale: Autoscale | None = None
    #: Overload shedding threshold (the engines' waiting requests); None: no shedding.
    max_waiting: int | None = None
    #: The engine limits the plan assumed (the manifest's engine_args or vLLM's defaults for the GPU).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    #: e.g. "awq (4-bit, group 128; ...)"; None: the weights are in ``dtype``.
    quantization: str | None = None
    #: What CUDA reports as the GPU's memory (the base of gpu_memory_utilization), bytes.
    gpu_usable_bytes: int = 0
    #: The fused-MoE kernel config vLLM looks for, and where it was found ("" : nowhere).
    moe_config: str | None = None
    moe_config_found: str = ""
    #: A folder of tuned fused-MoE configs (VLLM_TUNED_CONFIG_FOLDER), from the manifest.
    moe_config_dir: str | None = None
    #: What the plan cannot account for or the operator should act on, said before launch.
    warnings: tuple[str, ...] = ()
    #: Host CPUs one replica reserves (``host_cpus``): Ray's bundle and the chart's CPU request.
    host_cpus: int = 0
    #: The plan's arithmetic, every term with its source, in the order ``plan --explain`` shows it.
    #: (ReplicaPlan stays flat: its numbers above are the same values, set from the same variables.)
    budget: tuple[Term, ...] = ()

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale else self.replicas

    @property
    def gpus_per_replica(self) -> int:
        return 0 if self.accelerator == "cpu" else self.tensor_parallel_size

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["chat_template"] = str(self.chat_template)
        out["gpus_per_replica"] = self.gpus_per_replica
        return out


@dataclass(frozen=True)
class Autoscale:
    """A model's autoscaling, resolved (the manifest's ``Autoscaling`` with its defaults filled in)."""

    min_replicas: int
    max_replicas: int
    signal: str
    target: float
    """Per replica: waiting requests, KV-cache fraction, or seconds of p95 TTFT (target x SLO)."""
    scale_up_window_seconds: float
    scale_down_delay_seconds: float
    idle_seconds_before_zero: float
    hold_requests: int
    hold_timeout_seconds: float
    cold_start_seconds: float

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class FleetPlan:
    models: list[ReplicaPlan]
    gpus_per_node: int
    router: Router = field(default_factory=Router)
    metrics: Metrics = field(default_factory=Metrics)
    manifest_dir: Path = field(default_factory=Path.cwd)
    """Relative paths in the manifest (an API-key file) are relative to this."""
    tenants: dict[str, Tenant] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return sum(m.gpus_per_replica * m.replicas for m in self.models)

