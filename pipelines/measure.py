"""In-process speed measurements of a pipeline (no torch.distributed): numbers for specs/, not tests.

    python -m pp1.pipelines.measure chunks --preset tiny --mesh-size 1 2     # stage 0 + generator per chunk
    python -m pp1.pipelines.measure shards --preset krea-14b-shape --mesh-size 3 --scale 8
        # one block's compute per TP rank (uneven 14/13/13 vs even splits); --scale 8 shrinks
        # head_dim, FFN and tokens by 8 (CPU), --scale 1 is the real shape (GPU)
    python -m pp1.pipelines.measure --what vae --preset krea-14b-shape --device cuda
        # stage 0's VAE: decode / encode ms per chunk (warmup, then median); bf16 by default on CUDA

Multi-GPU numbers (NCCL all-reduces included) come from ``pp1 bench`` on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch

from .comm import SoloCommunicator
from .loader import DEFAULT_PIPELINE, load_factory
from .local_loop import ChunkSchedule, build_mesh, mesh_runner, run_loop
from .threaded_comm import ThreadedMesh


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_chunks(
    pipeline: str, preset: str, mesh_size: int, chunks: int, device: torch.device, dtype: torch.dtype,
    recompute_every: int = 2,
) -> dict[str, float | int | str]:
    """Median ms per chunk of the generator (with and without recompute) and of stage 0's decode."""
    factory = load_factory(pipeline)
    stage0 = factory.build_stage0(preset, device, dtype)
    with ThreadedMesh(mesh_size) as mesh:
        gens = build_mesh(factory, preset, mesh, device, dtype)
        sched = ChunkSchedule(stage0.geometry, factory.timesteps(preset), seed=0, recompute_every=recompute_every)
        res = run_loop(stage0, mesh_runner(mesh, gens), sched, "a red fox running through snow", chunks)
    rec = [t["generator"] for t, c in zip(res.timings_ms, res.calls, strict=True) if c.do_kv_recompute][1:]
    plain = [t["generator"] for t, c in zip(res.timings_ms, res.calls, strict=True) if not c.do_kv_recompute][2:]
    decode = [t["decode"] for t in res.timings_ms[2:]]
    med = statistics.median
    return {
        "preset": preset, "mesh_size": mesh_size, "threads": torch.get_num_threads(), "chunks": chunks,
        "generator_ms": round(med(plain), 1) if plain else float("nan"),
        "generator_recompute_ms": round(med(rec), 1) if rec else float("nan"),
        "decode_ms": round(med(decode), 1),
        "frames_per_chunk": int(res.frames[-1].shape[0]),
    }


def measure_vae(
    pipeline: str, preset: str, device: torch.device, dtype: torch.dtype, repeats: int = 10, warmup: int = 3,
) -> dict[str, float | int | str]:
    """Median ms of stage 0's decode (first chunk, later chunks) and encode (a chunk's frames, a full
    context window's frames) on random latents, after ``warmup`` calls; peak GPU memory on CUDA."""
    factory = load_factory(pipeline)
    t0 = time.perf_counter()
    stage0 = factory.build_stage0(preset, device, dtype)
    _sync(device)
    build_s = time.perf_counter() - t0
    geo = stage0.geometry
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(geo.latents_shape(), generator=g).to(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def decode_first() -> torch.Tensor:
        return stage0.decode(lat, first_chunk=True)

    first_ms = _median_ms(decode_first, device, repeats, warmup)
    stage0.decode(lat, first_chunk=True)
    decode_ms = _median_ms(lambda: stage0.decode(lat, first_chunk=False), device, repeats, warmup)
    chunk = stage0.decode(lat, first_chunk=False)
    ctx = geo.max_context_frames
    window = torch.cat([decode_first(), *[stage0.decode(lat, first_chunk=False) for _ in range(3)]])
    window = window[: 4 * ctx - 3]  # 4n-3 frames -> n latent frames (a causal start)
    encode_ms = _median_ms(lambda: stage0.encode(chunk), device, repeats, warmup)
    encode_ctx_ms = _median_ms(lambda: stage0.encode(window), device, repeats, warmup)
    row: dict[str, float | int | str] = {
        "preset": preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "build_s": round(build_s, 2),
        "decode_first_ms": round(first_ms, 2), "decode_ms": round(decode_ms, 2),
        "frames_first": int(decode_first().shape[0]), "frames": int(chunk.shape[0]),
        "encode_ms": round(encode_ms, 2), f"encode_{window.shape[0]}_frames_ms": round(encode_ctx_ms, 2),
        "video": "x".join(str(d) for d in chunk.shape[1:3]),
    }
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name(device)
    return row


def _block_runner(cfg, heads: int, ffn: int, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    """One block forward owning ``heads`` heads and ``ffn`` FFN columns, full KV window, no all-reduce."""
    from .dit.block import BlockShard
    from .dit.kv_cache import RollingKVCache
    from .dit.rope import rope_tables
    from .dit.segments import Kernels
    from .reference.weights import WeightSource, init_rule

    with torch.inference_mode():
        src = WeightSource(cfg.weight_seed, device, dtype, init_rule(cfg.num_blocks))
        block = BlockShard(cfg.dit(), _SlicedPlan(cfg, heads, ffn), src, 0)
        tpf, t = cfg.tokens_per_frame, cfg.latent_frames
        cache = RollingKVCache(1, heads, cfg.head_dim, tpf, cfg.kv_window_frames, t, device, dtype)
        cache.written = cache.next_slot = cache.window_frames  # a full window: attend window + chunk
        slots, used = cache.plan(t)
        x = torch.randn(t * tpf, cfg.dim, device=device)
        e0 = torch.randn(1, 6, cfg.dim, device=device) * 0.1
        pending = (torch.zeros(t * tpf, cfg.dim, device=device, dtype=dtype), torch.zeros(cfg.dim, device=device),
                   torch.zeros(6, cfg.dim, device=device))
        rope = rope_tables(100, t, cfg.grid, cfg.head_dim, device)
        solo, kernels = SoloCommunicator(), Kernels()
        text_kv = block.cross_kv(torch.randn(cfg.text_len, cfg.dim, device=device, dtype=dtype), solo)

    def run() -> object:
        with torch.inference_mode():
            return block.forward(x, pending, e0, rope, cache, slots, used, text_kv, solo, kernels)

    return run


def measure_block_shards(
    preset: str, mesh_size: int, device: torch.device, dtype: torch.dtype, scale: int = 1, repeats: int = 10,
) -> list[dict[str, float | int | str]]:
    """One block's forward (no all-reduce: compute only) for each distinct rank shard of the split,
    and for the whole block (TP=1), with a full KV window (window + chunk frames of keys).

    The cases run interleaved (round robin) so a noisy machine slows them alike; median and min.
    ``scale`` divides head_dim, FFN and the tokens per frame (so ~scale**3 less work) for CPU runs."""
    from .dit.config import PATCH
    from .dit.sharding import split_sizes
    from .reference.presets import VAE_SPATIAL, get_preset

    base = get_preset(preset)
    gh, gw = (max(1, round(g / scale**0.5)) for g in base.grid)  # tokens per frame / ~scale
    cfg = dataclasses.replace(
        base, dim=base.dim // scale, ffn_dim=base.ffn_dim // scale, num_blocks=1,
        video_height=gh * VAE_SPATIAL * PATCH[1], video_width=gw * VAE_SPATIAL * PATCH[2],
    )
    shards = list(zip(split_sizes(cfg.num_heads, mesh_size), split_sizes(cfg.ffn_dim, mesh_size), strict=True))
    cases = [(f"rank {r}", h, f) for r, (h, f) in enumerate(shards) if (h, f) not in shards[:r]]
    cases.append(("tp1 (whole block)", cfg.num_heads, cfg.ffn_dim))
    runners = [_block_runner(cfg, h, f, device, dtype) for _, h, f in cases]
    for run in runners:
        _median_ms(run, device, repeats=1, warmup=2)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            times[i].append(_median_ms(run, device, repeats=1, warmup=0))
    tokens = cfg.latent_frames * cfg.tokens_per_frame
    return [
        {"shard": label, "heads": h, "ffn": f, "block_ms": round(statistics.median(ts), 3),
         "block_ms_min": round(min(ts), 3), "tokens": tokens,
         "kv_tokens": (cfg.kv_window_frames + cfg.latent_frames) * cfg.tokens_per_frame, "dim": cfg.dim}
        for (label, h, f), ts in zip(cases, times, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class _SlicedPlan:
    cfg: object
    local_heads: int
    local_ffn: int

    @property
    def head_features(self) -> tuple[int, int]:
        return 0, self.local_heads * self.cfg.head_dim  # type: ignore[attr-defined]

    @property
    def ffn_cols(self) -> tuple[int, int]:
        return 0, self.local_ffn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["chunks", "shards", "vae"], default=None)
    p.add_argument("--what", dest="what_opt", choices=["chunks", "shards", "vae"], help="same as the positional")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mesh-size", type=int, nargs="+", default=[1])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default float32; vae on CUDA: bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    what = args.what_opt or args.what
    if what is None:
        p.error("say what to measure: chunks, shards or vae")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if what == "vae" and device.type == "cuda" else "float32"))
    if what == "vae":
        print(json.dumps(measure_vae(args.pipeline, args.preset, device, dtype, args.repeats)))
        return 0
    for n in args.mesh_size:
        if what == "chunks":
            print(json.dumps(measure_chunks(args.pipeline, args.preset, n, args.chunks, device, dtype)))
        else:
            for row in measure_block_shards(args.preset, n, device, dtype, args.scale, args.repeats):
                print(json.dumps({"preset": args.preset, "mesh_size": n, "scale": args.scale, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
