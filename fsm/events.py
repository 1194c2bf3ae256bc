"""Events: what an adapter feeds into a machine (``ProtocolMachine.handle``), each naming the machine's
method that takes it (``HANDLER``). Times are seconds on the adapter's monotonic clock.

Outcomes of I/O the machines asked for (a message, a finished operation, a bounded wait that ran
out, a broken channel) and requests from outside the loop (a signal, a stop, a hard cut).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pp1.fsm.base import Event
from pp1.protocol.messages import PPEnvelopeV1, PPResultV1, ReadyV1, TPHeaderV1

# -- outcomes every machine that waits on a channel takes ---------------------------------------------


@dataclass(frozen=True)
class TimedOut(Event):
    """A bounded wait the machine asked for ran out (on gloo the pair is closed for good: poisoned)."""

    HANDLER: ClassVar[str] = "on_timed_out"
    now: float


@dataclass(frozen=True)
class PeerGone(Event):
    """A channel operation failed because the peer's connection closed (it died) or the channel broke.
    ``peer``: the global rank at the other end, when the channel has one (a TP broadcast or an all-reduce
    does not say which mesh rank went away)."""

    HANDLER: ClassVar[str] = "on_peer_gone"
    reason: str
    peer: int | None = None


@dataclass(frozen=True)
class BadMessage(Event):
    """The peer sent something that does not decode or breaks the protocol's rules (stream out of step)."""

    HANDLER: ClassVar[str] = "on_bad_message"
    reason: str


@dataclass(frozen=True)
class LocalError(Event):
    """This rank was about to break the protocol (a preflight refused what it would have sent): nothing
    was sent."""

    HANDLER: ClassVar[str] = "on_local_error"
    reason: str


@dataclass(frozen=True)
class DrainRequested(Event):
    """SIGTERM / Ctrl-C (or the server's shutdown): stop admitting work and end in order."""

    HANDLER: ClassVar[str] = "on_drain"
    now: float


# -- the mesh ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderReceived(Event):
    HANDLER: ClassVar[str] = "on_header"
    header: TPHeaderV1
    now: float


@dataclass(frozen=True)
class ShardDone(Event):
    HANDLER: ClassVar[str] = "on_shard_done"
    now: float
    observed_calls: int = 0
    current_start_frame: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardFailed(Event):
    """The shard raised. ``recoverable``: every mesh rank is known to be still in step (the call was
    refused before any collective)."""

    HANDLER: ClassVar[str] = "on_shard_failed"
    reason: str
    recoverable: bool = False
    peer_lost: bool = False  # a collective of the shard failed because a mesh peer is gone (not this rank's fault)


@dataclass(frozen=True)
class InputsChecked(Event):
    HANDLER: ClassVar[str] = "on_inputs_checked"
    digest: str


@dataclass(frozen=True)
class WeightsChecked(Event):
    HANDLER: ClassVar[str] = "on_weights_checked"
    checksum: str


@dataclass(frozen=True)
class MeshWarm(Event):
    HANDLER: ClassVar[str] = "on_mesh_warm"
    now: float


@dataclass(frozen=True)
class PairWarm(Event):
    HANDLER: ClassVar[str] = "on_pair_warm"
    now: float


# -- the PP channel ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeReceived(Event):
    HANDLER: ClassVar[str] = "on_envelope"
    env: PPEnvelopeV1
    now: float


@dataclass(frozen=True)
class ResultSent(Event):
    HANDLER: ClassVar[str] = "on_result_sent"
    now: float


@dataclass(frozen=True)
class Sent(Event):
    """The planned envelope (and its tensors) went out; ``started_at``: when building it began."""

    HANDLER: ClassVar[str] = "on_sent"
    now: float
    started_at: float | None = None


@dataclass(frozen=True)
class ResultReceived(Event):
    HANDLER: ClassVar[str] = "on_result"
    result: PPResultV1
    now: float


@dataclass(frozen=True)
class ReadyReceived(Event):
    HANDLER: ClassVar[str] = "on_ready"
    ready: ReadyV1
    now: float


# -- the front's own work and requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Decoded(Event):
    HANDLER: ClassVar[str] = "on_decoded"
    call_id: int
    now: float


@dataclass(frozen=True)
class Woke(Event):
    """An ``Idle`` wait ended (the heartbeat is due, or a request came)."""

    HANDLER: ClassVar[str] = "on_wake"
    now: float


@dataclass(frozen=True)
class StopRequested(Event):
    HANDLER: ClassVar[str] = "on_stop_requested"
    now: float


@dataclass(frozen=True)
class CutRequested(Event):
    """A hard cut (prompt change, reset, error recovery): a new epoch from the next chunk on, with the new
    ``seed`` / ``recompute_every`` when given."""

    HANDLER: ClassVar[str] = "on_cut_requested"
    reason: str
    now: float
    seed: int | None = None
    recompute_every: int | None = None


@dataclass(frozen=True)
class StreamRequested(Event):
    """A viewer's session starts (True) or ends (False) the stream: chunks are generated only while one
    runs (a served front starts idle: heartbeats only)."""

    HANDLER: ClassVar[str] = "on_stream_requested"
    on: bool
    now: float
    seed: int | None = None
    recompute_every: int | None = None


@dataclass(frozen=True)
class PauseRequested(Event):
    """Stop planning chunks (heartbeats only), keeping the cache; or resume."""

    HANDLER: ClassVar[str] = "on_pause_requested"
    paused: bool
    now: float


# -- startup -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldReady(Event):
    HANDLER: ClassVar[str] = "on_world_ready"


@dataclass(frozen=True)
class ConfigsGathered(Event):
    HANDLER: ClassVar[str] = "on_configs"
    configs: list[dict[str, Any]]


@dataclass(frozen=True)
class GroupsReady(Event):
    HANDLER: ClassVar[str] = "on_groups_ready"


@dataclass(frozen=True)
class LoadDone(Event):
    HANDLER: ClassVar[str] = "on_load_done"
    ok: bool
    reason: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class VoteCounted(Event):
    HANDLER: ClassVar[str] = "on_vote_counted"
    min_vote: int
    causes: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class FingerprintsGathered(Event):
    HANDLER: ClassVar[str] = "on_fingerprints"
    fingerprints: list[str]


@dataclass(frozen=True)
class BarrierPassed(Event):
    HANDLER: ClassVar[str] = "on_barrier"
    min_verdict: int


# -- the device liveness watch (fsm/liveness.py) -------------------------------------------------------


@dataclass(frozen=True)
class DeviceWait:
    """One outstanding device op of this rank: ``group`` (mesh_dev, pair_dev) and its global ranks
    (``members``: only they can hold the op up), ``purpose``, ``seq``
    (the collective's number on that group on this rank; None for a p2p op), ``since`` (when it began)."""

    group: str
    members: tuple[int, ...]
    purpose: str
    since: float
    seq: int | None = None


@dataclass(frozen=True)
class PeerBeat:
    """A peer's latest entry on the job's store: ``mark`` changes whenever it publishes (its beat),
    ``state``: its lifecycle's state, ``seqs``: the last collective it entered, per device group."""

    mark: str
    state: str | None = None
    seqs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LivenessObserved(Event):
    """The monitor's periodic observation: this rank's outstanding device ops and every watched peer's
    latest beat (None: nothing read for it yet)."""

    HANDLER: ClassVar[str] = "on_observed"
    now: float
    waits: tuple[DeviceWait, ...]
    peers: Mapping[int, PeerBeat | None]
