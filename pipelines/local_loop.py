"""The front's chunk schedule, driven in one process: the reference for "PP1 equals a single process".

``ChunkSchedule`` builds each chunk's call the way the front does: noise per chunk from stage 0,
``init_cache`` on the first chunk of an epoch (plus ``reset_cache`` after a hard cut), a KV
recompute every K chunks (never on the first chunk of an epoch) whose context frames are the last
latent frames generated so far (at most ``geometry.max_context_frames``), a strictly increasing
call_id and the epoch. ``run_loop`` drives stage 0 and any ``ChunkCall -> ChunkOutput`` runner;
``mesh_runner`` is such a runner over N generator shards in threads.

Context source (the front's ``RunConfig.context_source``, the rule of ``fsm/front.py`` + ``adapters/front/engine.py``, the same ``pp1.protocol.schedule`` rules):
``"latents"`` sends the window's latents as generated; ``"reencode"`` replaces the window's first
latent frame s = p * T - n (chunk p, n context frames, T a chunk) by ``stage0.encode`` of ONE decoded
frame, the last one latent s decoded to, unless s == 0 (the epoch's own first frame, kept). No I/O:
the loop and the real front build the same envelopes for the same seed, prompt and schedule.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.schedule import (
    FIRST_CALL_ID,
    keyframe_index,
    oldest_needed_frame,
    recompute_due,
    reencode_frame,
)

from .contract import verify_generator_output
from .interface import ChunkCall, ChunkOutput, Generator, PipelineFactory, Stage0
from .threaded_comm import ThreadedMesh

Runner = Callable[[ChunkCall], ChunkOutput]
Encoder = Callable[[torch.Tensor], torch.Tensor]  # Stage0.encode: uint8 [F, H, W, 3] -> [C, T, h, w]

CONTEXT_SOURCES = ("latents", "reencode")


def chunk_keyframes(chunk_index: int, latent_frames: int, frames: torch.Tensor) -> dict[int, torch.Tensor]:
    """Epoch latent frame -> the last video frame it decoded to ([1, H, W, 3]), for chunk ``chunk_index``
    decoded to ``frames`` (``schedule.keyframe_index``)."""
    out: dict[int, torch.Tensor] = {}
    for j in range(chunk_index * latent_frames, (chunk_index + 1) * latent_frames):
        idx = keyframe_index(j, chunk_index, latent_frames, int(frames.shape[0]))
        if idx is not None:
            out[j] = frames[idx : idx + 1].clone()
    return out


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
        context_source: str = "latents",
        first_call_id: int = FIRST_CALL_ID,
    ) -> None:
        """``first_call_id``: the real front's first (after the PP channel's PING); its heartbeat NOOPs
        take ids too; ids never change what is computed. ``context_source``: "latents" |
        "reencode" (module docstring); with "reencode", ``record`` needs the decoded frames and
        ``next_call`` an encoder."""
        if recompute_every < 0:
            raise ValueError("recompute_every must be >= 0 (0 = never)")
        if context_source not in CONTEXT_SOURCES:
            raise ValueError(f"context_source must be one of {CONTEXT_SOURCES}, got {context_source!r}")
        self.geometry = geometry
        self.timesteps = tuple(timesteps)
        self.seed = seed
        self.recompute_every = recompute_every
        self.context_frames = context_frames or geometry.max_context_frames
        if not 1 <= self.context_frames <= geometry.max_context_frames:
            raise ValueError(f"context_frames must be in [1, {geometry.max_context_frames}]")
        self.context_source = context_source
        self.call_id = first_call_id
        self.cache_epoch = 0
        self.chunk_index = 0
        self.reencoded = 0  # context frames re-encoded from a decoded frame
        self._reset_next = False
        self._history: list[torch.Tensor] = []  # latents of this epoch, [C, T, h, w] each
        self._keyframes: dict[int, torch.Tensor] = {}  # epoch latent frame -> its last decoded frame (reencode)

    def is_recompute(self, chunk_index: int) -> bool:
        return recompute_due(chunk_index, self.recompute_every)

    def hard_cut(self) -> None:
        """Prompt reset / error recovery: next chunk starts a new epoch from an empty cache."""
        self.cache_epoch += 1
        self.chunk_index = 0
        self._history.clear()
        self._keyframes.clear()
        self._reset_next = True

    def context(self, encode: Encoder | None = None) -> torch.Tensor:
        """The last ``context_frames`` latent frames generated in this epoch (or fewer); with
        "reencode", the first of them re-encoded from its decoded frame (unless it is the epoch's first)."""
        frames = torch.cat(self._history, dim=1)
        ctx = frames[:, -self.context_frames :].contiguous()
        s = reencode_frame(self.chunk_index, self.geometry.latent_frames, int(ctx.shape[1]))
        if self.context_source != "reencode" or s is None:
            return ctx
        if encode is None:
            raise ValueError("context_source 'reencode' needs an encoder (stage0.encode)")
        frame = self._keyframes.get(s)
        if frame is None:
            raise ValueError(f"reencode: latent frame {s} of cache_epoch {self.cache_epoch} has no decoded frame "
                             "(record(out, frames) every chunk)")
        first = encode(frame)
        if tuple(first.shape) != tuple(self.geometry.context_shape(1)):
            raise ValueError(f"reencode gave {tuple(first.shape)}, expected {self.geometry.context_shape(1)}")
        ctx = ctx.clone()
        ctx[:, :1] = first.to(ctx.device, ctx.dtype)
        self.reencoded += 1
        return ctx

    def next_call(self, conditioning: torch.Tensor, noise: torch.Tensor, encode: Encoder | None = None) -> ChunkCall:
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
            context_frames=self.context(encode) if recompute else None,
        )
        self.call_id += 1
        return call

    def record(self, out: ChunkOutput, frames: torch.Tensor | None = None) -> None:
        """The result of the last call: its latents become context for later recomputes; with
        "reencode", its decoded ``frames`` (uint8 [F, H, W, 3]) give the frames to re-encode."""
        g = self.geometry
        self._history.append(out.latents.detach().clone())
        keep = -(-g.max_context_frames // g.latent_frames)
        del self._history[:-keep]
        if self.context_source == "reencode":
            if frames is None:
                raise ValueError("context_source 'reencode': record(out, frames) needs the decoded frames")
            self._keyframes.update(chunk_keyframes(self.chunk_index, g.latent_frames, frames))
            lowest = oldest_needed_frame(self.chunk_index, g.latent_frames, g.max_context_frames)
            for k in [k for k in self._keyframes if k < lowest]:
                del self._keyframes[k]
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
            call = schedule.next_call(cond, stage0.make_noise(schedule.seed, schedule.chunk_index), stage0.encode)
        t0 = time.perf_counter()
        out = runner(call)
        t1 = time.perf_counter()
        verify_generator_output(call, out, stage0.geometry)
        frames = stage0.decode(out.latents, first_chunk=call.chunk_index == 0)
        t2 = time.perf_counter()
        if replay is None:
            schedule.record(out, frames)
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
