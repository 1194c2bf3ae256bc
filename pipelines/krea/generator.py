"""The Krea generator: one tensor-parallel shard of the shared causal DiT (``pipelines/dit``), loaded from
the checkpoint, with its KV cache. One call = one chunk of T = 3 latent frames (timeline frames
[3k, 3k+3) of its epoch).

1. ``init_cache`` / ``reset_cache``: empty the KV cache (a new epoch).
2. ``do_kv_recompute`` (1 generator call): empty the cache, run the n context frames (Krea: the
   epoch's first latent or a re-encode of a decoded frame, then the 2 newest latents) at t = 0,
   block-causal over blocks of 3 frames, RoPE positions 0..n-1, no KV bias; keep their K/V.
3. Denoise (1 call per step): the chunk at window-relative positions n..n+2 (0..2 on an epoch's
   first chunk; without a recompute the positions keep counting) attends to the cached frames +
   itself, with the KV attention bias (an additive ``log(bias)`` per key, ``RollingKVCache.past_bias``)
   on cached frames but the oldest. Sampler: sigma(t) = the shifted flow table's entry nearest t
   (= t/1000 up to the table's spacing: Self-Forcing's ``FlowMatchScheduler``), x0 = x_t - sigma v;
   between steps x = (1 - sigma') x0 + sigma' eps, eps from a generator seeded with seed + 3k (Scope's
   rule), after the draw of the chunk's initial noise (which stage 0 made from the same seed).
4. The last step's K/V stay as the chunk's frames (used only when the next call does not recompute).

Cross-attention K/V are computed when the conditioning differs from the last one (every rank gets
the same conditioning, so every rank decides alike), else reused.

``compile=True`` (``--compile``): the DiT's segments are compiled and run once per possible token
count before the constructor returns (the load step; no collective). ``fp8_linears`` (option): the six
large linears of every block in float8 e4m3 with per-row scales.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..comm import Communicator
from ..dit.generator import DiTGenerator
from ..dit.masks import block_causal_mask
from ..dit.model import DiTShard, TextKV
from ..dit.segments import check_fp8
from ..interface import ChunkCall, ChunkOutput
from .checkpoint import CheckpointInfo, ShardReader, validate_checkpoint
from .config import KreaRun, flow_table
from .memory import preflight

log = logging.getLogger("pp1.pipelines.krea")


class FlowSigmas:
    """sigma(t): the entry of the shifted table nearest ``t`` (Self-Forcing's ``_convert_flow_pred_to_x0``
    and ``add_noise`` lookups: argmin |timesteps - t|)."""

    def __init__(self, shift: float) -> None:
        sigmas, timesteps = flow_table(shift)
        self.sigmas, self.timesteps = sigmas.double(), timesteps.double()

    def __call__(self, t: float) -> float:
        return float(self.sigmas[int(torch.argmin((self.timesteps - float(t)).abs()))])


def noise_generator(seed: int, chunk_index: int, chunk_frames: int, device: torch.device) -> torch.Generator:
    """Scope's per-chunk generator: seeded with base_seed + the chunk's first latent frame."""
    return torch.Generator(device=device).manual_seed((seed + chunk_index * chunk_frames) % (1 << 63))


def draw_noise(gen: torch.Generator, shape_cthw: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One chunk-shaped draw in Scope's [T, C, h, w] order, returned as [C, T, h, w] float32."""
    c, t, h, w = shape_cthw
    return torch.randn((t, c, h, w), generator=gen, device=device).permute(1, 0, 2, 3)


class KreaGenerator(DiTGenerator):
    NAME = "krea"

    def __init__(
        self,
        run: KreaRun,
        mesh_rank: int,
        mesh_size: int,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        info: CheckpointInfo | None = None,
        compile: bool = False,
    ) -> None:
        cfg = run.model
        self._setup(cfg.num_heads, cfg.head_dim, cfg.ffn_dim, mesh_rank, mesh_size, comm,
                    f"{cfg.name}: a mesh of {mesh_size} is larger than its {cfg.num_heads} heads")
        self.spec, self.device, self.dtype = run, torch.device(device), dtype
        self.geometry = run.geometry(dtype)
        fp8 = run.options.fp8_linears
        if fp8:
            check_fp8(self.device, dtype)
        # cheap checks first (header only), then the memory preflight, then the shard's bytes
        self.info = info or validate_checkpoint(run.options.require("checkpoint"), cfg)
        self.memory = preflight(run, self.plan, self.info, self.device, dtype, enforce=run.options.memory_check)
        t0 = time.perf_counter()
        reader = ShardReader(self.info, self.device, dtype)
        with torch.inference_mode():
            self.model = DiTShard(run.dit(), self.plan, reader, comm, self.device, dtype, fp8)
        reader.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.load_s = time.perf_counter() - t0
        self.bytes_loaded = reader.bytes_loaded
        self.sigma = FlowSigmas(cfg.flow_shift)
        self.log_bias = math.log(run.options.kv_bias)  # 0 when the bias is off (1)
        self._fingerprint = f"{self.info.fingerprint()}/{str(dtype).removeprefix('torch.')}{'/fp8' if fp8 else ''}"
        self._compile(compile, log)
        self._origin = 0  # the epoch timeline's frame at RoPE position 0 (window-relative positions)

    # --- Generator interface ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """The checkpoint's header digest (+ preset, dtype): equal on every rank reading the same file."""
        return self._fingerprint

    # --- internals ----------------------------------------------------------------------------------
    def text_kv(self, conditioning: torch.Tensor) -> TextKV:
        """Cross-attention K/V, recomputed only when the conditioning changes."""
        return self._cached_text_kv(conditioning.to(self.device))

    def recompute_mask(self, frames: int) -> torch.Tensor | None:
        """The recompute pass's mask: block-causal over blocks of ``chunk_frames`` (None: one block)."""
        cfg = self.model.cfg
        return block_causal_mask(frames, cfg.tokens_per_frame, cfg.chunk_frames, self.device, self.dtype)

    def _run(self, call: ChunkCall) -> ChunkOutput:
        model, cache = self.model, self.model.cache
        t_lat = self.geometry.latent_frames
        start = call.chunk_index * t_lat
        t0 = self._sync()
        calls0 = model.forward_calls
        if call.init_cache or call.reset_cache:
            cache.reset()
            self._origin = start
        self._epoch = call.cache_epoch
        text_kv = self.text_kv(call.conditioning)
        t1 = self._sync()
        if call.do_kv_recompute:
            ctx = call.context_frames
            assert ctx is not None  # check_call
            n = int(ctx.shape[1])
            cache.reset()
            self._origin = start - n  # context at positions 0..n-1, the chunk at n..
            model.forward(ctx.to(self.device, torch.float32), 0.0, 0, text_kv, self.recompute_mask(n))
            cache.commit(n, start)
        t2 = self._sync()
        position = start - self._origin
        bias = cache.past_bias(t_lat, self.log_bias, self.dtype)
        gen = noise_generator(call.seed, call.chunk_index, t_lat, self.device)
        draw_noise(gen, tuple(call.noise.shape), self.device)  # the chunk's initial noise (stage 0 drew it)
        x = call.noise.to(self.device, torch.float32)
        x0 = x
        steps = call.timesteps
        for i, t in enumerate(steps):
            v = model.forward(x, float(t), position, text_kv, bias)
            x0 = x - self.sigma(t) * v
            if i + 1 < len(steps):
                nxt = self.sigma(steps[i + 1])
                x = (1.0 - nxt) * x0 + nxt * draw_noise(gen, tuple(x.shape), self.device)
        cache.commit(t_lat, start + t_lat)
        t3 = self._sync()
        return ChunkOutput(
            latents=x0.to(getattr(torch, self.geometry.dtype)).contiguous(),
            generator_calls=model.forward_calls - calls0,
            current_start_frame=start + t_lat,
            timings_ms={"text": (t1 - t0) * 1e3, "recompute": (t2 - t1) * 1e3, "denoise": (t3 - t2) * 1e3,
                        "generator": (t3 - t0) * 1e3},
        )
