"""What ``codefleet apply`` changes: the running plan against a new one, without side effects."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from codefleet.errors import PlanError
from codefleet.plans import FleetPlan, ReplicaPlan
from codefleet.runtime.autoscale import Autoscaler


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
        return self.old.placement.replicas != self.new.placement.replicas

    @property
    def autoscale_changed(self) -> bool:
        return self.old.autoscale != self.new.autoscale


@dataclass(frozen=True)
class PlanDiff:
    models: tuple[ModelChange, ...]
    """Every model, in the plan's order, changed or not."""
    tenants_changed: bool


def check_followable(old: FleetPlan, new: FleetPlan) -> None:
    """Adding, removing or renaming models and router or metrics settings cannot be followed while
    the fleet runs (the endpoint's model list and its ports are fixed): PlanError."""
    names = [m.name for m in old.models]
    if [m.name for m in new.models] != names:
        raise PlanError(f"the models changed ({', '.join(names)} -> {', '.join(m.name for m in new.models)}); "
                        f"adding, removing or renaming a model needs `codefleet down` and `up`")
    if new.router != old.router or new.metrics != old.metrics:
        raise PlanError("router or metrics settings changed; they need `codefleet down` and `up`")


def diff_plans(old: FleetPlan, new: FleetPlan, old_generations: Mapping[str, str],
               new_generations: Mapping[str, str]) -> PlanDiff:
    """``old`` -> ``new`` model by model (generations: each model's ``replica.generation``);
    PlanError when the change cannot be followed (``check_followable``)."""
    check_followable(old, new)
    models = tuple(ModelChange(o, m, replace=old_generations[o.name] != new_generations[m.name])
                   for o, m in zip(old.models, new.models, strict=True))
    return PlanDiff(models, tenants_changed=new.tenants != old.tenants)


@dataclass(frozen=True)
class Followed:
    """The loop's targets after a diff, and what ``codefleet apply`` reports."""

    desired: dict[str, int]
    autoscalers: dict[str, Autoscaler]
    changes: list[str]


def follow(diff: PlanDiff, desired: Mapping[str, int], autoscalers: Mapping[str, Autoscaler],
           now: float) -> Followed:
    """Each model's replicas to have after ``diff``: the new plan's count, or its autoscaler's (a new
    one when autoscaling was turned on or its settings changed, starting at the new ``replicas``
    when that changed, else at the current count; an existing one is told a changed ``replicas``,
    in place). ``desired`` and ``autoscalers`` are the running fleet's, not changed."""
    out_desired = dict(desired)
    out_autoscalers = dict(autoscalers)
    changes: list[str] = []
    for c in diff.models:
        old, m = c.old, c.new
        before = desired.get(old.name, old.placement.replicas)
        if m.autoscale is None:
            out_autoscalers.pop(m.name, None)
            out_desired[m.name] = m.placement.replicas
        elif c.autoscale_changed or m.name not in out_autoscalers:
            start = m.placement.replicas if c.replicas_changed else before
            out_autoscalers[m.name] = Autoscaler(m.autoscale, start, now)
            out_desired[m.name] = out_autoscalers[m.name].desired
            a = m.autoscale
            changes.append(f"{m.name}: autoscaling {a.min_replicas}..{a.max_replicas} on {a.signal} "
                           f"(target {a.target:g}); now {out_desired[m.name]}")
        elif c.replicas_changed:
            out_autoscalers[m.name].set(m.placement.replicas, now)
            out_desired[m.name] = out_autoscalers[m.name].desired
        if c.replace:
            changes.append(f"{m.name}: rolling replace of {before} replica(s) (then {out_desired[m.name]})")
        elif before != out_desired[m.name]:
            changes.append(f"{m.name}: {before} -> {out_desired[m.name]} replicas")
    return Followed(out_desired, out_autoscalers, changes)


def adapter_changes(old: FleetPlan, new: FleetPlan, replaced: Collection[str] = ()) -> list[str]:
    """Adapters added or removed per model: loaded or unloaded on the running replicas, no restart,
    unless the model's replicas are replaced anyway (``replaced``: max_loras or max_lora_rank
    changed, which their defaults do when the adapters' count or rank does)."""
    out = []
    for o, m in zip(old.models, new.models, strict=True):
        before = {a.name: (a.source, a.revision) for a in (o.lora.adapters if o.lora else ())}
        after = {a.name: (a.source, a.revision) for a in (m.lora.adapters if m.lora else ())}
        added = [n for n in after if n not in before]
        removed = [n for n in before if n not in after]
        changed = [n for n in after if n in before and after[n] != before[n]]
        parts = ([f"+{', +'.join(added)}"] if added else []) + ([f"-{', -'.join(removed)}"] if removed else []) \
            + ([f"{', '.join(changed)} from a new source"] if changed else [])
        if parts:
            how = "with the rolling replace" if m.name in replaced else "live, on every replica"
            out.append(f"{m.name}: adapters {'; '.join(parts)} ({how})")
    return out
