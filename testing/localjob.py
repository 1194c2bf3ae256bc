"""A job of ranks started as this process's own subprocesses (not through torchrun), so that each
rank's exit code and exit time are observable: the multi-process tests and the fault table use it.

Each rank runs ``python -m pp1.adapters.roles.main`` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
(127.0.0.1) / MASTER_PORT in its environment; stdout (events) and stderr (logs) go to files.
Every rank is killed by pid on exit from the ``with`` block, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pp1.adapters.rank.observe import parse_event


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankProc:
    rank: int
    popen: subprocess.Popen
    out_path: Path
    err_path: Path
    exit_code: int | None = None
    exited_at: float | None = None  # wall clock (time.time), as seen by the poller


@dataclass
class LocalJob:
    """``args``: options for every rank; ``rank_args``: extra options per rank (appended);
    ``env``: extra environment (e.g. PP1_FAULT)."""

    world_size: int
    args: list[str]
    rank_args: dict[int, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    python: str = sys.executable
    procs: list[RankProc] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="pp1-job-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.times_path = self.workdir / "fault_times.jsonl"
        self.report_path = self.workdir / "report.json"

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> LocalJob:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def start(self) -> None:
        port = free_port()
        assert self.workdir is not None
        for r in range(self.world_size):
            env = {
                **os.environ, "RANK": str(r), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": str(self.world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PP1_FAULT_TIMES": str(self.times_path),
                **self.env,
            }
            argv = [self.python, "-m", "pp1.adapters.roles.main", *self.args, "--report-json", str(self.report_path),
                    *self.rank_args.get(r, [])]
            out, err = self.workdir / f"rank{r}.out", self.workdir / f"rank{r}.err"
            with open(out, "w") as fo, open(err, "w") as fe:
                p = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env, stdin=subprocess.DEVNULL)
            self.procs.append(RankProc(r, p, out, err))

    def kill_all(self) -> None:
        for rp in self.procs:
            if rp.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    rp.popen.kill()
        for rp in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rp.popen.wait(10)

    # -- observing -----------------------------------------------------------------------------------
    def poll(self) -> None:
        now = time.time()
        for rp in self.procs:
            if rp.exit_code is None:
                code = rp.popen.poll()
                if code is not None:
                    rp.exit_code, rp.exited_at = code, now

    def alive(self) -> list[int]:
        self.poll()
        return [rp.rank for rp in self.procs if rp.exit_code is None]

    def wait_all(self, timeout_s: float) -> dict[int, int | None]:
        """Wait until every rank exited or ``timeout_s`` passed; rank -> exit code (None: still alive)."""
        end = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < end:
            time.sleep(0.02)
        return self.codes()

    def codes(self) -> dict[int, int | None]:
        self.poll()
        return {rp.rank: rp.exit_code for rp in self.procs}

    def events(self, rank: int) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.procs[rank].out_path.read_text().splitlines():
                ev = parse_event(line)
                if ev is not None:
                    out.append(ev)
        return out

    def wait_event(self, rank: int, event: str, timeout_s: float, **match: Any) -> dict[str, Any] | None:
        """The first event ``event`` of ``rank`` whose fields match, waiting up to ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for ev in self.events(rank):
                if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if self.procs[rank].popen.poll() is not None:
                break
            time.sleep(0.05)
        return None

    def log(self, rank: int) -> str:
        with contextlib.suppress(OSError):
            return self.procs[rank].err_path.read_text()
        return ""

    def logs(self) -> str:
        return "\n".join(f"----- rank {r} -----\n{self.log(r)}" for r in range(len(self.procs)))

    def send_signal(self, rank: int, sig: int) -> float:
        t = time.time()
        self.signals.append({"event": "signal", "rank": rank, "sig": int(sig), "t": t})
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.procs[rank].popen.pid, sig)
        return t

    def report(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.report_path.read_text())
        return {}

    # -- fault timing --------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.times_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def fault_time(self) -> float | None:
        """When the fault fired (the injected fault's record, or the first signal this job sent)."""
        faults = [r["t"] for r in self.records() if r.get("event") == "fault"]
        if faults:
            return min(faults)
        return self.signals[0]["t"] if self.signals else None

    def detection_times(self) -> dict[int, float]:
        """Rank -> seconds from the fault to that rank's exit (ranks that exited after the fault)."""
        t0 = self.fault_time()
        self.poll()
        if t0 is None:
            return {}
        return {rp.rank: rp.exited_at - t0 for rp in self.procs if rp.exited_at is not None and rp.exited_at >= t0}

    def timing_record(self, name: str) -> dict[str, Any]:
        return {"scenario": name, "codes": self.codes(), "detect_s": self.detection_times(),
                "records": self.records() + self.signals}
