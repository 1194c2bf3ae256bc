"""A tiny, fast test double of a pipeline (``--pipeline pp1.testing.standin:factory``).

Stage 0 and a tensor-parallel "generator" with the real interface and collectives (one sharded
MLP per denoising step: column shard, ReLU, row shard, all-reduce), a KV position that follows
init/reset/recompute, and a fingerprint equal on every rank. Used by the multi-process tests,
where the runtime's behaviour matters and the model's cost does not.
"""

from __future__ import annotations

import hashlib
import time

import torch

from pp1.pipelines.comm import Communicator
from pp1.pipelines.interface import ChunkCall, ChunkOutput
from pp1.protocol.geometry import ChunkGeometry

HIDDEN = 24  # divisible by mesh sizes 1, 2, 3, 4, 6
TIMESTEPS = (1000, 750, 500, 250)


def _geometry(dtype: str = "float32") -> ChunkGeometry:
    return ChunkGeometry(
        latent_channels=4, latent_frames=3, latent_height=4, latent_width=4,
        text_len=4, text_dim=8, max_context_frames=6, dtype=dtype,
    )


class StandinStage0:
    def __init__(self, geometry: ChunkGeometry, device: torch.device, dtype: torch.dtype) -> None:
        self.geometry = geometry
        self.device, self.dtype = device, dtype

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.geometry.conditioning_shape(), generator=g).to(self.device, self.dtype)

    def make_noise(self, seed: int, chunk_index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk_index)
        return torch.randn(self.geometry.noise_shape(), generator=g).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        c, t, h, w = latents.shape
        frames = 4 * t - (3 if first_chunk else 0)
        x = latents[:3].float().mean(dim=1)  # [3, h, w]
        img = ((x.tanh() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)  # [h, w, 3]
        img = img.repeat_interleave(8, 0).repeat_interleave(8, 1)
        return img.unsqueeze(0).expand(frames, -1, -1, -1).contiguous().cpu()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        t = max(1, (frames.shape[0] + 3) // 4)
        x = frames.float().mean() / 255.0
        return torch.full((g.latent_channels, t, g.latent_height, g.latent_width), float(x)).to(self.device, self.dtype)


class StandinGenerator:
    def __init__(self, geometry: ChunkGeometry, mesh_rank: int, mesh_size: int, comm: Communicator,
                 device: torch.device, dtype: torch.dtype) -> None:
        if HIDDEN % mesh_size:
            raise ValueError(f"stand-in hidden size {HIDDEN} not divisible by mesh size {mesh_size}")
        self.geometry, self.comm = geometry, comm
        self.mesh_rank, self.mesh_size = mesh_rank, mesh_size
        g = torch.Generator().manual_seed(1234)
        c = geometry.latent_channels
        w1 = torch.randn(c, HIDDEN, generator=g) * 0.3
        w2 = torch.randn(HIDDEN, c, generator=g) * 0.3
        shard = HIDDEN // mesh_size
        sl = slice(mesh_rank * shard, (mesh_rank + 1) * shard)
        self.w1 = w1[:, sl].contiguous().to(device, dtype)
        self.w2 = w2[sl, :].contiguous().to(device, dtype)
        self.cond = torch.randn(geometry.text_dim, c, generator=g).to(device, dtype) * 0.1
        self.device, self.dtype = device, dtype
        self.start_frame = 0

    def held_weights(self) -> list[torch.Tensor]:
        return [self.w1, self.w2, self.cond]

    def _step(self, x: torch.Tensor, cond: torch.Tensor, t: int) -> torch.Tensor:
        c = x.shape[0]
        tokens = x.reshape(c, -1).T  # [N, C]
        bias = (cond.mean(dim=0) @ self.cond) * (t / 1000.0)
        y = torch.relu((tokens + bias) @ self.w1) @ self.w2  # partial sum over the hidden shard
        self.comm.all_reduce_sum_(y)
        return (tokens - 0.1 * y).T.reshape(x.shape)

    def run(self, call: ChunkCall) -> ChunkOutput:
        t0 = time.perf_counter()
        calls = 0
        if call.init_cache or call.reset_cache:
            self.reset()
        if call.do_kv_recompute:
            if call.context_frames is None:
                raise ValueError("do_kv_recompute without context_frames")
            self._step(call.context_frames.to(self.device, self.dtype), call.conditioning, 0)
            calls += 1
        x = call.noise.to(self.device, self.dtype)
        for t in call.timesteps:
            x = self._step(x, call.conditioning.to(self.device, self.dtype), t)
            calls += 1
        self.start_frame += self.geometry.latent_frames
        ms = (time.perf_counter() - t0) * 1000
        return ChunkOutput(latents=x, generator_calls=calls, current_start_frame=self.start_frame,
                           timings_ms={"total": ms})

    def reset(self) -> None:
        self.start_frame = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(f"standin:{HIDDEN}:{self.mesh_size}".encode()).hexdigest()[:16]


class StandinFactory:
    name = "standin"

    def geometry(self, preset: str) -> ChunkGeometry:
        return _geometry()

    def timesteps(self, preset: str) -> tuple[int, ...]:
        return TIMESTEPS

    def build_stage0(self, preset: str, device: torch.device, dtype: torch.dtype) -> StandinStage0:
        return StandinStage0(_geometry(str(dtype).removeprefix("torch.")), device, dtype)

    def check_mesh_size(self, preset: str, mesh_size: int) -> None:
        if mesh_size < 1 or HIDDEN % mesh_size:
            raise ValueError(f"stand-in hidden size {HIDDEN} not divisible by a mesh of {mesh_size}")

    def build_generator(self, preset: str, mesh_rank: int, mesh_size: int, comm: Communicator,
                        device: torch.device, dtype: torch.dtype) -> StandinGenerator:
        return StandinGenerator(_geometry(str(dtype).removeprefix("torch.")), mesh_rank, mesh_size, comm, device, dtype)


def factory() -> StandinFactory:
    return StandinFactory()
