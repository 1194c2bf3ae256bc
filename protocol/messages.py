"""Every message of the PP and TP channels, versioned.

PP envelope: front -> mesh leader (one per chunk, heartbeat or shutdown).
PP result: mesh leader -> front (exactly one per envelope sent).
TP header: mesh leader -> mesh workers (relayed envelopes, heartbeats, shutdown, warmup).
Ready: mesh leader -> front, once, after the leader has driven warmup through the mesh.

Tensors are announced by ``tensors`` (ordered specs) and travel after the header, in that order.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .tensors import TensorSpec

PROTOCOL_VERSION = 1


class Action(str, Enum):
    NOOP = "noop"  # heartbeat: the front is idle but alive; relayed to workers
    INFER = "infer"  # run one chunk through the mesh
    WARMUP = "warmup"  # a warmup chunk the leader drives through the mesh itself (TP only)
    PING = "ping"  # one round trip on a channel at startup (warms lazy connections)
    SHUTDOWN = "shutdown"  # orderly exit; the leader relays it, then every rank exits 0
    READY = "ready"  # leader -> front: the mesh has warmed up and serves


class MessageKind(IntEnum):
    """Carried in the fixed-size frame header so a receiver knows what to decode."""

    PP_ENVELOPE = 1
    PP_RESULT = 2
    TP_HEADER = 3
    READY = 4


class ErrorCode(str, Enum):
    INVALID_ENVELOPE = "invalid_envelope"  # failed the leader's validation; never relayed
    UNSUPPORTED_VERSION = "unsupported_version"
    GENERATOR_FAILED = "generator_failed"  # the mesh raised while computing the chunk
    TRIPWIRE = "tripwire"  # observed generator calls != expected, ids mismatch
    MESH_FAILED = "mesh_failed"  # a mesh rank is gone; the leader is about to exit


# Names of the tensors an INFER envelope and its result carry, in travel order.
T_CONDITIONING = "conditioning"
T_NOISE = "noise"
T_CONTEXT = "context_frames"
T_LATENTS_OUT = "latents_out"


class _Message(BaseModel):
    # a non-finite float serialises as a JSON constant (NaN, Infinity) that the codec refuses, never as null
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    version: Literal[1] = PROTOCOL_VERSION
    tensors: tuple[TensorSpec, ...] = ()

    KIND: ClassVar[MessageKind]  # set by subclasses

    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def spec(self, name: str) -> TensorSpec | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


class _CallIds(_Message):
    """The ids every call-related message carries (the front's tripwires compare them)."""

    action: Action
    call_id: int = Field(ge=0)
    chunk_index: int = Field(default=0, ge=0)
    cache_epoch: int = Field(default=0, ge=0)


class _CallParams(_CallIds):
    """What the mesh needs to run one call: the ids, the cache flags, the steps and the seed (declared
    once: the PP envelope and the TP header carry the same fields)."""

    init_cache: bool = False  # first chunk of an epoch: start from an empty KV cache
    reset_cache: bool = False  # drop the mesh's KV cache before this chunk (hard cut)
    do_kv_recompute: bool = False  # rebuild the KV cache from context_frames first
    timesteps: tuple[int, ...] = ()
    seed: int = Field(default=0, ge=0, lt=2**63)

    def call_params(self) -> dict[str, Any]:
        """The fields of :class:`_CallParams` (the ids, flags, steps and seed), by name."""
        return {name: getattr(self, name) for name in CALL_PARAMS}


class PPEnvelopeV1(_CallParams):
    """Front -> leader. ``call_id`` strictly increases over the job's life."""

    KIND: ClassVar[MessageKind] = MessageKind.PP_ENVELOPE

    num_denoising_steps: int = Field(default=0, ge=0)
    expected_generator_calls: int = Field(default=0, ge=0)


class PPResultV1(_CallIds):
    """Leader -> front, one per envelope. ``ok=False`` carries an error code and message."""

    KIND: ClassVar[MessageKind] = MessageKind.PP_RESULT

    ok: bool
    error_code: ErrorCode | None = None
    error_message: str = ""
    observed_generator_calls: int = Field(default=0, ge=0)
    current_start_frame: int = Field(default=0, ge=0)  # mesh's KV position after this chunk
    timings_ms: dict[str, float] = Field(default_factory=dict)


class TPHeaderV1(_CallParams):
    """Leader -> workers. Carries what a worker needs to run its shard of one call; ``inputs_digest``: the
    checksum of the call's tensors as the leader holds them (every worker checks its own against it)."""

    KIND: ClassVar[MessageKind] = MessageKind.TP_HEADER

    inputs_digest: str = Field(default="", max_length=64)


class ReadyV1(_Message):
    """Leader -> front: warmup is done on every mesh rank; the mesh serves."""

    KIND: ClassVar[MessageKind] = MessageKind.READY

    mesh_size: int = Field(ge=1)
    warmup_chunks: int = Field(ge=0)
    warmup_ms: tuple[float, ...] = ()
    fingerprint: str = ""


Message = PPEnvelopeV1 | PPResultV1 | TPHeaderV1 | ReadyV1

MESSAGE_TYPES: dict[MessageKind, type[_Message]] = {
    MessageKind.PP_ENVELOPE: PPEnvelopeV1,
    MessageKind.PP_RESULT: PPResultV1,
    MessageKind.TP_HEADER: TPHeaderV1,
    MessageKind.READY: ReadyV1,
}


CALL_PARAMS: tuple[str, ...] = tuple(n for n in _CallParams.model_fields if n not in _Message.model_fields)


def relay_header(env: PPEnvelopeV1) -> TPHeaderV1:
    """The TP header the leader sends its workers for a (validated) PP envelope."""
    return TPHeaderV1(**env.call_params(), tensors=env.tensors)
