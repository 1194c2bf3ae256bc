"""What this rank's device ops are doing, for the liveness monitor (``adapters/rank/liveness.py``):
the ops started on a device group and not yet seen complete, and the number of collectives entered
per device group. On NCCL an op returns to the CPU at once and completes on the GPU: it stays
outstanding until its ``Work`` says it completed, so a wait is seen wherever the CPU later blocks on
it. No decisions here: the monitor's machine (``pp1.fsm.liveness``) judges the peers.

``BlockingDeviceDouble`` is the CPU double of NCCL's failure mode (``PP1_DEVICE_DOUBLE=blocking``, CPU
only, for tests and drills): before each collective on a device group, every member meets on the
job's store and waits for all the others without a bound, the way an NCCL all-reduce waits for a
dead peer; gloo alone would notice the closed connection.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ENV_DOUBLE = "PP1_DEVICE_DOUBLE"


@dataclass(frozen=True)
class OpWait:
    """An outstanding device op: its group and the group's global ranks, purpose, start (monotonic) and
    collective number (None: p2p)."""

    group: str
    members: tuple[int, ...]
    purpose: str
    since: float
    seq: int | None = None


class DeviceWaits:
    """Outstanding device ops and collective counts (thread-safe: the role thread writes, the monitor reads)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[int, tuple[OpWait, Any]] = {}
        self._tokens = itertools.count()
        self._seqs: dict[str, int] = {}

    def begin(self, group: str, members: Sequence[int], purpose: str, collective: bool) -> tuple[int, int | None]:
        """A device op starts: (its token, its collective number on ``group``, None for p2p)."""
        with self._lock:
            seq = None
            if collective:
                seq = self._seqs[group] = self._seqs.get(group, 0) + 1
            token = next(self._tokens)
            self._open[token] = (OpWait(group=group, members=tuple(members), purpose=purpose, since=self.clock(), seq=seq), None)
            return token, seq

    def attach(self, token: int, work: Any) -> None:
        """The op's ``Work``: the op stays outstanding until it reports completion."""
        with self._lock:
            if token in self._open:
                self._open[token] = (self._open[token][0], work)

    def end(self, token: int) -> None:
        with self._lock:
            self._open.pop(token, None)

    def settle(self, token: int) -> None:
        """After the CPU's wait returned: done unless its work is still running on the device."""
        with self._lock:
            entry = self._open.get(token)
            if entry is None or _completed(entry[1]):
                self._open.pop(token, None)

    def outstanding(self) -> tuple[OpWait, ...]:
        with self._lock:
            for token in [t for t, (_, w) in self._open.items() if w is not None and _completed(w)]:
                self._open.pop(token)
            return tuple(w for w, _ in self._open.values())

    def seqs(self) -> dict[str, int]:
        with self._lock:
            return dict(self._seqs)


def _completed(work: Any) -> bool:
    if work is None:
        return False
    try:
        return bool(work.is_completed())
    except Exception:  # a failed work is done (its error went to the waiter)
        return True


class BlockingDeviceDouble:
    """Members of a device group meet on the store before each collective, waiting without a bound."""

    def __init__(self, store: Any, rank: int) -> None:
        self.store, self.rank = store, rank

    def meet(self, group: str, seq: int, members: Sequence[int]) -> None:
        self.store.set(f"pp1/double/{group}/{seq}/{self.rank}", "1")
        self.store.wait([f"pp1/double/{group}/{seq}/{r}" for r in members], datetime.timedelta(days=1))
