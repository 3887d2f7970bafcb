"""``densecap view DIR``: serve the results viewer for a folder written by ``densecap caption --output-vis-dir``.

The original served ``vis/`` with ``python -m SimpleHTTPServer 8181``. This does the same with a threaded
``http.server``: the viewer's files (``client/static/viewer``) at ``/`` and DIR's ``results.json`` and
images at ``/data/``, which is where the viewer looks by default. It serves nothing outside these two
folders (``..``, absolute paths and symlinks that lead out are refused) and only answers GET and HEAD.
Torch-free.
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import posixpath
import sys
import urllib.parse
from pathlib import Path

#: URL prefix under which DIR is served; the viewer's default ``data_dir``.
DATA_PREFIX = "/data/"


def viewer_static_dir() -> Path:
    """The folder holding the viewer's index.html, viewer.js and viewer.css."""
    candidates = []
    spec = importlib.util.find_spec("client")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "static" / "viewer" for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "client" / "static" / "viewer")  # source checkout
    for candidate in candidates:
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError("the viewer's files (client/static/viewer/index.html) are not installed; "
                            "reinstall densecap-live or run from a source checkout")


def resolve_inside(root: Path, url_path: str) -> Path | None:
    """The file under ``root`` that ``url_path`` (already without its prefix) names, or None if it leads out.

    ``root`` must be resolved. Percent-escapes are decoded first, so ``%2e%2e/`` is caught like ``../``.
    """
    relative = urllib.parse.unquote(url_path)
    if "\x00" in relative or "\\" in relative:
        return None
    parts = [p for p in posixpath.normpath("/" + relative).split("/") if p]
    if any(p in ("..", ".") for p in parts):
        return None
    candidate = root.joinpath(*parts).resolve() if parts else root
    try:
        candidate.relative_to(root)  # catches symlinks pointing out of root
    except ValueError:
        return None
    return candidate


class ViewerRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from two roots: the viewer at ``/`` and the data folder at ``/data/``."""

    viewer_root: Path  # set on the subclass made by ``make_server``
    data_root: Path

    def translate_path(self, path: str) -> str:  # noqa: D401 (http.server's name)
        path = urllib.parse.urlsplit(path).path
        if path.startswith(DATA_PREFIX):
            root, rest = self.data_root, path[len(DATA_PREFIX):]
        else:
            root, rest = self.viewer_root, path.lstrip("/")
        target = resolve_inside(root, rest)
        return str(target) if target is not None else ""

    def send_head(self):
        if self.translate_path(self.path) == "":
            self.send_error(403, "outside the served folders")
            return None
        return super().send_head()

    def list_directory(self, path):  # no folder listings: only the viewer and the data are served
        self.send_error(404, "no listing")
        return None

    def end_headers(self) -> None:
        # results.json and images change between runs in place; the viewer must see the new ones.
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if getattr(self.server, "quiet", False):
            return
        super().log_message(format, *args)


def make_server(data_dir: Path, host: str = "127.0.0.1", port: int = 8181, *,
                quiet: bool = False) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for ``data_dir`` (not yet serving; call ``serve_forever``). Port 0 picks a free one."""
    handler = type("BoundViewerRequestHandler", (ViewerRequestHandler,), {
        "viewer_root": viewer_static_dir().resolve(),
        "data_root": Path(data_dir).resolve(),
    })
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.quiet = quiet  # type: ignore[attr-defined]
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder with results.json and its images "
                        "(the --output-vis-dir of `densecap caption`)")
    parser.add_argument("--port", type=int, default=8181, help="port to listen on (default 8181; 0 = any free)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 shares it with your network)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    if not data_dir.is_dir():
        print(f"densecap view: {data_dir} is not a folder; pass the --output-vis-dir of a `densecap caption` run",
              file=sys.stderr)
        return 2
    if not (data_dir / "results.json").is_file():
        print(f"densecap view: warning: {data_dir}/results.json does not exist yet; the page will say so "
              "until `densecap caption --output-vis-dir` writes it", file=sys.stderr)
    try:
        server = make_server(data_dir, args.host, args.port, quiet=args.quiet)
    except OSError as exc:
        print(f"densecap view: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
              "pick another --port", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    print(f"Serving {data_dir.resolve()} at http://{shown_host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
