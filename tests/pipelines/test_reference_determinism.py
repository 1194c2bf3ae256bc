"""Same seeds -> same frames, run after run; a new prompt or seed -> a different video; the VAE's shapes
and its causal state across chunks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.local_loop import ChunkSchedule, run_loop
from pp1.pipelines.reference.generator import ReferenceGenerator
from pp1.pipelines.reference.presets import get_preset
from pp1.pipelines.reference.vae import ReferenceVAE

PRESET = "tiny"
CPU = torch.device("cpu")


def _video(factory, prompt: str, seed: int, chunks: int = 2):  # type: ignore[no-untyped-def]
    stage0 = factory.build_stage0(PRESET, CPU, torch.float32)
    gen = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    sched = ChunkSchedule(stage0.geometry, factory.timesteps(PRESET), seed=seed, recompute_every=1)
    return run_loop(stage0, gen.run, sched, prompt, chunks).frames


def _mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.float() - y.float()).abs().mean() for x, y in zip(a, b, strict=True)) / len(a))


def test_same_seeds_same_frames_and_prompt_or_seed_changes_them(factory) -> None:  # type: ignore[no-untyped-def]
    base = _video(factory, "a red fox running", seed=1)
    again = _video(factory, "a red fox running", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(base, again, strict=True))
    assert [tuple(f.shape) for f in base] == [(9, 128, 128, 3), (12, 128, 128, 3)]
    assert _mean_abs(base, _video(factory, "a blue whale diving", seed=1)) > 5.0  # visible (0..255)
    assert _mean_abs(base, _video(factory, "a red fox running", seed=2)) > 20.0


def test_stage0_is_deterministic_and_the_vae_has_wan_shapes(stage0) -> None:  # type: ignore[no-untyped-def]
    geo = stage0.geometry
    c = stage0.encode_prompt("Hello, world")
    assert c.shape == geo.conditioning_shape() and c.dtype == torch.float32
    assert torch.equal(c, stage0.encode_prompt("hello , WORLD"))  # case and spacing do not matter
    assert not torch.equal(c, stage0.encode_prompt("hello world"))
    assert stage0.encode_prompt("").abs().sum() == 0
    n = stage0.make_noise(3, 4)
    assert torch.equal(n, stage0.make_noise(3, 4)) and not torch.equal(n, stage0.make_noise(3, 5))
    g = torch.Generator().manual_seed(0)
    lat, lat2 = (torch.randn(geo.latents_shape(), generator=g) for _ in range(2))
    first, later = stage0.decode(lat, first_chunk=True), stage0.decode(lat2, first_chunk=False)
    hw = (geo.latent_height * 8, geo.latent_width * 8, 3)
    assert first.dtype == later.dtype == torch.uint8
    assert tuple(first.shape) == (9, *hw) and tuple(later.shape) == (12, *hw)
    assert first.float().std() > 20.0 and 20.0 < first.float().mean() < 235.0  # a picture, not a saturated one
    # deterministic, and stateful like Wan's streaming decode: a chunk continues the one before it
    assert torch.equal(stage0.decode(lat, first_chunk=True), first)
    assert torch.equal(stage0.decode(lat2, first_chunk=False), later)
    stage0.decode(lat2, first_chunk=True)
    assert not torch.equal(stage0.decode(lat2, first_chunk=False), later)  # another past, other frames
    # encode: Wan's shapes (4k+1 frames: causal start; 4k: continuation), the run dtype; not an inverse
    for frames, t in ((first, geo.latent_frames), (later, geo.latent_frames), (first[:1], 1)):
        z = stage0.encode(frames)
        assert z.shape == geo.context_shape(t) and z.dtype == torch.float32 and bool(z.isfinite().all())
        assert torch.equal(z, stage0.encode(frames))
    assert not torch.equal(stage0.encode(first), stage0.encode(stage0.decode(lat2, first_chunk=True)))
    with pytest.raises(ValueError):
        stage0.encode(first[:3])


def test_vae_decodes_a_stream_in_chunks_as_in_one_piece() -> None:
    """Chunked decode with the carried causal state equals decoding the whole latent video at once
    (what Wan's frame-by-frame decode with its feat_cache computes)."""
    vae = ReferenceVAE(get_preset("micro"), CPU, torch.float32)
    lat = torch.randn(16, 9, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(lat, first_chunk=True)
    parts = [vae.decode(lat[:, :3], first_chunk=True)] + [vae.decode(lat[:, i : i + 3], False) for i in (3, 6)]
    assert [p.shape[0] for p in parts] == [9, 12, 12] and whole.shape[0] == 33
    assert (torch.cat(parts).int() - whole.int()).abs().max() <= 1


def test_fingerprint_is_stable_and_follows_the_weights(factory) -> None:  # type: ignore[no-untyped-def]
    a = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    b = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)
    assert a.fingerprint() == b.fingerprint() and a.shard_digest() == b.shard_digest()
    other = dataclasses.replace(get_preset(PRESET), weight_seed=1)
    c = ReferenceGenerator(other, 0, 1, SoloCommunicator(), CPU, torch.float32)
    assert c.fingerprint().split("/")[-1] != a.fingerprint().split("/")[-1]
    bf = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.bfloat16)
    assert bf.fingerprint() != a.fingerprint()
