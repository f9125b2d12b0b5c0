"""The runtime: one reconcile loop (``core.Fleet``) over thin backends that start, stop and locate
engines (``local``: processes on this host; ``ray``: actors in placement groups).

The loop compares the desired fleet (the plan) with the replicas that exist and acts on the
difference, level-triggered: every pass recomputes from what it sees, so a missed event heals on
the next one. A replica is ``starting`` (launched, not yet healthy), ``ready`` (healthy and
registered with the router), ``draining`` (out of the router, finishing its requests) or
``stopped``. Scaling, rolling replacement, restarts after a crash, router registration, the
``codefleet_*`` metrics, the Prometheus file_sd targets and the state file ``status`` reads are
all the loop's, the same for every backend.

Modules: ``core`` (the loop), ``backend`` (what the loop needs of a backend), ``local`` and ``ray``
(the backends), ``replica`` (a replica's record, its generation), ``rollout`` (one model's step:
scale, rolling replace), ``changes`` (``apply``: the running plan against a new one), ``autoscale``
(the autoscaler and its samples), ``probe`` (/health and /metrics over HTTP), ``state`` (the state
file: one writer, one reader).
"""
