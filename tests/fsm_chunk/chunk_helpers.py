"""Shared helpers of the chunk-machine unit tests."""

from __future__ import annotations

from typing import Any

from pp1.fsm.chunk import ChunkMachine, ChunkPlan, Decision
from pp1.protocol.messages import PPResultV1

TIMESTEPS = (1000, 750, 500, 250)


def machine(**kw: Any) -> ChunkMachine:
    args: dict[str, Any] = dict(chunk_frames=3, window=6, timesteps=TIMESTEPS, recompute_every=1,
                                deadline_floor_s=10.0, deadline_factor=4.0, heartbeat_s=1.0)
    args.update(kw)
    return ChunkMachine(0, **args)


def answer(plan: ChunkPlan, ok: bool = True, **over: Any) -> PPResultV1:
    """The result a well-behaved leader would send for ``plan`` (fields overridable)."""
    fields: dict[str, Any] = dict(
        action=plan.action, ok=ok, call_id=plan.call_id, chunk_index=plan.chunk_index,
        cache_epoch=plan.cache_epoch, observed_generator_calls=plan.expected_generator_calls if ok else 0,
    )
    if not ok:
        fields["error_code"] = "generator_failed"
        fields["error_message"] = "boom"
    fields.update(over)
    return PPResultV1(**fields)


def send(m: ChunkMachine, now: float = 0.0) -> ChunkPlan:
    plan = m.plan_next(now)
    m.on_sent(now)
    return plan


def run_chunk(m: ChunkMachine, now: float = 0.0, rtt: float = 0.1, ok: bool = True) -> tuple[ChunkPlan, Decision]:
    plan = send(m, now)
    return plan, m.on_result(answer(plan, ok=ok), now + rtt)
