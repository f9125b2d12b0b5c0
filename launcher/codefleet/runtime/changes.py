"""What ``codefleet apply`` changes: the running plan against a new one, without side effects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from codefleet.errors import PlanError
from codefleet.planner import FleetPlan, ReplicaPlan


@dataclass(frozen=True)
class ModelChange:
    old: ReplicaPlan
    new: ReplicaPlan
    replace: bool
    """What an engine runs changed (its generation): the model's replicas are replaced one at a time."""

    @property
    def name(self) -> str:
        return self.new.name

    @property
    def replicas_changed(self) -> bool:
        return self.old.replicas != self.new.replicas

    @property
    def autoscale_changed(self) -> bool:
        return self.old.autoscale != self.new.autoscale


@dataclass(frozen=True)
class PlanDiff:
    models: tuple[ModelChange, ...]
    """Every model, in the plan's order, changed or not."""
    tenants_changed: bool


def diff_plans(old: FleetPlan, new: FleetPlan, old_generations: Mapping[str, str],
               new_generations: Mapping[str, str]) -> PlanDiff:
    """``old`` -> ``new`` model by model (generations: each model's ``replica.generation``).
    Adding, removing or renaming models and router or metrics settings cannot be followed while the
    fleet runs (the endpoint's model list and its ports are fixed): PlanError."""
    names = [m.name for m in old.models]
    if [m.name for m in new.models] != names:
        raise PlanError(f"the models changed ({', '.join(names)} -> {', '.join(m.name for m in new.models)}); "
                        f"adding, removing or renaming a model needs `codefleet down` and `up`")
    if new.router != old.router or new.metrics != old.metrics:
        raise PlanError("router or metrics settings changed; they need `codefleet down` and `up`")
    models = tuple(ModelChange(o, m, replace=old_generations[o.name] != new_generations[m.name])
                   for o, m in zip(old.models, new.models, strict=True))
    return PlanDiff(models, tenants_changed=new.tenants != old.tenants)
