"""The pipeline interface, in two halves.

Stage 0 (front): prompt -> conditioning; latents -> RGB frames (decode); frames -> latents (encode,
for context frames); the noise of each chunk.
Generator (mesh): one shard of the causal DiT for (mesh_rank, mesh_size); runs one envelope's call
(denoising steps plus an optional KV recompute over context frames) with its own KV cache.

Third-party pipelines plug in by import path ``package.module:factory`` where ``factory`` is a
callable returning a ``PipelineFactory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.schedule import expected_generator_calls

from .comm import Communicator


@dataclass
class ChunkCall:
    """One generator call as the mesh sees it: the call parameters of a TP header (built generically from
    ``TPHeaderV1.call_params()``, never field by field) and its tensors."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    init_cache: bool
    reset_cache: bool
    do_kv_recompute: bool
    timesteps: tuple[int, ...]
    seed: int
    conditioning: torch.Tensor  # [text_len, text_dim]
    noise: torch.Tensor  # [C, T, h, w]
    context_frames: torch.Tensor | None = None  # [C, Tctx, h, w], required iff do_kv_recompute

    @property
    def expected_generator_calls(self) -> int:
        return expected_generator_calls(len(self.timesteps), self.do_kv_recompute)


@dataclass
class ChunkOutput:
    latents: torch.Tensor  # [C, T, h, w] (same on every mesh rank)
    generator_calls: int  # observed forward passes of the DiT (tripwire vs expected)
    current_start_frame: int  # latent frames in the KV cache's timeline after this call
    timings_ms: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Stage0(Protocol):
    geometry: ChunkGeometry

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Conditioning for a prompt, shape geometry.conditioning_shape()."""
        ...

    def make_noise(self, seed: int, chunk_index: int) -> torch.Tensor:
        """The initial noise of a chunk, shape geometry.noise_shape(); deterministic in its args."""
        ...

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """Latents [C, T, h, w] -> uint8 RGB frames [F, H, W, 3]; F = 4T (4T-3 on the first chunk)."""
        ...

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [F, H, W, 3] -> latents [C, T, h, w] (for KV-recompute context)."""
        ...


@runtime_checkable
class Generator(Protocol):
    """Optional: ``held_weights() -> list[torch.Tensor]``, the weights the shard holds now: the runtime
    checksums them at load, at READY and every few calls, and fails the rank when they changed (a
    weight tripwire; ``pp1.pipelines.checksum``). Without it, that tripwire is off for the pipeline."""

    def run(self, call: ChunkCall) -> ChunkOutput: ...

    def reset(self) -> None:
        """Drop the KV cache."""
        ...

    def fingerprint(self) -> str:
        """Digest of this shard's weights (compared across the mesh at startup)."""
        ...


@runtime_checkable
class PipelineFactory(Protocol):
    """What a pipeline must provide. Optional: ``with_options(options: dict[str, str]) ->
    PipelineFactory``, the factory configured by ``--pipeline-option KEY=VALUE`` (parity-checked as
    ``RunConfig.pipeline_options``; raise ``pp1.pipelines.loader.PipelineOptionError(key, reason)``
    for a key or value it refuses). Without it, a run with options is refused before it starts.
    Optional: ``check_mesh_size(preset, mesh_size)`` raising ValueError when the model cannot be
    sharded over that many ranks (asked before any process starts).

    Optional: ``supports_compile = True`` and a keyword ``compile: bool = False`` on
    ``build_generator``. With ``--compile`` the runtime calls ``build_generator(..., compile=True)``
    (``pp1.pipelines.loader.build_generator``); the generator must be compiled for every call shape it
    can serve before ``build_generator`` returns, without collectives (it runs in the load step: an
    exception fails the load vote with its cause, and no peer waits), and may expose ``compile_s``
    (seconds) for the logs. Without ``supports_compile``, ``--compile`` is refused before start."""

    name: str

    def geometry(self, preset: str) -> ChunkGeometry: ...

    def timesteps(self, preset: str) -> tuple[int, ...]:
        """Default denoising step list for the preset (e.g. (1000, 750, 500, 250))."""
        ...

    def build_stage0(self, preset: str, device: torch.device, dtype: torch.dtype) -> Stage0: ...

    def build_generator(
        self,
        preset: str,
        mesh_rank: int,
        mesh_size: int,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Generator: ...
