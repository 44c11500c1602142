"""The ``bitmar_memory_browser`` command: open a store read-only, load the model that wrote it (to
embed text and image queries), and serve the browser on 127.0.0.1 until Ctrl-C."""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
from pathlib import Path

DEFAULT_PORT = 8765
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT_NAME = "bitmar_default.safetensors"


def default_checkpoint() -> Path:
    """The bundled checkpoint: the package's share dir (found through the ament index, or under
    this Python's prefix, where scripts/setup.sh installs it), else this source checkout's."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory("bitmar_ros")) / "checkpoints" / DEFAULT_CHECKPOINT_NAME)
    except Exception:  # no ament environment (AMENT_PREFIX_PATH unset) or not installed through it
        pass
    candidates.append(Path(sys.prefix) / "share" / "bitmar_ros" / "checkpoints" / DEFAULT_CHECKPOINT_NAME)
    candidates.append(REPO_ROOT / "checkpoints" / DEFAULT_CHECKPOINT_NAME)
    return next((c for c in candidates if c.is_file()), candidates[-1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(64)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def uvicorn_server(app, **kwargs):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **kwargs))


class ServerThread:
    """The browser served from a background thread (tests, notebooks): ``start()``, ``url``, ``stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(app)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitmar_memory_browser", description=__doc__)
    ap.add_argument("--store", required=True, type=Path, help="the node's store_dir (holds episodes.sqlite3)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="the model that wrote the store, for embedding queries (default: the bundled checkpoint)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; another address shows the "
                         "robot's memory to the network)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: a free one)")
    ap.add_argument("--allow-clear", action="store_true",
                    help="offer 'clear memory' (asks for confirmation; stop the node writing the store first)")
    ap.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                    help="Host header name to serve when listening on a non-loopback address (repeatable; "
                         "default there: any)")
    ap.add_argument("--page-size", type=int, default=24, help="episodes per timeline page (1-100)")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads for embedding queries")
    args = ap.parse_args(argv)

    # Imported here, not at module level: loading torch and the checkpoint is the command's work.
    from bitmar_core.inference.runtime import RuntimeLoadError
    from bitmar_core.episodes.store_api import StoreError

    from .app import LOOPBACK_HOSTS, create_app
    from .memory_view import MAX_PAGE_SIZE, MemoryView

    if not 1 <= args.page_size <= MAX_PAGE_SIZE:
        ap.error(f"--page-size: expected 1-{MAX_PAGE_SIZE}, got {args.page_size}")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port: expected 0-65535, got {args.port}")
    checkpoint = args.checkpoint or default_checkpoint()
    try:
        view = MemoryView.open(checkpoint, args.store, allow_clear=args.allow_clear, num_threads=args.num_threads)
    except (RuntimeLoadError, StoreError) as exc:
        print(f"bitmar_memory_browser: cannot open the store {args.store} with the checkpoint {checkpoint}: {exc}",
              file=sys.stderr)
        return 2
    if is_loopback(args.host):
        hosts = LOOPBACK_HOSTS
    else:
        hosts = LOOPBACK_HOSTS + args.allowed_host if args.allowed_host else ["*"]
        print(f"bitmar_memory_browser: listening on {args.host}: the memory is visible to the network", file=sys.stderr)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        view.close()
        print(f"bitmar_memory_browser: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    app = create_app(view, allowed_hosts=hosts, default_page_size=args.page_size)
    mode = "clear allowed" if args.allow_clear else "read-only"
    print(f"BitMar memory browser: {view.store.count()} episodes in {args.store} ({mode})\n"
          f"  open {url_of(sock)}  (Ctrl-C stops it)", flush=True)
    try:
        uvicorn_server(app).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        view.close()
    return 0
