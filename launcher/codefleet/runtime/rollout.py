"""What one pass of the loop does to one model's replicas: scale to the desired count, or replace
an older generation one replica at a time (a new replica first, then an old one drained once the
new one is ready). Pure: the loop (``core.Fleet._converge``) carries the step out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from codefleet.runtime.replica import Replica, State


@dataclass(frozen=True)
class Step:
    """In this order: drain ``drain_first``, launch ``launch`` new replicas, drain ``drain``."""

    drain_first: tuple[Replica, ...] = ()
    """Replicas of an older generation not serving yet: no reason to wait for them."""
    launch: int = 0
    drain: tuple[Replica, ...] = ()


def converge_step(live: Sequence[Replica], generation: str, want: int) -> Step:
    """``live``: the model's starting and ready replicas; ``generation``: the plan's; ``want``: its
    desired replicas."""
    new = [r for r in live if r.generation == generation]
    old = [r for r in live if r.generation != generation]
    first = tuple(r for r in old if r.state is State.STARTING)
    old = [r for r in old if r.state is not State.STARTING]
    if old:
        launch = int(len(new) < want and not any(r.state is State.STARTING for r in new))
        surplus = len(old) + sum(r.state is State.READY for r in new) - want
        return Step(first, launch, tuple(sorted(old, key=lambda r: r.index)[:max(0, surplus)]))
    if len(new) > want:
        # the ones not serving yet first, then the newest
        order = sorted(new, key=lambda r: (r.state is State.READY, -r.index))
        return Step(first, 0, tuple(order[: len(new) - want]))
    return Step(first, want - len(new))
