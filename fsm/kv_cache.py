"""The front's model of the mesh's KV cache (one epoch's attention window). No I/O.

The mesh owns the real cache; the front's chunk machine (``fsm/chunk.py``) mirrors it here so the
schedule (init / reset / recompute flags, how many context frames a recompute needs) is decided in
one place. All sizes are in latent frames.

    empty --store--> filling | rolling      a chunk's result was accepted (rolling once the window is full)
    filling|rolling --recompute_due--> needs_recompute    mark_recompute(): the schedule says the next chunk recomputes
    needs_recompute --recompute_begun--> recomputing      begin_recompute(): that chunk was sent (it is in flight)
    recomputing --store--> filling | rolling              its result was accepted
    any live state --cache_reset--> empty                  reset(): hard cut (prompt reset / error recovery)

``store()`` is two table events (``fill`` / ``roll``): the method picks the one that matches the
frame count, so the table stays data and every move is explicit.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import FAILED, ProtocolMachine

EMPTY = "empty"
FILLING = "filling"
ROLLING = "rolling"
NEEDS_RECOMPUTE = "needs_recompute"
RECOMPUTING = "recomputing"

KV_STATES = [EMPTY, FILLING, ROLLING, NEEDS_RECOMPUTE, RECOMPUTING, FAILED]

# (event, source(s), dest). Event names differ from the method names (transitions binds triggers).
KV_TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    ("fill", [EMPTY, FILLING, RECOMPUTING], FILLING),
    ("roll", [EMPTY, FILLING, ROLLING, RECOMPUTING], ROLLING),
    ("recompute_due", [FILLING, ROLLING], NEEDS_RECOMPUTE),
    ("recompute_begun", NEEDS_RECOMPUTE, RECOMPUTING),
    ("cache_reset", [EMPTY, FILLING, ROLLING, NEEDS_RECOMPUTE, RECOMPUTING], EMPTY),
]


class KVCacheMachine(ProtocolMachine):
    """Tracks how many latent frames the mesh's cache holds and whether a recompute is due.

    ``window``: the local attention window in latent frames (``geometry.max_context_frames``).
    ``chunk_frames``: latent frames one chunk adds (``geometry.latent_frames``).
    """

    NAME: ClassVar[str] = "kv_cache"
    STATES: ClassVar[list[str]] = KV_STATES
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]] = KV_TRANSITIONS
    INITIAL: ClassVar[str] = EMPTY
    TERMINAL: ClassVar[frozenset[str]] = frozenset({FAILED})

    def __init__(self, rank: int, window: int, chunk_frames: int, **ctx: Any) -> None:
        if window < 1 or chunk_frames < 1:
            raise ValueError(f"window ({window}) and chunk_frames ({chunk_frames}) must be >= 1")
        self.window = window
        self.chunk_frames = chunk_frames
        self.cached_frames = 0  # frames held in the window (<= window)
        self.timeline_frames = 0  # frames generated this epoch (the mesh's current_start_frame)
        super().__init__(rank, **ctx)

    # -- moves ------------------------------------------------------------------------------------
    def store(self) -> str:
        """A chunk's result was accepted: the cache grew by one chunk (capped at the window)."""
        timeline = self.timeline_frames + self.chunk_frames
        cached = min(self.cached_frames + self.chunk_frames, self.window)
        self.fire(ROLLING_EVENT if cached >= self.window else FILLING_EVENT)
        self.timeline_frames, self.cached_frames = timeline, cached
        return self.state

    def mark_recompute(self) -> str:
        return self.fire("recompute_due")

    def begin_recompute(self) -> int:
        """The recomputing chunk was planned; returns how many context frames it must carry."""
        self.fire("recompute_begun")
        return self.context_frames()

    def reset(self) -> str:
        self.fire("cache_reset")
        self.cached_frames = 0
        self.timeline_frames = 0
        return self.state

    # -- questions --------------------------------------------------------------------------------
    def context_frames(self) -> int:
        """Latent frames a recompute now would rebuild: what the window holds."""
        return self.cached_frames

    @property
    def is_full(self) -> bool:
        return self.cached_frames >= self.window


FILLING_EVENT = "fill"
ROLLING_EVENT = "roll"
