"""The generator's math against independent oracles, on the tests' tiny checkpoint (float32, CPU):

- one block, and the whole DiT on an epoch's first chunk, equal diffusers' ``WanTransformer3DModel``
  (the same weights, keys renamed to diffusers' names with norm2 <-> norm3 swapped), at TP=1 and TP=3;
- QK RMSNorm over ALL heads computed from sharded features (one all-reduce of sums of squares) equals
  the unsharded norm;
- the recompute is exact: a chunk denoised on a cache rebuilt by the recompute pass equals one
  forward over [context, chunk] with full block-causal attention (per-frame timesteps 0 / t), with
  and without the KV attention bias (an additive log(bias) on the biased keys in the oracle);
- window-relative RoPE: shifting every position by the same amount changes nothing (relative);
- sigma(t) = the shifted table's entry nearest t; Krea's step lists.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU, PRESET
from safetensors.torch import load_file

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.dit.kv_cache import RollingKVCache
from pp1.pipelines.dit.masks import block_causal_mask
from pp1.pipelines.dit.segments import add_pending, rms_scale, sum_squares
from pp1.pipelines.dit.sharding import shard_range
from pp1.pipelines.krea import KreaOptions, KreaRun, get_model
from pp1.pipelines.krea.config import flow_table, krea_steps, parse_steps
from pp1.pipelines.krea.generator import FlowSigmas
from pp1.pipelines.threaded_comm import ThreadedMesh

CFG = get_model(PRESET)
TOL = dict(rtol=1e-4, atol=1e-4)


def to_diffusers(name: str) -> str:
    """Original Wan name -> diffusers' WanTransformer3DModel name (diffusers' conversion table, inverted)."""
    for a, b in (("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
                 ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
                 ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
                 ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
                 ("time_projection.1.", "condition_embedder.time_proj."), ("head.modulation", "scale_shift_table"),
                 ("head.head.", "proj_out."), (".modulation", ".scale_shift_table"), (".self_attn.", ".attn1."),
                 (".cross_attn.", ".attn2."), (".attn1.o.", ".attn1.to_out.0."), (".attn2.o.", ".attn2.to_out.0."),
                 (".norm3.", ".norm2."), (".ffn.0.", ".ffn.net.0.proj."), (".ffn.2.", ".ffn.net.2.")):
        name = name.replace(a, b)
    for attn in ("attn1", "attn2"):
        for n in "qkv":
            name = name.replace(f".{attn}.{n}.", f".{attn}.to_{n}.")
    return name


@pytest.fixture(scope="module")
def oracle(tiny):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
                              in_channels=16, out_channels=16, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
                              ffn_dim=CFG.ffn_dim, num_layers=CFG.num_blocks, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", eps=CFG.eps).eval()
    sd = {to_diffusers(k.removeprefix("model.")): v for k, v in load_file(str(tiny.checkpoint)).items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("norm3" not in k and "norm1" not in k for k in missing) and not [
        k for k in missing if not k.endswith(("norm_out.weight", "norm_out.bias"))], (missing, unexpected)
    return m


def build(krea, n: int):
    mesh = ThreadedMesh(n, timeout_s=60)
    gens = mesh.map(lambda r, comm: krea.build_generator(PRESET, r, n, comm, CPU, torch.float32))
    return mesh, gens


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(16, 3, 8, 8, generator=g)
    text = torch.randn(CFG.text_len, CFG.text_dim, generator=g)
    return lat, text


@pytest.mark.parametrize("tp", [1, 3])
def test_first_chunk_equals_diffusers_wan_transformer(krea, oracle, tp: int) -> None:
    lat, text = inputs()
    with torch.no_grad():
        want = oracle(lat[None], torch.tensor([750]), text[None], return_dict=False)[0][0]
    mesh, gens = build(krea, tp)

    def first_chunk(r: int, _c) -> torch.Tensor:
        m = gens[r].model
        with torch.inference_mode():
            m.cache.reset()  # nothing cached: the chunk attends to itself only
            return m.forward(lat, 750.0, 0, m.embed_text(text))

    with mesh:
        outs = mesh.map(first_chunk)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0], want, **TOL)


def test_one_block_equals_the_diffusers_block(krea, oracle) -> None:
    lat, text = inputs(1)
    with torch.no_grad():
        rope = oracle.rope(lat[None])
        x = oracle.patch_embedding(lat[None]).flatten(2).transpose(1, 2)
        _, e0, ctx, _ = oracle.condition_embedder(torch.tensor([500]), text[None], None)
        e0 = e0.unflatten(1, (6, -1))
        want = oracle.blocks[0](x, ctx, e0, rope)[0]
    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    m = gen.model
    with torch.inference_mode():
        kv = m.blocks[0].cross_kv(ctx[0], m.comm)
        m.cache.reset()
        slots, used = m.cache.plan(3)
        e0 = e0.float()
        x1, pending = m.blocks[0].forward(x[0], m.no_pending(x[0]), e0, m.rope(0, 3), m.cache, slots, used, kv,
                                          m.comm, m.kernels)
        got = add_pending(x1, *pending, e0)  # the block's last residual (the next segment adds it)
    torch.testing.assert_close(got, want, **TOL)


def test_qk_rmsnorm_over_all_heads_from_shards_equals_the_full_norm() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(10, 40, generator=g), torch.randn(40, generator=g)
    want = F.rms_norm(x, (40,), w, 1e-6)
    with ThreadedMesh(3) as mesh:
        def part(r, comm):
            a, b = shard_range(5, 3, r)  # 5 heads of 8: 2/2/1
            mine = x[:, a * 8 : b * 8]
            sq = sum_squares(mine)  # what the split segments return, all-reduced between them
            comm.all_reduce_sum_(sq)
            return rms_scale(mine, sq, w[a * 8 : b * 8], 40, 1e-6)
        got = torch.cat(mesh.map(part), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [1.0, 0.3])
def test_a_cached_chunk_equals_full_block_causal_attention_over_the_window(krea, bias: float) -> None:
    """Recompute (t=0 over 3 context frames at positions 0..2, into the cache) + one cached denoising
    step of the chunk at 3..5 == one forward over the 6 frames with block-causal attention (blocks of 3)
    and per-frame timesteps (0 for the context, t for the chunk); the bias as an additive mask."""
    g = torch.Generator().manual_seed(5)
    ctx, chunk = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    text = torch.randn(CFG.text_len, CFG.text_dim, generator=g)
    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    m, tpf = gen.model, 16
    with torch.inference_mode():
        kv = m.embed_text(text)
        m.cache.reset()
        m.forward(ctx, 0.0, 0, kv, gen.recompute_mask(3))
        m.cache.commit(3, 3)
        cached = m.forward(chunk, 750.0, 3, kv, m.cache.past_bias(3, math.log(bias), torch.float32))
        # the oracle's mask, written from the definition: query i sees key j iff j < end of i's block
        n = 6 * tpf
        q_block_end = (torch.arange(n) // (3 * tpf) + 1) * (3 * tpf)
        mask = torch.where(torch.arange(n)[None, :] < q_block_end[:, None], 0.0, float("-inf"))
        mask[3 * tpf :, tpf : 3 * tpf] += math.log(bias)  # chunk queries: bias on context frames 1..2
        m.cache.reset()  # the 6 frames attend to themselves only, through the oracle's mask
        full = m.forward(torch.cat([ctx, chunk], dim=1), torch.tensor([0.0] * 3 + [750.0] * 3), 0, kv, mask)
    torch.testing.assert_close(cached, full[:, 3:], rtol=1e-5, atol=1e-5)
    assert torch.equal(block_causal_mask(6, tpf, 3, CPU), torch.where(torch.arange(n)[None, :] < q_block_end[:, None],
                                                                      0.0, float("-inf")))


def test_kv_bias_covers_past_frames_but_the_first_and_the_chunk() -> None:
    """log(bias) on the cached frames but the oldest (the anchor), not on the chunk; over the cache's
    ring (window 3 + chunk 3 frames of 4 tokens), wherever the window starts."""
    cache = RollingKVCache(1, 1, 2, 4, 3, 3, CPU, torch.float32)
    lb = math.log(0.3)
    assert cache.past_bias(3, lb, torch.float32) is None  # first chunk: nothing cached
    cache.commit(3, 3)  # frames 0..2 in slots 0..2; the chunk goes to 3..5
    m = cache.past_bias(3, lb, torch.float32)
    assert m is not None and m.shape == (1, 24)
    assert torch.equal(m[0] != 0, torch.tensor([False] * 4 + [True] * 8 + [False] * 12))
    assert math.isclose(float(m[0, 5]), math.log(0.3), rel_tol=1e-6)
    assert cache.past_bias(3, math.log(1.0), torch.float32) is None  # bias 1: off (Krea's release)
    cache.commit(3, 6)  # window = frames 3..5 in slots 3..5; the next chunk overwrites slots 0..2
    m = cache.past_bias(3, lb, torch.float32)
    assert m is not None and torch.equal(m[0] != 0, torch.tensor([False] * 12 + [False] * 4 + [True] * 8))
    cache.commit(3, 9)  # window = frames 6..8 in slots 0..2 (oldest: slot 0); the chunk goes to 3..5
    m = cache.past_bias(3, lb, torch.float32)
    assert m is not None and torch.equal(m[0] != 0, torch.tensor([False] * 4 + [True] * 8 + [False] * 12))


def test_rope_positions_are_relative_to_the_window(krea) -> None:
    """The same recompute + chunk at positions (0..2, 3..5) and shifted by 7 give the same chunk."""
    g = torch.Generator().manual_seed(9)
    ctx, chunk = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    m = gen.model
    outs = []
    with torch.inference_mode():
        kv = m.embed_text(torch.randn(CFG.text_len, CFG.text_dim, generator=g))
        for shift in (0, 7):
            m.cache.reset()
            m.forward(ctx, 0.0, shift, kv, gen.recompute_mask(3))
            m.cache.commit(3, 3)
            outs.append(m.forward(chunk, 500.0, 3 + shift, kv, m.cache.past_bias(3, math.log(0.3), torch.float32)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_generator_places_the_chunk_after_the_context_in_window_positions(krea, monkeypatch) -> None:
    """First chunk at 0..2; a recompute of n frames at 0..n-1 and t=0, then the chunk at n..n+2."""
    from pp1.pipelines.contract import synthetic_call

    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    seen = []
    real = gen.model.forward

    def spy(latents, t, frame_start, text_kv, mask=None):
        seen.append((float(torch.as_tensor(t).reshape(-1)[0]), frame_start, latents.shape[1]))
        return real(latents, t, frame_start, text_kv, mask)

    monkeypatch.setattr(gen.model, "forward", spy)
    geo = gen.geometry
    gen.run(synthetic_call(geo, (1000, 500), call_id=1, chunk_index=0, init_cache=True))
    gen.run(synthetic_call(geo, (1000, 500), call_id=2, chunk_index=1, do_kv_recompute=True,
                           context_frames=torch.randn(16, 2, 8, 8)))
    assert seen == [(1000.0, 0, 3), (500.0, 0, 3), (0.0, 0, 2), (1000.0, 2, 3), (500.0, 2, 3)]


def test_sigma_is_the_nearest_entry_of_the_shifted_table() -> None:
    sig = FlowSigmas(5.0)
    sigmas, timesteps = flow_table(5.0)
    assert sig(1000) == 1.0
    for t in (937, 750, 500, 250, 3):
        i = int(torch.argmin((timesteps.double() - t).abs()))
        assert sig(t) == float(sigmas[i].double())
        assert abs(sig(t) - t / 1000) < 2e-3  # t/1000 on the shifted table, up to half its spacing
    s = 0.375  # unshifted 0.375 -> shifted 5s/(1+4s) = 0.75
    assert abs(5 * s / (1 + 4 * s) - 0.75) < 1e-12


def test_step_lists() -> None:
    assert parse_steps("scope") == (1000, 750, 500, 250)
    assert krea_steps(5) == (1000, 938, 833, 625, 0)  # Krea's server config list [1000, 937.5, 833.3, 625, 0]
    assert krea_steps(4) == (1000, 909, 715, 0)
    assert parse_steps("1000, 500") == (1000, 500)
    defaults = KreaOptions()
    assert defaults.steps == (1000, 750, 500, 250) and defaults.kv_bias == 0.3
    assert KreaRun(CFG, defaults).geometry().max_context_frames == 3  # Krea's kv_cache_num_frames
