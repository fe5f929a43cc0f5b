"""Generate gen/ from proto/: Python modules, typing stubs and Envoy's descriptor set.

Usage (from anywhere):
    .venv/bin/python scripts/gen_protos.py          # regenerate gen/
    .venv/bin/python scripts/gen_protos.py --check  # exit 1, listing files, if gen/ is stale

Output, all under gen/ (which goes on sys.path; modules import each other as
`bank.customer.v1.customer_pb2`, as PEP 420 namespace packages, so no __init__.py):
- gen/bank/<area>/v1/*_pb2.py and .pyi stubs (mypy-protobuf) for every proto under proto/bank,
  plus *_pb2_grpc.py and .pyi for those that define a service. No Python is generated for the
  vendored proto/google: the googleapis-common-protos wheel provides google.api, google.rpc.
- gen/buf/validate/validate_pb2.py and .pyi from the vendored proto/buf: the bank protos import
  it for their protovalidate rules. The protovalidate runtime ships its own copy only for
  another protobuf runtime (protobuf-py, as protovalidate._gen), not as a google.protobuf
  module, so this is the only buf.validate module our code imports.
- gen/bank.pb: the descriptor set Envoy's gRPC-JSON transcoder loads. It also holds
  google/rpc/status.proto and error_details.proto, named explicitly, so Envoy can render
  google.rpc.Status details (ErrorInfo, BadRequest) as JSON.
- gen/bank.swagger.json: the OpenAPI (Swagger 2.0) document of the public REST API, by
  protoc-gen-openapiv2 (built by devstack into the stack's bin/ at a pinned version) and
  finished by openapi_doc.py (buf.validate rules, error statuses, bearer auth). Envoy serves it
  at /openapi.json.

Everything is generated into a temporary directory first: a protoc failure leaves gen/ as it
was, and --check compares that directory with gen/ instead of touching it. Inputs are sorted,
so the same protos always give byte-identical output.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import openapi_doc
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools ships no stubs

from common import config
from devstack import install
from devstack.components import Paths

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
GEN_ROOT = REPO_ROOT / "gen"
DESCRIPTOR_SET_NAME = "bank.pb"
# Not inputs of Python generation, but Envoy needs them in the descriptor set to render error
# details; named here because no bank proto imports them.
ENVOY_EXTRA_PROTOS = ("google/rpc/error_details.proto", "google/rpc/status.proto")
# Vendored, imported by the bank protos, and given Python here because no wheel provides it as
# a google.protobuf module (see proto/buf/README.md).
VALIDATE_PROTO = "buf/validate/validate.proto"
# Left behind in gen/ by imports; never part of the generated output.
IGNORED_NAMES = frozenset({"__pycache__"})
IGNORED_SUFFIXES = (".pyc",)


def bank_protos() -> list[str]:
    """Every proto under proto/bank, as protoc import paths (relative to proto/), sorted."""
    protos = sorted(path.relative_to(PROTO_ROOT).as_posix() for path in (PROTO_ROOT / "bank").rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'bank'}")
    return protos


def plugin_path(name: str) -> Path:
    """A protoc plugin installed next to this interpreter (the venv's bin/).

    Not resolved through symlinks: .venv/bin/python links to the base interpreter, whose
    bin/ does not hold the venv's plugins.
    """
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise SystemExit(f"protoc plugin {name} not found at {path}; run this with the venv's python")
    return path


def go_plugin_path(name: str) -> Path:
    """A Go protoc plugin, built by devstack into the stack's bin/ if missing (pinned there)."""
    paths = Paths(Path(config.load().stack_dir))
    return install.go_tool(name, paths.bin, paths.install_log(name))


def run_protoc(arguments: Sequence[str]) -> None:
    grpc_tools_include = Path(protoc.__file__).parent / "_proto"
    # argv[0] is ignored by protoc.main. proto/ comes first so our vendored google/api and
    # google/rpc are the ones used; grpc_tools' bundled dir provides google/protobuf.
    argv = ["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--proto_path={grpc_tools_include}", *arguments]
    exit_code: int = protoc.main(argv)
    if exit_code != 0:
        raise SystemExit(f"protoc failed with exit code {exit_code}: {' '.join(argv)}")


def generate(out_dir: Path) -> None:
    """Write the complete contents of gen/ into the empty directory out_dir."""
    protos = bank_protos()
    descriptor_set_path = out_dir / DESCRIPTOR_SET_NAME
    # Source info is left out (protoc's default): Envoy does not need comments, and it keeps
    # the file small.
    run_protoc([f"--descriptor_set_out={descriptor_set_path}", "--include_imports", *protos, *ENVOY_EXTRA_PROTOS])
    run_protoc(
        [
            f"--plugin=protoc-gen-mypy={plugin_path('protoc-gen-mypy')}",
            f"--python_out={out_dir}",
            f"--mypy_out={out_dir}",
            "--mypy_opt=quiet",
            VALIDATE_PROTO,
            *protos,
        ]
    )
    # gRPC stubs only where there is a service: events.proto would otherwise get empty
    # *_pb2_grpc modules that nobody should import.
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path.read_bytes())
    service_protos = sorted(file.name for file in descriptor_set.file if file.service and file.name in protos)
    run_protoc(
        [
            f"--plugin=protoc-gen-mypy_grpc={plugin_path('protoc-gen-mypy_grpc')}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            "--mypy_grpc_opt=quiet",
            *service_protos,
        ]
    )
    generate_openapi(descriptor_set, protos, out_dir)


def generate_openapi(descriptor_set: descriptor_pb2.FileDescriptorSet, protos: list[str], out_dir: Path) -> None:
    """Write the OpenAPI document of the services that have REST routes (the public ones)."""
    public_protos = sorted(
        file.name
        for file in descriptor_set.file
        if file.name in protos
        and any(method.options.HasExtension(annotations_pb2.http) for service in file.service for method in service.method)
    )
    # The plugin insists on a Go import path for every file; ours declare none (no Go code is
    # generated), so each one gets a placeholder that never appears in the output.
    go_packages = [
        f"M{file.name}=simplebank/{Path(file.name).parent.as_posix()}"
        for file in descriptor_set.file
        if not file.options.go_package
    ]
    with tempfile.TemporaryDirectory(prefix="openapi_") as temporary:
        raw_dir = Path(temporary)
        run_protoc(
            [
                f"--plugin=protoc-gen-openapiv2={go_plugin_path(openapi_doc.PLUGIN_NAME)}",
                f"--openapiv2_out={raw_dir}",
                f"--openapiv2_opt={','.join([*openapi_doc.PLUGIN_OPTIONS, *go_packages])}",
                *public_protos,
            ]
        )
        openapi_doc.write(openapi_doc.plugin_output(raw_dir), out_dir / openapi_doc.DOC_NAME, descriptor_set)


def is_ignored(relative: Path) -> bool:
    return any(part in IGNORED_NAMES for part in relative.parts) or relative.name.endswith(IGNORED_SUFFIXES)


def files_under(root: Path) -> set[Path]:
    """Regular files under root, relative to it, without interpreter caches."""
    if not root.is_dir():
        return set()
    return {
        path.relative_to(root) for path in root.rglob("*") if path.is_file() and not is_ignored(path.relative_to(root))
    }


def differing_files(fresh: Path, current: Path) -> list[str]:
    """Files that are missing, extra or different in current compared with fresh, sorted."""
    fresh_files = files_under(fresh)
    current_files = files_under(current)
    differing = fresh_files ^ current_files
    differing.update(
        relative
        for relative in fresh_files & current_files
        if not filecmp.cmp(fresh / relative, current / relative, shallow=False)
    )
    return sorted(relative.as_posix() for relative in differing)


def replace_gen(fresh: Path) -> None:
    """Make gen/ exactly the fresh output: stale files from removed protos go too."""
    GEN_ROOT.mkdir(exist_ok=True)
    for child in GEN_ROOT.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    shutil.copytree(fresh, GEN_ROOT, dirs_exist_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if gen/ is stale")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gen_protos_") as temporary:
        fresh = Path(temporary)
        generate(fresh)
        differing = differing_files(fresh, GEN_ROOT)
        if args.check:
            if differing:
                print("gen/ is stale; run .venv/bin/python scripts/gen_protos.py. Differing files:")
                for name in differing:
                    print(f"  gen/{name}")
                return 1
            print("gen/ is up to date")
            return 0
        replace_gen(fresh)
    print(f"generated {len(files_under(GEN_ROOT))} files in gen/ ({len(differing)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
