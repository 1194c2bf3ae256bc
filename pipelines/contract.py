"""The pipeline contract: checks the runtime runs at load, and a suite any pipeline can run on itself.

At-load / per-call checks (cheap, raise ``PipelineContractError`` with every finding):
    verify_factory(factory, preset) -> ChunkGeometry
    verify_stage0(stage0, geometry)
    verify_generator_api(generator)
    verify_generator_output(call, out, geometry)        # shape, dtype, finite, call count
Checks of an incoming call (raise ``InvalidChunkCall``): check_call(call, geometry).
The whole suite (builds the pipeline, runs a schedule over a threaded mesh):
    check_pipeline(factory, preset, mesh_size=1) -> list[Finding]
    require_pipeline(...)                                # raises if any finding
    python -m pp1.pipelines.contract package.module:factory --preset tiny --mesh-size 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pp1.protocol.geometry import ChunkGeometry

from .interface import ChunkCall, ChunkOutput, Generator, PipelineFactory, Stage0

MAX_TIMESTEP = 1000


@dataclass(frozen=True)
class Finding:
    """One broken rule: which check, which field, what is wrong."""

    check: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.field}: {self.reason}"


class PipelineContractError(Exception):
    """A pipeline breaks the interface; the runtime refuses it. ``findings`` lists every problem."""

    def __init__(self, findings: list[Finding] | Finding) -> None:
        self.findings = [findings] if isinstance(findings, Finding) else list(findings)
        lines = "\n  ".join(str(f) for f in self.findings)
        super().__init__(f"pipeline breaks the contract ({len(self.findings)} finding(s)):\n  {lines}")

    @property
    def code(self) -> str:
        return self.findings[0].check if self.findings else "contract"


class InvalidChunkCall(ValueError):
    """A ChunkCall a generator must not run (the caller broke the rules, not the pipeline)."""

    def __init__(self, field: str, reason: str, code: str = "invalid_call") -> None:
        self.field, self.reason, self.code = field, reason, code
        super().__init__(f"invalid chunk call [{code}] at {field}: {reason}")


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_findings(check: str, field: str, t: Any, shape: tuple[int, ...], dtype: str) -> list[Finding]:
    if not isinstance(t, torch.Tensor):
        return [Finding(check, field, f"expected a torch.Tensor, got {type(t).__name__}")]
    out = []
    if tuple(t.shape) != tuple(shape):
        out.append(Finding(check, f"{field}.shape", f"expected {tuple(shape)}, got {tuple(t.shape)}"))
    if _dtype_name(t.dtype) != dtype:
        out.append(Finding(check, f"{field}.dtype", f"expected {dtype}, got {_dtype_name(t.dtype)}"))
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        out.append(Finding(check, field, "contains NaN or Inf"))
    return out


def _raise_if(findings: list[Finding]) -> None:
    if findings:
        raise PipelineContractError(findings)


# --- checks of an incoming call -------------------------------------------------------------


def check_call(call: ChunkCall, geometry: ChunkGeometry) -> None:
    """Raise ``InvalidChunkCall`` if ``call`` does not fit ``geometry`` (same verdict on every rank)."""
    if not call.timesteps:
        raise InvalidChunkCall("call.timesteps", "at least one denoising step is required", "no_steps")
    for i, t in enumerate(call.timesteps):
        if not 0 <= int(t) <= MAX_TIMESTEP:
            raise InvalidChunkCall(f"call.timesteps[{i}]", f"{t} outside [0, {MAX_TIMESTEP}]", "bad_timestep")
    if call.chunk_index < 0 or call.seed < 0 or call.cache_epoch < 0:
        raise InvalidChunkCall("call", "chunk_index, seed and cache_epoch must be >= 0", "negative_id")
    pairs = [("conditioning", call.conditioning, geometry.conditioning_shape()),
             ("noise", call.noise, geometry.noise_shape())]
    for name, t, shape in pairs:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise InvalidChunkCall(f"call.{name}", "expected a floating-point tensor", "bad_tensor")
        if tuple(t.shape) != shape:
            raise InvalidChunkCall(f"call.{name}.shape", f"expected {shape}, got {tuple(t.shape)}", "bad_shape")
    if call.do_kv_recompute:
        ctx = call.context_frames
        if ctx is None:
            raise InvalidChunkCall("call.context_frames", "required when do_kv_recompute is set", "no_context")
        if not isinstance(ctx, torch.Tensor) or not ctx.is_floating_point() or ctx.dim() != 4:
            raise InvalidChunkCall("call.context_frames", "expected a floating [C, T, h, w] tensor", "bad_tensor")
        n = ctx.shape[1]
        if tuple(ctx.shape) != geometry.context_shape(n) or not 1 <= n <= geometry.max_context_frames:
            raise InvalidChunkCall(
                "call.context_frames.shape",
                f"expected {geometry.context_shape(n)} with 1 <= T <= {geometry.max_context_frames}, "
                f"got {tuple(ctx.shape)}",
                "bad_shape",
            )


def wire_geometry(factory: PipelineFactory, preset: str, dtype: torch.dtype | str) -> ChunkGeometry:
    """The preset's geometry with the run's dtype as wire dtype (what the runtime checks against)."""
    return factory.geometry(preset).model_copy(update={"dtype": _dtype_name(dtype)})


# --- at-load and per-call checks of a pipeline ------------------------------------------------


def verify_factory(factory: Any, preset: str) -> ChunkGeometry:
    """The factory has the interface's attributes and gives a sane geometry and step list."""
    findings = []
    name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        findings.append(Finding("factory", "factory.name", "must be a non-empty str"))
    for method in ("geometry", "timesteps", "build_stage0", "build_generator"):
        if not callable(getattr(factory, method, None)):
            findings.append(Finding("factory", f"factory.{method}", "missing or not callable"))
    _raise_if(findings)
    geometry = factory.geometry(preset)
    if not isinstance(geometry, ChunkGeometry):
        _raise_if([Finding("factory", "factory.geometry()", f"returned {type(geometry).__name__}, "
                           "expected pp1.protocol.geometry.ChunkGeometry")])
    steps = factory.timesteps(preset)
    if not isinstance(steps, tuple) or not steps:
        findings.append(Finding("factory", "factory.timesteps()", f"expected a non-empty tuple, got {steps!r}"))
    elif not all(isinstance(t, int) and 0 <= t <= MAX_TIMESTEP for t in steps):
        findings.append(Finding("factory", "factory.timesteps()", f"ints in [0, {MAX_TIMESTEP}] expected: {steps}"))
    _raise_if(findings)
    return geometry


def verify_stage0(stage0: Any, geometry: ChunkGeometry) -> None:
    """Stage 0 gives the shapes and dtypes of the interface and is deterministic."""
    chk = "stage0"
    if not isinstance(stage0, Stage0):
        _raise_if([Finding(chk, "stage0", "lacks geometry / encode_prompt / make_noise / decode / encode")])
    findings: list[Finding] = []
    if stage0.geometry != geometry:
        findings.append(Finding(chk, "stage0.geometry", f"{stage0.geometry} != factory geometry {geometry}"))
    dt, t_lat = geometry.dtype, geometry.latent_frames
    cond = stage0.encode_prompt("a red fox running through snow")
    findings += _tensor_findings(chk, "encode_prompt()", cond, geometry.conditioning_shape(), dt)
    if not findings:
        if not torch.equal(cond, stage0.encode_prompt("a red fox running through snow")):
            findings.append(Finding(chk, "encode_prompt()", "not deterministic for the same prompt"))
        if torch.equal(cond, stage0.encode_prompt("a blue whale in deep water")):
            findings.append(Finding(chk, "encode_prompt()", "two different prompts give the same conditioning"))
    noise = stage0.make_noise(7, 1)
    nf = _tensor_findings(chk, "make_noise()", noise, geometry.noise_shape(), dt)
    findings += nf
    if not nf:
        if not torch.equal(noise, stage0.make_noise(7, 1)):
            findings.append(Finding(chk, "make_noise()", "not deterministic in (seed, chunk_index)"))
        if torch.equal(noise, stage0.make_noise(7, 2)):
            findings.append(Finding(chk, "make_noise()", "same noise for two chunk indices"))
    _raise_if(findings)
    lat = torch.randn(geometry.latents_shape(), generator=torch.Generator().manual_seed(0)).to(noise)
    first = stage0.decode(lat, first_chunk=True)
    later = stage0.decode(lat, first_chunk=False)
    for name, frames, f in (("decode(first_chunk=True)", first, 4 * t_lat - 3),
                            ("decode(first_chunk=False)", later, 4 * t_lat)):
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            findings.append(Finding(chk, name, "expected a uint8 [F, H, W, 3] tensor"))
            continue
        findings += _tensor_findings(chk, name, frames, (f, *frames.shape[1:3], 3), "uint8")
    _raise_if(findings)
    if first.shape[1:] != later.shape[1:]:
        findings.append(Finding(chk, "decode()", f"frame size differs: {tuple(first.shape)} vs {tuple(later.shape)}"))
    for name, frames, t in (("encode(1 frame)", first[:1], 1), (f"encode({4 * t_lat - 3} frames)", first, t_lat)):
        findings += _tensor_findings(chk, name, stage0.encode(frames), geometry.context_shape(t), dt)
    _raise_if(findings)


def verify_generator_api(generator: Any) -> None:
    if not isinstance(generator, Generator):
        _raise_if([Finding("generator", "generator", "lacks run / reset / fingerprint")])
    fp = generator.fingerprint()
    if not isinstance(fp, str) or not fp:
        _raise_if([Finding("generator", "generator.fingerprint()", f"expected a non-empty str, got {fp!r}")])


def verify_generator_output(call: ChunkCall, out: Any, geometry: ChunkGeometry) -> None:
    """What a generator returned for ``call``: latents shape/dtype/finite and the call-count tripwire."""
    chk = "generator_output"
    if not isinstance(out, ChunkOutput):
        _raise_if([Finding(chk, "output", f"expected ChunkOutput, got {type(out).__name__}")])
    findings = _tensor_findings(chk, "output.latents", out.latents, geometry.latents_shape(), geometry.dtype)
    expected = call.expected_generator_calls
    if out.generator_calls != expected:
        how = f"{len(call.timesteps)} steps" + (" + 1 recompute" if call.do_kv_recompute else "")
        findings.append(Finding("call_count", "output.generator_calls",
                                f"{out.generator_calls} != expected {expected} ({how})"))
    if not isinstance(out.current_start_frame, int) or out.current_start_frame < 0:
        findings.append(Finding(chk, "output.current_start_frame", f"expected an int >= 0, got "
                                f"{out.current_start_frame!r}"))
    _raise_if(findings)


# --- building calls without a front -------------------------------------------------------------


def synthetic_call(
    geometry: ChunkGeometry,
    timesteps: tuple[int, ...],
    *,
    call_id: int,
    chunk_index: int = 0,
    cache_epoch: int = 0,
    init_cache: bool = False,
    reset_cache: bool = False,
    do_kv_recompute: bool = False,
    context_frames: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ChunkCall:
    """A deterministic call with seeded conditioning and noise (warmup, tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + chunk_index)
    dt = getattr(torch, geometry.dtype)
    cond = torch.randn(geometry.conditioning_shape(), generator=g).to(device, dt)
    noise = torch.randn(geometry.noise_shape(), generator=g).to(device, dt)
    if do_kv_recompute and context_frames is None:
        ctx_t = min(geometry.max_context_frames, max(1, chunk_index * geometry.latent_frames))
        context_frames = torch.randn(geometry.context_shape(ctx_t), generator=g).to(device, dt)
    return ChunkCall(
        call_id=call_id, chunk_index=chunk_index, cache_epoch=cache_epoch, init_cache=init_cache,
        reset_cache=reset_cache, do_kv_recompute=do_kv_recompute, timesteps=tuple(timesteps), seed=seed,
        conditioning=cond, noise=noise, context_frames=context_frames if do_kv_recompute else None,
    )


# --- the suite ----------------------------------------------------------------------------------


def _guard(findings: list[Finding], check: str, field: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a contract error adds its findings, any other exception one finding. None if it failed."""
    try:
        return fn()
    except PipelineContractError as exc:
        findings.extend(exc.findings)
    except Exception as exc:  # the suite reports, it does not crash
        findings.append(Finding(check, field, f"raised {type(exc).__name__}: {exc}"))
    return None


def check_pipeline(
    factory: PipelineFactory,
    preset: str,
    mesh_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunks: int = 4,
) -> list[Finding]:
    """Build the pipeline (mesh_size shards in threads) and run a schedule; every problem found.

    Schedule (after one warm-up call and a reset): chunk 0 (init_cache), plain chunks, a KV-recompute
    chunk with context frames taken from the previous latents, then a hard cut (reset_cache, new
    epoch). Checks every output, that all ranks return identical latents and equal fingerprints,
    that a rerun is deterministic and that a recompute call without context frames is refused.
    """
    from .local_loop import ChunkSchedule, copy_call
    from .threaded_comm import ThreadedMesh

    device = torch.device(device)
    findings: list[Finding] = []
    geometry = _guard(findings, "factory", "factory", lambda: verify_factory(factory, preset))
    if geometry is None:
        return findings
    geometry = wire_geometry(factory, preset, dtype)
    steps = factory.timesteps(preset)
    stage0 = _guard(findings, "stage0", "build_stage0()", lambda: factory.build_stage0(preset, device, dtype))
    if stage0 is not None:
        _guard(findings, "stage0", "stage0", lambda: verify_stage0(stage0, geometry))
    with ThreadedMesh(mesh_size) as mesh:
        gens = _guard(findings, "generator", "build_generator()", lambda: mesh.map(
            lambda r, comm: factory.build_generator(preset, r, mesh_size, comm, device, dtype)))
        if gens is None:
            return findings
        for r, g in enumerate(gens):
            _guard(findings, "generator", f"rank {r}", lambda g=g: verify_generator_api(g))
        if findings:
            return findings
        fps = [g.fingerprint() for g in gens]
        if len(set(fps)) != 1:
            findings.append(Finding("fingerprint", "generator.fingerprint()", f"differs across ranks: {fps}"))

        def run(call: ChunkCall) -> ChunkOutput | None:
            before = len(findings)
            outs = _guard(findings, "generator", f"run(chunk {call.chunk_index})",
                          lambda: mesh.map(lambda r, _c: gens[r].run(copy_call(call))))
            if outs is None:
                return None
            for r, out in enumerate(outs):
                _guard(findings, "generator_output", f"rank {r}",
                       lambda out=out: verify_generator_output(call, out, geometry))
            if len(findings) > before:
                return None
            if not all(torch.equal(outs[0].latents, o.latents) for o in outs[1:]):
                findings.append(Finding("mesh", f"chunk {call.chunk_index}", "mesh ranks returned different latents"))
            return outs[0]

        # Warm-up first, as the runtime does (pp1.md section 2.8): the first use of some kernels can
        # differ in the last bit from later calls (seen: cuDNN attention, bf16, two threads on one GPU).
        if run(synthetic_call(geometry, steps, call_id=0, init_cache=True, seed=1, device=device)) is None:
            return findings
        _guard(findings, "generator", "reset()", lambda: mesh.map(lambda r, _c: gens[r].reset()))
        sched = ChunkSchedule(geometry, steps, seed=3, recompute_every=2)
        wire = getattr(torch, geometry.dtype)
        cond = torch.randn(geometry.conditioning_shape(), generator=torch.Generator().manual_seed(1)).to(device, wire)
        first_latents = None
        for k in range(chunks):
            if k == chunks - 1:
                sched.hard_cut()
            noise = torch.randn(geometry.noise_shape(), generator=torch.Generator().manual_seed(100 + k)).to(device, wire)
            call = sched.next_call(cond, noise)
            out = run(call)
            if out is None:
                return findings
            sched.record(out)
            if k == 0:
                first_latents = out.latents.clone()
        # determinism: a reset shard replays chunk 0 bit for bit
        _guard(findings, "generator", "reset()", lambda: mesh.map(lambda r, _c: gens[r].reset()))
        replay = ChunkSchedule(geometry, steps, seed=3, recompute_every=2)
        noise0 = torch.randn(geometry.noise_shape(), generator=torch.Generator().manual_seed(100)).to(device, wire)
        out = run(replay.next_call(cond, noise0))
        if out is not None and not torch.equal(out.latents, first_latents):
            findings.append(Finding("determinism", "chunk 0", "same call after reset() gave different latents"))
        # a recompute call without context frames must be refused (by every rank alike)
        bad = synthetic_call(geometry, steps, call_id=10_000, chunk_index=1, do_kv_recompute=True)
        bad.context_frames = None
        try:
            mesh.map(lambda r, _c: gens[r].run(bad))
            findings.append(Finding("generator", "run()", "accepted do_kv_recompute without context_frames"))
        except Exception:  # expected: refused
            pass
    if stage0 is not None and first_latents is not None:
        _guard(findings, "stage0", "decode()", lambda: stage0.decode(first_latents.to(device), first_chunk=True))
    return findings


def require_pipeline(factory: PipelineFactory, preset: str, mesh_size: int = 1, **kw: Any) -> None:
    """``check_pipeline`` that raises ``PipelineContractError`` with every finding."""
    _raise_if(check_pipeline(factory, preset, mesh_size, **kw))


def main(argv: list[str] | None = None) -> int:
    from .loader import DEFAULT_PIPELINE, load_factory

    p = argparse.ArgumentParser(prog="python -m pp1.pipelines.contract", description="Run the pipeline contract.")
    p.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, help="package.module:factory")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mesh-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    findings = check_pipeline(load_factory(args.pipeline), args.preset, args.mesh_size, args.device)
    for f in findings:
        print(f, file=sys.stderr)
    print(f"{args.pipeline} preset={args.preset} mesh_size={args.mesh_size}: "
          f"{'OK' if not findings else f'{len(findings)} finding(s)'}")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
