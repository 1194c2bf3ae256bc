"""The device-collective liveness watch: while this rank waits inside a device collective or p2p op
(an NCCL all-reduce never returns when a peer died: no bound of ours, only the process group's 600 s),
a monitor on the CPU control plane decides from every peer's heartbeat on the job's store whether a
peer is dead or stalled, and fails this rank with the cause, naming the peer.

One instance per rank, fed by the monitor thread (``adapters/rank/liveness.py``) every ``BEAT_S``
with :class:`pp1.fsm.events.LivenessObserved`: this rank's outstanding device ops (what the
runtime started and has not seen complete) and every peer's latest beat. The rules:

Only the members of the op's group are judged (a front that failed does not hold up the mesh's
all-reduce).

- **silent**: a peer whose beat has not changed for ``SILENT_S`` (its process died, or it cannot run
  even its monitor thread): dead.
- **failed**: a peer whose own lifecycle says ``failed`` (it will not join the op).
- **stalled**: while this rank has waited ``STALL_S`` in collective #n of a group, a peer of that
  group that has not entered #n and has not moved for ``STALL_S`` (alive, but not coming).

The verdicts count only while a device op is outstanding: a silent peer while nothing waits on it
is the channels' business (heartbeats, deadlines). Detection takes at most ``STALL_S + 2 * BEAT_S``
(6 s) after the wait began, well inside the 10 s bound and far from the process group's timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .base import FAILED, Intent, InvalidEvent, ProtocolMachine
from .events import DeviceWait, PeerBeat
from .intents import EXIT_FAILED, Exit

log = logging.getLogger("pp1.fsm.liveness")

BEAT_S = 0.5  # the monitor's period: publish this rank's beat, read every peer's
SILENT_S = 3.0  # a peer whose beat has not moved this long is dead
STALL_S = 5.0  # a live peer that has not entered the collective this rank waits in, this long: stalled

STATES = ["watching", "waiting", FAILED]
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    ("wait_began", "watching", "waiting"),  # a device op is outstanding
    ("wait_ended", "waiting", "watching"),  # none is
]


@dataclass
class _Seen:
    mark: str | None
    moved_at: float  # when its mark last changed (or when this watch began, before any beat)
    seqs: dict[str, int]
    seqs_moved_at: float
    failed: bool = False


class DeviceLivenessMachine(ProtocolMachine):
    """This rank's watch over its peers while it waits in device ops (see the module docstring)."""

    NAME = "liveness"
    STATES = STATES
    TRANSITIONS = TRANSITIONS
    INITIAL = "watching"
    TERMINAL = frozenset({FAILED})

    def __init__(self, rank: int, peers: list[int] | tuple[int, ...] = (), started_at: float = 0.0,
                 **ctx: object) -> None:
        super().__init__(rank, **ctx)
        self._seen: dict[int, _Seen] = {p: _Seen(None, started_at, {}, started_at) for p in peers if p != rank}

    # -- the one event ------------------------------------------------------------------------------
    def on_observed(self, now: float, waits: tuple[DeviceWait, ...],
                    peers: Mapping[int, PeerBeat | None]) -> list[Intent]:
        """Record the peers' beats; while a device op waits, give a verdict on them."""
        if self.is_terminal:
            raise InvalidEvent(self.NAME, self.state, "LivenessObserved")
        self._record(now, peers)
        if not waits:
            if self.can_fire("wait_ended"):
                self.fire("wait_ended")
            return []
        if self.can_fire("wait_began"):
            self.fire("wait_began")
        verdict = self._verdict(now, waits)
        if verdict is None:
            return []
        blame, reason = verdict
        self.fail_with(reason, "remote", blame)
        log.error("liveness rank=%d: %s", self.rank, reason)
        return [Exit(EXIT_FAILED, reason)]

    # -- the rules ------------------------------------------------------------------------------------
    def _record(self, now: float, peers: Mapping[int, PeerBeat | None]) -> None:
        for p, beat in peers.items():
            seen = self._seen.get(p)
            if seen is None or beat is None:
                continue
            if beat.mark != seen.mark:
                seen.mark, seen.moved_at = beat.mark, now
            if dict(beat.seqs) != seen.seqs:
                seen.seqs, seen.seqs_moved_at = dict(beat.seqs), now
            if beat.state == FAILED:
                seen.failed = True

    def _verdict(self, now: float, waits: tuple[DeviceWait, ...]) -> tuple[int, str] | None:
        for w in sorted(waits, key=lambda w: w.since):
            what = f"{w.purpose} on {w.group}" + (f" (#{w.seq})" if w.seq is not None else "")
            waited = now - w.since
            peers = [(p, seen) for p, seen in sorted(self._seen.items()) if p in w.members]
            for p, seen in peers:
                if seen.failed:
                    return p, f"rank {p} failed while this rank waits in {what} for {waited:.1f} s"
                if now - seen.moved_at >= SILENT_S:
                    return p, (f"rank {p} is silent (no heartbeat for {now - seen.moved_at:.1f} s: dead) while "
                               f"this rank waits in {what} for {waited:.1f} s")
            if w.seq is None or waited < STALL_S:
                continue
            for p, seen in peers:
                theirs = seen.seqs.get(w.group)
                if theirs is not None and theirs < w.seq and now - seen.seqs_moved_at >= STALL_S:
                    return p, (f"rank {p} stalled: it has not entered {w.purpose} #{w.seq} on {w.group} (its last: "
                               f"#{theirs}) for {now - seen.seqs_moved_at:.1f} s while this rank waits in it")
        return None
