"""The router's worker list as the gateway sees it: which models have a healthy worker (vllm-router
sends a request for a model without workers to *another* model's worker, so the gate answers for
those itself), how many per model (``ready_replicas`` in /v1/models), and their URLs (shedding
reads their engines' /metrics)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from aiohttp import ClientSession
from aiohttp.client_exceptions import ClientError

HOLD_POLL_S = 0.2
"""How often the worker list is read while requests are held, or until the router first answers."""


class Workers:
    def __init__(self, router_url: str, models: frozenset[str], poll_s: float,
                 changed: Callable[[], None], holding: Callable[[], bool]) -> None:
        self.router_url = router_url
        self.poll_s = poll_s
        self.changed = changed
        """Called after every look (held requests may go; the model list may change)."""
        self.holding = holding
        self.available: frozenset[str] = models
        """Models with at least one healthy worker (all of them until the first look)."""
        self.ready: dict[str, int] | None = None
        """Healthy workers per model; None until the router first answered."""
        self.urls: list[tuple[str, str]] = []
        """(engine URL, model) of every healthy worker of a model (not of an adapter: its workers are
        aliases of its base model's engines, codefleet.lora.alias_url)."""
        self.aliases: frozenset[str] = frozenset()
        """The adapters' names."""
        self.refreshed_at = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self.session: ClientSession | None = None

    async def refresh(self) -> None:
        assert self.session is not None
        try:
            async with self.session.get(self.router_url + "/workers") as r:
                data = await r.json(content_type=None)
            workers = [w for w in data.get("workers", []) if w.get("is_healthy", True)]
            self.available = frozenset(w["model_id"] for w in workers)
            self.urls = [(str(w["url"]), str(w["model_id"])) for w in workers
                         if "url" in w and w["model_id"] not in self.aliases]
            self.ready = dict(collections.Counter(str(w["model_id"]) for w in workers))
        except (ClientError, TimeoutError, ValueError, KeyError, AttributeError):
            pass  # router restarting: keep the last known set
        self.refreshed_at = time.monotonic()
        self.changed()

    def refresh_soon(self) -> asyncio.Future[None] | None:
        """Look again now unless a look is under way or finished under 0.1 s ago (requests that
        arrive together share one look); the look under way, if any."""
        if (self._refreshing is None or self._refreshing.done()) and time.monotonic() - self.refreshed_at > 0.1:
            self._refreshing = asyncio.ensure_future(self.refresh())
        return self._refreshing if self._refreshing is not None and not self._refreshing.done() else None

    async def poll(self) -> None:
        while True:
            # faster while requests wait for a replica (the launcher also signals a registration),
            # and until the router first answered (it may start after the gateway)
            fast = self.holding() or self.ready is None
            await asyncio.sleep(min(self.poll_s, HOLD_POLL_S) if fast else self.poll_s)
            await self.refresh()
