"""The local stack launcher: `python -m devstack up|run|down|status|logs|env|envoy-config|tls|pg-bootstrap`.

`make up`, `make run` and `make down` are thin aliases. Every setting comes from the
environment (see `python -m devstack env`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import config
from devstack import install, proc, tls
from devstack.components import cluster_bootstrap, envoy_config
from devstack.stack import Stack, StackError


def _up(stack: Stack, names: list[str] | None) -> int:
    t0 = time.monotonic()
    print(f"Starting the Simple Bank local stack (data in {stack.paths.root})", file=sys.stderr)
    try:
        asyncio.run(stack.up(names))
    except StackError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    print(f"\nAll healthy in {time.monotonic() - t0:.1f}s.\n\n{stack.endpoint_table()}\n", file=sys.stderr)
    return 0


def _run(stack: Stack) -> int:
    """Start everything and stay in the foreground; Ctrl-C (or SIGTERM) stops everything."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = _up(stack, None)
    if code != 0:
        return code
    print("Running. Press Ctrl-C to stop everything.", file=sys.stderr)
    reported: set[str] = set()
    while not stopping:
        time.sleep(0.5)
        for c in stack.components:
            if c.name not in reported and not stack.running(c.name):
                reported.add(c.name)
                print(f"\n{c.name} exited; last lines of its log:\n{proc.tail(stack.paths.log(c.name), 20)}\n",
                      file=sys.stderr)
    print("\nStopping the stack...", file=sys.stderr)
    stack.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start what is missing, wait until healthy, return")
    up.add_argument("components", nargs="*", help="only these (and what they need)")
    sub.add_parser("run", help="start everything and stay in the foreground until Ctrl-C")
    down = sub.add_parser("down", help="stop what devstack started (by pid)")
    down.add_argument("components", nargs="*")
    sub.add_parser("status", help="what runs, and is it healthy")
    logs = sub.add_parser("logs", help="show a component's log")
    logs.add_argument("component")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    sub.add_parser("env", help="every setting: variable, default, meaning")
    sub.add_parser("tools", help="build grpcurl, ghz and k6 into <stack_dir>/bin")
    envoy = sub.add_parser("envoy-config", help="render the Envoy config")
    envoy.add_argument("--compose", action="store_true", help="for docker-compose (service hostnames)")
    envoy.add_argument("--k8s", action="store_true", help="for Kubernetes, deploy/k8s (headless Service names)")
    tls_cmd = sub.add_parser("tls", help="make the local CA and Envoy's localhost certificate if missing or expiring")
    tls_cmd.add_argument("--dir", help="where (default: <stack_dir>/tls)")
    tls_cmd.add_argument("--owner", type=int, help="uid to own the files (docker-compose: Envoy's)")
    sub.add_parser("pg-bootstrap", help="HA mode: the bank's database, once the Patroni cluster has a leader and a "
                                        "synchronous standby (docker-compose's ha profile; `up` does it itself)")
    args = parser.parse_args(argv)

    settings = config.load()
    stack = Stack(settings)
    if args.command == "up":
        return _up(stack, args.components or None)
    if args.command == "run":
        return _run(stack)
    if args.command == "down":
        stopped = stack.down(args.components or None)
        print(f"Stopped {len(stopped)} component(s).", file=sys.stderr)
        return 0
    if args.command == "status":
        rows = asyncio.run(stack.status())
        name_width = max((len(name) for name, _, _ in rows), default=0)
        state_width = max((len(state) for _, state, _ in rows), default=0)
        for name, state, where in rows:
            print(f"  {name:<{name_width}} {state:<{state_width}} {where}")
        return 0
    if args.command == "logs":
        log = stack.paths.log(args.component)
        if args.follow:
            return subprocess.call(["tail", "-n", str(args.lines), "-F", str(log)])
        print(proc.tail(log, args.lines))
        return 0
    if args.command == "tools":
        for tool in ("grpcurl", "ghz", "k6"):
            path = install.go_tool(tool, stack.paths.bin, stack.paths.install_log(tool))
            print(f"  {tool}: {path}", file=sys.stderr)
        return 0
    if args.command == "env":
        for name, default, doc in config.documented():
            print(f"{name}={default}\n    {doc}")
        return 0
    if args.command == "tls":
        files = tls.LocalTls(Path(args.dir)) if args.dir else tls.local(settings)
        made = tls.ensure(files, owner_uid=args.owner)
        print(f"{'made' if made else 'kept'}: {files.cert} (CA for clients: {files.ca_cert})", file=sys.stderr)
        return 0
    if args.command == "pg-bootstrap":
        if not settings.pg_ha:
            print("pg-bootstrap is for the HA mode: set BANK_PG_NODES to the number of Patroni nodes", file=sys.stderr)
            return 2
        asyncio.run(cluster_bootstrap(settings))
        print(f"database {settings.pg_database} ready on the cluster's leader", file=sys.stderr)
        return 0
    if args.command == "envoy-config":
        print(envoy_config(settings, compose=args.compose, k8s=args.k8s), end="")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
