"""The front's schedule, and "PP1 equals a single process" at the pipeline level: stage 0 + one
generator in one loop gives the frames that the same envelopes give through TP shards (threads)."""

from __future__ import annotations

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.interface import ChunkOutput
from pp1.pipelines.local_loop import ChunkSchedule, build_mesh, copy_call, mesh_runner, run_loop
from pp1.pipelines.threaded_comm import ThreadedMesh
from pp1.protocol.schedule import FIRST_CALL_ID

PRESET = "micro"
PROMPT = "a paper boat on a rainy street"


def _schedule(factory, stage0, seed: int = 4):  # type: ignore[no-untyped-def]
    return ChunkSchedule(stage0.geometry, factory.timesteps(PRESET), seed=seed, recompute_every=1)


def test_schedule_flags_ids_and_context(stage0, factory) -> None:  # type: ignore[no-untyped-def]
    geo = stage0.geometry
    for k, expected in [(1, [0, 1, 1, 1, 1]), (2, [0, 0, 1, 0, 1]), (0, [0, 0, 0, 0, 0])]:
        s = ChunkSchedule(geo, (1000, 500), recompute_every=k)
        got = []
        for i in range(5):
            call = s.next_call(torch.zeros(geo.conditioning_shape()), torch.zeros(geo.noise_shape()))
            got.append(int(call.do_kv_recompute))
            assert call.init_cache == (i == 0) and call.call_id == FIRST_CALL_ID + i and call.chunk_index == i
            assert (call.context_frames is not None) == call.do_kv_recompute
            s.record(_fake_output(geo, value=i))
        assert got == expected
    # context = the newest latent frames so far, at most max_context_frames
    s = ChunkSchedule(geo, (1000,), recompute_every=1)
    for i in range(3):
        call = s.next_call(torch.zeros(geo.conditioning_shape()), torch.zeros(geo.noise_shape()))
        if i == 1:
            assert call.context_frames.shape[1] == 3 and bool((call.context_frames == 0).all())
        if i == 2:
            assert call.context_frames.shape[1] == 6
            assert call.context_frames[:, :3].eq(0).all() and call.context_frames[:, 3:].eq(1).all()
        s.record(_fake_output(geo, value=i))
    s.hard_cut()
    call = s.next_call(torch.zeros(geo.conditioning_shape()), torch.zeros(geo.noise_shape()))
    assert (call.init_cache, call.reset_cache, call.do_kv_recompute) == (True, True, False)
    assert (call.cache_epoch, call.chunk_index, call.call_id) == (1, 0, FIRST_CALL_ID + 3)
    with pytest.raises(ValueError):
        ChunkSchedule(geo, (1000,), context_frames=7)


def _fake_output(geo, value: float) -> ChunkOutput:  # type: ignore[no-untyped-def]
    return ChunkOutput(latents=torch.full(geo.latents_shape(), float(value)), generator_calls=1, current_start_frame=0)


@pytest.mark.timeout(60)
def test_single_process_equals_tp2_shards_with_the_same_envelopes(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    single = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), torch.device("cpu"), torch.float32)
    local = run_loop(stage0, single.run, _schedule(factory, stage0), PROMPT, 4)
    assert [c.do_kv_recompute for c in local.calls] == [False, True, True, True]
    with ThreadedMesh(2) as mesh:
        shards = build_mesh(factory, PRESET, mesh)
        # the front's side: the same envelopes (copied as if they crossed a channel), decoded by stage 0
        pp1 = run_loop(stage0, mesh_runner(mesh, shards), _schedule(factory, stage0), "", 4,
                       replay=[copy_call(c) for c in local.calls])
    for a, b in zip(local.outputs, pp1.outputs, strict=True):
        assert torch.allclose(b.latents, a.latents, rtol=1e-5, atol=2e-5), (b.latents - a.latents).abs().max()
        assert (a.generator_calls, a.current_start_frame) == (b.generator_calls, b.current_start_frame)
    for fa, fb in zip(local.frames, pp1.frames, strict=True):
        assert fa.shape == fb.shape
        diff = (fa.int() - fb.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # float32 rounding at a uint8 edge


@pytest.mark.timeout(60)
def test_tp2_loop_is_bit_identical_to_its_replay(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    with ThreadedMesh(2) as mesh:
        first = run_loop(stage0, mesh_runner(mesh, build_mesh(factory, PRESET, mesh)), _schedule(factory, stage0),
                         PROMPT, 3)
        again = run_loop(stage0, mesh_runner(mesh, build_mesh(factory, PRESET, mesh)), _schedule(factory, stage0), "",
                         3, replay=first.calls)
    assert all(torch.equal(a, b) for a, b in zip(first.frames, again.frames, strict=True))
