"""``pp1 serve`` as a real job for tests: the launcher in its own session on 127.0.0.1 and a free port,
the ranks it starts (through torchrun) tracked by pid, and everything killed by pid at the end, whatever
happened. CPU, gloo, the tiny reference model by default."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent links in /proc), torchrun's ranks included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class ServedJob:
    """A running ``pp1 serve``: its URL, the launcher process, the pids seen below it, its output."""

    url: str
    proc: subprocess.Popen[str]
    log_path: Path
    pids: set[int] = field(default_factory=set)

    def track(self) -> set[int]:
        self.pids |= descendants(self.proc.pid)
        return self.pids

    def rank_pids(self) -> dict[int, int]:
        """global rank -> pid, from the ranks' own progress (the status route)."""
        st = httpx.get(f"{self.url}api/v1/status", timeout=5).json()
        out = {}
        for r in st["front"]["ranks"]:
            if r.get("pid"):
                out[r["rank"]] = r["pid"]
        return out

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}api/v1/status", timeout=5).json()

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.url}ready", timeout=5)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.track()
            if self.proc.poll() is not None:
                raise RuntimeError(f"pp1 serve exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.ready().status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"pp1 serve not ready after {timeout_s} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int | None:
        """Signal the launcher (SIGINT: drain); wait; returns its exit code (None: it had to be killed)."""
        self.track()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> list[int]:
        """SIGKILL the launcher and every process ever seen below it; returns the pids that were still alive."""
        self.track()
        left = [p for p in self.pids | {self.proc.pid} if alive(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return [p for p in left if p != self.proc.pid]


@contextlib.contextmanager
def served_job(*args: str, env: dict[str, str] | None = None, python: str = sys.executable) -> Iterator[ServedJob]:
    """``pp1 serve --port <free> [args]`` until the ``with`` ends; every process is killed by pid then."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="pp1-serve-"))
    log_path = log_dir / "serve.log"
    cmd = [python, "-m", "pp1", "serve", "--port", str(port), "--verbose", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=full_env,
                                start_new_session=True)
    job = ServedJob(f"http://127.0.0.1:{port}/", proc, log_path)
    try:
        yield job
    finally:
        job.kill_all()
