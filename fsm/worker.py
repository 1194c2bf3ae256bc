"""The mesh worker's loop (mesh ranks 1..M-1) and its watchdog.

waiting --header(INFER|WARMUP)--> running --shard_done--> waiting; NOOP (heartbeat) keeps it
waiting and re-arms the watchdog; SHUTDOWN -> exited (Exit 0). WARMUP tensors do not travel:
every mesh rank makes them from ``header.seed``. The startup PING on the TP channel belongs to
``warming_channels`` (the channel adapter), not to this loop: a PING here fails the rank. In ``waiting``, no header for
``watchdog_s`` seconds (W > 3H) -> failed, Exit(EXIT_ORPHAN): the leader or the front is gone.
The watchdog is not armed while a shard runs (a collective that never returns is bounded by
the process-group timeout, not by this loop).

Time is passed in (``now``, seconds on any monotonic clock); the adapter owns the clock. The
adapter waits for the next header on the CPU channel with a timeout of
``watchdog_deadline() - now`` and calls ``on_tick(now)`` when that wait times out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, TPHeaderV1
from pp1.protocol.preflight import validate_tp_header

from .base import ProtocolMachine
from .intents import EXIT_FAILED, EXIT_OK, EXIT_ORPHAN, Exit, Intent, RecvTensors, RunShard

log = logging.getLogger("pp1.fsm.worker")

WAITING, RUNNING, EXITED, FAILED = "waiting", "running", "exited", "failed"

STATES = [WAITING, RUNNING, EXITED, FAILED]
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    # (event, source(s), dest)
    ("heartbeat", WAITING, WAITING),  # NOOP header: re-arm the watchdog
    ("header", WAITING, RUNNING),  # INFER or WARMUP header: receive its tensors, run the shard
    ("shard_done", RUNNING, WAITING),
    ("shutdown", WAITING, EXITED),  # SHUTDOWN header
    # "fail" (every non-terminal state -> failed) is added by ProtocolMachine: watchdog expiry,
    # a shard that raised, a header that breaks the protocol.
]

# TP action -> event of the table; any other action (PING, READY) from the leader breaks the protocol.
EVENT_FOR_ACTION: dict[Action, str] = {
    Action.NOOP: "heartbeat",
    Action.INFER: "header",
    Action.WARMUP: "header",
    Action.SHUTDOWN: "shutdown",
}


class WorkerLoop(ProtocolMachine):
    """A mesh worker's loop (mesh ranks 1..M-1): runs its shard for each relayed header; NOOP
    re-arms the watchdog, SHUTDOWN exits 0, no header for W seconds exits as an orphan.

    ``serving`` turns True at the first header that is not WARMUP: the adapter fires the
    lifecycle's ``warmup_done`` then.

    With ``geometry``, every header is validated (``validate_tp_header``; call_ids strictly
    increase within the warmup sequence and within the serving sequence, which restarts at the
    front's ids); a header that breaks the rules fails the rank (the leader broke the protocol).
    """

    NAME = "worker"
    STATES = STATES
    TRANSITIONS = TRANSITIONS
    INITIAL = WAITING
    TERMINAL = frozenset({EXITED, FAILED})

    def __init__(
        self,
        rank: int,
        watchdog_s: float,
        now: float,
        heartbeat_s: float | None = None,
        geometry: ChunkGeometry | None = None,
        **ctx: Any,
    ) -> None:
        if watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be > 0, got {watchdog_s}")
        if heartbeat_s is not None and not watchdog_s > 3 * heartbeat_s:
            raise ValueError(f"watchdog W={watchdog_s}s must exceed 3 x heartbeat H={heartbeat_s}s")
        super().__init__(rank, **ctx)
        self.watchdog_s = watchdog_s
        self.last_header_at = now
        self.current: TPHeaderV1 | None = None
        self.serving = False
        self.headers_seen = 0
        self.geometry = geometry
        self._last_ids: dict[bool, int | None] = {False: None, True: None}  # warmup? -> last call_id

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
            reason = f"orphan: no header for {waited:.1f} s (watchdog W={self.watchdog_s:g} s)"
            self.fail_with(reason, "remote")
            log.error("worker rank=%d state=%s %s", self.rank, self.state, reason)
            return [Exit(EXIT_ORPHAN, reason)]
        return []

    # -- headers ------------------------------------------------------------------------------------
    def on_header(self, header: TPHeaderV1, now: float) -> list[Intent]:
        """A TP header arrived from the leader. In ``running`` this is an InvalidEvent (the
        adapter receives headers only while waiting)."""
        event = EVENT_FOR_ACTION.get(header.action)
        if self.state == WAITING:
            reason = self._check(header, event)
            if reason:
                self.fail_with(reason, "remote")
                log.error("worker rank=%d call_id=%d state=%s %s", self.rank, header.call_id, self.state, reason)
                return [Exit(EXIT_FAILED, reason)]
        self.fire(event or "header")  # outside the table (e.g. while running): InvalidEvent
        self._last_ids[header.action == Action.WARMUP] = header.call_id
        self.last_header_at = now
        self.headers_seen += 1
        if header.action != Action.WARMUP:
            self.serving = True
        log.debug(
            "worker rank=%d action=%s call_id=%d chunk_index=%d cache_epoch=%d state=%s",
            self.rank, header.action.value, header.call_id, header.chunk_index, header.cache_epoch, self.state,
        )
        if event == "heartbeat":
            return []
        if event == "shutdown":
            return [Exit(EXIT_OK, f"shutdown (call_id={header.call_id})")]
        self.current = header
        out: list[Intent] = []
        if header.tensors and header.action != Action.WARMUP:  # WARMUP tensors are made from the seed
            out.append(RecvTensors(header.tensors))
        out.append(RunShard(header))
        return out

    def _check(self, header: TPHeaderV1, event: str | None) -> str:
        if event is None:
            return f"unexpected TP action {header.action.value!r} (call_id={header.call_id})"
        if self.geometry is None:
            return ""
        try:
            validate_tp_header(header, self.geometry, self._last_ids[header.action == Action.WARMUP])
        except RemoteProtocolError as err:
            return f"invalid TP header [{err.code}] {err.field}: {err.reason}"
        return ""

    # -- the shard ----------------------------------------------------------------------------------
    def on_shard_done(self, now: float) -> list[Intent]:
        """The shard finished its call; back to waiting, watchdog re-armed from ``now``."""
        self.fire("shard_done")
        self.last_header_at = now
        self.current = None
        return []

    def on_shard_failed(self, reason: str) -> list[Intent]:
        """The shard raised: this rank fails (the leader's collectives fail with it)."""
        h = self.current
        where = f" (call_id={h.call_id} chunk_index={h.chunk_index})" if h else ""
        cause = self.fail_with(f"shard failed{where}: {reason}", "local")
        return [Exit(EXIT_FAILED, cause.reason)]
