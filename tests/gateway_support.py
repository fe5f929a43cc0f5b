"""What the gateway's tests share (test_authz, test_validation, test_gateway_limits): every RPC of
the contract with its REST mapping, read from the descriptor set (gen/bank.pb), the ones Envoy
routes (from its rendered config) and the internal ones, and Envoy's limits with a raw HTTP
request (bytes in, status and bytes out) to probe them."""

from __future__ import annotations

import http.client
from dataclasses import dataclass

import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from common.config import REPO_ROOT, Settings
from devstack.components import envoy_config

DESCRIPTOR_SET = REPO_ROOT / "gen" / "bank.pb"
# Envoy's limits (envoy/envoy.yaml.tmpl): 64 KiB bodies, 16 KiB of headers, 64 headers.
BODY_LIMIT_BYTES = 64 * 1024
HEADERS_LIMIT_BYTES = 16 * 1024
HEADER_COUNT_LIMIT = 64


@dataclass(frozen=True)
class Rpc:
    method: str  # "/bank.account.v1.AccountService/GetAccount"
    http_verb: str  # "get", "post", "delete" ("" for a method without a REST mapping)
    http_path: str  # "/v1/accounts/{account_id}"


def _descriptor_rpcs() -> dict[str, list[Rpc]]:
    """Every bank service in gen/bank.pb with its methods and their REST mapping."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    services: dict[str, list[Rpc]] = {}
    for file in files.file:
        if not file.package.startswith("bank."):
            continue
        for service in file.service:
            full = f"{file.package}.{service.name}"
            rpcs = []
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern") or ""
                rpcs.append(Rpc(f"/{full}/{method.name}", verb, getattr(rule, verb) if verb else ""))
            services[full] = rpcs
    return services


def _routed_services(settings: Settings) -> set[str]:
    """The services Envoy routes: its route prefixes "/<service>/"."""
    config = yaml.safe_load(envoy_config(settings))
    routed = set()
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for host in network_filter["typed_config"].get("route_config", {}).get("virtual_hosts", []):
                    for route in host["routes"]:
                        prefix = route["match"].get("prefix", "")
                        if prefix.startswith("/bank.") and prefix.endswith("/"):
                            routed.add(prefix.strip("/"))
    return routed


SERVICES = _descriptor_rpcs()


def public_rpcs(settings: Settings) -> dict[str, Rpc]:
    routed = _routed_services(settings)
    return {rpc.method: rpc for name in routed for rpc in SERVICES[name]}


def internal_rpcs(settings: Settings) -> list[Rpc]:
    routed = _routed_services(settings)
    return [rpc for name, rpcs in SERVICES.items() if name not in routed for rpc in rpcs]


def raw_request(settings: Settings, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP request through Envoy, as sent: its status and raw body."""
    connection = http.client.HTTPConnection("127.0.0.1", settings.envoy_port, timeout=15)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
