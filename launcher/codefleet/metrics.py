"""The launcher's own Prometheus metrics (``codefleet_`` prefix), one registry per fleet."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, start_http_server

disable_created_metrics()


class FleetMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.replicas_desired = Gauge("codefleet_replicas_desired", "Replicas the plan asks for", ["model"], registry=r)
        self.replicas_ready = Gauge("codefleet_replicas_ready", "Replicas healthy and registered with the router",
                                    ["model"], registry=r)
        self.restarts = Counter("codefleet_replica_restarts", "Engine restarts after the engine exited",
                                ["model", "replica"], registry=r)
        self.startup_seconds = Gauge("codefleet_replica_startup_seconds",
                                     "Seconds from launch to healthy, last start of each replica",
                                     ["model", "replica"], registry=r)
        self.registrations = Counter("codefleet_router_registrations",
                                     "Worker registrations with vllm-router (action: add or remove)",
                                     ["model", "action"], registry=r)
        self.component_restarts = Counter("codefleet_component_restarts", "Router or gateway restarts",
                                          ["component"], registry=r)
        self.autoscaler_desired = Gauge("codefleet_autoscaler_desired_replicas",
                                        "Replicas the autoscaler asks for", ["model"], registry=r)
        self.autoscaler_decisions = Counter("codefleet_autoscaler_decisions",
                                            "Autoscaler decisions by reason (from_zero, scale_up, scale_down, to_zero)",
                                            ["model", "reason"], registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics in a thread; returns the port (useful with port 0)."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
