"""Load check of the generator at full size, without the real weights (or with them):

    python -m pp1.pipelines.krea.loadcheck --write /tmp/krea-random.safetensors --preset krea-14b \
        --device cuda --tp 3 --chunks 4 --json out.json

1. ``--write PATH``: write a random checkpoint of the preset in the released layout (bf16, original
   Wan names, ``model.`` prefix), streamed tensor by tensor (drawn on ``--device``); skip it to check
   an existing file (``--checkpoint PATH``, e.g. the real one).
2. Load the generator at TP=1 on the device: validate the header, memory preflight, read every tensor
   (``get_slice``); report the seconds, the bytes read and the device memory (allocated / peak).
3. ``--tp M``: load each of the M shards of a mesh of M, one after another on the same device (each
   freed before the next), as its rank would: seconds, bytes and peak memory per rank.
4. ``--chunks N``: at TP=1, run N chunks (the first starts an epoch, the others recompute over 3
   context frames) with random conditioning; ms per chunk and the generator's own timings.
Prints one JSON document (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..contract import synthetic_call
from .config import KreaOptions, KreaRun, get_model
from .generator import KreaGenerator
from .writer import write_random_checkpoint

GIB = 1 << 30


class _LoadOnlyComm:
    """A communicator for loading one shard alone (loading makes no collective call)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        raise RuntimeError("loadcheck: a shard loaded alone cannot run (no mesh)")


class _Solo:
    rank, size = 0, 1

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        return None


def _mem(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB}


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.krea.loadcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="krea-14b")
    p.add_argument("--write", default=None, metavar="PATH", help="write a random checkpoint here first")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="an existing checkpoint (instead of --write)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--resolution", default=None, help="HxW (default: the preset's)")
    p.add_argument("--tp", type=int, default=0, help="also load each shard of a mesh of this size, one at a time")
    p.add_argument("--chunks", type=int, default=0, help="chunks to run at TP=1 after loading")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = get_model(args.preset)
    report: dict = {"preset": cfg.name, "parameters": cfg.parameters(), "device": str(device), "dtype": args.dtype}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    def emit() -> None:
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if args.json:
            Path(args.json).write_text(text)

    path = Path(args.write or args.checkpoint or "")
    if args.write:
        t0 = time.perf_counter()
        size = write_random_checkpoint(path, cfg, dtype=dtype, device=device)
        report["write"] = {"path": str(path), "bytes": size, "s": round(time.perf_counter() - t0, 2)}
        print(f"loadcheck: wrote {size / GIB:.2f} GiB in {report['write']['s']} s", flush=True)
    raw = {"checkpoint": str(path)}
    if args.resolution:
        raw["resolution"] = args.resolution
    spec = KreaRun(cfg, KreaOptions.parse(raw))

    _reset(device)
    gen = KreaGenerator(spec, 0, 1, _Solo(), device, dtype)
    report["tp1"] = {"load_s": round(gen.load_s, 2), "bytes_loaded_gib": gen.bytes_loaded / GIB,
                     "estimate": gen.memory.describe(), **_mem(device)}
    print(f"loadcheck: TP=1 loaded in {gen.load_s:.1f} s", flush=True)
    emit()
    if args.chunks:
        geo = gen.geometry
        times, parts = [], []
        for k in range(args.chunks):
            call = synthetic_call(geo, spec.options.steps, call_id=k, chunk_index=k, init_cache=k == 0,
                                  do_kv_recompute=k > 0, seed=1, device=device)
            if k > 0:
                call.context_frames = torch.randn(geo.context_shape(3), device=device).to(dtype)
            t0 = time.perf_counter()
            out = gen.run(call)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            parts.append({k2: round(v, 1) for k2, v in out.timings_ms.items()})
            assert torch.isfinite(out.latents.float()).all(), f"chunk {k}: non-finite latents"
        report["chunks_tp1"] = {"ms": [round(t, 1) for t in times], "timings": parts,
                                "steps": list(spec.options.steps), "kv_bias": spec.options.kv_bias, **_mem(device)}
        emit()
    del gen
    for r in range(args.tp):
        _reset(device)
        g = KreaGenerator(spec, r, args.tp, _LoadOnlyComm(r, args.tp), device, dtype)
        report.setdefault(f"tp{args.tp}", []).append({
            "rank": r, "heads": list(g.plan.heads), "ffn": list(g.plan.ffn_cols), "load_s": round(g.load_s, 2),
            "bytes_loaded_gib": g.bytes_loaded / GIB, "estimate": g.memory.describe(), **_mem(device)})
        del g
        emit()
    emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
