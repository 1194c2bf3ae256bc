"""``--compile`` for the Krea generator (the shared DiT's segments; CPU, Inductor's C++ backend, float32,
tiny checkpoint):

- compiled equals eager at TP=1, and TP=2 / TP=3 compiled (shards in threads, uneven 2/1/1 heads:
  the QK-norm over all heads through the split segments and their sums-of-squares all-reduces) equal
  TP=1 eager, every rank bit-identical, over a schedule with the KV bias on a window that wraps the
  cache's ring, recomputes of two context lengths and a hard cut; one graph per segment (5 fused at
  TP=1, 7 split on a mesh) and nothing compiled after the precompile;
- the factory declares it (``--compile`` is accepted); FP8 linears are refused where they cannot run.

Compilation costs seconds per graph on the CPU: each mesh is built once, in one test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CPU, PRESET, STEPS, options_with

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.dit import segments
from pp1.pipelines.loader import build_generator, load_factory, supports_compile
from pp1.pipelines.local_loop import ChunkSchedule, copy_call
from pp1.pipelines.threaded_comm import ThreadedMesh

CHUNKS = 6
# chunk k: (recompute?, context frames, hard cut before it): 0 starts; 1 continues (bias on 2 cached
# frames); 2 recomputes over 2 frames; 3 continues (the ring wraps); 4 recomputes over 3; 5 after a cut
PLAN = {2: 2, 4: 3}
TOL = {"rtol": 1e-5, "atol": 2e-5}


def calls(krea) -> list:  # type: ignore[no-untyped-def]
    geo = krea.geometry(PRESET)
    sched = ChunkSchedule(geo, STEPS, seed=5, recompute_every=1)
    cond = torch.randn(geo.conditioning_shape(), generator=torch.Generator().manual_seed(1))
    out, latents = [], None
    for k in range(CHUNKS):
        if k == CHUNKS - 1:
            sched.hard_cut()
        sched.recompute_every = 1 if k in PLAN else 10**6
        sched.context_frames = PLAN.get(k, 3)
        noise = torch.randn(geo.noise_shape(), generator=torch.Generator().manual_seed(100 + k))
        call = sched.next_call(cond, noise)
        out.append(call)
        latents = torch.randn(geo.latents_shape(), generator=torch.Generator().manual_seed(200 + k))
        sched.record(_output(call, latents))
    return out


def _output(call, latents):  # type: ignore[no-untyped-def]
    from pp1.pipelines.interface import ChunkOutput

    return ChunkOutput(latents=latents, generator_calls=len(call.timesteps) + int(call.do_kv_recompute),
                       current_start_frame=(call.chunk_index + 1) * latents.shape[1])


def run(krea, mesh_size: int, compile: bool, schedule: list):  # type: ignore[no-untyped-def]
    with ThreadedMesh(mesh_size, timeout_s=600) as mesh:
        gens = mesh.map(lambda r, comm: build_generator(krea, PRESET, r, mesh_size, comm, CPU, torch.float32,
                                                        compile=compile, path="pp1.pipelines.krea:factory"))
        outs = []
        for call in schedule:
            res = mesh.map(lambda r, _c, call=call: gens[r].run(copy_call(call)))
            assert all(torch.equal(res[0].latents, o.latents) for o in res[1:]), f"ranks differ at {call.chunk_index}"
            outs.append(res[0])
    return outs, gens


@pytest.fixture(scope="module")
def schedule(krea):  # type: ignore[no-untyped-def]
    s = calls(krea)
    assert [c.do_kv_recompute for c in s] == [False, False, True, False, True, False]
    assert [c.context_frames.shape[1] for c in s if c.do_kv_recompute] == [2, 3]
    assert s[-1].init_cache and s[-1].cache_epoch == 1
    return s


@pytest.fixture(scope="module")
def eager(krea, schedule):  # type: ignore[no-untyped-def]
    return run(krea, 1, False, schedule)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mesh_size", [1, 2, 3])
def test_compiled_equals_eager(krea, schedule, eager, mesh_size: int) -> None:  # type: ignore[no-untyped-def]
    ref, ref_gens = eager
    got, gens = run(krea, mesh_size, True, schedule)
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        torch.testing.assert_close(b.latents, a.latents, **TOL, msg=f"TP={mesh_size} compiled, chunk {k}")
        assert b.generator_calls == a.generator_calls and b.current_start_frame == a.current_start_frame
    want = segments.FUSED if mesh_size == 1 else segments.SPLIT
    for g in gens:
        assert g.model.segments == want and g.compiled and g.compile_graphs == len(want) and g.late_compiles == 0
        assert g.compile_s is not None and g.compile_s > 0
    assert gens[0].fingerprint() == ref_gens[0].fingerprint()  # the checkpoint's digest: compiling changes nothing


def test_the_factory_declares_compile_and_fp8_is_refused_where_it_cannot_run(krea, tiny) -> None:  # type: ignore[no-untyped-def]
    assert supports_compile(krea)
    fp8 = load_factory("pp1.pipelines.krea:factory", options_with(tiny, fp8_linears="true"))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fp8.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        fp8.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.bfloat16)
