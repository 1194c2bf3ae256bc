"""Scripted prompt changes for headless runs: ``--prompt-change CHUNK:TEXT`` (repeatable).

After CHUNK chunks were shown (counted over the whole run, every epoch), the front changes its
prompt through :meth:`ChunkEngine.request_prompt` -- the one way to change it: a hard cut (epoch + 1,
a chunk in flight is received and dropped) and the new conditioning from the epoch's first chunk on.
The prompts are encoded up front by the caller (:meth:`PromptScript.encode`, before the engine runs),
never on the engine's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pp1.pipelines.interface import Stage0

if TYPE_CHECKING:  # pragma: no cover
    from .chunk_engine import ChunkEngine, ChunkRecord

log = logging.getLogger("pp1.adapters.prompt_changes")

OPTION = "--prompt-change"


@dataclass(frozen=True)
class PromptChange:
    after_chunks: int  # change once this many chunks were shown
    prompt: str


def parse_prompt_change(text: str) -> PromptChange:
    """``"CHUNK:TEXT"`` -> PromptChange; ValueError (saying what is wrong) for anything else."""
    head, sep, prompt = text.partition(":")
    if not sep:
        raise ValueError(f"expected CHUNK:TEXT (e.g. 4:\"a red fox\"), got {text!r}")
    try:
        after = int(head.strip())
    except ValueError:
        raise ValueError(f"CHUNK must be an integer in CHUNK:TEXT, got {head!r}") from None
    if after < 1:
        raise ValueError(f"CHUNK must be >= 1 (chunks shown before the change), got {after}")
    if not prompt.strip():
        raise ValueError(f"TEXT must not be empty in CHUNK:TEXT, got {text!r}")
    return PromptChange(after, prompt)


def parse_prompt_changes(texts: Sequence[str], chunks: int | None = None) -> list[PromptChange]:
    """Every ``CHUNK:TEXT``, sorted by CHUNK; one change per CHUNK; with ``chunks`` (the run's total),
    each CHUNK must come before the run ends (CHUNK < chunks)."""
    changes = sorted((parse_prompt_change(t) for t in texts), key=lambda c: c.after_chunks)
    seen: set[int] = set()
    for c in changes:
        if c.after_chunks in seen:
            raise ValueError(f"two prompt changes after chunk {c.after_chunks}")
        seen.add(c.after_chunks)
        if chunks is not None and c.after_chunks >= chunks:
            raise ValueError(f"a change after {c.after_chunks} chunks never happens in a run of {chunks} chunks")
    return changes


class PromptScript:
    """The headless driver: conditioning encoded up front (:meth:`encode`, on the caller's thread);
    :meth:`on_frames` (the engine's frame callback) asks for each change once its chunk count is shown."""

    def __init__(self, changes: Sequence[PromptChange]) -> None:
        self.changes = sorted(changes, key=lambda c: c.after_chunks)
        self._conditioning: list[torch.Tensor] = []
        self.shown = 0
        self.applied = 0
        self.engine: ChunkEngine | None = None

    def encode(self, stage0: Stage0) -> PromptScript:
        self._conditioning = [stage0.encode_prompt(c.prompt) for c in self.changes]
        return self

    def attach(self, engine: ChunkEngine) -> ChunkEngine:
        """Chain into ``engine.on_frames`` (keeping any callback already there)."""
        if len(self._conditioning) != len(self.changes):
            raise RuntimeError("PromptScript.encode(stage0) must run before attach (on the caller's thread)")
        self.engine = engine
        inner: Callable[[torch.Tensor, ChunkRecord], None] | None = engine.on_frames

        def on_frames(frames: torch.Tensor, rec: ChunkRecord) -> None:
            if inner is not None:
                inner(frames, rec)
            self.on_frames(frames, rec)

        engine.on_frames = on_frames
        return engine

    def on_frames(self, frames: torch.Tensor, rec: ChunkRecord) -> None:
        self.shown += 1
        assert self.engine is not None
        while self.applied < len(self.changes) and self.changes[self.applied].after_chunks <= self.shown:
            change, cond = self.changes[self.applied], self._conditioning[self.applied]
            self.applied += 1
            log.info("prompt change after %d shown chunks (cache_epoch=%d chunk_index=%d): %r", self.shown,
                     rec.cache_epoch, rec.chunk_index, change.prompt)
            self.engine.request_prompt(change.prompt, conditioning=cond)
