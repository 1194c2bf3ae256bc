"""Fault injection for tests, read from the environment by the adapters only (never from the
parity-checked RunConfig): ``PP1_FAULT="rank=2,at=load,do=fail;rank=1,at=chunk:3,do=stall:5"``.

``at``: ``load`` | ``warmup`` | ``ready`` | ``chunk:N`` (front: before sending chunk N's envelope;
leader: on receiving it, before relaying; worker: on its TP header) | ``sent:N`` (front: right
after sending chunk N) | ``relayed:N`` (leader: after relaying chunk N to the workers) | ``shard:N``
(a mesh rank: chunk N's tensors are in, its shard is about to run: inside the mesh's collectives) | ``idle``
(front: once idle after its chunks).
``do``: ``fail`` (raise) | ``kill`` (SIGKILL itself) | ``exit[:code]`` | ``stall[:seconds]`` (sleep;
default 3600) | ``corrupt_envelope`` / ``unserialisable`` / ``bad_dtype`` (front: the chunk's
message is broken on purpose, see the front's engine) | ``perturb_inputs[:x]`` (a mesh rank adds x,
default 0.25, to the call's noise after it arrived: its inputs drift) | ``perturb_weights[:x]`` (a mesh
rank adds x, default 0.5, to one weight after loading: its weights drift). A phase entered is a point
too (``at=warmup``: on entering warmup; any lifecycle state). An unknown point or action is refused at
start; a fault whose point the run never reached is reported at exit (``fault_unfired`` event).

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

import torch

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


# Where a fault can fire: a phase entered (every lifecycle state), a moment, or a chunk's step.
PHASE_POINTS = frozenset({"init", "parity", "loading", "voting", "fingerprint", "barrier", "warming_channels",
                          "warmup", "serving", "draining"})
POINTS = PHASE_POINTS | {"load", "ready", "idle"}
CHUNK_POINTS = ("chunk", "sent", "relayed", "shard")  # chunk:N, sent:N, relayed:N, shard:N
ACTIONS = {  # do= -> whether it takes an argument
    "fail": False, "kill": False, "exit": True, "stall": True, "corrupt_envelope": False, "unserialisable": False,
    "bad_dtype": False, "perturb_inputs": True, "perturb_weights": True,
}


def _check_point(at: str, part: str) -> None:
    name, sep, n = at.partition(":")
    if sep and name in CHUNK_POINTS:
        if not n.isdigit():
            raise ValueError(f"{ENV_FAULT}: {part!r}: at={at}: the chunk index must be an integer")
        return
    if at not in POINTS:
        raise ValueError(f"{ENV_FAULT}: {part!r}: unknown point at={at!r}; known: {', '.join(sorted(POINTS))}, "
                         f"{', '.join(p + ':N' for p in CHUNK_POINTS)}")


def parse_faults(spec: str | None) -> list[Fault]:
    """``"rank=2,at=load,do=fail;..."`` -> faults. A malformed spec, an unknown point or action raise
    ValueError naming it (a mistyped fault must not pass a test silently)."""
    out: list[Fault] = []
    for part in (spec or "").split(";"):
        part = part.strip()
        if not part:
            continue
        items = [item for item in part.split(",") if item.strip()]
        bad = [item for item in items if "=" not in item]
        kv = dict(item.split("=", 1) for item in items if "=" in item)
        unknown = sorted(set(kv) - {"rank", "at", "do"})
        if bad or unknown or not {"rank", "at", "do"} <= kv.keys():
            raise ValueError(f"{ENV_FAULT}: {part!r} needs rank=, at= and do= (and nothing else)")
        try:
            rank = int(kv["rank"])
        except ValueError:
            raise ValueError(f"{ENV_FAULT}: {part!r}: rank must be an integer") from None
        _check_point(kv["at"], part)
        do, sep, arg = kv["do"].partition(":")
        if do not in ACTIONS:
            raise ValueError(f"{ENV_FAULT}: {part!r}: unknown action do={do!r}; known: {', '.join(sorted(ACTIONS))}")
        if sep and not ACTIONS[do]:
            raise ValueError(f"{ENV_FAULT}: {part!r}: do={do} takes no argument")
        if arg:
            try:
                float(arg)
            except ValueError:
                raise ValueError(f"{ENV_FAULT}: {part!r}: do={do}:{arg}: the argument must be a number") from None
        out.append(Fault(rank=rank, at=kv["at"], do=do, arg=arg))
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

    def unfired(self) -> list[str]:
        """This rank's faults that never fired (reported at exit: a point the run never reached)."""
        return [str(f) for f in self.faults if not f.fired]

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


def perturb_weights(fault: Fault | None, generator: object) -> bool:
    """The weight drill: when ``fault`` is ``perturb_weights``, add its amount to the first weight this
    rank's generator holds (its weights drift after load; the next weights check sees it)."""
    if fault is None or fault.do != "perturb_weights":
        return False
    weights = getattr(generator, "held_weights", lambda: [])()
    if weights:
        with torch.inference_mode():  # loaded weights may be inference tensors
            weights[0].add_(float(fault.arg or 0.5))
    return bool(weights)


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
