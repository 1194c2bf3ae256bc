"""Fixtures of the server tests: the fake front and the server on it, uvicorn in a thread on 127.0.0.1 and
a free port (the real 3-rank job: ``pp1.testing.served_job``)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("aiortc")
pytest.importorskip("fastapi")

from pp1.server.app import create_app  # noqa: E402
from pp1.server.core import ServerCore  # noqa: E402
from pp1.server.runner import bind, uvicorn_server  # noqa: E402
from pp1.server.settings import ServerSettings  # noqa: E402
from pp1.testing.fake_front import FakeFront  # noqa: E402


@dataclass
class Served:
    url: str
    front: Any
    core: ServerCore
    settings: ServerSettings


def wait_ready(front: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not front.status().ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"front not ready after {timeout_s} s: {front.status()}")
        time.sleep(0.02)


@pytest.fixture
def front_options() -> dict[str, Any]:
    return {}


@pytest.fixture
def server_options() -> dict[str, Any]:
    return {}


@pytest.fixture
def front(front_options: dict[str, Any]) -> Iterator[Any]:
    """The fake front (the real job: ``pp1.testing.served_job``, in test_server_real_job.py)."""
    f = FakeFront(**{"width": 64, "height": 64, "fps": 24.0, "chunk_frames": 12, **front_options})
    try:
        yield f
    finally:
        f.close()


@contextlib.contextmanager
def serve_in_thread(front: Any, settings: ServerSettings, port: int = 0) -> Iterator[Served]:
    """The app on ``front`` under uvicorn in a thread, on 127.0.0.1:``port`` (0: a free one)."""
    app = create_app(front, settings)
    server = uvicorn_server(app, settings, log_level="warning")
    sock = bind("127.0.0.1", port)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", front, app.state.core, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def served(front: Any, server_options: dict[str, Any]) -> Iterator[Served]:
    settings = ServerSettings(**{"port": 0, "close_flush_s": 0.3, **server_options})
    with serve_in_thread(front, settings) as s:
        yield s
