"""What the reconcile loop asks engines and the gateway over HTTP: /health and /metrics.

``Fleet`` takes a ``Probe``; ``HttpProbe`` is the real one, tests pass a fake.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import httpx


class Answer(NamedTuple):
    status: int
    text: str


class Probe(Protocol):
    def health(self, url: str) -> bool:
        """``url``/health answers 200."""
        ...

    def metrics(self, url: str, timeout: float) -> Answer | None:
        """``url``/metrics; None when it does not answer (refused, timed out)."""
        ...

    def close(self) -> None: ...


class HttpProbe:
    def __init__(self, timeout: float = 2.0) -> None:
        self._client = httpx.Client(timeout=timeout)

    def health(self, url: str) -> bool:
        try:
            return self._client.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self, url: str, timeout: float) -> Answer | None:
        try:
            resp = self._client.get(url + "/metrics", timeout=timeout)
        except httpx.HTTPError:
            return None
        return Answer(resp.status_code, resp.text)

    def close(self) -> None:
        self._client.close()
