"""Intents: what a machine asks its adapter to do next, in order (the contract: ``fsm/base.py``).

The machines in ``pp1.fsm`` never do I/O. A handler returns a list of intents; the adapter performs
them in list order and answers an intent whose outcome the machine needs with the next event
(``fsm/events.py``). An adapter must perform every intent of a list (or fail the rank): skipping one
breaks a peer's expectations ("never skip a receive").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pp1.fsm.base import Intent
from pp1.protocol.messages import PPEnvelopeV1, PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.tensors import TensorSpec

__all__ = [
    "EXIT_FAILED", "EXIT_OK", "EXIT_ORPHAN", "AwaitEnvelope", "AwaitHeader", "AwaitReady", "AwaitResult", "Barrier", "CheckInputs", "CheckWeights", "GatherConfigs", "GatherFingerprints",
    "InitGroups", "InitWorld", "Load", "Vote",
    "Decode", "Drop", "Exit", "Idle", "Intent", "KeepLatents", "NextStep", "MakeWarmupTensors", "RecvTensors", "RunShard", "SendEnvelope",
    "SendReady", "SendResult", "SendTP", "Show", "WarmMesh", "WarmPair", "describe",
]

# Exit codes a rank uses (the launcher restarts the job on any non-zero code).
EXIT_OK = 0  # orderly SHUTDOWN
EXIT_FAILED = 1  # this rank or the mesh failed (the cause is logged and, on the front, reported)
EXIT_ORPHAN = 3  # mesh watchdog: no header for W seconds (the leader or the front is gone)


# -- waiting (answered by a message, TimedOut at ``until``, PeerGone or BadMessage) ---------------------


@dataclass(frozen=True)
class AwaitHeader(Intent):
    """Worker: wait for the next TP header, at most until ``until`` (monotonic seconds)."""

    BETWEEN_STEPS: ClassVar[bool] = True

    until: float


@dataclass(frozen=True)
class AwaitEnvelope(Intent):
    """Leader: wait for the front's next PP envelope (header + metadata), at most until ``until``
    (None: no bound of ours; pure TP, where the front is in the same process)."""

    BETWEEN_STEPS: ClassVar[bool] = True

    until: float | None


@dataclass(frozen=True)
class AwaitResult(Intent):
    """Front: wait for the result of the envelope in flight, at most until ``until`` (its deadline)."""

    BETWEEN_STEPS: ClassVar[bool] = True

    until: float


@dataclass(frozen=True)
class AwaitReady(Intent):
    """Front: wait for the leader's READY, at most until ``until``."""

    BETWEEN_STEPS: ClassVar[bool] = True

    until: float


@dataclass(frozen=True)
class Idle(Intent):
    """Front: nothing to send until ``until`` (the next heartbeat); wake early for a request from
    another thread (answered by ``Woke`` or the request's event)."""

    BETWEEN_STEPS: ClassVar[bool] = True

    until: float


@dataclass(frozen=True)
class NextStep(Intent):
    """Between two steps of the loop: the adapter feeds any request from another thread, then asks for
    the next step (``Woke``)."""

    BETWEEN_STEPS: ClassVar[bool] = True


# -- startup (the rank's lifecycle; pp1.md §2, the same order on every rank) ----------------------------


@dataclass(frozen=True)
class InitWorld(Intent):
    """init_process_group and the world CPU group (the only groups that do not depend on the topology).
    Answered by ``WorldReady``."""


@dataclass(frozen=True)
class GatherConfigs(Intent):
    """All-gather every rank's run config (``config``: this rank's, as JSON) over the world CPU group.
    Answered by ``ConfigsGathered``."""

    config: dict[str, Any]


@dataclass(frozen=True)
class InitGroups(Intent):
    """Create the topology's sub-groups in ONE fixed order on every rank (after parity: ranks that agree
    on the config agree on these calls). Answered by ``GroupsReady``."""


@dataclass(frozen=True)
class Load(Intent):
    """Build what this rank serves with (stage 0, a generator shard, or both). Answered by ``LoadDone``
    (also when it failed: every rank still votes)."""


@dataclass(frozen=True)
class Vote(Intent):
    """All-reduce MIN of ``vote`` over the world CPU group; when the result is 0, all-gather every rank's
    load failure (``cause``). Answered by ``VoteCounted``."""

    vote: int
    cause: str | None


@dataclass(frozen=True)
class GatherFingerprints(Intent):
    """Mesh ranks: all-gather ``fingerprint`` over the mesh CPU group. Answered by ``FingerprintsGathered``."""

    fingerprint: str


@dataclass(frozen=True)
class Barrier(Intent):
    """All-reduce MIN of ``verdict`` (1: this rank's checks passed) over the world CPU group: the barrier.
    Answered by ``BarrierPassed``."""

    verdict: int


# -- tensors ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecvTensors(Intent):
    """Receive the tensors announced by a header that was just received, in ``specs`` order, on
    the device channel. ``discard=True``: receive them and drop them (the header was rejected,
    but the sender sends the payload anyway; never skip a receive)."""

    specs: tuple[TensorSpec, ...]
    discard: bool = False


@dataclass(frozen=True)
class MakeWarmupTensors(Intent):
    """The tensors a WARMUP header announces do not travel: every mesh rank draws them from
    ``header.seed``, identically (so warmup needs no front)."""

    header: TPHeaderV1


# -- the mesh -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendTP(Intent):
    """Leader: send ``header`` to every worker on the TP control channel, then, when
    ``with_tensors``, the tensors it announces (the ones just received or made) on the device
    channel. A WARMUP header travels alone (``with_tensors=False``)."""

    header: TPHeaderV1
    with_tensors: bool = True
    digest_inputs: bool = False  # stamp the header with the checksum of its tensors (the workers check it)
    preflight: bool = True  # False: it relays an envelope validated one step before (only encoded, not re-checked)


@dataclass(frozen=True)
class RunShard(Intent):
    """Run this rank's generator shard for the call described by ``header`` (its tensors were
    received or made just before). Answered by ``ShardDone`` / ``ShardFailed``."""

    header: TPHeaderV1


@dataclass(frozen=True)
class CheckInputs(Intent):
    """Checksum the call's tensors as this rank holds them (received or made); answered by
    ``InputsChecked``: the machine compares it with the leader's ``header.inputs_digest``."""

    header: TPHeaderV1


@dataclass(frozen=True)
class CheckWeights(Intent):
    """Checksum this shard's weights as held now; answered by ``WeightsChecked`` (compared with load's)."""


@dataclass(frozen=True)
class WarmMesh(Intent):
    """One all-reduce on the mesh device group (its lazy connections); answered by ``MeshWarm``."""


@dataclass(frozen=True)
class WarmPair(Intent):
    """One tensor round trip on the front-leader device group (NCCL sets up a pair lazily on its first
    send/recv); answered by ``PairWarm``."""


# -- the PP channel -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendEnvelope(Intent):
    """Front: build the tensors ``envelope`` announces (INFER: the conditioning of its epoch, the noise
    of (seed, chunk_index) and, on a recompute, the context frames ``context`` describes), preflight
    everything, send it within ``timeout_s``. Answered by ``Sent``, or ``LocalError`` (refused before
    the first byte: nothing was sent)."""

    envelope: PPEnvelopeV1
    timeout_s: float
    context_frames: int = 0  # recompute: latent frames of context, epoch frames [context_start, +context_frames)
    context_start: int = 0
    reencode: int | None = None  # recompute: this epoch latent frame is the VAE re-encode of its decoded frame


@dataclass(frozen=True)
class SendResult(Intent):
    """Leader: send ``result`` to the front (pure TP: hand it to the in-process front), then its
    latents when the result announces them. Answered by ``ResultSent``."""

    result: PPResultV1


@dataclass(frozen=True)
class SendReady(Intent):
    """Leader: warmup is done on every mesh rank; tell the front (pure TP: the local front)."""

    ready: ReadyV1


# -- the front's stage 0 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepLatents(Intent):
    """Front: the latents of the chunk ``call_id`` just received are history of epoch ``cache_epoch`` from
    latent frame ``first_frame`` on (later recompute windows take their context from it); drop history
    older than ``keep_from``."""

    call_id: int
    cache_epoch: int
    first_frame: int
    keep_from: int


@dataclass(frozen=True)
class _ChunkRecord(Intent):
    """The ids and times of a received chunk (what the adapter reports about it)."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    recompute: bool
    sent_at: float  # when the front began building its envelope
    received_at: float  # when its result arrived


@dataclass(frozen=True)
class Decode(_ChunkRecord):
    """Front: decode the latents of the accepted chunk (on an epoch's first chunk, as a stream's start)
    and keep its frames until shown; for re-encode context, keep the decoded frame of each of its latent
    frames (from ``first_frame``). Answered by ``Decoded``."""

    first_frame: int = 0


@dataclass(frozen=True)
class Show(Intent):
    """Front: hand the frames just decoded for ``call_id`` to the viewers (still of the current epoch)."""

    call_id: int


@dataclass(frozen=True)
class Drop(_ChunkRecord):
    """Front: a received chunk that will never be shown (``why``: a hard cut, a failure); report it."""

    why: str = ""


@dataclass(frozen=True)
class Exit(Intent):
    """End this rank's loop and exit the process with ``code`` (after best-effort cleanup under a
    bound). Always the last intent of a list."""

    code: int
    reason: str


def describe(intents: list[Intent]) -> str:
    """A short, log-friendly summary: ``SendTP(infer call_id=3) RunShard(infer call_id=3)``."""
    parts = []
    for it in intents:
        name = type(it).__name__
        header = getattr(it, "header", None) or getattr(it, "envelope", None)
        if header is not None:
            parts.append(f"{name}({header.action.value} call_id={header.call_id} chunk={header.chunk_index} "
                         f"epoch={header.cache_epoch})")
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
