"""The rank lifecycle (pp1.md §2), one machine per role, in the same order on every rank.

Roles: ``front`` (rank 0 under PP1: stage 0 + HTTP), ``leader`` (mesh rank 0), ``worker`` (mesh
ranks 1..M-1), ``tp_rank0`` (pure TP: mesh leader + front + HTTP in one process). Mesh roles
check shard fingerprints; the front does not. ``failed`` is reachable from every non-terminal
state through ``fail_with``; ``shutdown`` and ``failed`` are terminal.

Each state binds to one adapter call (``BINDINGS`` of each class, rendered in specs/diagrams/):
the adapter runs it, then fires the event named in the table (or ``fail_with`` on error).
``warmup_done`` means: leader, it drove warmup through the mesh and sent READY; front, READY was
received; tp_rank0, its in-process leader finished warmup; worker, the first TP header that is
not WARMUP arrived (``WorkerLoopMachine.serving``; fire it before handling that header).
``drain`` (SIGTERM / Ctrl-C) is taken in ``serving`` only; a signal in any earlier state fails the
rank (it is inside a collective). Mesh roles leave ``serving``/``draining`` on SHUTDOWN
(``shutdown_received``); the front and tp_rank0 leave ``draining`` with ``drained`` after they
sent SHUTDOWN and got its result.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pp1.protocol.config import RunConfig, parity_report

from .base import ErrorKind, FailureCause, Intent, ProtocolMachine
from .intents import (
    EXIT_FAILED,
    Barrier,
    Exit,
    GatherConfigs,
    GatherFingerprints,
    InitGroups,
    InitWorld,
    Load,
    Vote,
)

log = logging.getLogger("pp1.fsm.lifecycle")

(INIT, PARITY, LOADING, VOTING, FINGERPRINT, BARRIER, WARMING_CHANNELS, WARMUP, SERVING, DRAINING, SHUTDOWN,
 FAILED) = ("init", "parity", "loading", "voting", "fingerprint", "barrier", "warming_channels", "warmup",
            "serving", "draining", "shutdown", "failed")

Table = list[tuple[str, "str | list[str]", str]]

# -- tables (event, source(s), dest); "fail" -> failed from every non-terminal state is implied --------
FRONT_STATES = [INIT, PARITY, LOADING, VOTING, BARRIER, WARMING_CHANNELS, WARMUP, SERVING, DRAINING, SHUTDOWN,
                FAILED]
FRONT_TRANSITIONS: Table = [
    ("start", INIT, PARITY),
    ("parity_ok", PARITY, LOADING),
    ("loaded", LOADING, VOTING),
    ("vote_ok", VOTING, BARRIER),
    ("barrier_done", BARRIER, WARMING_CHANNELS),
    ("channels_warm", WARMING_CHANNELS, WARMUP),
    ("warmup_done", WARMUP, SERVING),  # READY received from the leader
    ("drain", SERVING, DRAINING),
    ("drained", DRAINING, SHUTDOWN),  # in-flight chunks done, SHUTDOWN sent and answered
]

MESH_STATES = [INIT, PARITY, LOADING, VOTING, FINGERPRINT, BARRIER, WARMING_CHANNELS, WARMUP, SERVING, DRAINING,
               SHUTDOWN, FAILED]
# Mesh roles share startup up to serving; ``warmup_done`` means, per role: leader, it drove warmup
# through the mesh and sent READY; worker, the first TP header that is not WARMUP arrived; tp_rank0,
# its in-process leader drove warmup (the server reports ready).
MESH_STARTUP: Table = [
    ("start", INIT, PARITY),
    ("parity_ok", PARITY, LOADING),
    ("loaded", LOADING, VOTING),
    ("vote_ok", VOTING, FINGERPRINT),
    ("fingerprint_ok", FINGERPRINT, BARRIER),
    ("barrier_done", BARRIER, WARMING_CHANNELS),
    ("channels_warm", WARMING_CHANNELS, WARMUP),
    ("warmup_done", WARMUP, SERVING),
]
# Leader and worker: a signal finishes the call in hand, then waits for SHUTDOWN (the watchdog bounds
# it); SHUTDOWN is relayed (leader) and answered, then the rank exits 0.
LEADER_TRANSITIONS: Table = MESH_STARTUP + [
    ("drain", SERVING, DRAINING),
    ("shutdown_received", [SERVING, DRAINING], SHUTDOWN),
]
WORKER_TRANSITIONS: Table = LEADER_TRANSITIONS
# Pure-TP rank 0 fronts too: it drains its in-flight chunks, then relays SHUTDOWN to the workers.
TP_RANK0_TRANSITIONS: Table = MESH_STARTUP + [
    ("drain", SERVING, DRAINING),
    ("drained", DRAINING, SHUTDOWN),
]

# -- state -> the adapter call it binds to (the collectives, in order; pp1.md §2) --------------------
_COMMON_BINDINGS: dict[str, str] = {
    INIT: "init_process_group and the world CPU group (only groups every rank has whatever its config)",
    PARITY: "all_gather_object(run config) over the world CPU group; parity_report() empty -> then the "
            "topology's sub-groups (mesh CPU + device, front-leader pair), one fixed order -> parity_ok",
    VOTING: "all_reduce(load_ok, MIN) over the world CPU group; 1 -> vote_ok, 0 -> fail naming rank + cause",
    BARRIER: "all_reduce(fingerprint verdict, MIN) over the world CPU group (the barrier)",
    SHUTDOWN: "destroy process groups best-effort under a bound; exit 0 (no exit barrier)",
    FAILED: "log the FailureCause; best-effort cleanup under a bound; exit non-zero",
}
FRONT_BINDINGS: dict[str, str] = {
    **_COMMON_BINDINGS,
    LOADING: "PipelineFactory.build_stage0 (then loaded, ok or not)",
    WARMING_CHANNELS: "one PING round trip front<->leader on the PP pair (CPU group + device group)",
    WARMUP: "receive ReadyV1 from the leader (the front has no generator)",
    SERVING: "FrontEngine performs FrontMachine's intents over the PP channel (INFER, NOOP every H s)",
    DRAINING: "stop admitting; finish in-flight chunks under a deadline; send SHUTDOWN, receive its result",
}
LEADER_BINDINGS: dict[str, str] = {
    **_COMMON_BINDINGS,
    LOADING: "PipelineFactory.build_generator(mesh_rank 0) (then loaded, ok or not)",
    FINGERPRINT: "all_gather_object(Generator.fingerprint()) over the mesh CPU group; all equal -> fingerprint_ok",
    WARMING_CHANNELS: "answer the front's PING on the PP pair; PING header on the mesh CPU group; "
                      "all_reduce on the mesh device group",
    WARMUP: "LeaderRelayMachine.start_warmup(): warmup chunks through the mesh, then SendReady",
    SERVING: "LeaderRelayMachine loop: receive envelope, validate, relay (TP), run shard, reply",
    DRAINING: "LeaderRelayMachine loop until SHUTDOWN arrives (finish the call in hand)",
}
WORKER_BINDINGS: dict[str, str] = {
    **_COMMON_BINDINGS,
    LOADING: "PipelineFactory.build_generator(mesh_rank r) (then loaded, ok or not)",
    FINGERPRINT: "all_gather_object(Generator.fingerprint()) over the mesh CPU group; all equal -> fingerprint_ok",
    WARMING_CHANNELS: "receive the leader's PING header (mesh CPU group); all_reduce on the mesh device group",
    WARMUP: "WorkerLoopMachine on WARMUP headers until the first other header",
    SERVING: "WorkerLoopMachine: receive TP header (timeout = watchdog), receive tensors, run shard",
    DRAINING: "WorkerLoopMachine until SHUTDOWN (the watchdog bounds the wait)",
}
TP_RANK0_BINDINGS: dict[str, str] = {
    **_COMMON_BINDINGS,
    LOADING: "build_stage0 and build_generator(mesh_rank 0) (then loaded, ok or not)",
    FINGERPRINT: "all_gather_object(Generator.fingerprint()) over the mesh CPU group; all equal -> fingerprint_ok",
    WARMING_CHANNELS: "PING header on the mesh CPU group; all_reduce on the mesh device group",
    WARMUP: "LeaderRelayMachine.start_warmup() in process; SendReady goes to the local server",
    SERVING: "FrontEngine -> the in-process channel -> LeaderRelayMachine's executor (no PP channel)",
    DRAINING: "stop admitting; finish in-flight chunks; SHUTDOWN through the LeaderRelayMachine to the workers",
}


SignalVerdict = Literal["drain", "ignore", "fail"]
LoadStatus = Literal["not_loaded", "loading", "loaded", "error"]

# What a lifecycle state says about loading (the server's pipeline status): before init nothing; the
# startup states load (the state is the stage); serving and after, loaded; failed, an error.
_LOAD_STATUS: dict[str, LoadStatus] = {
    INIT: "not_loaded", PARITY: "loading", LOADING: "loading", VOTING: "loading", FINGERPRINT: "loading",
    BARRIER: "loading", WARMING_CHANNELS: "loading", WARMUP: "loading", SERVING: "loaded", DRAINING: "loaded",
    SHUTDOWN: "loaded", FAILED: "error",
}
STARTUP_ORDER: tuple[str, ...] = (INIT, PARITY, LOADING, VOTING, FINGERPRINT, BARRIER, WARMING_CHANNELS, WARMUP)


def load_status(state: str) -> LoadStatus:
    """not_loaded | loading | loaded | error, for a lifecycle state (unknown: not_loaded)."""
    return _LOAD_STATUS.get(state, "not_loaded")


def job_load_status(states: list[str | None]) -> tuple[LoadStatus, str | None]:
    """The job's loading status from every rank's lifecycle state (None: not heard of yet): error when any
    rank failed; loaded when every rank serves; else loading, at the earliest rank's stage."""
    known = [s for s in states if s is not None]
    if any(load_status(s) == "error" for s in known):
        return "error", FAILED
    if known and len(known) == len(states) and all(load_status(s) == "loaded" for s in known):
        return "loaded", None
    if not known or all(s == INIT for s in known):
        return "not_loaded", None
    stages = [s for s in known if s in STARTUP_ORDER]
    return "loading", min(stages, key=STARTUP_ORDER.index) if stages else None


MESH_DRAIN_S = 5.0  # a mesh rank asked to drain waits this long (plus a heartbeat) for the front's SHUTDOWN


def drain_bound_s(config: RunConfig, hosts_front: bool, deadline_s: float | None = None) -> float:
    """How long an orderly drain may take before the rank crashes instead. The front (and pure TP's
    rank 0): twice its result deadline (the chunk in flight, then SHUTDOWN's answer) plus two heartbeats
    and 5 s. A mesh rank: the front learns of its drain request within a heartbeat (the job's store), then
    drains; a mesh rank that hears no SHUTDOWN within ``MESH_DRAIN_S`` + a heartbeat crashes (the front is
    gone or stuck: the job is failing anyway, and torchrun's teardown must not wait on it)."""
    if hosts_front:
        deadline = config.deadline_floor_s if deadline_s is None else deadline_s
        return 2 * deadline + 2 * config.heartbeat_s + 5
    return MESH_DRAIN_S + config.heartbeat_s


class LifecycleMachine(ProtocolMachine):
    """Base of the per-role lifecycles. Tracks this rank's load result for the vote."""

    ROLE: ClassVar[str]
    BINDINGS: ClassVar[dict[str, str]]
    TERMINAL = frozenset({SHUTDOWN, FAILED})
    INITIAL = INIT

    MESH: ClassVar[bool] = True  # checks shard fingerprints

    def __init__(self, rank: int, **ctx: Any) -> None:
        super().__init__(rank, **{"role": self.ROLE, **ctx})
        self.load_ok: bool | None = None
        self.load_error = ""
        self.fingerprint = ""
        self._config: dict[str, Any] = {}
        self._fingerprint_detail = ""

    # -- startup, driven as intents (the adapter performs the collectives) ----------------------------
    def start(self, config: dict[str, Any]) -> list[Intent]:
        """Begin startup with this rank's run config (JSON): init, parity, groups, load, vote,
        fingerprint (mesh), barrier. Ends in ``warming_channels`` with no intent left (the role's
        machine takes over), or in ``failed`` with ``Exit``."""
        self._config = config
        return [InitWorld()]

    def on_world_ready(self) -> list[Intent]:
        self.fire("start")
        return [GatherConfigs(self._config)]

    def on_configs(self, configs: list[dict[str, Any]]) -> list[Intent]:
        """Parity: any key that differs from rank 0's fails every rank with a per-key diff (local on the
        rank whose config differs from rank 0's, remote on the others)."""
        report = parity_report(configs)
        if report:
            kind = "local" if self._config != configs[0] else "remote"
            return self._exit("config parity failed: " + "; ".join(report), kind)
        return [InitGroups()]

    def on_groups_ready(self) -> list[Intent]:
        self.fire("parity_ok")
        return [Load()]

    def on_load_done(self, ok: bool, reason: str = "", fingerprint: str = "") -> list[Intent]:
        self.fingerprint = fingerprint
        vote = self.on_loaded(ok, reason)
        return [Vote(vote, None if ok else reason)]

    def on_vote_counted(self, min_vote: int, causes: list[str | None]) -> list[Intent]:
        detail = "; ".join(f"rank {r}: {c}" for r, c in enumerate(causes) if c)
        self.on_vote(min_vote, detail)
        if self.failure is not None:
            return [Exit(EXIT_FAILED, str(self.failure))]
        if self.MESH:
            return [GatherFingerprints(self.fingerprint)]
        return [Barrier(1)]

    def on_fingerprints(self, fingerprints: list[str]) -> list[Intent]:
        """Every mesh rank's shard fingerprint must be the same."""
        if len(set(fingerprints)) == 1:
            self.fire("fingerprint_ok")
            return [Barrier(1)]
        self._fingerprint_detail = ", ".join(f"mesh rank {i}: {fp}" for i, fp in enumerate(fingerprints))
        return [Barrier(0)]

    def on_barrier(self, min_verdict: int) -> list[Intent]:
        if self._fingerprint_detail:
            return self._exit(f"shard fingerprints differ: {self._fingerprint_detail}", "local")
        if min_verdict < 1:
            return self._exit("shard fingerprints differ on the mesh", "remote")
        self.fire("barrier_done")
        return []  # the channels are the role machine's (it fires channels_warm)

    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:
        return self._exit(f"a peer was lost during {self.state}: {reason}", "remote", peer)

    def on_timed_out(self, now: float) -> list[Intent]:
        """A startup collective outlived the process-group timeout (a peer is stalled)."""
        return self._exit(f"a startup collective timed out during {self.state}", "remote")

    def on_local_error(self, reason: str) -> list[Intent]:
        """Creating the topology's groups failed (every rank has the same config: every rank fails alike)."""
        return self._exit(f"topology: {reason}", "local")

    def on_drain(self, now: float) -> list[Intent]:
        return self._exit(f"stop requested during {self.state}", "local")

    def _exit(self, reason: str, kind: str, blame: int | None = None) -> list[Intent]:
        if not self.is_terminal:
            self.fail_with(reason, "local" if kind == "local" else "remote", blame)
            log.error("%s", self.failure)
        return [Exit(EXIT_FAILED, str(self.failure or reason))]

    def on_loaded(self, ok: bool, reason: str = "") -> int:
        """Record this rank's load result and fire ``loaded``; returns the vote to all-reduce
        (1 or 0). A rank whose load failed still votes, so that no rank waits forever."""
        self.load_ok, self.load_error = ok, reason
        self.fire("loaded")
        if not ok:
            log.error("%s rank=%d load failed: %s", self.NAME, self.rank, reason)
        return 1 if ok else 0

    # -- signals (SIGTERM / Ctrl-C) -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Warmed up and serving (not draining, not ended)."""
        return self.state == SERVING

    def signal_verdict(self, job_failed: bool = False) -> SignalVerdict:
        """What a signal (SIGTERM / Ctrl-C) means in this state, without changing it (the signal handler
        runs on another thread than the role's loop). ``drain`` from the channels' warm-up on: the role's
        machine is asked to end in order (a request before serving is kept and applied once it serves:
        never lost) and moves the lifecycle to draining itself; ``ignore`` while already draining or
        ended (the drain is bounded); ``fail`` inside the startup collectives (init .. barrier: the job
        cannot drain yet; the rank fails at once and the launcher ends the rest).

        ``job_failed``: another rank of the job is known to have failed (the job's store says so; torchrun
        tears a failed job down with SIGTERM). A drain could not finish (SHUTDOWN goes through every rank):
        ``fail`` at once, also while draining, rather than wait out the drain's bound."""
        if self.is_terminal:
            return "ignore"
        if job_failed:
            return "fail"
        if self.state in (WARMING_CHANNELS, WARMUP, SERVING):
            return "drain"
        if self.state == DRAINING:
            return "ignore"
        return "fail"

    def on_vote(self, min_vote: int, detail: str = "") -> str:
        """The all-reduced (MIN) vote: 1 -> vote_ok; 0 -> failed (local when this rank's own load
        failed, remote otherwise). ``detail`` names the ranks and causes, when gathered."""
        if min_vote >= 1:
            return self.fire("vote_ok")
        if self.load_ok is False:
            self.fail_with(f"load failed: {self.load_error}", "local")
        else:
            self.fail_with(f"load vote failed on another rank: {detail or 'cause not gathered'}", "remote")
        return self.state


class FrontLifecycleMachine(LifecycleMachine):
    """LifecycleMachine of the front (rank 0 under PP1): stage 0, HTTP, the PP channel to the leader."""

    MESH = False

    NAME = "lifecycle_front"
    ROLE = "front"
    STATES = FRONT_STATES
    TRANSITIONS = FRONT_TRANSITIONS
    BINDINGS = FRONT_BINDINGS


class LeaderLifecycleMachine(LifecycleMachine):
    """LifecycleMachine of the mesh leader (mesh rank 0): relays the front's envelopes to the mesh."""

    NAME = "lifecycle_leader"
    ROLE = "leader"
    STATES = MESH_STATES
    TRANSITIONS = LEADER_TRANSITIONS
    BINDINGS = LEADER_BINDINGS


class WorkerLifecycleMachine(LifecycleMachine):
    """LifecycleMachine of a mesh worker (mesh ranks 1..M-1): loops on the TP channel."""

    NAME = "lifecycle_worker"
    ROLE = "worker"
    STATES = MESH_STATES
    TRANSITIONS = WORKER_TRANSITIONS
    BINDINGS = WORKER_BINDINGS


class TPRank0LifecycleMachine(LifecycleMachine):
    """LifecycleMachine of rank 0 under pure TP: mesh leader, front and HTTP server in one process."""

    NAME = "lifecycle_tp_rank0"
    ROLE = "tp_rank0"
    STATES = MESH_STATES
    TRANSITIONS = TP_RANK0_TRANSITIONS
    BINDINGS = TP_RANK0_BINDINGS


LIFECYCLES: dict[str, type[LifecycleMachine]] = {
    "front": FrontLifecycleMachine,
    "leader": LeaderLifecycleMachine,
    "worker": WorkerLifecycleMachine,
    "tp_rank0": TPRank0LifecycleMachine,
}


def make_lifecycle(role: str, rank: int, **ctx: Any) -> LifecycleMachine:
    """The lifecycle machine of ``role`` ("front", "leader", "worker", "tp_rank0")."""
    try:
        cls = LIFECYCLES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; expected one of {sorted(LIFECYCLES)}") from None
    return cls(rank, **ctx)


class RoleMachine(ProtocolMachine):
    """A role's serving machine (leader relay, worker loop, the front's chunk machine) linked to its
    rank's lifecycle: it moves the lifecycle at the protocol steps that define its phases, and fails it
    with the same cause."""

    def __init__(self, rank: int, *, lifecycle: LifecycleMachine | None = None, **ctx: Any) -> None:
        super().__init__(rank, **ctx)
        self.lifecycle = lifecycle

    _drain_pending = False

    def _lifecycle_event(self, event: str) -> None:
        lc = self.lifecycle
        if lc is not None and lc.can_fire(event):
            lc.fire(event)
            if self._drain_pending and lc.can_fire("drain"):  # a drain asked for before serving, applied now
                self._drain_pending = False
                lc.fire("drain")

    def _lifecycle_drain(self) -> None:
        """The rank is asked to drain: the lifecycle moves to draining now if it serves, else once it does."""
        lc = self.lifecycle
        if lc is None:
            return
        if lc.can_fire("drain"):
            lc.fire("drain")
        elif not lc.is_terminal:
            self._drain_pending = True

    def fail_with(self, reason: str, kind: ErrorKind, blame: int | None = None) -> FailureCause:
        cause = super().fail_with(reason, kind, blame)
        lc = self.lifecycle
        if lc is not None and not lc.is_terminal:
            lc.fail_with(cause.reason, cause.kind, cause.blame)
        return cause


class MeshTripwires:
    """The drift tripwires every mesh rank's machine holds (mixed into the leader relay and the worker
    loop): the call's inputs as this rank holds them equal the leader's (``inputs_digest``), and the
    shard's weights as held equal what was loaded (checked at READY and every ``weights_check_every``
    calls). A mismatch fails this rank (local: its inputs or weights drifted), naming it; never wrong
    video at exit 0."""

    weights_baseline: str | None = None  # the checksum at load (None: the pipeline cannot say: no check)
    weights_check_every: int = 0
    calls_since_check = 0

    def _weights_due(self) -> bool:
        if self.weights_baseline is None or self.weights_check_every <= 0:
            return False
        self.calls_since_check += 1
        return self.calls_since_check >= self.weights_check_every

    def on_inputs_checked(self, digest: str) -> list[Intent]:
        header = self.current  # type: ignore[attr-defined]
        expected = header.inputs_digest if header is not None else ""
        if expected and digest != expected:
            return self._drift(f"inputs drift: the tensors of call_id={header.call_id} chunk_index="
                               f"{header.chunk_index} on rank {self.rank} (checksum {digest}) differ from the "  # type: ignore[attr-defined]
                               f"leader's ({expected})")
        return []

    def on_weights_checked(self, checksum: str) -> list[Intent]:
        self.calls_since_check = 0
        if self.weights_baseline is not None and checksum != self.weights_baseline:
            return self._drift(f"weights drift: rank {self.rank}'s weights as held (checksum {checksum}) are "  # type: ignore[attr-defined]
                               f"not the ones it loaded ({self.weights_baseline})")
        return []

    def _drift(self, reason: str) -> list[Intent]:
        self.fail_with(reason, "local")  # type: ignore[attr-defined]
        log.error("%s", reason)
        return [Exit(EXIT_FAILED, reason)]
