"""A ``FrontAPI`` that runs the reference pipeline in this process (no torchrun, no PP channel): real
frames for the page and the tests, with the fake's lifecycle, status and fault injection.

The chunk schedule is ``pp1.pipelines.local_loop.ChunkSchedule`` (the front's rules, in one process),
the generator a ``ThreadedMesh`` of ``tp`` shards. Prompts are encoded on the caller's thread
(``start`` / ``update``, as the real front does); several prompts blend by weight. A prompt change,
``reset_cache``, a new ``seed`` or ``recompute_every`` is a hard cut (a new epoch, a fresh cache).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from pp1.pipelines.interface import Stage0
from pp1.pipelines.loader import DEFAULT_PIPELINE, load_factory
from pp1.pipelines.local_loop import ChunkSchedule, build_mesh, mesh_runner
from pp1.pipelines.reference.presets import VAE_SPATIAL
from pp1.pipelines.threaded_comm import ThreadedMesh
from pp1.protocol.schedule import FRAMES_PER_LATENT
from pp1.server.front_api import StreamParameters

from .fake_front import FakeFront, Job

REFERENCE_SUPPORTED = frozenset({"prompts", "seed", "recompute_every", "reset_cache", "paused", "input_mode"})

PromptKey = tuple[tuple[str, float], ...]


def prompt_key(prompts: list[dict[str, Any]] | None, default: str) -> PromptKey:
    if not prompts:
        return ((default, 1.0),)
    return tuple((str(p["text"]), float(p.get("weight", 1.0))) for p in prompts)


class ReferenceFront(FakeFront):
    def __init__(self, *, preset: str = "tiny", pipeline: str = DEFAULT_PIPELINE, tp: int = 1, fps: float = 16.0,
                 recompute_every: int = 1, seed: int = 0, startup_s: float = 0.0, **kw: Any) -> None:
        self._factory = load_factory(pipeline)
        self._preset = preset
        self._tp = tp
        g = self._factory.geometry(preset)
        self._geometry = g
        self._timesteps = tuple(self._factory.timesteps(preset))
        self._defaults = {"seed": seed, "recompute_every": recompute_every}
        self._stage0: Stage0 | None = None
        self._runner: Any = None
        self._mesh: ThreadedMesh | None = None
        self._schedule: ChunkSchedule | None = None
        self._rendered_epoch: int | None = None
        self._cond: dict[PromptKey, torch.Tensor] = {}
        self._cond_lock = threading.Lock()
        super().__init__(
            width=g.latent_width * VAE_SPATIAL, height=g.latent_height * VAE_SPATIAL, fps=fps,
            chunk_frames=FRAMES_PER_LATENT * g.latent_frames, mesh_size=tp, topology="tp",
            pipeline=pipeline, preset=preset, reference_weights=pipeline == DEFAULT_PIPELINE,
            supported_parameters=REFERENCE_SUPPORTED, startup_s=startup_s, **kw,
        )

    # -- loading (the "loading" phase of the lifecycle) ------------------------------------------------
    def _load(self) -> None:
        dev, dtype = torch.device("cpu"), torch.float32
        self._stage0 = self._factory.build_stage0(self._preset, dev, dtype)
        self._mesh = ThreadedMesh(self._tp)
        gens = build_mesh(self._factory, self._preset, self._mesh, dev, dtype)
        self._runner = mesh_runner(self._mesh, gens)
        self._conditioning(prompt_key(None, self._info.default_prompt))

    def close(self) -> None:
        super().close()
        if self._mesh is not None:
            self._mesh.close()

    # -- prompts: encoded on the caller's thread ------------------------------------------------------
    def _conditioning(self, key: PromptKey) -> torch.Tensor:
        with self._cond_lock:
            cached = self._cond.get(key)
        if cached is not None:
            return cached
        assert self._stage0 is not None
        total = sum(w for _, w in key) or 1.0
        cond = sum((w / total) * self._stage0.encode_prompt(text) for text, w in key)
        assert isinstance(cond, torch.Tensor)
        with self._cond_lock:
            if len(self._cond) > 64:
                self._cond.clear()
            self._cond[key] = cond
        return cond

    def _encode(self, params: StreamParameters) -> None:
        if params.prompts and self._stage0 is not None:
            self._conditioning(prompt_key([p.model_dump() for p in params.prompts], self._info.default_prompt))

    def start(self, params: StreamParameters) -> None:
        self._encode(params)
        super().start(params)

    def update(self, params: StreamParameters) -> None:
        self._encode(params)
        super().update(params)
        if params.seed is not None or params.recompute_every is not None:
            with self._lock:
                if params.prompts is None and not params.reset_cache:
                    self._hard_cut()  # a new seed / schedule starts a new epoch

    # -- one chunk (the comms thread) -----------------------------------------------------------------
    def _render(self, job: Job) -> Any:
        assert self._stage0 is not None and self._runner is not None
        params = {**self._defaults, **job.params}
        if self._schedule is None or job.cache_epoch != self._rendered_epoch:
            self._schedule = ChunkSchedule(self._geometry, self._timesteps, seed=int(params["seed"]),
                                           recompute_every=int(params["recompute_every"]))
            self._rendered_epoch = job.cache_epoch
            first = True
        else:
            first = False
        sched = self._schedule
        cond = self._conditioning(prompt_key(params.get("prompts"), self._info.default_prompt))
        call = sched.next_call(cond, self._stage0.make_noise(sched.seed, sched.chunk_index), self._stage0.encode)
        if first:
            call.reset_cache = True  # a fresh epoch: the generator drops what the previous one cached
        t0 = time.perf_counter()
        out = self._runner(call)
        t1 = time.perf_counter()
        frames = self._stage0.decode(out.latents, first_chunk=call.chunk_index == 0)
        t2 = time.perf_counter()
        sched.record(out, frames)
        with self._lock:
            self._mesh_ms, self._decode_ms = (t1 - t0) * 1000, (t2 - t1) * 1000  # last chunk's (no overlap here)
        return frames
