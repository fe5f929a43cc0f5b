"""The customer web app (web/): its build, and the small static-file server Envoy routes `/` to.

    python -m devstack.web build      npm ci when node_modules is missing or stale, then esbuild into web/dist
    python -m devstack.web check      the build, then TypeScript's type check (tsc --noEmit): `make lint`
    python -m devstack.web serve      serve web/dist (the local stack's `web` component)

Why a process of its own and not Envoy's direct_response: docs/decisions/0017. The server answers
only the few files the build makes (no path ever reaches the file system), reads them at each
request so a rebuild needs no restart, and leaves the security headers (the
Content-Security-Policy) to Envoy's route, the one place that says what a page may load.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import config
from common.config import REPO_ROOT
from devstack import install

WEB = REPO_ROOT / "web"
DIST = WEB / "dist"
# Every file the server answers: URL path -> (file in dist/, content type). Nothing else exists.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app/app.css": ("app.css", "text/css; charset=utf-8"),
    "/app/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
# npm ci writes this beside node_modules when it succeeded: the lockfile's hash it installed.
LOCK_STAMP = WEB / "node_modules" / ".simplebank-lock.sha256"
BUILD_TIMEOUT_S = 600


def _node_and_npm(log: Path) -> tuple[str, str]:
    """Node.js and npm from the machine, or Debian's packages when missing."""
    node = install.debian_binary("node", "nodejs", log)
    npm = shutil.which("npm") or install.debian_binary("npm", "npm", log)
    return node, npm


def install_packages(log: Path) -> None:
    """`npm ci` (exactly package-lock.json's versions, from the npm registry) when node_modules
    was not installed from the current lockfile."""
    _, npm = _node_and_npm(log)
    wanted = hashlib.sha256((WEB / "package-lock.json").read_bytes()).hexdigest()
    if LOCK_STAMP.is_file() and LOCK_STAMP.read_text().strip() == wanted:
        return
    install._run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], log, cwd=WEB)
    LOCK_STAMP.write_text(wanted + "\n")


def build(log: Path) -> Path:
    """web/dist from web/src: index.html, app.js (bundled, minified), app.css, favicon.svg."""
    install_packages(log)
    _, npm = _node_and_npm(log)
    install._run([npm, "run", "--silent", "build"], log, cwd=WEB)
    missing = [name for name, _ in FILES.values() if not (DIST / name).is_file()]
    if missing:
        raise install.InstallError(f"the web build made no {', '.join(missing)} in {DIST} (see {log})")
    return DIST


def typecheck(log: Path) -> None:
    install_packages(log)
    _, npm = _node_and_npm(log)
    install._run([npm, "run", "--silent", "typecheck"], log, cwd=WEB)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with Envoy: every answer has a Content-Length
    server_version = "simplebank-web"
    sys_version = ""
    root: Path = DIST

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        found = FILES.get(path)
        content = None
        if found is not None:
            try:
                content = (self.root / found[0]).read_bytes()
            except OSError:
                content = None
        if found is None or content is None:
            content, content_type, status = b"not found\n", "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND
        else:
            content_type, status = found[1], HTTPStatus.OK
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        # Small files, no content hashes in their names: the browser asks again each time.
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        # Envoy's access log already has every request (with its request id); stay quiet.
        return


def serve(host: str, port: int, root: Path) -> None:
    _Handler.root = root
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    print(f"serving {root} on http://{host}:{port}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check", "serve"])
    args = parser.parse_args(argv)
    settings = config.load()
    log = Path(settings.stack_dir) / "logs" / "web.install.log"
    try:
        if args.command == "build":
            print(f"built {build(log)}", file=sys.stderr)
        elif args.command == "check":
            build(log)
            typecheck(log)
        else:
            serve(settings.bind_host, settings.web_port, DIST)
    except install.InstallError as exc:
        print(f"{exc}\n{log.read_text()[-4000:] if log.is_file() else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
