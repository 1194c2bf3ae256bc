"""The reference generator: one tensor-parallel shard of the causal DiT with its rolling KV cache.

One call (one chunk of ``T`` latent frames at timeline frames ``[k*T, (k+1)*T)``, ``k`` = chunk_index):

1. ``init_cache`` or ``reset_cache``: empty the KV cache.
2. ``do_kv_recompute`` (1 generator call): empty the cache, run the context latents (taken to be
   the ``Tctx`` frames just before the chunk, positions ``[k*T - Tctx, k*T)``) through the model at
   t=0 and keep their K/V as the new cache.
3. Denoise (1 generator call per timestep): flow matching, x0 = x_t - sigma(t) * v; between steps the
   x0 estimate is re-noised to the next level with noise seeded by (seed, chunk_index, step).
   Every step attends to the cached window plus the chunk itself.
4. Commit: the K/V of the LAST denoising step (computed from x at the last timestep) stay in the
   cache; the window keeps the newest ``kv_window_frames`` frames. No extra clean pass is run, so
   generator calls = steps + (1 if recompute).

A call that is not an epoch start (no init/reset) and not a recompute must continue the cache:
its chunk must start where the cache ends, in the same epoch; anything else is refused.

``compile=True`` (``--compile``): the blocks' segments are compiled with torch.compile and run once
per possible token count before the constructor returns (the load step: a failure raises and fails
the load vote with its cause; no collective is involved). ``compile_s`` is that time, ``compile_graphs``
the graphs built; a serve-time recompile is logged and counted in ``late_compiles``.
``fp8_linears=True``: the six large linears of every block in float8 e4m3 with per-row scales.
"""

from __future__ import annotations

import logging

import torch

from ..comm import Communicator
from ..dit.generator import DiTGenerator
from ..dit.model import DiTShard, TextKV
from ..dit.segments import check_fp8
from ..interface import ChunkCall, ChunkOutput
from .presets import ReferenceConfig
from .weights import WeightSource, init_rule, mix_seed, seeded_randn

log = logging.getLogger("pp1.pipelines.reference")


class ReferenceGenerator(DiTGenerator):
    NAME = "reference"

    def __init__(
        self,
        cfg: ReferenceConfig,
        mesh_rank: int,
        mesh_size: int,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
        fp8_linears: bool = False,
    ) -> None:
        self._setup(cfg.num_heads, cfg.head_dim, cfg.ffn_dim, mesh_rank, mesh_size, comm,
                    f"{cfg.name}: mesh of {mesh_size} is larger than {cfg.num_heads} heads")
        self.cfg = cfg
        self.geometry = cfg.geometry(dtype)  # wire dtype = run dtype: latents come back in it
        self.device = torch.device(device)
        self.dtype = dtype
        if fp8_linears:
            check_fp8(self.device, dtype)
        src = WeightSource(cfg.weight_seed, self.device, dtype, init_rule(cfg.num_blocks))
        with torch.inference_mode():
            self.model = DiTShard(cfg.dit(), self.plan, src, comm, self.device, dtype, fp8_linears)
        self.full_digest, self._shard_digest = src.digests()
        self._fingerprint = (
            f"reference/{cfg.name}/seed{cfg.weight_seed}/tp{mesh_size}/{str(dtype).removeprefix('torch.')}"
            f"/{self.device.type}{'/fp8' if fp8_linears else ''}/{self.full_digest}"
        )
        self._compile(compile, log)

    # --- Generator interface ----------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Digest of the FULL model this shard is cut from (same on every rank of a consistent mesh)."""
        return self._fingerprint

    def shard_digest(self) -> str:
        """Digest of this rank's own weights (differs per rank; for logs)."""
        return self._shard_digest

    # --- internals --------------------------------------------------------------------------------

    def _text(self, conditioning: torch.Tensor) -> TextKV:
        return self._cached_text_kv(conditioning.to(self.device, torch.float32))

    def _run(self, call: ChunkCall) -> ChunkOutput:
        cfg, model, cache = self.cfg, self.model, self.model.cache
        t_lat = self.geometry.latent_frames
        start = call.chunk_index * t_lat
        t0 = self._sync()
        calls0 = model.forward_calls
        if call.init_cache or call.reset_cache:
            cache.reset()
        self._epoch = call.cache_epoch
        text_kv = self._text(call.conditioning)
        t1 = self._sync()
        if call.do_kv_recompute:
            ctx = call.context_frames
            assert ctx is not None  # check_call
            n = ctx.shape[1]
            cache.reset()
            model.forward(ctx.to(self.device, torch.float32), 0.0, start - n, text_kv)
            cache.commit(n, start)
        t2 = self._sync()
        x = call.noise.to(self.device, torch.float32)
        steps = call.timesteps
        x0 = x
        for i, t in enumerate(steps):
            sigma = flow_sigma(float(t), cfg.flow_shift)
            v = model.forward(x, float(t), start, text_kv)
            x0 = x - sigma * v
            if i + 1 < len(steps):
                nxt = flow_sigma(float(steps[i + 1]), cfg.flow_shift)
                eps = seeded_randn(x.shape, mix_seed("renoise", call.seed, call.chunk_index, i + 1)).to(self.device)
                x = (1.0 - nxt) * x0 + nxt * eps
        cache.commit(t_lat, start + t_lat)
        t3 = self._sync()
        return ChunkOutput(
            latents=x0.to(getattr(torch, self.geometry.dtype)).contiguous(),
            generator_calls=model.forward_calls - calls0,
            current_start_frame=start + t_lat,
            timings_ms={
                "text": (t1 - t0) * 1e3,
                "recompute": (t2 - t1) * 1e3,
                "denoise": (t3 - t2) * 1e3,
                "generator": (t3 - t0) * 1e3,
            },
        )


def flow_sigma(t: float, shift: float) -> float:
    """Wan's shifted flow-matching noise level for timestep ``t`` in [0, 1000]."""
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s) if s > 0 else 0.0
