"""The front's chunk schedule, driven in one process: the reference for "PP1 equals a single process".

``ChunkSchedule`` builds each chunk's call the way the front does: noise per chunk from stage 0,
``init_cache`` on the first chunk of an epoch (plus ``reset_cache`` after a hard cut), a KV
recompute every K chunks (never on the first chunk of an epoch) whose context frames are the last
latent frames generated so far (at most ``geometry.max_context_frames``), a strictly increasing
call_id and the epoch. ``run_loop`` drives stage 0 and any ``ChunkCall -> ChunkOutput`` runner;
``mesh_runner`` is such a runner over N generator shards in threads.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pp1.protocol.geometry import ChunkGeometry

from .contract import verify_generator_output
from .interface import ChunkCall, ChunkOutput, Generator, PipelineFactory, Stage0
from .threaded_comm import ThreadedMesh

Runner = Callable[[ChunkCall], ChunkOutput]


def copy_call(call: ChunkCall) -> ChunkCall:
    """The call with its own tensors, as a rank that received it over a channel would hold it."""
    c = copy.copy(call)
    c.conditioning = call.conditioning.clone()
    c.noise = call.noise.clone()
    c.context_frames = None if call.context_frames is None else call.context_frames.clone()
    return c


class ChunkSchedule:
    """What each chunk's envelope carries (flags, ids, context frames), given the latents so far."""

    def __init__(
        self,
        geometry: ChunkGeometry,
        timesteps: tuple[int, ...],
        seed: int = 0,
        recompute_every: int = 1,
        context_frames: int | None = None,
    ) -> None:
        if recompute_every < 0:
            raise ValueError("recompute_every must be >= 0 (0 = never)")
        self.geometry = geometry
        self.timesteps = tuple(timesteps)
        self.seed = seed
        self.recompute_every = recompute_every
        self.context_frames = context_frames or geometry.max_context_frames
        if not 1 <= self.context_frames <= geometry.max_context_frames:
            raise ValueError(f"context_frames must be in [1, {geometry.max_context_frames}]")
        self.call_id = 0
        self.cache_epoch = 0
        self.chunk_index = 0
        self._reset_next = False
        self._history: list[torch.Tensor] = []  # latents of this epoch, [C, T, h, w] each

    def is_recompute(self, chunk_index: int) -> bool:
        k = self.recompute_every
        return k > 0 and chunk_index > 0 and chunk_index % k == 0

    def hard_cut(self) -> None:
        """Prompt reset / error recovery: next chunk starts a new epoch from an empty cache."""
        self.cache_epoch += 1
        self.chunk_index = 0
        self._history.clear()
        self._reset_next = True

    def context(self) -> torch.Tensor:
        """The last ``context_frames`` latent frames generated in this epoch (or fewer)."""
        frames = torch.cat(self._history, dim=1)
        return frames[:, -self.context_frames :].contiguous()

    def next_call(self, conditioning: torch.Tensor, noise: torch.Tensor) -> ChunkCall:
        k = self.chunk_index
        recompute = self.is_recompute(k) and bool(self._history)
        call = ChunkCall(
            call_id=self.call_id,
            chunk_index=k,
            cache_epoch=self.cache_epoch,
            init_cache=k == 0,
            reset_cache=k == 0 and self._reset_next,
            do_kv_recompute=recompute,
            timesteps=self.timesteps,
            seed=self.seed,
            conditioning=conditioning,
            noise=noise,
            context_frames=self.context() if recompute else None,
        )
        self.call_id += 1
        return call

    def record(self, out: ChunkOutput) -> None:
        """The result of the last call: its latents become context for later recomputes."""
        self._history.append(out.latents.detach().clone())
        keep = -(-self.geometry.max_context_frames // self.geometry.latent_frames)
        del self._history[:-keep]
        self.chunk_index += 1
        self._reset_next = False


@dataclass
class LoopResult:
    calls: list[ChunkCall] = field(default_factory=list)
    outputs: list[ChunkOutput] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)  # uint8 [F, H, W, 3] per chunk
    timings_ms: list[dict[str, float]] = field(default_factory=list)  # per chunk: generator, decode


def run_loop(
    stage0: Stage0,
    runner: Runner,
    schedule: ChunkSchedule,
    prompt: str,
    chunks: int,
    replay: list[ChunkCall] | None = None,
) -> LoopResult:
    """Drive ``chunks`` chunks: conditioning, noise, call, verify, decode.

    With ``replay``, the calls (envelopes) of an earlier run are sent as they were instead of
    building new ones: the same envelopes through a different runner.
    """
    res = LoopResult()
    cond = stage0.encode_prompt(prompt)
    for i in range(chunks):
        if replay is not None:
            call = replay[i]
        else:
            call = schedule.next_call(cond, stage0.make_noise(schedule.seed, schedule.chunk_index))
        t0 = time.perf_counter()
        out = runner(call)
        t1 = time.perf_counter()
        verify_generator_output(call, out, stage0.geometry)
        if replay is None:
            schedule.record(out)
        frames = stage0.decode(out.latents, first_chunk=call.init_cache)
        t2 = time.perf_counter()
        res.calls.append(call)
        res.outputs.append(out)
        res.frames.append(frames)
        res.timings_ms.append({"generator": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3})
    return res


def mesh_runner(mesh: ThreadedMesh, generators: list[Generator]) -> Runner:
    """Run each call on every shard at once (each with its own copy); ranks must agree bit for bit."""

    def run(call: ChunkCall) -> ChunkOutput:
        outs = mesh.map(lambda r, _comm: generators[r].run(copy_call(call)))
        for r, o in enumerate(outs[1:], start=1):
            if not torch.equal(outs[0].latents, o.latents):
                raise RuntimeError(f"chunk {call.chunk_index}: mesh rank {r} returned different latents")
        return outs[0]

    return run


def build_mesh(
    factory: PipelineFactory,
    preset: str,
    mesh: ThreadedMesh,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Generator]:
    device = torch.device(device)
    return mesh.map(lambda r, comm: factory.build_generator(preset, r, mesh.size, comm, device, dtype))
