"""The generator through the front's schedule (pipelines/local_loop.py), on the tiny checkpoint:
TP=1, TP=2 and TP=3 (uneven: heads 2/1/1, FFN 22/21/21) give the same latents over several chunks
(get_slice loading on every rank), cross-attention K/V are computed only when the conditioning
changes, the call count is steps + recompute, a call that breaks the cache's continuity is refused,
and the contract suite passes at TP=1 and TP=3."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU, PRESET, STEPS

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.contract import InvalidChunkCall, check_pipeline, synthetic_call
from pp1.pipelines.local_loop import ChunkSchedule, copy_call
from pp1.pipelines.threaded_comm import ThreadedMesh

CHUNKS = 5


def run_schedule(krea, n: int, prompts: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """CHUNKS chunks (recompute every chunk, context = the last 3 latents) with conditioning
    ``prompts[k]`` (a seed) on chunk k; returns the latents and each rank's text_embeds counts."""
    geo = krea.geometry(PRESET)
    sched = ChunkSchedule(geo, STEPS, seed=11, recompute_every=1)
    conds = {p: torch.randn(geo.conditioning_shape(), generator=torch.Generator().manual_seed(p)) for p in prompts}
    with ThreadedMesh(n, timeout_s=60) as mesh:
        gens = mesh.map(lambda r, comm: krea.build_generator(PRESET, r, n, comm, CPU, torch.float32))
        out = []
        for k in range(CHUNKS):
            noise = torch.randn(geo.noise_shape(), generator=torch.Generator().manual_seed(100 + k))
            call = sched.next_call(conds[prompts[k]], noise)
            res = mesh.map(lambda r, _c, call=call: gens[r].run(copy_call(call)))
            assert all(torch.equal(res[0].latents, o.latents) for o in res[1:]), f"ranks differ at chunk {k}"
            assert res[0].generator_calls == len(STEPS) + (1 if call.do_kv_recompute else 0)
            sched.record(res[0])
            out.append(res[0].latents)
        return out, [g.model.text_embeds for g in gens]


def test_tp1_tp2_tp3_give_the_same_latents_over_several_chunks(krea) -> None:
    prompts = [1] * CHUNKS
    ref, _ = run_schedule(krea, 1, prompts)
    for n in (2, 3):
        got, _ = run_schedule(krea, n, prompts)
        for k, (a, b) in enumerate(zip(ref, got, strict=True)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"TP={n} chunk {k}")
    assert all(torch.isfinite(x).all() for x in ref)


def test_cross_attention_kv_recomputed_only_when_the_conditioning_changes(krea) -> None:
    _, counts = run_schedule(krea, 2, [1, 1, 2, 2, 1])
    assert counts == [3, 3]  # prompt 1, then 2, then 1 again


def test_a_call_that_breaks_the_cache_is_refused(krea) -> None:
    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    geo = gen.geometry
    with pytest.raises(InvalidChunkCall, match="cache_empty|empty"):
        gen.run(synthetic_call(geo, STEPS, call_id=1, chunk_index=1))
    gen.run(synthetic_call(geo, STEPS, call_id=2, chunk_index=0, init_cache=True))
    with pytest.raises(InvalidChunkCall, match="starts at latent frame 6"):
        gen.run(synthetic_call(geo, STEPS, call_id=3, chunk_index=2))
    out = gen.run(synthetic_call(geo, STEPS, call_id=4, chunk_index=1))  # continues without a recompute
    assert out.current_start_frame == 6 and out.generator_calls == len(STEPS)


@pytest.mark.parametrize("mesh_size", [1, 3])
def test_the_pipeline_passes_the_contract_suite(krea, mesh_size: int) -> None:
    assert check_pipeline(krea, PRESET, mesh_size) == []
