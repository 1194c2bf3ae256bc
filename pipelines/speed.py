"""Generator speed on one device, in process: chunk time, the GPU time split, the numeric error.

    python -m pp1.pipelines.speed --preset krea-14b-shape --device cuda --variants eager compiled fp8 \\
        --reference float32 --chunks 8 --profile --save DIR --tag after
    python -m pp1.pipelines.speed --preset micro --variants eager compiled --reference float32   # CPU smoke
    python -m pp1.pipelines.speed --pipeline pp1.pipelines.krea:factory --preset krea-14b --device cuda \
        --pipeline-option checkpoint=/m/krea.safetensors --variants eager compiled fp8   # scripts/device_krea_speed.sh

A chunk is the real schedule's steady chunk: a KV recompute over the context frames (3 after the
first chunk, then the full window: 6 for the reference, 3 for Krea) plus the denoising steps, at TP=1 (a solo communicator).
Every variant gets the same calls (seeded; inputs rounded to bfloat16 so that every dtype sees the
same values). Variants: ``eager``, ``compiled`` (``build_generator(..., compile=True)``), ``fp8``
(compiled, pipeline option ``fp8_linears=true``), ``fp8-eager``, ``float32`` (eager, the reference:
run on the first ``--reference-chunks`` calls only, it is slow).

Reported per variant (JSON lines, then a table): build / compile seconds, median ms of a steady chunk
(generator, recompute, denoise), peak memory, and with ``--profile`` one steady chunk under
torch.profiler: GPU kernel time split into matmul / attention / the rest, GPU busy share (kernel
time over the chunk's wall time) and the top kernels. Errors: relative L2 (||a - ref|| / ||ref||) of
each chunk's latents against the float32 reference and against ``eager``.

Uses only the pipeline interface, so this file also measures an older checkout: run it by path with
that checkout's ``pp1`` on PYTHONPATH (``--save DIR --tag before``; a later run with ``--compare DIR``
reports the errors of every saved run against its reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.interface import ChunkCall, Generator
from pp1.pipelines.loader import DEFAULT_PIPELINE, load_factory, parse_pipeline_option

VARIANTS: dict[str, tuple[bool, dict[str, str], dict[str, Any]]] = {
    # name -> (compile, pipeline options, Inductor config patched around the build: experiments)
    "eager": (False, {}, {}),
    "compiled": (True, {}, {}),
    "compiled-cdt": (True, {}, {"coordinate_descent_tuning": True}),
    "compiled-det": (True, {}, {"deterministic": True}),  # the default since this was measured
    "compiled-autotune": (True, {}, {"deterministic": False}),
    "compiled-static": (True, {}, {"static": True}),
    "compiled-noepi": (True, {}, {"gelu_epilogue": False}),
    "eager-noepi": (False, {}, {"gelu_epilogue": False}),
    "compiled-kvbias1": (True, {"kv_bias": "1"}, {}),  # krea: no KV attention bias (no mask: the fast kernels)
    "fp8": (True, {"fp8_linears": "true"}, {}),
    "fp8-eager": (False, {"fp8_linears": "true"}, {}),
    "float32": (False, {}, {}),
}
ATTENTION = ("flash", "fmha", "attention", "sdpa", "attn")
MATMUL = ("gemm", "xmma", "nvjet", "cutlass", "matmul", "splitk", "f8f8bf16", "cublas", "gemv", "mm_kernel")


def kernel_kind(name: str) -> str:
    if name.startswith("triton_tem"):  # an Inductor matmul template (max-autotune only)
        return "matmul"
    if name.startswith("triton_"):  # Inductor's fused elementwise / reduction kernels (their names list
        return "rest"  # the aten ops they absorbed, e.g. the transposes feeding an attention call)
    n = name.lower()
    if any(k in n for k in ATTENTION):
        return "attention"
    if any(k in n for k in MATMUL):
        return "matmul"
    return "rest"


def make_calls(factory: Any, preset: str, chunks: int, seed: int = 0) -> list[ChunkCall]:
    """Chunk 0 starts the cache; every later chunk recomputes over min(k*T, window) context frames."""
    geo = factory.geometry(preset)
    steps = tuple(factory.timesteps(preset))
    g = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(torch.bfloat16).float()  # the same values in every dtype

    cond = rand(geo.conditioning_shape())
    calls = []
    for k in range(chunks):
        ctx = min(k * geo.latent_frames, geo.max_context_frames)
        calls.append(ChunkCall(
            call_id=k, chunk_index=k, cache_epoch=0, init_cache=k == 0, reset_cache=False, do_kv_recompute=k > 0,
            timesteps=steps, seed=seed, conditioning=cond, noise=rand(geo.noise_shape()),
            context_frames=rand(geo.context_shape(ctx)) if k > 0 else None,
        ))
    return calls


def _cast(call: ChunkCall, device: torch.device, dtype: torch.dtype) -> ChunkCall:
    c = ChunkCall(**{**call.__dict__})
    c.conditioning = call.conditioning.to(device, dtype)
    c.noise = call.noise.to(device, dtype)
    c.context_frames = None if call.context_frames is None else call.context_frames.to(device, dtype)
    return c


class GpuSampler:
    """SM clock, power and temperature of the GPU, sampled every ``period_s`` in a thread (NVML; None
    where NVML is not there): the matmul rate follows the clock, and a denser chunk can lower it."""

    def __init__(self, device: torch.device, period_s: float = 0.05) -> None:
        self.samples: list[tuple[float, float, float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.period_s = period_s
        self.nvml: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML: no samples
            self.nvml = None

    def _loop(self) -> None:
        n, h = self.nvml, self.handle
        while not self._stop.is_set():
            try:
                reasons = 0
                with contextlib.suppress(Exception):
                    reasons = int(n.nvmlDeviceGetCurrentClocksEventReasons(h))
                self.samples.append((float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                                     n.nvmlDeviceGetPowerUsage(h) / 1e3,
                                     float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)), reasons))
            except Exception:
                return
            time.sleep(self.period_s)

    def __enter__(self) -> GpuSampler:
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        clk, pw, temp, reasons = zip(*self.samples, strict=True)
        ored = 0
        for r in reasons:
            ored |= r
        return {"sm_mhz_mean": round(statistics.mean(clk)), "sm_mhz_min": round(min(clk)),
                "power_w_mean": round(statistics.mean(pw)), "power_w_max": round(max(pw)),
                "temp_c_max": round(max(temp)), "clock_event_reasons": hex(ored), "samples": len(clk)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_chunk(gen: Generator, call: ChunkCall, device: torch.device, top: int = 15) -> dict[str, Any]:
    """One chunk under torch.profiler: kernel time by kind, busy share, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        gen.run(call)
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    kinds = {"matmul": 0.0, "attention": 0.0, "rest": 0.0}
    by_name: dict[str, list[float]] = {}
    spans = []
    for e in prof.events():
        if device.type == "cuda" and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and (e.cpu_parent is not None or not e.name.startswith("aten::")):
            continue  # CPU: top-level aten ops only (a rough split, for the smoke test)
        us = e.time_range.elapsed_us()
        spans.append((e.time_range.start, e.time_range.end))
        kinds[kernel_kind(e.name)] += us / 1e3
        by_name.setdefault(e.name, []).append(us / 1e3)
    busy = sum(kinds.values())
    union, end = 0.0, float("-inf")  # kernels of one stream do not overlap; the union guards against it
    for s, t in sorted(spans):
        if t > end:
            union += (t - max(s, end)) / 1e3
            end = t
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "wall_ms": round(wall_ms, 1), "kernel_ms": round(busy, 1), "busy_ms": round(union, 1),
        "busy_share": round(union / wall_ms, 3) if wall_ms else None,
        **{f"{k}_ms": round(v, 1) for k, v in kinds.items()},
        **{f"{k}_share": round(v / busy, 3) if busy else None for k, v in kinds.items()},
        "kernels": sum(len(v) for v in by_name.values()),
        "top": [{"name": n[:120], "kind": kernel_kind(n), "ms": round(sum(v), 2), "count": len(v)} for n, v in rows],
    }


def run_variant(pipeline: str, preset: str, variant: str, device: torch.device, dtype: torch.dtype,
                calls: list[ChunkCall], profile: bool,
                base_options: dict[str, str] | None = None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    compile_, options, patches = VARIANTS[variant]
    run_dtype = torch.float32 if variant == "float32" else dtype
    factory = load_factory(pipeline, {**(base_options or {}), **options} or None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with _experiment(patches):  # held while the variant runs: eager code reads the knobs at every call
        t0 = time.perf_counter()
        if compile_:
            gen = factory.build_generator(preset, 0, 1, SoloCommunicator(), device, run_dtype, compile=True)  # type: ignore[call-arg]
        else:
            gen = factory.build_generator(preset, 0, 1, SoloCommunicator(), device, run_dtype)
        _sync(device)
        build_s = time.perf_counter() - t0
        outs, timings = [], []
        sampler = GpuSampler(device)
        for k, call in enumerate(calls):
            c = _cast(call, device, run_dtype)
            _sync(device)
            if k == 2:
                sampler.__enter__()  # the steady chunks
            t1 = time.perf_counter()
            out = gen.run(c)
            _sync(device)
            wall = (time.perf_counter() - t1) * 1e3
            outs.append(out.latents.float().cpu())
            timings.append({**out.timings_ms, "wall": wall})
        sampler.__exit__()
        steady = timings[2:] or timings[-1:]
        med = {k: round(statistics.median(t[k] for t in steady), 1)
               for k in ("wall", "generator", "recompute", "denoise") if all(k in t for t in steady)}
        row: dict[str, Any] = {
            "variant": variant, "preset": preset, "device": str(device),
            "dtype": str(run_dtype).removeprefix("torch."), "chunks": len(calls), "steady_chunks": len(steady),
            "build_s": round(build_s, 1), "compile_s": getattr(gen, "compile_s", None),
            "graphs": getattr(gen, "compile_graphs", None), "chunk_ms": med.get("wall"),
            "generator_ms": med.get("generator"), "recompute_ms": med.get("recompute"),
            "denoise_ms": med.get("denoise"), "chunk_ms_all": [round(t["wall"], 1) for t in timings],
            "fingerprint": gen.fingerprint(),
        }
        if profile and len(calls) > 1:
            try:
                row["profile"] = profile_chunk(gen, _cast(calls[-1], device, run_dtype), device)
            except Exception as exc:  # the profiler is a bonus: keep the timings
                row["profile_error"] = f"{type(exc).__name__}: {exc}"
        row["late_compiles"] = getattr(gen, "late_compiles", None)
        row["gpu"] = sampler.summary()
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del gen
    return row, outs


@contextlib.contextmanager
def _experiment(patches: dict[str, Any]) -> Iterator[None]:
    """An experiment variant's knobs: Inductor config, static token shapes, the GELU epilogue."""
    patches = dict(patches)
    static = patches.pop("static", False)
    gelu_epilogue = patches.pop("gelu_epilogue", None)
    with contextlib.ExitStack() as stack:
        if patches:
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(patches))
        if static:
            from pp1.pipelines import compiling

            stack.callback(setattr, compiling, "DYNAMIC_TOKENS", compiling.DYNAMIC_TOKENS)
            compiling.DYNAMIC_TOKENS = False
        if gelu_epilogue is not None:
            from pp1.pipelines.dit import segments

            stack.callback(setattr, segments, "GELU_EPILOGUE", segments.GELU_EPILOGUE)
            segments.GELU_EPILOGUE = gelu_epilogue
        yield


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(saved: dict[str, list[torch.Tensor]], reference: str, against: str) -> dict[str, dict[str, Any]]:
    """Per saved run: relative L2 per chunk against ``reference`` and against ``against`` (common chunks)."""
    out: dict[str, dict[str, Any]] = {}
    for name, lat in saved.items():
        row: dict[str, Any] = {}
        for label, ref_name in (("vs_" + reference, reference), ("vs_" + against, against)):
            ref = saved.get(ref_name)
            if ref is None or ref_name == name:
                continue
            errs = [rel_l2(a, b) for a, b in zip(lat, ref, strict=False)]
            row[label] = [float(f"{e:.3g}") for e in errs]
            row[label + "_max"] = float(f"{max(errs):.3g}") if errs else None
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--preset", default="micro")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=sorted(VARIANTS))
    p.add_argument("--reference", choices=["float32", "none"], default="none")
    p.add_argument("--reference-chunks", type=int, default=3)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--save", default=None, help="save each variant's latents as DIR/<tag>-<variant>.pt")
    p.add_argument("--tag", default="run")
    p.add_argument("--compare", default=None, help="errors of every run saved in DIR (after this one's)")
    p.add_argument("--json", default=None, help="append the JSON rows to this file")
    p.add_argument("--pipeline-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline option for every variant (e.g. checkpoint=PATH for the krea pipeline)")
    args = p.parse_args(argv)
    base_options = dict(parse_pipeline_option(o) for o in args.pipeline_option)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    factory = load_factory(args.pipeline, base_options or None)
    calls = make_calls(factory, args.preset, args.chunks)
    rows, saved = [], {}
    plan = list(args.variants) + (["float32"] if args.reference == "float32" else [])
    for variant in plan:
        use = calls[: args.reference_chunks] if variant == "float32" else calls
        try:
            row, outs = run_variant(args.pipeline, args.preset, variant, device, dtype, use,
                                    args.profile and variant != "float32", base_options)
        except Exception as exc:  # one variant failing (e.g. no FP8 on this device) does not stop the others
            row, outs = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}, []
        row["tag"] = args.tag
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # row by row: a run cut short keeps what it measured
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if outs:
            saved[f"{args.tag}-{variant}"] = outs
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                torch.save(outs, Path(args.save) / f"{args.tag}-{variant}.pt")
    if args.compare:
        for f in sorted(Path(args.compare).glob("*.pt")):
            saved.setdefault(f.stem, torch.load(f))
    errors = compare(saved, f"{args.tag}-float32", f"{args.tag}-eager")
    print(json.dumps({"errors": errors}), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"errors": errors, "tag": args.tag}) + "\n")
    print(f"{'variant':<24}{'chunk ms':>9}{'recomp':>8}{'denoise':>8}{'build s':>8}{'matmul':>8}{'attn':>7}"
          f"{'rest':>7}{'busy':>6}{'MHz':>6}{'W':>5}")
    for r in rows:
        pr, gp = r.get("profile") or {}, r.get("gpu") or {}
        print(f"{r['tag'] + '-' + r['variant']:<24}{r.get('chunk_ms') or '-':>9}{r.get('recompute_ms') or '-':>8}"
              f"{r.get('denoise_ms') or '-':>8}{r.get('build_s') or '-':>8}{pr.get('matmul_ms', '-'):>8}"
              f"{pr.get('attention_ms', '-'):>7}{pr.get('rest_ms', '-'):>7}{pr.get('busy_share', '-'):>6}"
              f"{gp.get('sm_mhz_mean', '-'):>6}{gp.get('power_w_mean', '-'):>5}"
              f"{'  ' + r['error'] if 'error' in r else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
