"""Fault injection for tests, read from the environment by the adapters only (never from the
parity-checked RunConfig): ``PP1_FAULT="rank=2,at=load,do=fail;rank=1,at=chunk:3,do=stall:5"``.

``at``: ``load`` | ``warmup`` | ``ready`` | ``chunk:N`` (front: before sending chunk N's envelope;
leader: on receiving it, before relaying; worker: on its TP header) | ``sent:N`` (front: right
after sending chunk N) | ``relayed:N`` (leader: after relaying chunk N to the workers) | ``idle``
(front: once idle after its chunks).
``do``: ``fail`` (raise) | ``kill`` (SIGKILL itself) | ``exit[:code]`` | ``stall[:seconds]`` (sleep;
default 3600) | ``corrupt_envelope`` / ``unserialisable`` / ``bad_dtype`` (front: the chunk's
message is broken on purpose, see chunk_engine).

Each fault fires at most once per process. When ``PP1_FAULT_TIMES=path`` is set, the moment a
fault fires and every rank's exit are appended to ``path`` as JSON lines (see :func:`record`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field

log = logging.getLogger("pp1.adapters.rank.faults")

ENV_FAULT = "PP1_FAULT"
ENV_TIMES = "PP1_FAULT_TIMES"


class InjectedFault(RuntimeError):
    """Raised by ``do=fail``."""


@dataclass
class Fault:
    rank: int
    at: str
    do: str
    arg: str = ""
    fired: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"rank={self.rank},at={self.at},do={self.do}{':' + self.arg if self.arg else ''}"


def parse_faults(spec: str | None) -> list[Fault]:
    """``"rank=2,at=load,do=fail;..."`` -> faults. Malformed specs raise ValueError."""
    out: list[Fault] = []
    for part in (spec or "").split(";"):
        part = part.strip()
        if not part:
            continue
        kv = dict(item.split("=", 1) for item in part.split(",") if "=" in item)
        if not {"rank", "at", "do"} <= kv.keys():
            raise ValueError(f"{ENV_FAULT}: {part!r} needs rank=, at= and do=")
        do, _, arg = kv["do"].partition(":")
        out.append(Fault(rank=int(kv["rank"]), at=kv["at"], do=do, arg=arg))
    return out


class FaultPlan:
    """The faults of this rank. ``check(point)`` fires process-level faults (fail, kill, exit,
    stall) and returns message-level ones (corrupt_envelope, ...) for the caller to apply."""

    def __init__(self, rank: int, faults: list[Fault] | None = None) -> None:
        self.rank = rank
        self.faults = [f for f in (faults or []) if f.rank == rank]

    @classmethod
    def from_env(cls, rank: int) -> FaultPlan:
        return cls(rank, parse_faults(os.environ.get(ENV_FAULT)))

    def check(self, point: str) -> Fault | None:
        for f in self.faults:
            if f.fired or f.at != point:
                continue
            f.fired = True
            log.warning("rank=%d FAULT INJECTED at %s: %s", self.rank, point, f)
            record("fault", rank=self.rank, at=point, do=f.do)
            if f.do == "fail":
                raise InjectedFault(f"injected fault at {point} on rank {self.rank}")
            if f.do == "kill":
                _flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if f.do == "exit":
                _flush()
                os._exit(int(f.arg or 1))
            if f.do == "stall":
                time.sleep(float(f.arg or 3600))
                return None
            return f
        return None


def _flush() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()


def record(event: str, **fields: object) -> None:
    """Append one JSON line ``{"event", "t" (wall clock), **fields}`` to $PP1_FAULT_TIMES, if set."""
    path = os.environ.get(ENV_TIMES)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:  # pragma: no cover - best effort
        log.debug("could not record %s: %s", event, exc)
