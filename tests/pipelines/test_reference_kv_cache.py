"""The generator's KV cache: recompute rebuilds it from the context alone, continuity is enforced,
and the rolling window keeps exactly the newest frames."""

from __future__ import annotations

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.contract import InvalidChunkCall, synthetic_call
from pp1.pipelines.dit.kv_cache import RollingKVCache
from pp1.pipelines.local_loop import ChunkSchedule, run_loop

PRESET = "micro"


def _fresh(factory):  # type: ignore[no-untyped-def]
    return factory.build_generator(PRESET, 0, 1, SoloCommunicator(), torch.device("cpu"), torch.float32)


def test_chunk_after_recompute_equals_cache_rebuilt_from_scratch(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    gen = _fresh(factory)
    sched = ChunkSchedule(stage0.geometry, factory.timesteps(PRESET), seed=11, recompute_every=3)
    res = run_loop(stage0, gen.run, sched, "a lighthouse at night", 5)
    assert [c.do_kv_recompute for c in res.calls] == [False, False, False, True, False]
    assert [o.generator_calls for o in res.outputs] == [4, 4, 4, 5, 4]
    # a fresh generator (empty cache, other history) that recomputes from the same context
    other = _fresh(factory)
    other.run(synthetic_call(stage0.geometry, (1000, 500), call_id=0, init_cache=True, seed=99))
    for call, want in zip(res.calls[3:], res.outputs[3:], strict=True):
        got = other.run(call)
        assert torch.equal(got.latents, want.latents)
        assert got.current_start_frame == want.current_start_frame == (call.chunk_index + 1) * 3


def test_without_recompute_the_last_step_kv_is_kept(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    geo, steps = stage0.geometry, factory.timesteps(PRESET)
    a, b = _fresh(factory), _fresh(factory)
    c0 = synthetic_call(geo, steps, call_id=0, chunk_index=0, init_cache=True, seed=1)
    c1 = synthetic_call(geo, steps, call_id=1, chunk_index=1, seed=1)
    a.run(c0)
    out_a = a.run(c1)
    # same chunk 0 but a different LAST step: chunk 1 must see a different cache
    b.run(synthetic_call(geo, (*steps[:-1], 100), call_id=0, chunk_index=0, init_cache=True, seed=1))
    out_b = b.run(c1)
    assert not torch.equal(out_a.latents, out_b.latents)
    # but the same earlier steps with the same last step give the same cache
    b.run(c0)
    assert torch.equal(b.run(c1).latents, out_a.latents)


def test_continuity_is_enforced(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    geo, steps = stage0.geometry, factory.timesteps(PRESET)
    gen = _fresh(factory)
    with pytest.raises(InvalidChunkCall, match="cache is empty") as e:
        gen.run(synthetic_call(geo, steps, call_id=0, chunk_index=1))
    assert e.value.code == "cache_empty"
    gen.run(synthetic_call(geo, steps, call_id=0, chunk_index=0, init_cache=True))
    with pytest.raises(InvalidChunkCall, match="starts at latent frame 6") as e:
        gen.run(synthetic_call(geo, steps, call_id=1, chunk_index=2))  # chunk 1 skipped
    assert e.value.code == "not_contiguous"
    with pytest.raises(InvalidChunkCall) as e:
        gen.run(synthetic_call(geo, steps, call_id=1, chunk_index=1, cache_epoch=1))
    assert e.value.code == "epoch_mismatch"
    gen.run(synthetic_call(geo, steps, call_id=1, chunk_index=1))  # the right next chunk
    out = gen.run(synthetic_call(geo, steps, call_id=2, chunk_index=0, cache_epoch=1, init_cache=True,
                                 reset_cache=True))
    assert out.current_start_frame == 3
    gen.reset()
    with pytest.raises(InvalidChunkCall, match="cache is empty"):
        gen.run(synthetic_call(geo, steps, call_id=3, chunk_index=1, cache_epoch=1))


def test_bad_calls_are_refused(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    geo, steps = stage0.geometry, factory.timesteps(PRESET)
    gen = _fresh(factory)
    call = synthetic_call(geo, steps, call_id=0, chunk_index=1, do_kv_recompute=True)
    call.context_frames = None
    with pytest.raises(InvalidChunkCall, match="context_frames"):
        gen.run(call)
    call.context_frames = torch.zeros(geo.context_shape(geo.max_context_frames + 1))
    with pytest.raises(InvalidChunkCall, match="1 <= T <= 6"):
        gen.run(call)
    bad = synthetic_call(geo, steps, call_id=0, init_cache=True)
    bad.noise = bad.noise[:, :2]
    with pytest.raises(InvalidChunkCall, match=r"call\.noise\.shape"):
        gen.run(bad)
    with pytest.raises(InvalidChunkCall, match="at least one"):
        gen.run(synthetic_call(geo, (), call_id=0, init_cache=True))


def _positions(cache: RollingKVCache, frames: int) -> list[int]:
    """Write a chunk whose keys hold their frame position; return the frame positions attended."""
    start = cache.end_frame
    k = torch.arange(start, start + frames).repeat_interleave(cache.tokens_per_frame).float()[:, None, None]
    keys, _ = cache.write(0, k, k)
    return sorted({int(x) for x in keys[0, :, 0].tolist()})


@pytest.mark.parametrize("ctx", [None, 1, 3, 4, 6])
def test_rolling_window_keeps_the_newest_frames(ctx: int | None) -> None:
    window, chunk = 6, 3
    cache = RollingKVCache(1, 1, 1, 2, window, chunk, torch.device("cpu"), torch.float32)
    end = 0
    if ctx is not None:  # a recompute: context frames just before frame 30
        end = 30
        cache.reset()
        k = torch.arange(end - ctx, end).repeat_interleave(2).float()[:, None, None]
        cache.end_frame = end - ctx
        cache.write(0, k, k)
        cache.commit(ctx, end)
    for _ in range(6):
        seen = _positions(cache, chunk)
        first_cached = max(end - window, 30 - ctx if ctx else 0)
        assert seen == list(range(first_cached, end + chunk)), (end, seen)
        cache.commit(chunk, end + chunk)
        end += chunk
