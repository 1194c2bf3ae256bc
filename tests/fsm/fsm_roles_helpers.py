"""Shared helpers of the lifecycle / leader / worker / diagram tests (tests/fsm/)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pp1.fsm.base import ProtocolMachine
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, Action, PPEnvelopeV1
from pp1.protocol.tensors import TensorSpec

GEOMETRY = ChunkGeometry(
    latent_channels=4, latent_frames=3, latent_height=4, latent_width=6, text_len=8, text_dim=16,
    max_context_frames=6,
)
TIMESTEPS = (1000, 750, 500, 250)


def chunk_specs(recompute: bool = False, context_frames: int = 3, g: ChunkGeometry = GEOMETRY) -> tuple[TensorSpec, ...]:
    specs = [
        TensorSpec(name=T_CONDITIONING, dtype=g.dtype, shape=g.conditioning_shape()),
        TensorSpec(name=T_NOISE, dtype=g.dtype, shape=g.noise_shape()),
    ]
    if recompute:
        specs.append(TensorSpec(name=T_CONTEXT, dtype=g.dtype, shape=g.context_shape(context_frames)))
    return tuple(specs)


def infer(call_id: int, chunk_index: int = 0, cache_epoch: int = 0, recompute: bool = False, **over: Any) -> PPEnvelopeV1:
    """A valid INFER envelope (fields overridable)."""
    fields: dict[str, Any] = dict(
        action=Action.INFER, call_id=call_id, chunk_index=chunk_index, cache_epoch=cache_epoch,
        init_cache=chunk_index == 0, reset_cache=chunk_index == 0 and cache_epoch > 0,
        do_kv_recompute=recompute, num_denoising_steps=len(TIMESTEPS), timesteps=TIMESTEPS,
        expected_generator_calls=len(TIMESTEPS) + (1 if recompute else 0), seed=7,
        tensors=chunk_specs(recompute),
    )
    fields.update(over)
    return PPEnvelopeV1(**fields)


def control(action: Action, call_id: int) -> PPEnvelopeV1:
    return PPEnvelopeV1(action=action, call_id=call_id)


def factories() -> dict[str, Callable[[], ProtocolMachine]]:
    """Machine NAME -> a fresh real instance, for every machine we know how to build."""
    from pp1.fsm.leader import LeaderRelayMachine
    from pp1.fsm.lifecycle import LIFECYCLES
    from pp1.fsm.worker import WorkerLoopMachine

    out: dict[str, Callable[[], ProtocolMachine]] = {
        cls.NAME: (lambda cls=cls: cls(1)) for cls in LIFECYCLES.values()
    }
    out["leader"] = lambda: LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=1)
    out["worker"] = lambda: WorkerLoopMachine(2, 5.0, 0.0, heartbeat_s=1.0, geometry=GEOMETRY)
    try:
        from pp1.fsm.chunk import ChunkMachine

        out["chunk"] = lambda: ChunkMachine(0, chunk_frames=3, window=6, timesteps=TIMESTEPS)
    except ImportError:  # pragma: no cover - the module is not there
        pass
    try:
        from pp1.fsm.kv_cache import KVCacheMachine

        out["kv_cache"] = lambda: KVCacheMachine(0, window=6, chunk_frames=3)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pp1.fsm.session import SessionMachine

        out["session"] = lambda: SessionMachine(0)
    except ImportError:  # pragma: no cover
        pass
    return out


def build(cls: type[ProtocolMachine]) -> ProtocolMachine:
    """A real instance when we know its constructor; otherwise a bare machine with the same tables
    (a machine added to the registry later is still covered by the table tests)."""
    make = factories().get(cls.NAME)
    if make is not None:
        return make()
    clone = type(f"Bare_{cls.__name__}", (ProtocolMachine,), {
        "NAME": cls.NAME, "STATES": cls.STATES, "TRANSITIONS": cls.TRANSITIONS,
        "INITIAL": cls.INITIAL, "TERMINAL": cls.TERMINAL,
    })
    return clone(0)


def force_state(m: ProtocolMachine, state: str) -> None:
    """Put a machine in ``state`` directly (table tests only)."""
    m._machine.set_state(state)  # type: ignore[attr-defined]
    assert m.state == state
