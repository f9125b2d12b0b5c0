"""CPU pinning for side-by-side runs on a small host: the engine on one core, everything else on the rest.

On 2 cores an unpinned engine's API server, the router and the clients take turns on the same CPU,
and whichever side of a comparison runs while the engine is starved looks slower. Pinning the
engine's whole process tree (API server and OpenMP rank) to core 0 gives it the same CPU in every
run; the clients (and the router/gateway when measured) share the other cores, as on a GPU host
where the engine's work is not on the host CPU at all.
"""

from __future__ import annotations

import os

import psutil


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def pin(pids: list[int], cores: list[int], skip: frozenset[int] = frozenset()) -> None:
    """Pin every thread of each process tree (OpenMP threads carry their own affinity), except the
    processes in ``skip``."""
    for pid in pids:
        for proc in tree(pid):
            if proc.pid in skip:
                continue
            try:
                threads = proc.threads()
            except psutil.NoSuchProcess:
                continue
            for thread in threads:
                try:
                    os.sched_setaffinity(thread.id, cores)
                except OSError:
                    pass  # a thread that just ended


def isolate_engine(engine_pid: int, others: list[int]) -> bool:
    """Engine tree on the first allowed core, ``others`` (pids, trees included) on the rest.
    Returns False (and pins nothing) on a single-core host."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return False
    engine = frozenset(p.pid for p in tree(engine_pid))
    pin([engine_pid], cores[:1])
    # The engine is usually a child of one of ``others`` (the process that started the fleet):
    # pinning that tree must leave the engine's processes where they are.
    pin(others, cores[1:], skip=engine)
    return True


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU time of a process (and its descendants) so far."""
    total = 0.0
    for proc in tree(pid) if children else [psutil.Process(pid)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total
