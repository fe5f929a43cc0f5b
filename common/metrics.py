"""Prometheus metrics shared by every service, served on each service's own metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_STARTED = Counter("grpc_server_started_total", "RPCs started", ["grpc_service", "grpc_method"])
RPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed, by status code", ["grpc_service", "grpc_method", "grpc_code"]
)
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def serve(host: str, port: int) -> None:
    start_http_server(port, addr=host)
