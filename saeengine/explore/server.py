"""Serving the explorer with uvicorn: on 127.0.0.1 unless another host is given (a warning
says what a non-loopback address exposes), on a socket bound here first so the printed
URL has the real port (``port=0``: a free one), stopping cleanly on Ctrl-C (uvicorn's
signal handling: in-flight requests finish, then the process returns)."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import webbrowser

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError with the reason (port in use, ...)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without
    # it every response waits ~40 ms for a delayed ACK (Nagle), as measured by the load test
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(app, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, open_browser: bool = False,
          log_level: str = "warning", out=sys.stdout) -> None:
    """Run ``app`` until Ctrl-C (or SIGTERM). Prints where it listens."""
    import uvicorn

    sock = bind(host, port)
    actual = sock.getsockname()[1]
    url = url_of(host, actual)
    if is_loopback(host):
        print(f"explore: serving on {url} (bound to {host}: only this machine can connect; --host to change)",
              file=out, flush=True)
    else:
        print(f"explore: WARNING: bound to {host}, not loopback: anyone who can reach this machine on port {actual} "
              "can read the data and use the server (no authentication)", file=out, flush=True)
        print(f"explore: serving on {url}", file=out, flush=True)
    print("explore: press Ctrl-C to stop", file=out, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off"))
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the captured SIGINT
        pass
    finally:
        sock.close()
    print("explore: stopped", file=out, flush=True)
