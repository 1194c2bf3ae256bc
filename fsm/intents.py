"""Intents: what a machine asks its adapter to do next, in order.

The machines in `pp1.fsm` never do I/O. A handler such as ``LeaderRelay.on_envelope`` returns a
list of intents; the adapter performs them in list order, then fires the resulting event back
(``on_shard_done``, ``on_result_sent``, ...). An adapter must perform every intent of a list
(or fail the rank): skipping one breaks a peer's expectations ("never skip a receive").
"""

from __future__ import annotations

from dataclasses import dataclass

from pp1.protocol.messages import PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.tensors import TensorSpec

# Exit codes a rank uses (the launcher restarts the job on any non-zero code).
EXIT_OK = 0  # orderly SHUTDOWN
EXIT_FAILED = 1  # this rank or the mesh failed (the cause is logged and, on the front, reported)
EXIT_ORPHAN = 3  # mesh watchdog: no header for W seconds (the leader or the front is gone)


@dataclass(frozen=True)
class Intent:
    """Base of every intent (for isinstance checks and type hints)."""


@dataclass(frozen=True)
class RecvTensors(Intent):
    """Receive the tensors announced by a header that was just received, in ``specs`` order, on
    the device channel. ``discard=True``: receive them and drop them (the header was rejected,
    but the sender sends the payload anyway; never skip a receive)."""

    specs: tuple[TensorSpec, ...]
    discard: bool = False


@dataclass(frozen=True)
class SendTP(Intent):
    """Leader: send ``header`` to every worker on the TP control channel, then the tensors it
    announces (the ones just received from the front) on the device channel. A WARMUP header
    travels alone: every mesh rank makes its tensors from ``header.seed``."""

    header: TPHeaderV1


@dataclass(frozen=True)
class RunShard(Intent):
    """Run this rank's generator shard for the call described by ``header`` (its tensors were
    received just before; for a WARMUP header, made from ``header.seed``, the same on every mesh
    rank). Report back with ``on_shard_done`` / ``on_shard_failed``."""

    header: TPHeaderV1


@dataclass(frozen=True)
class SendResult(Intent):
    """Leader: send ``result`` to the front (under pure TP: hand it to the in-process front),
    then ``latents_out`` when the result announces it. Report back with ``on_result_sent``."""

    result: PPResultV1


@dataclass(frozen=True)
class SendReady(Intent):
    """Leader: warmup is done on every mesh rank; tell the front (pure TP: the local server)."""

    ready: ReadyV1


@dataclass(frozen=True)
class Exit(Intent):
    """End this rank's serving loop and exit the process with ``code`` (after best-effort
    cleanup under a bound). Always the last intent of a list."""

    code: int
    reason: str


def describe(intents: list[Intent]) -> str:
    """A short, log-friendly summary: ``SendTP(infer call_id=3) RunShard(infer call_id=3)``."""
    parts = []
    for it in intents:
        name = type(it).__name__
        if isinstance(it, SendTP | RunShard):
            h = it.header
            parts.append(f"{name}({h.action.value} call_id={h.call_id} chunk={h.chunk_index} epoch={h.cache_epoch})")
        elif isinstance(it, SendResult):
            r = it.result
            parts.append(f"{name}(ok={r.ok} call_id={r.call_id} code={r.error_code and r.error_code.value})")
        elif isinstance(it, RecvTensors):
            parts.append(f"{name}(n={len(it.specs)} discard={it.discard})")
        elif isinstance(it, Exit):
            parts.append(f"{name}({it.code}: {it.reason})")
        else:
            parts.append(name)
    return " ".join(parts)
