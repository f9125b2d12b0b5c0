"""What the gateway process is told: written as JSON by the launcher, or by the chart's frontend."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pydantic.dataclasses

from codefleet.manifest import Autoscaling, Limits

#: Paths the gate forwards to the router (POST, JSON body with a ``model``).
FORWARDED = ("/v1/chat/completions", "/v1/completions")

#: The tenant of a key that names none.
DEFAULT_TENANT = "default"

#: Environment variable carrying the key the gate presents to the engines (never on argv).
UPSTREAM_KEY_ENV = "CODEFLEET_UPSTREAM_KEY"


#: A held model's first guess of its time to a ready replica: the manifest's default.
COLD_START_S = float(Autoscaling.model_fields["cold_start_seconds"].default)
#: The gateway's drain on SIGTERM when it is told none.
DRAIN_S = 60.0


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class Hold:
    """Requests for a model with no ready replica wait here (scale from zero) instead of a 503.

    The one spelling of a hold: the gateway's config file, ``codefleet frontend``'s targets
    (frontend_config.Target) and the launcher's frontend all use it (validated when read)."""

    max_requests: Annotated[int, pydantic.Field(ge=0)]
    """Held at once for the model; one more gets 503 with Retry-After."""
    timeout_s: Annotated[float, pydantic.Field(gt=0)]
    """A held request waits at most this long, then gets 503 with Retry-After."""
    cold_start_s: Annotated[float, pydantic.Field(gt=0)] = COLD_START_S
    """First guess of the time to a ready replica (Retry-After); replaced by the cold starts seen."""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gate needs."""

    router_url: str
    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    key_sha256: tuple[str, ...] = ()
    """Hex SHA-256 of each accepted client key; empty means no authentication."""
    max_body_bytes: int = 32 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    poll_s: float = 0.5
    """How often the gate reads the router's worker list."""
    drain_s: float = DRAIN_S
    """On SIGTERM: how long requests in flight may finish before their streams are ended."""
    created: int = field(default_factory=lambda: int(time.time()))
    hold: dict[str, Hold] = field(default_factory=dict)
    """Per model: hold its requests while it has no ready replica (models not here get 503 at once)."""
    key_tenants: dict[str, str] = field(default_factory=dict)
    """Hex SHA-256 of a key -> its tenant (a key not here belongs to ``default``)."""
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Tenant name -> its limits (the manifest's ``Tenant`` fields that are set)."""
    frontend_pods: int = 1
    """How many gateways share the tenants' limits: each enforces 1/frontend_pods of every rate."""
    shed: dict[str, int] = field(default_factory=dict)
    """Per model: shed new requests (429) while its engines hold more than this many waiting."""
    fim: dict[str, str] = field(default_factory=dict)
    """Per model that fills in the middle (``suffix`` on /v1/completions): its format (codefleet.fim);
    a ``suffix`` for any other model gets 400 here. Listed in /v1/models as ``fim``."""
    affinity: dict[str, float] | None = None
    """Prefix affinity's settings (gateway/affinity.py: ``Affinity``'s keywords); None: off."""
    migration: dict[str, float] = field(default_factory=dict)
    """A lost replica's streams continued elsewhere (gateway/migrate.py: ``Settings``' keywords; empty:
    its defaults)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapter name -> its base model: served like a model under its own name (the router has
    a worker for it on each replica that loaded it), listed in /v1/models with ``parent``; reloaded
    on SIGHUP (``codefleet apply``)."""

    def to_json(self) -> str:
        data: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            data[k] = (list(v) if isinstance(v, tuple) else v.model_dump() if isinstance(v, Limits)
                       else {m: dataclasses.asdict(h) for m, h in v.items()} if k == "hold" else v)
        return json.dumps(data, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> GatewayConfig:
        data = json.loads(Path(path).read_text())
        data["models"] = tuple(data["models"])
        data["key_sha256"] = tuple(data.get("key_sha256", ()))
        data["limits"] = Limits(**data.get("limits", {}))
        data["hold"] = {m: Hold(**h) for m, h in data.get("hold", {}).items()}
        return cls(**data)


def hash_keys(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)
