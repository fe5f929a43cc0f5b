"""Installs what the local stack needs, only when it is missing, from the package registries.

- Debian packages (PostgreSQL, Redis, Prometheus, JDK 17, Maven) with apt-get;
- Kafka and Cassandra jars from Maven Central, resolved by mvn from the poms in devstack/maven;
- Go tools (mailpit, grpcurl, ghz, k6, kustomize, kubeconform) with `go install` at pinned versions.
Everything downloaded lands under the stack's cache folder, so a second start downloads nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

MAVEN_DIR = Path(__file__).resolve().parent / "maven"
JDK17_HOME = Path("/usr/lib/jvm/java-17-openjdk-amd64")

GO_TOOLS = {
    "mailpit": "github.com/axllent/mailpit@v1.27.11",
    "grpcurl": "github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4",
    "ghz": "github.com/bojand/ghz/cmd/ghz@v0.93.0",
    "k6": "go.k6.io/k6@v1.8.1",
    # deploy/k8s checks (tests/test_deploy_files.py): kustomize builds, kubeconform validates.
    # kustomize 5.8.3 needs Go 1.27; 5.8.2 builds with the Go 1.26 the machines have.
    "kustomize": "sigs.k8s.io/kustomize/kustomize/v5@v5.8.2",
    "kubeconform": "github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0",
    # protoc plugin for gen/bank.swagger.json (scripts/gen_protos.py builds it when missing).
    "protoc-gen-openapiv2": "github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2@v2.33.0",
}

# apt and dpkg hold one lock; two components installing at once would collide on it.
_apt_lock = threading.Lock()
_apt_updated = False

T = TypeVar("T")


class InstallError(RuntimeError):
    pass


def _run(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=1800)
    if result.returncode != 0:
        raise InstallError(f"`{' '.join(argv)}` exited with {result.returncode} (see {log})")


def _as_root(what: str) -> list[str]:
    """The prefix that runs `what` as root: none for root, else sudo."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is None:
        raise InstallError(f"need root (or sudo) to {what}")
    return ["sudo"]


def apt_install(packages: list[str], log: Path) -> None:
    global _apt_updated
    prefix = _as_root(f"apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with _apt_lock:
        if not _apt_updated:
            _run([*prefix, "apt-get", "update", "-q"], log, env)
            _apt_updated = True
        _run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], log, env)


def _debian(packages: list[str], find: Callable[[], T | None], missing: str, log: Path,
            installed: Callable[[], None] | None = None) -> T:
    """What find() finds; when it finds nothing, the packages are installed (then `installed`
    runs) and it looks again. Still nothing: InstallError, saying what is `missing`."""
    found = find()
    if found is None:
        apt_install(packages, log)
        if installed is not None:
            installed()
        found = find()
    if found is None:
        raise InstallError(f"{' '.join(packages)} installed but {missing}")
    return found


def _if_exists(path: Path) -> Callable[[], Path | None]:
    return lambda: path if path.exists() else None


def postgres_bindir(log: Path) -> Path:
    def newest() -> Path | None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
        return versions[-1].parent if versions else None

    return _debian(["postgresql"], newest, "no /usr/lib/postgresql/*/bin/postgres found", log)


def debian_binary(name: str, package: str, log: Path) -> str:
    return _debian([package], lambda: shutil.which(name), f"`{name}` is not on PATH", log)


# The HA mode (BANK_PG_NODES > 1): Debian's Patroni runs on the system python3 with Debian's
# drivers (python3-psycopg2 for Postgres, python3-etcd for its etcd3 client's errors), never in
# the venv; etcd-server is etcd 3.4, whose v2 API is off (so Patroni's `etcd3:` section).
PATRONI_PACKAGES = ["patroni", "python3-psycopg2", "python3-etcd"]
PATRONI_BINARY = Path("/usr/bin/patroni")
ETCD_BINARY = Path("/usr/bin/etcd")


def patroni(log: Path) -> Path:
    return _debian(PATRONI_PACKAGES, _if_exists(PATRONI_BINARY), f"no {PATRONI_BINARY}", log)


def etcd(log: Path) -> Path:
    """etcd's server binary. The package's own service is never used: on a systemd host it
    would hold port 2379, so it is stopped and disabled right after the install, and the stack
    starts its own etcd with its own data folder."""
    def disable_its_service() -> None:
        if shutil.which("systemctl") is not None and Path("/run/systemd/system").exists():
            _run([*_as_root("disable etcd.service"), "systemctl", "disable", "--now", "etcd.service"], log)

    return _debian(["etcd-server"], _if_exists(ETCD_BINARY), f"no {ETCD_BINARY}", log, disable_its_service)


def java17(log: Path) -> Path:
    """The JDK 17 java binary: Kafka 4 and Cassandra 5 are run on it (not on a newer JDK)."""
    java = Path(os.environ.get("BANK_JAVA_HOME", str(JDK17_HOME))) / "bin/java"
    return _debian(["openjdk-17-jdk-headless"], _if_exists(java), f"no {java}; set BANK_JAVA_HOME to a JDK 17", log)


def _built_once(target: Path, stamp: Path, source: str, build: Callable[[], None]) -> Path:
    """target, built from source: by build() unless it exists and its stamp names that source
    (so a changed pin rebuilds it, and a build cut short is done again)."""
    if target.exists() and stamp.exists() and stamp.read_text() == source:
        return target
    build()
    stamp.write_text(source)
    return target


def _go(what: str) -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        raise InstallError(f"Go is not installed; {what} is built with Go")
    return go


def maven_classpath(artifact: str, version: str, cache_dir: Path, log: Path) -> Path:
    """Resolve devstack/maven/<artifact>.pom.xml's runtime closure into cache_dir/<artifact>-<version>/lib."""
    lib = cache_dir / f"{artifact}-{version}" / "lib"

    def build() -> None:
        mvn = debian_binary("mvn", "maven", log)
        java = java17(log)
        pom = MAVEN_DIR / f"{artifact}.pom.xml"
        if lib.exists():
            shutil.rmtree(lib)
        env = dict(os.environ, JAVA_HOME=str(java.parent.parent))
        _run([mvn, "-B", "-q", "-f", str(pom), f"-Drevision={version}",
              "dependency:copy-dependencies", f"-DoutputDirectory={lib}", "-DincludeScope=runtime"], log, env)

    return _built_once(lib, lib / ".complete", version, build)


def go_tool(name: str, bin_dir: Path, log: Path) -> Path:
    module = GO_TOOLS[name]

    def build() -> None:
        go = _go(name)
        bin_dir.mkdir(parents=True, exist_ok=True)
        _run([go, "install", module], log, dict(os.environ, GOBIN=str(bin_dir), GOFLAGS="-mod=mod"))

    return _built_once(bin_dir / name, bin_dir / f".{name}.version", module, build)


# `docker compose config` checks docker-compose.yml without an engine (tests/test_deploy_files.py).
# The compose plugin is built inside its downloaded module: `go install ...@v5.6.0` is refused
# because its go.mod has exclude directives. Its go.mod asks for Go 1.26.8, the machines' Go.
DOCKER_COMPOSE_MODULE = "github.com/docker/compose/v5@v5.6.0"


def _go_module_dir(go: str, module: str, log: Path) -> Path:
    """The module downloaded into Go's module cache (read-only there), from the Go module proxy."""
    import json  # only the compose plugin's build reads `go mod download -json`

    result = subprocess.run([go, "mod", "download", "-json", module], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, GOFLAGS="-mod=mod"), cwd=Path(os.sep))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ go mod download -json {module}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise InstallError(f"`go mod download {module}` exited with {result.returncode} (see {log})")
    return Path(json.loads(result.stdout)["Dir"])


def docker_compose(bin_dir: Path, log: Path) -> tuple[list[str], dict[str, str]]:
    """How to run `docker compose`: the argv that starts it and the variables to add. The plugin
    is built once into <bin_dir>/docker-config/cli-plugins (DOCKER_CONFIG's plugin folder) and
    run by the machine's docker CLI; without one it runs standalone, as `docker-compose`. (The
    docker CLI itself does not build from the Go module proxy: a dependency is not served.)"""
    config_dir = bin_dir / "docker-config"
    plugin = config_dir / "cli-plugins" / "docker-compose"

    def build() -> None:
        go = _go("the docker compose plugin")
        source = _go_module_dir(go, DOCKER_COMPOSE_MODULE, log)
        version = DOCKER_COMPOSE_MODULE.rpartition("@")[2]
        _run([go, "build", "-trimpath", "-ldflags", f"-w -X github.com/docker/compose/v5/internal.Version={version}",
              "-o", str(plugin), "./cmd"], log, dict(os.environ, GOFLAGS="-mod=mod"), cwd=source)

    _built_once(plugin, bin_dir / ".docker-compose.version", DOCKER_COMPOSE_MODULE, build)
    docker = shutil.which("docker")
    if docker is None:
        return [str(plugin)], {}
    return [docker, "compose"], {"DOCKER_CONFIG": str(config_dir)}
