"""``--compile`` for the reference generator (CPU, Inductor's C++ backend, float32, micro):

- compiled equals eager at TP=1, and TP=2 / TP=3 compiled (shards in threads, uneven 2/1/1 heads)
  equal TP=1 eager, with every rank bit-identical, over a schedule with KV recomputes of two context
  lengths, a hard cut and a new epoch; one graph per segment (5) serves every block and every call,
  and nothing compiles after the precompile;
- a segment that cannot compile fails ``build_generator`` (the load step) with a CompileError that
  names it; a pipeline that does not declare ``supports_compile`` is refused.

Compilation costs seconds per graph on the CPU: the compiled meshes are built once per module.
"""

from __future__ import annotations

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.compiling import CompileError
from pp1.pipelines.dit import segments
from pp1.pipelines.dit.rope import apply_rope, rope_tables
from pp1.pipelines.loader import PipelineLoadError, build_generator, require_compile_support
from pp1.pipelines.local_loop import ChunkSchedule, LoopResult, mesh_runner, run_loop
from pp1.pipelines.threaded_comm import ThreadedMesh

PRESET = "micro"
CHUNKS = 6  # recompute every 2: chunk 2 over 4 context frames, chunk 4 over 6; a hard cut before chunk 5
CPU = torch.device("cpu")
TOL = {"rtol": 1e-5, "atol": 2e-5}


def _loop(factory, stage0, mesh_size: int, compile: bool, replay: LoopResult | None = None):  # type: ignore[no-untyped-def]
    with ThreadedMesh(mesh_size, timeout_s=300) as mesh:
        gens = mesh.map(lambda r, comm: build_generator(factory, PRESET, r, mesh_size, comm, CPU, torch.float32,
                                                        compile=compile))
        sched = ChunkSchedule(stage0.geometry, factory.timesteps(PRESET), seed=9, recompute_every=2)
        if replay is None:
            res = LoopResult()
            cond = stage0.encode_prompt("a kite over the dunes")
            for k in range(CHUNKS):
                if k == CHUNKS - 1:
                    sched.hard_cut()
                sched.context_frames = 4 if k == 2 else 6  # two recompute lengths
                call = sched.next_call(cond, stage0.make_noise(sched.seed, sched.chunk_index))
                out = mesh_runner(mesh, gens)(call)
                sched.record(out)
                res.calls.append(call)
                res.outputs.append(out)
        else:
            res = run_loop(stage0, mesh_runner(mesh, gens), sched, "", CHUNKS, replay=replay.calls)
    return res, gens


@pytest.fixture(scope="module")
def eager(factory, stage0):  # type: ignore[no-untyped-def]
    return _loop(factory, stage0, 1, compile=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mesh_size", [1, 2, 3])
def test_compiled_equals_eager(factory, stage0, eager, mesh_size: int) -> None:  # type: ignore[no-untyped-def]
    ref, ref_gens = eager
    assert [c.do_kv_recompute for c in ref.calls] == [False, False, True, False, True, False]
    assert [c.context_frames.shape[1] for c in ref.calls if c.context_frames is not None] == [4, 6]
    assert ref.calls[-1].init_cache and ref.calls[-1].reset_cache and ref.calls[-1].cache_epoch == 1
    res, gens = _loop(factory, stage0, mesh_size, compile=True, replay=ref)  # ranks agree bit for bit (mesh_runner)
    for a, b in zip(ref.outputs, res.outputs, strict=True):
        assert torch.allclose(b.latents, a.latents, **TOL), (b.latents - a.latents).abs().max()
        assert b.generator_calls == a.generator_calls and b.current_start_frame == a.current_start_frame
    for g in gens:
        assert g.compiled and g.compile_graphs == len(g.model.segments) == 5 and g.late_compiles == 0
        assert g.compile_s is not None and g.compile_s > 0
    fp = gens[0].fingerprint()
    assert fp.replace(f"/tp{mesh_size}/", "/tp1/") == ref_gens[0].fingerprint()  # compiling changes no weight


def test_precompile_covers_every_call_shape(factory) -> None:  # type: ignore[no-untyped-def]
    """A chunk, and a recompute over 1..window context frames: every token count precompiled."""
    gen = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    cfg = gen.cfg
    assert gen.model.token_counts() == [f * cfg.tokens_per_frame for f in range(1, cfg.kv_window_frames + 1)]


def test_a_segment_that_cannot_compile_fails_the_build(factory, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    fn, tokens = segments.SEGMENTS["attn_out"]

    def attn_out(o: torch.Tensor, w_o: torch.Tensor, s_o: torch.Tensor | None) -> torch.Tensor:
        if float(o.sum()) > 0:  # data-dependent Python control flow: not one graph
            return fn(o, w_o, s_o)
        return -fn(o, w_o, s_o)

    monkeypatch.setitem(segments.SEGMENTS, "attn_out", (attn_out, tokens))
    with pytest.raises(CompileError, match="compiling attn_out failed"):
        factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32, compile=True)


def test_compile_needs_a_factory_that_declares_it(factory) -> None:  # type: ignore[no-untyped-def]
    class Plain:
        name = "plain"

        def build_generator(self, *args: object) -> object:
            raise AssertionError("not called")

    require_compile_support(factory, "pp1.pipelines.reference:factory")
    with pytest.raises(PipelineLoadError, match="does not compile"):
        build_generator(Plain(), PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32, compile=True,  # type: ignore[arg-type]
                        path="plain:factory")


def test_fp8_linears_are_refused_where_they_cannot_run(factory) -> None:  # type: ignore[no-untyped-def]
    from pp1.pipelines.loader import load_factory

    fp8 = load_factory("pp1.pipelines.reference:factory", {"fp8_linears": "true"})
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fp8.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        fp8.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.bfloat16)


def test_rope_rotates_pairs() -> None:
    cos, sin = rope_tables(3, 2, (4, 5), 16, CPU)
    x = torch.randn(40, 3, 16, generator=torch.Generator().manual_seed(0))
    c, s = cos[:, None, ::2], sin[:, None, 1::2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    want = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    assert torch.allclose(apply_rope(x, cos, sin), want, atol=1e-6)
    assert torch.allclose(cos[:, ::2], cos[:, 1::2]) and torch.equal(sin[:, ::2], -sin[:, 1::2])

