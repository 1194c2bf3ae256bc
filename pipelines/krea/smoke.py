"""Smoke test for a user WITH the released weights: generate a few chunks in one process and check
that the frames look like video, not noise.

    python -m pp1.pipelines.krea.smoke --out smoke-out \
        --pipeline-option checkpoint=/m/krea-realtime-video-14b.safetensors \
        --pipeline-option text_encoder=/m/models_t5_umt5-xxl-enc-bf16.pth \
        --pipeline-option tokenizer=/m/google/umt5-xxl --pipeline-option vae=/m/Wan2.1_VAE.pth \
        [--tp 2]  [--chunks 8]  [--prompt "..."]

Runs the front's schedule (recompute every chunk, context re-encoded: Krea's rule) with stage 0 on
cuda:0 and the generator on cuda:0 (``--tp N``: N shards in threads on cuda:0..N-1). Writes
``frames.pt`` (uint8 [F, H, W, 3]) and PNGs of a few frames to ``--out`` and prints, per chunk and
overall: the neighbour-pixel correlation (natural images: > 0.8; noise: ~0), the correlation of
consecutive frames (video: > 0.8; noise: ~0) and the pixel spread (a blank frame: ~0). Exit 0 when
all three pass (spatial > 0.7, temporal > 0.7, std > 8), else 1. Random weights fail it (that is the
point: it tells a working checkpoint from a broken load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..loader import load_factory, parse_pipeline_option
from ..local_loop import ChunkSchedule, mesh_runner, run_loop
from ..threaded_comm import ThreadedMesh

SPATIAL_MIN, TEMPORAL_MIN, STD_MIN = 0.7, 0.7, 8.0


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den else 0.0


def video_stats(frames: torch.Tensor) -> dict[str, float]:
    """frames uint8 [F, H, W, 3] -> spatial (horizontal neighbours), temporal (consecutive frames), std."""
    f = frames.float().mean(-1)  # luma-ish
    spatial = sum(_corr(x[:, :-1], x[:, 1:]) for x in f) / len(f)
    temporal = sum(_corr(f[i], f[i + 1]) for i in range(len(f) - 1)) / max(1, len(f) - 1)
    return {"spatial": round(spatial, 3), "temporal": round(temporal, 3), "std": round(float(f.std()), 2)}


def looks_like_video(stats: dict[str, float]) -> bool:
    return stats["spatial"] > SPATIAL_MIN and stats["temporal"] > TEMPORAL_MIN and stats["std"] > STD_MIN


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.krea.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline-option", dest="options", action="append", default=[], type=parse_pipeline_option,
                   metavar="KEY=VALUE")
    p.add_argument("--preset", default="krea-14b")
    p.add_argument("--prompt", default="a red fox running through fresh snow in a pine forest, cinematic")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="krea-smoke")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    factory = load_factory("pp1.pipelines.krea:factory", dict(args.options))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def dev(r: int) -> torch.device:
        return torch.device(f"cuda:{r}") if args.device == "cuda" else torch.device(args.device)

    stage0 = factory.build_stage0(args.preset, dev(0), dtype)
    with ThreadedMesh(args.tp, timeout_s=600) as mesh:
        gens = mesh.map(lambda r, comm: factory.build_generator(args.preset, r, args.tp, comm, dev(r), dtype))
        sched = ChunkSchedule(stage0.geometry, factory.timesteps(args.preset), seed=args.seed, recompute_every=1,
                              context_source="reencode")
        res = run_loop(stage0, mesh_runner(mesh, gens), sched, args.prompt, args.chunks)
    frames = torch.cat([f.cpu() for f in res.frames])
    torch.save(frames, out / "frames.pt")
    try:
        from PIL import Image

        for i in range(0, len(frames), max(1, len(frames) // 6)):
            Image.fromarray(frames[i].numpy()).save(out / f"frame{i:04d}.png")
    except ImportError:
        pass
    per_chunk = [video_stats(f) for f in res.frames]
    overall = video_stats(frames)
    ok = looks_like_video(overall)
    report = {"preset": args.preset, "prompt": args.prompt, "tp": args.tp, "frames": len(frames),
              "ms_per_chunk": [round(t["generator"], 1) for t in res.timings_ms], "per_chunk": per_chunk,
              "overall": overall, "looks_like_video": ok}
    (out / "smoke.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"krea smoke: {'PASS: frames look like video' if ok else 'FAIL: frames look like noise or blank'}"
          f" (spatial {overall['spatial']} > {SPATIAL_MIN}, temporal {overall['temporal']} > {TEMPORAL_MIN}, "
          f"std {overall['std']} > {STD_MIN}); frames in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
