"""The liveness monitor: a thread on every rank that, every ``BEAT_S``, publishes this rank's beat (and
the collectives it entered per device group) on the job's store, reads every peer's, and feeds them
with this rank's outstanding device ops into its ``DeviceLivenessMachine`` (``pp1.fsm.liveness``
decides). When the machine gives up on a peer, the rank exits with the cause: a wait inside a device
collective or p2p op whose peer died or stalled ends within seconds, never at the process group's
timeout. A beat the store cannot take or give is skipped (no verdict from a store hiccup).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pp1.adapters.rank.progress import ProgressBoard
from pp1.adapters.transport.device_waits import DeviceWaits
from pp1.fsm.base import FailureCause
from pp1.fsm.events import DeviceWait, LivenessObserved, PeerBeat
from pp1.fsm.intents import Exit
from pp1.fsm.liveness import BEAT_S, DeviceLivenessMachine

log = logging.getLogger("pp1.adapters.rank.liveness")


def peer_beat(entry: dict[str, Any] | None) -> PeerBeat | None:
    """A peer's progress entry as the machine reads it (None: nothing published yet)."""
    if entry is None:
        return None
    return PeerBeat(mark=str(entry.get("beat", entry.get("t"))), state=entry.get("state"),
                    seqs={str(k): int(v) for k, v in (entry.get("dev_seq") or {}).items()})


class LivenessMonitor:
    """Start with :meth:`start`; ``on_exit(code, reason)`` ends the rank (it does not return)."""

    def __init__(self, rank: int, world_size: int, waits: DeviceWaits, board: ProgressBoard,
                 on_exit: Callable[[int, str], None], clock: Callable[[], float] = time.monotonic,
                 **ids: object) -> None:
        self.rank, self.waits, self.board, self.on_exit, self.clock = rank, waits, board, on_exit, clock
        self.machine = DeviceLivenessMachine(rank, [r for r in range(world_size) if r != rank],
                                             started_at=clock(), **ids)
        self._beat = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pp1-liveness", daemon=True)

    @property
    def failure(self) -> FailureCause | None:
        return self.machine.failure

    def start(self) -> LivenessMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._beat += 1
            self.board.publish(beat=self._beat, dev_seq=self.waits.seqs())
            try:
                entries = self.board.entries()
            except Exception as exc:  # the store is away: no verdict from what we could not read
                log.debug("liveness: peers not read: %s", exc)
                continue
            peers = {r: peer_beat(e) for r, e in enumerate(entries) if r != self.rank}
            waits = tuple(DeviceWait(w.group, w.members, w.purpose, w.since, w.seq) for w in self.waits.outstanding())
            for it in self.machine.handle(LivenessObserved(self.clock(), waits, peers)):
                if isinstance(it, Exit):
                    self.on_exit(it.code, it.reason)
                    return
