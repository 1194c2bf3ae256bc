"""The mesh worker's loop (mesh ranks 1..M-1) and its watchdog.

warming --PING--> (WarmMesh) --warm--> waiting --header(INFER|WARMUP)--> running --shard_done-->
waiting; NOOP (heartbeat) keeps it waiting and re-arms the watchdog; SHUTDOWN -> exited (Exit 0).
The machine drives its own loop: after every step it asks for the next header with
``AwaitHeader(until=watchdog deadline)``. WARMUP tensors do not travel: every mesh rank makes them
from ``header.seed`` (``MakeWarmupTensors``). In ``waiting``, no header for ``watchdog_s`` seconds
(W > 3H) -> failed, Exit(EXIT_ORPHAN): the leader or the front is gone; a lost leader is an orphan
exit too. The watchdog is not armed while a shard runs (a collective that never returns is bounded
by the device-collective monitor and the process-group timeout, not by this loop).

Every header is validated (``validate_tp_header``; call_ids strictly increase within the warmup
sequence and within the serving sequence, which restarts at the front's ids); a header that breaks
the rules fails the rank (the leader broke the protocol). Tests and production build it the same way.

With a ``lifecycle`` (the rank's lifecycle machine), the worker moves it: ``channels_warm`` once the
mesh device probe completed, ``warmup_done`` at the first header that is not WARMUP (fired before
handling that header), ``drain`` on a drain request, ``shutdown_received`` on SHUTDOWN, and its failure
with the same cause.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, TPHeaderV1
from pp1.protocol.preflight import validate_tp_header
from pp1.protocol.schedule import PING_CALL_ID

from .intents import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ORPHAN,
    AwaitHeader,
    CheckInputs,
    CheckWeights,
    Exit,
    Intent,
    MakeWarmupTensors,
    RecvTensors,
    RunShard,
    WarmMesh,
)
from .lifecycle import LifecycleMachine, MeshTripwires, RoleMachine

log = logging.getLogger("pp1.fsm.worker")

WARMING, WAITING, RUNNING, EXITED, FAILED = "warming", "waiting", "running", "exited", "failed"

STATES = [WARMING, WAITING, RUNNING, EXITED, FAILED]
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    # (event, source(s), dest)
    ("ping", WARMING, WARMING),  # the leader's PING header: WarmMesh (one all-reduce on the mesh device group)
    ("warm", WARMING, WAITING),  # the probe completed: warmup headers follow
    ("heartbeat", WAITING, WAITING),  # NOOP header: re-arm the watchdog
    ("header", WAITING, RUNNING),  # INFER or WARMUP header: receive (or make) its tensors, run the shard
    ("shard_done", RUNNING, WAITING),
    ("shutdown", WAITING, EXITED),  # SHUTDOWN header
    # "fail" (every non-terminal state -> failed) is added by ProtocolMachine: watchdog expiry,
    # a lost leader, a shard that raised, a header that breaks the protocol.
]

# TP action -> event of the table; any other action (PING after warming, READY) breaks the protocol.
EVENT_FOR_ACTION: dict[Action, str] = {
    Action.NOOP: "heartbeat",
    Action.INFER: "header",
    Action.WARMUP: "header",
    Action.SHUTDOWN: "shutdown",
}


class WorkerLoopMachine(MeshTripwires, RoleMachine):
    """A mesh worker's loop (mesh ranks 1..M-1): runs its shard for each relayed header; NOOP
    re-arms the watchdog, SHUTDOWN exits 0, no header for W seconds exits as an orphan.

    ``watchdog_s``: W; ``now``: the clock at construction; ``heartbeat_s``: H (W > 3H is checked);
    ``geometry``: what headers are validated against; ``warm_timeout_s``: the bound on the wait for
    the leader's PING (default 4 W).
    """

    NAME: ClassVar[str] = "worker"
    STATES: ClassVar[list[str]] = STATES
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]] = TRANSITIONS
    INITIAL: ClassVar[str] = WARMING
    TERMINAL: ClassVar[frozenset[str]] = frozenset({EXITED, FAILED})

    def __init__(
        self,
        rank: int,
        watchdog_s: float,
        now: float,
        geometry: ChunkGeometry,
        heartbeat_s: float | None = None,
        *,
        warm_timeout_s: float | None = None,
        lifecycle: LifecycleMachine | None = None,
        leader_rank: int | None = None,
        weights_baseline: str | None = None,
        weights_check_every: int = 0,
        **ctx: Any,
    ) -> None:
        if not (watchdog_s > 0 and math.isfinite(watchdog_s)):
            raise ValueError(f"watchdog_s must be a positive, finite number, got {watchdog_s}")
        if heartbeat_s is not None and not watchdog_s > 3 * heartbeat_s:
            raise ValueError(f"watchdog W={watchdog_s}s must exceed 3 x heartbeat H={heartbeat_s}s")
        super().__init__(rank, lifecycle=lifecycle, **ctx)
        self.watchdog_s = watchdog_s
        self.leader_rank = leader_rank  # its peer: a remote failure is the leader's (or the front's behind it)
        self.warm_timeout_s = warm_timeout_s if warm_timeout_s is not None else 4 * watchdog_s
        self.last_header_at = now
        self.current: TPHeaderV1 | None = None
        self.serving = False
        self.headers_seen = 0
        self.geometry = geometry
        self.weights_baseline, self.weights_check_every = weights_baseline, weights_check_every
        self._last_ids: dict[bool, int | None] = {False: None, True: None}  # warmup? -> last call_id

    # -- the loop -----------------------------------------------------------------------------------
    def start(self, now: float) -> list[Intent]:
        """Wait for the leader's PING (the TP channel's warm-up), bounded by ``warm_timeout_s``."""
        self.last_header_at = now
        return [AwaitHeader(until=now + self.warm_timeout_s)]

    def _next(self) -> list[Intent]:
        return [AwaitHeader(until=self.watchdog_deadline())]

    # -- the watchdog -------------------------------------------------------------------------------
    def watchdog_deadline(self) -> float:
        """When ``on_tick`` will declare this rank orphaned; +inf while a shard runs or after exit."""
        if self.state != WAITING:
            return math.inf
        return self.last_header_at + self.watchdog_s

    def on_tick(self, now: float) -> list[Intent]:
        """Check the watchdog. Returns [] or [Exit(EXIT_ORPHAN, ...)] (state -> failed)."""
        if self.state == WAITING and now >= self.watchdog_deadline():
            waited = now - self.last_header_at
            return self._exit(EXIT_ORPHAN, f"orphan: no header for {waited:.1f} s (watchdog W={self.watchdog_s:g} s)",
                              "remote")
        return []

    def on_timed_out(self, now: float) -> list[Intent]:
        """The bounded wait for a header ran out (or, running, the wait for the call's tensors: fatal)."""
        if self.state == WARMING:
            return self._exit(EXIT_FAILED, f"no PING from the leader within {self.warm_timeout_s:g} s", "remote")
        if self.state == RUNNING:
            return self._exit(EXIT_FAILED, "the call's tensors did not arrive in time", "remote")
        out = self.on_tick(now)
        return out or (self._next() if self.state == WAITING else [])

    # -- headers ------------------------------------------------------------------------------------
    def on_header(self, header: TPHeaderV1, now: float) -> list[Intent]:
        """A TP header arrived from the leader. In ``running`` this is an InvalidEvent (the
        adapter receives headers only while waiting)."""
        if self.state == WARMING:
            return self._on_ping(header)
        event = EVENT_FOR_ACTION.get(header.action)
        if self.state == WAITING:
            reason = self._check(header, event)
            if reason:
                return self._exit(EXIT_FAILED, reason, "remote")
        first_serving = header.action is not Action.WARMUP and not self.serving and self.state == WAITING
        if first_serving:
            self._lifecycle_event("warmup_done")  # before handling the first serving header
        self.fire(event or "header")  # outside the table (e.g. while running): InvalidEvent
        self._last_ids[header.action == Action.WARMUP] = header.call_id
        self.last_header_at = now
        self.headers_seen += 1
        if header.action != Action.WARMUP:
            self.serving = True
        log.debug("worker rank=%d action=%s call_id=%d chunk_index=%d cache_epoch=%d state=%s",
                  self.rank, header.action.value, header.call_id, header.chunk_index, header.cache_epoch, self.state)
        check: list[Intent] = [CheckWeights()] if first_serving and self.weights_baseline is not None else []
        if event == "heartbeat":
            return [*check, *self._next()]
        if event == "shutdown":
            self._lifecycle_event("shutdown_received")
            return [Exit(EXIT_OK, f"shutdown (call_id={header.call_id})")]
        self.current = header
        if header.action is Action.WARMUP:  # WARMUP tensors are made from the seed, never sent
            out: list[Intent] = [MakeWarmupTensors(header)]
        else:
            out = [*check, RecvTensors(header.tensors)] if header.tensors else list(check)
        if header.inputs_digest:
            out.append(CheckInputs(header))
        return [*out, RunShard(header)]

    def _on_ping(self, header: TPHeaderV1) -> list[Intent]:
        if header.action is not Action.PING or header.call_id != PING_CALL_ID:
            return self._exit(EXIT_FAILED, f"expected the leader's PING (call_id={PING_CALL_ID}) first, got "
                              f"{header.action.value} call_id={header.call_id}", "remote")
        self.fire("ping")
        return [WarmMesh()]

    def on_mesh_warm(self, now: float) -> list[Intent]:
        """The mesh device probe completed: the TP channel is warm; warmup headers follow."""
        self.fire("warm")
        self._lifecycle_event("channels_warm")
        self.last_header_at = now
        return self._next()

    def _check(self, header: TPHeaderV1, event: str | None) -> str:
        if event is None:
            return f"unexpected TP action {header.action.value!r} (call_id={header.call_id})"
        try:
            validate_tp_header(header, self.geometry, self._last_ids[header.action == Action.WARMUP])
        except RemoteProtocolError as err:
            return f"invalid TP header [{err.code}] {err.field}: {err.reason}"
        return ""

    # -- the shard ----------------------------------------------------------------------------------
    def on_shard_done(self, now: float, observed_calls: int = 0, current_start_frame: int = 0,
                      timings_ms: dict[str, float] | None = None) -> list[Intent]:
        """The shard finished its call; back to waiting, watchdog re-armed from ``now``."""
        self.fire("shard_done")
        self.last_header_at = now
        self.current = None
        return [*([CheckWeights()] if self._weights_due() else []), *self._next()]

    def on_shard_failed(self, reason: str, recoverable: bool = False, peer_lost: bool = False) -> list[Intent]:
        """The shard raised: this rank fails (the leader's collectives fail with it). A collective that
        failed because a mesh peer is gone is that peer's fault (which one, a collective does not say)."""
        h = self.current
        where = f" (call_id={h.call_id} chunk_index={h.chunk_index})" if h else ""
        if peer_lost:
            return self._exit(EXIT_FAILED, f"a mesh peer was lost during the shard{where}: {reason}", "remote",
                              blame=None)
        return self._exit(EXIT_FAILED, f"shard failed{where}: {reason}", "local")

    # -- broken channels and requests ---------------------------------------------------------------
    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:
        """The leader's connection closed (a header or its tensors could not be received): it is gone."""
        return self._exit(EXIT_ORPHAN, f"orphan: lost the leader ({reason[:160]})", "remote")

    def on_bad_message(self, reason: str) -> list[Intent]:
        return self._exit(EXIT_FAILED, f"bad TP header: {reason}", "remote")

    def on_drain(self, now: float) -> list[Intent]:
        """SIGTERM: finish the call in hand, then wait for SHUTDOWN (the watchdog bounds the wait)."""
        self._lifecycle_drain()
        log.info("worker rank=%d drain requested: waiting for SHUTDOWN (the watchdog bounds the wait)", self.rank)
        return []

    def _exit(self, code: int, reason: str, kind: str, blame: int | None | str = "leader") -> list[Intent]:
        if not self.is_terminal:
            self.fail_with(reason, "local" if kind == "local" else "remote",
                           self.leader_rank if blame == "leader" else blame)  # type: ignore[arg-type]
            log.error("worker rank=%d state=%s %s", self.rank, self.state, reason)
        return [Exit(code, reason)]


