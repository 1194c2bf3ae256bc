"""Stage 0 on tiny files: UMT5 through transformers (folder and Wan-named file alike; padding zeroed;
equal to the model run directly), the Wan 2.1 VAE's streaming decode (9 then 12 frames, equal to one
whole decode, cleared by a hard cut, undisturbed by a re-encode), and Krea's context-frame rule as the
front builds it (context_source "reencode" with 3 context frames)."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from conftest import CPU, PRESET, STEPS, options_with

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.krea import factory
from pp1.pipelines.local_loop import ChunkSchedule, run_loop


@pytest.fixture(scope="module")
def stage0(krea):
    return krea.build_stage0(PRESET, CPU, torch.float32)


def test_umt5_conditioning_equals_the_encoder_run_directly(stage0, tiny) -> None:
    from transformers import UMT5EncoderModel

    cond = stage0.encode_prompt("a  red fox &amp; the   sea")
    tok = stage0.text.tokenizer(["a red fox & the sea"], padding="max_length", max_length=16, return_tensors="pt")
    n = int(tok["attention_mask"].sum())
    assert n == 7  # six words + EOS
    with torch.no_grad():
        want = UMT5EncoderModel.from_pretrained(str(tiny.text_encoder))(**tok).last_hidden_state[0]
    assert cond.shape == (16, 32)
    torch.testing.assert_close(cond[:n], want[:n], rtol=1e-5, atol=1e-5)
    assert torch.equal(cond[n:], torch.zeros(16 - n, 32))  # padding zeroed (Wan)
    wan = factory().with_options(options_with(tiny, text_encoder=tiny.text_encoder_wan)).build_stage0(
        PRESET, CPU, torch.float32)  # the same weights as one file with Wan's T5 names
    assert torch.equal(wan.encode_prompt("a red fox & the sea"), cond)


def test_streaming_decode_equals_one_whole_decode_and_a_hard_cut_restarts(stage0) -> None:
    vae = stage0.vae.vae
    lat = torch.randn(16, 9, 8, 8, generator=torch.Generator().manual_seed(2))
    parts = [stage0.vae.decode(lat[:, i : i + 3], first_chunk=i == 0) for i in (0, 3, 6)]
    assert [p.shape[0] for p in parts] == [9, 12, 12]
    with torch.no_grad():
        whole = vae.decode(lat[None] * stage0.vae.std + stage0.vae.mean).sample[0].transpose(0, 1)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)
    again = stage0.vae.decode(lat[:, :3], first_chunk=True)  # hard cut: the cache starts over
    assert torch.equal(again, parts[0])


def test_a_one_frame_reencode_does_not_disturb_the_streaming_state(stage0) -> None:
    lat = torch.randn(16, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    first = stage0.decode(lat[:, :3], first_chunk=True)
    plain = stage0.decode(lat[:, 3:], first_chunk=False)
    stage0.decode(lat[:, :3], first_chunk=True)
    ctx = stage0.encode(first[-1:])  # Krea: the oldest of the last 9 decoded frames, re-encoded
    assert ctx.shape == (16, 1, 8, 8) and ctx.dtype == torch.float32
    assert torch.equal(stage0.decode(lat[:, 3:], first_chunk=False), plain)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        stage0.encode(first[:4])


def test_noise_is_scopes_per_chunk_seeding(stage0) -> None:
    a = stage0.make_noise(42, 2)
    g = torch.Generator().manual_seed(42 + 6)  # base_seed + the chunk's first latent frame
    assert torch.equal(a, torch.randn(3, 16, 8, 8, generator=g).permute(1, 0, 2, 3))
    assert not torch.equal(a, stage0.make_noise(42, 3))


def test_the_fronts_reencode_rule_is_kreas_context_rule(krea, stage0) -> None:
    """Krea / Scope: chunk 1's context = [the epoch's first latent, the 2 newest latents]; chunk k >= 2:
    [VAE re-encode of the oldest of the last 9 decoded frames, the 2 newest latents]. The front's
    rule with 3 context frames (geometry.max_context_frames) and context_source "reencode" sends exactly that."""
    gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    sched = ChunkSchedule(stage0.geometry, STEPS, seed=5, recompute_every=1, context_source="reencode")
    res = run_loop(stage0, gen.run, sched, "a calm sea at dawn", 5)
    decoded: deque[torch.Tensor] = deque(maxlen=1 + (3 - 1) * 4)  # Krea's decoded_frame_buffer: 9 frames
    latents: list[torch.Tensor] = []
    for k, (call, out, frames) in enumerate(zip(res.calls, res.outputs, res.frames, strict=True)):
        if k == 0:
            assert not call.do_kv_recompute
        else:
            newest = torch.cat(latents, dim=1)[:, -2:]
            anchor = latents[0][:, :1] if k == 1 else stage0.encode(decoded[0][None])
            assert torch.equal(call.context_frames, torch.cat([anchor, newest], dim=1)), k
        latents.append(out.latents)
        decoded.extend(frames)
    assert sched.reencoded == 3


def test_the_smoke_checks_verdict_tells_video_from_noise() -> None:
    from pp1.pipelines.krea.smoke import looks_like_video, video_stats

    noise = torch.randint(0, 256, (8, 32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    moving = torch.stack([(128 + 100 * torch.sin((x + 2 * t) / 8) * torch.cos(y / 9)) for t in range(8)])
    video = moving[..., None].expand(8, 32, 48, 3).clamp(0, 255).to(torch.uint8)
    assert not looks_like_video(video_stats(noise)) and looks_like_video(video_stats(video))
    assert not looks_like_video(video_stats(torch.full((8, 32, 48, 3), 90, dtype=torch.uint8)))
