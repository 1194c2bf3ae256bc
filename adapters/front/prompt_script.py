"""Scripted prompt changes for headless runs: ``--prompt-change CHUNK:TEXT`` (repeatable).

After CHUNK chunks were shown (counted over the whole run, every epoch), the front changes its
prompt through :meth:`FrontEngine.request_prompt` -- the one way to change it: a hard cut (epoch + 1,
a chunk in flight is received and dropped) and the new conditioning from the epoch's first chunk on.
The prompts are encoded up front by the caller (:meth:`PromptScript.encode`, before the engine runs),
never on the engine's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pp1.adapters.rank.options import PromptChange
from pp1.pipelines.interface import Stage0

if TYPE_CHECKING:  # pragma: no cover
    from pp1.adapters.front.engine import FrameBatch, FrontEngine

log = logging.getLogger("pp1.adapters.front.prompt_script")


class PromptScript:
    """The headless driver: conditioning encoded up front (:meth:`encode`, on the caller's thread);
    :meth:`on_frames` (a frame sink of the engine) asks for each change once its chunk count is shown."""

    def __init__(self, changes: Sequence[PromptChange]) -> None:
        self.changes = sorted(changes, key=lambda c: c.after_chunks)
        self._conditioning: list[torch.Tensor] = []
        self.shown = 0
        self.applied = 0
        self.engine: FrontEngine | None = None

    def encode(self, stage0: Stage0) -> PromptScript:
        self._conditioning = [stage0.encode_prompt(c.prompt) for c in self.changes]
        return self

    def attach(self, engine: FrontEngine) -> FrontEngine:
        """Become one of ``engine``'s frame sinks."""
        if len(self._conditioning) != len(self.changes):
            raise RuntimeError("PromptScript.encode(stage0) must run before attach (on the caller's thread)")
        self.engine = engine
        engine.add_sink(self.on_frames)
        return engine

    def on_frames(self, batch: FrameBatch) -> None:
        self.shown += 1
        assert self.engine is not None
        rec = batch.record
        while self.applied < len(self.changes) and self.changes[self.applied].after_chunks <= self.shown:
            change, cond = self.changes[self.applied], self._conditioning[self.applied]
            self.applied += 1
            log.info("prompt change after %d shown chunks (cache_epoch=%d chunk_index=%d): %r", self.shown,
                     rec.cache_epoch, rec.chunk_index, change.prompt)
            self.engine.request_prompt(change.prompt, conditioning=cond)
