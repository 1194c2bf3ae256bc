"""The run's configuration and the parity check every rank runs before anything heavy loads."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .messages import PROTOCOL_VERSION

Topology = Literal["pp1", "tp"]
MAX_WARMUP_CHUNKS = 64
MAX_SEED = 2**63 - 1 - MAX_WARMUP_CHUNKS
Role = Literal["front", "leader", "worker", "tp_rank0"]


class RunConfig(BaseModel):
    """What every rank must agree on. Two ranks with different digests must not start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topology: Topology = "pp1"
    world_size: int = Field(default=3, ge=1)
    mesh_global_ranks: tuple[int, ...] = (1, 2)
    preset: str = "tiny"
    pipeline: str = "pp1.pipelines.reference:factory"
    # ``--pipeline-option KEY=VALUE``: handed to the pipeline's ``with_options`` on every rank
    pipeline_options: dict[str, str] = Field(default_factory=dict)
    dtype: str = "float32"
    device_backend: str = "gloo"
    control_backend: str = "gloo"
    compile: bool = False
    protocol_version: int = PROTOCOL_VERSION
    # every number has a sane, finite range: a value outside it cannot work (refused before any process starts)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # warmup chunk i draws from seed + i (< 2**63 on the wire)
    recompute_every: int = Field(default=1, ge=0, le=10_000)  # K: recompute every K chunks (0 = never)
    heartbeat_s: float = Field(default=1.0, ge=0.05, le=3600, allow_inf_nan=False)  # H
    watchdog_s: float = Field(default=5.0, ge=0.2, le=86_400, allow_inf_nan=False)  # W > 3 H
    deadline_floor_s: float = Field(default=30.0, ge=0.5, le=86_400, allow_inf_nan=False)
    deadline_factor: float = Field(default=4.0, gt=1, le=1000, allow_inf_nan=False)  # c in max(c * p99, floor)
    warmup_chunks: int = Field(default=1, ge=0, le=MAX_WARMUP_CHUNKS)
    # KV-recompute context frames: the previous latents as generated, or with the window's first latent
    # frame re-encoded from its decoded image (Krea / Self-Forcing; see adapters/front/engine.py)
    context_source: Literal["latents", "reencode"] = "latents"

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.watchdog_s <= 3 * self.heartbeat_s:
            raise ValueError(
                f"watchdog_s ({self.watchdog_s}) must exceed 3 x heartbeat_s ({self.heartbeat_s}): "
                "a mesh rank would take an idle front for a dead one"
            )
        ranks = self.mesh_global_ranks
        if not ranks or len(set(ranks)) != len(ranks) or any(not 0 <= r < self.world_size for r in ranks):
            raise ValueError(f"mesh_global_ranks {ranks} must be distinct ranks in [0, {self.world_size})")
        expected = self.world_size - (1 if self.topology == "pp1" else 0)
        if len(ranks) != expected:
            raise ValueError(
                f"topology {self.topology!r} with world_size {self.world_size} needs {expected} mesh ranks, "
                f"got {len(ranks)}"
            )
        if self.topology == "pp1" and 0 in ranks:
            raise ValueError("under pp1, rank 0 is the front and cannot be a mesh rank")
        if self.topology == "tp" and ranks[0] != 0:
            raise ValueError("under pure TP, rank 0 must be the mesh leader (mesh_global_ranks[0] == 0)")
        return self

    @property
    def front_rank(self) -> int | None:
        """Global rank of the front, or None under pure TP (rank 0 is the leader and the front)."""
        return 0 if self.topology == "pp1" else None

    @property
    def leader_rank(self) -> int:
        return self.mesh_global_ranks[0]

    @property
    def mesh_size(self) -> int:
        return len(self.mesh_global_ranks)

    def role_of(self, rank: int) -> Role:
        """The role of global ``rank``: ``front`` (rank 0 under pp1), ``leader`` (mesh_global_ranks[0]
        under pp1; never hard-coded), ``tp_rank0`` (the leader under pure TP: leader + front in one
        process) or ``worker`` (the rest of the mesh). The one place roles are derived."""
        if self.front_rank is not None and rank == self.front_rank:
            return "front"
        if rank not in self.mesh_global_ranks:
            raise ValueError(f"rank {rank} is neither the front ({self.front_rank}) nor in the mesh "
                             f"{self.mesh_global_ranks}")
        if rank == self.leader_rank:
            return "leader" if self.front_rank is not None else "tp_rank0"
        return "worker"

    def hosts_front(self, rank: int) -> bool:
        """Runs the front's work (stage 0, the chunk schedule, HTTP): the front, or pure TP's rank 0."""
        return self.role_of(rank) in ("front", "tp_rank0")

    def digest(self) -> str:
        return config_digest(self.model_dump(mode="json"))


def config_digest(cfg: dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(ref: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """Per-key differences, ``key: ref_value != other_value``, sorted by key."""
    out = []
    for key in sorted(set(ref) | set(other)):
        a, b = ref.get(key, "<missing>"), other.get(key, "<missing>")
        if a != b:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def parity_report(configs: list[dict[str, Any]]) -> list[str]:
    """One line per (rank, key) that differs from rank 0's config; empty means parity holds."""
    lines = []
    for rank, cfg in enumerate(configs[1:], start=1):
        lines.extend(f"rank {rank} vs rank 0: {d}" for d in config_diff(configs[0], cfg))
    return lines
