"""What a plan is: the planner's output (planner.py makes them; the runtime, router, chart and CLI read them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codefleet.lora import LoraPlan
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
class Placement:
    """Where a model's replicas run and how many there are."""

    accelerator: str
    """A GPU type of gpus.py, or ``cpu``."""
    tensor_parallel_size: int
    #: The replica count; with ``ReplicaPlan.autoscale`` the starting count.
    replicas: int
    replicas_per_node: int
    nodes: int
    #: Host CPUs one replica reserves (``sizing.host_cpus``): Ray's bundle and the chart's CPU request.
    host_cpus: int = 0

    @property
    def gpus_per_replica(self) -> int:
        return 0 if self.accelerator == "cpu" else self.tensor_parallel_size


@dataclass(frozen=True)
class Memory:
    """One replica's memory budget, per GPU (per rank on the CPU); ``ReplicaPlan.budget`` shows how each is made."""

    parameters: int
    weight_bytes: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_bytes_per_gpu: int
    kv_tokens: int
    full_length_sequences: float
    #: What CUDA reports as the GPU's memory (the base of gpu_memory_utilization), bytes; 0 on the CPU.
    gpu_usable_bytes: int = 0
    #: The CPU engine's KV cache (VLLM_CPU_KVCACHE_SPACE), GiB.
    cpu_kv_cache_gib: int = 0


@dataclass(frozen=True)
class EngineLimits:
    """What the engine is told or assumed to run with: the weights' dtype and the scheduler's limits."""

    dtype: str
    max_model_len: int
    gpu_memory_utilization: float
    #: The engine limits the plan assumed (the manifest's engine_args or vLLM's defaults for the GPU).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    #: e.g. "awq (4-bit, group 128; ...)"; None: the weights are in ``dtype``.
    quantization: str | None = None


@dataclass(frozen=True)
class Generation:
    """How the model's answers are made: its chat template and the request defaults the engine applies."""

    chat_template: Path
    #: Sampling defaults for --override-generation-config.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    stop_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    #: Fill-in-the-middle format (codefleet.fim), None: the model takes no ``suffix``.
    fim: str | None = None


@dataclass(frozen=True)
class MoeKernel:
    """The fused-MoE kernel config vLLM looks for (None: not an MoE, or none applies), where it was
    found ("": nowhere), and the manifest's folder of tuned configs (VLLM_TUNED_CONFIG_FOLDER)."""

    config: str | None = None
    found: str = ""
    config_dir: str | None = None


@dataclass(frozen=True)
class ReplicaPlan:
    """One model's plan; every replica of it is the same."""

    name: str
    source: str
    model_ref: str
    family: str
    placement: Placement
    memory: Memory
    engine: EngineLimits
    generation: Generation
    moe: MoeKernel
    estimate: Estimate | None
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    demo: str | None = None
    #: Drain budget (seconds) of a replica leaving service; vLLM's --shutdown-timeout.
    drain_seconds: int = 120
    #: None: ``placement.replicas`` is fixed; else replicas follow load and that is the starting count.
    autoscale: Autoscale | None = None
    #: Overload shedding threshold (the engines' waiting requests); None: no shedding.
    max_waiting: int | None = None
    #: What the plan cannot account for or the operator should act on, said before launch.
    warnings: tuple[str, ...] = ()
    #: The engine serves vLLM's render endpoints (``--enable-scale-out``): vllm-router's cache_aware
    #: asks them for each prompt's token ids (without them it routes on load alone).
    render_endpoints: bool = False
    #: vLLM's --speculative-config (codefleet.speculative), None: no speculative decoding.
    speculative: dict[str, Any] | None = None
    #: LoRA slots and adapters (codefleet.lora), None: LoRA off.
    lora: LoraPlan | None = None
    #: The plan's arithmetic, every term with its source, in the order ``plan --explain`` shows it;
    #: the numbers of ``memory`` and ``placement`` are the same values, set from the same variables.
    budget: tuple[Term, ...] = ()

    @property
    def max_replicas(self) -> int:
        return self.autoscale.max_replicas if self.autoscale else self.placement.replicas

    def to_json(self) -> dict[str, Any]:
        """The plan as ``codefleet plan --json`` prints it: the same nesting as the dataclasses."""
        out = asdict(self)
        out["generation"]["chat_template"] = str(self.generation.chat_template)
        out["placement"]["gpus_per_replica"] = self.placement.gpus_per_replica
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
        return sum(m.placement.gpus_per_replica * m.placement.replicas for m in self.models)

