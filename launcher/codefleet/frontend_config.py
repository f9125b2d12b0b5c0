"""What the fleet's frontend (vllm-router and the gateway) is told: one record, made one way from the plan.

``frontend_settings(plan)`` is the only way from a plan to the frontend's settings (models listed,
holds, shedding, drain, tenants): ``codefleet up`` starts its frontend from it
(``router.Frontend.for_plan``), and ``codefleet helm-values`` writes the chart's values from it
(helm.py). The chart turns those values into the file ``codefleet frontend`` reads
(``FrontendConfig``, helm/codefleet/templates/frontend-config.yaml), and ``FrontendConfig.settings``
gives the same record back (discovery.py). A model's hold is the gateway's ``Hold`` all the way;
only the chart's values spell its fields in camelCase (``HOLD_VALUES``). Every default is defined
once: the manifest's (cold start, drain budget) or the gateway's (``gateway.config``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from codefleet.fim import FormatName
from codefleet.gateway.config import DRAIN_S, Hold
from codefleet.manifest import Defaults, Metrics, Router, Tenant, _Strict
from codefleet.plans import Autoscale, FleetPlan

#: The chart's values spell a hold's fields so (models[].autoscaling.hold); frontend-config.yaml
#: spells them back into ``Hold``'s (tests/helm checks the round trip).
HOLD_VALUES = {"max_requests": "requests", "timeout_s": "timeoutSeconds", "cold_start_s": "coldStartSeconds"}


def hold_of(a: Autoscale) -> Hold:
    """An autoscaled model's hold (with 0 requests it holds none; the chart still reads its size)."""
    return Hold(a.hold_requests, a.hold_timeout_seconds, a.cold_start_seconds)


def holding(holds: Iterable[tuple[str, Hold | None]]) -> dict[str, Hold]:
    """The models whose requests the gateway holds while they have no ready replica."""
    return {m: h for m, h in holds if h is not None and h.max_requests > 0}


@dataclass(frozen=True)
class FrontendSettings:
    """What the router and the gateway are told, however the frontend runs."""

    router: Router
    metrics: Metrics
    models: tuple[str, ...]
    """Served model names the gateway lists."""
    drain_s: float = DRAIN_S
    """The gateway's drain on SIGTERM: how long open streams may finish."""
    hold: dict[str, Hold] = field(default_factory=dict)
    """Models whose requests the gateway holds while they have no ready replica (scale from zero);
    an autoscaled model's adapters are held like it."""
    shed: dict[str, int] = field(default_factory=dict)
    """Per model: the engines' waiting requests above which new requests are shed (429)."""
    tenants: dict[str, Tenant] = field(default_factory=dict)
    frontend_pods: int = 1
    """Frontend processes sharing the tenants' limits (each enforces its share)."""
    fim: dict[str, str] = field(default_factory=dict)
    """Per model that fills in the middle: its format (the gateway refuses ``suffix`` for the rest)."""
    manifest_dir: Path = field(default_factory=Path.cwd)
    """Where a relative API-key file is found."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapter name -> its base model (served under its own name; codefleet.lora)."""


def frontend_settings(plan: FleetPlan) -> FrontendSettings:
    """The frontend of a plan: every model that may have a replica is listed; the drain is the
    longest of the models' (the gateway outlasts each engine's drain)."""
    return FrontendSettings(
        plan.router, plan.metrics, tuple(p.name for p in plan.models if p.max_replicas > 0),
        drain_s=float(max((p.drain_seconds for p in plan.models), default=DRAIN_S)),
        hold=holding((name, hold_of(p.autoscale) if p.autoscale else None) for p in plan.models
                     for name in (p.name, *(a.name for a in (p.lora.adapters if p.lora else ())))),
        shed={p.name: p.max_waiting for p in plan.models if p.max_waiting is not None},
        # an adapter fills as its base model does (the engine's middleware renders every fill it gets)
        tenants=dict(plan.tenants), fim={name: p.generation.fim for p in plan.models if p.generation.fim
                                         for name in (p.name, *(a.name for a in (p.lora.adapters if p.lora else ())))},
        manifest_dir=plan.manifest_dir, adapters=adapters_of(plan))


def adapters_of(plan: FleetPlan) -> dict[str, str]:
    """Adapter name -> base model, of the models that may have a replica."""
    return {a.name: p.name for p in plan.models if p.lora is not None and p.max_replicas > 0 for a in p.lora.adapters}


class Target(_Strict):
    model: str
    """Served model name."""
    host: str
    """DNS name of the model's headless Service."""
    port: int = Field(8000, ge=1, le=65535)
    replicas: int | None = Field(None, ge=0)
    """Replicas the chart asks for (the codefleet_replicas_desired gauge); none when KEDA scales it."""
    hold: Hold | None = None
    """Hold requests while the model has no ready replica (it scales from zero)."""
    max_waiting: int | None = Field(None, ge=0)
    """Shed new requests while the model's engines hold more than this many waiting."""
    fim: FormatName | None = None
    """The model's fill-in-the-middle format (codefleet.fim); none: ``suffix`` is refused."""
    adapters: list[str] = Field(default_factory=list)
    """The model's LoRA adapters (its engines load them at start, ``--lora-modules``); each ready
    pod is registered under each adapter's name too."""


class FrontendConfig(_Strict):
    """The file ``codefleet frontend --config`` reads (the chart's frontend-config.yaml writes it)."""

    router: Router
    metrics: Metrics
    targets: list[Target] = Field(min_length=1)
    interval: float = Field(2.0, gt=0)
    """Seconds between DNS look-ups."""
    drain_seconds: float = Field(Defaults.model_fields["drain_seconds"].default, gt=0)
    """On SIGTERM: how long open streams may finish before each ends with an error event."""
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Per-tenant limits (the manifest's tenants)."""
    frontend_pods: int = Field(1, ge=1)
    """Frontend pods sharing the tenants' limits: each enforces 1/frontend_pods."""

    def settings(self, manifest_dir: Path) -> FrontendSettings:
        return FrontendSettings(
            self.router, self.metrics, tuple(dict.fromkeys(t.model for t in self.targets)),
            drain_s=self.drain_seconds, hold=holding((m, t.hold) for t in self.targets for m in (t.model, *t.adapters)),
            shed={t.model: t.max_waiting for t in self.targets if t.max_waiting is not None},
            tenants=dict(self.tenants), frontend_pods=self.frontend_pods,
            fim={m: t.fim for t in self.targets if t.fim for m in (t.model, *t.adapters)}, manifest_dir=manifest_dir,
            adapters={a: t.model for t in self.targets for a in t.adapters})
