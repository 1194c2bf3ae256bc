"""Run the app under uvicorn: ``serve(front, settings)`` (blocking) or ``uvicorn_server`` for a
caller that drives the server itself (a thread in tests, rank 0 of ``pp1 serve``)."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .front_api import FrontAPI
from .settings import ServerSettings


def uvicorn_server(app: FastAPI, settings: ServerSettings, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``app`` on settings.host:port (not started). Its SIGINT / SIGTERM
    handling runs the app's shutdown: every stream closed with the reason, FrontAPI.request_shutdown."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, lifespan="on",
                            access_log=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port): pass it to ``Server.run(sockets=[...])``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    return f"http://{shown}:{port}/"


def serve(front: FrontAPI, settings: ServerSettings, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; prints the viewer's URL."""
    app = create_app(front, settings)
    server = uvicorn_server(app, settings, log_level)
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    print(f"pp1 viewer: {url_of(settings.host, port)}" + ("  (token required for changes)" if settings.token else ""),
          flush=True)
    server.run(sockets=[sock])
