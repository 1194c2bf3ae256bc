"""Hypothesis strategies for protocol messages and the tensors they announce (shared by the
protocol tests; not a test module)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from pp1.protocol.codec import torch_dtype
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import (
    T_CONDITIONING,
    T_CONTEXT,
    T_LATENTS_OUT,
    T_NOISE,
    Action,
    ErrorCode,
    PPEnvelopeV1,
    PPResultV1,
    ReadyV1,
    TPHeaderV1,
)
from pp1.protocol.tensors import SUPPORTED_DTYPES, TensorSpec

ids = st.integers(min_value=0, max_value=2**63)
small = st.integers(min_value=0, max_value=2**31)
seeds = st.integers(min_value=0, max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
names = st.text(min_size=1, max_size=64)
dtypes = st.sampled_from(sorted(SUPPORTED_DTYPES))
shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4).map(tuple)

specs = st.builds(TensorSpec, name=names, dtype=dtypes, shape=shapes)
spec_tuples = st.lists(specs, max_size=4).map(tuple)


def make_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Deterministic contents of a spec's tensor (random bits for floats and ints alike)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(spec.dtype)
    if dtype.is_floating_point:
        return (torch.randn(spec.shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, spec.shape, generator=g, dtype=dtype)


envelopes = st.builds(
    PPEnvelopeV1,
    action=st.sampled_from(list(Action)),
    call_id=ids,
    chunk_index=small,
    cache_epoch=small,
    init_cache=st.booleans(),
    reset_cache=st.booleans(),
    do_kv_recompute=st.booleans(),
    num_denoising_steps=st.integers(0, 50),
    timesteps=st.lists(st.integers(-5, 5000), max_size=8).map(tuple),
    expected_generator_calls=st.integers(0, 51),
    seed=seeds,
    tensors=spec_tuples,
)

results = st.builds(
    PPResultV1,
    action=st.sampled_from(list(Action)),
    ok=st.booleans(),
    error_code=st.none() | st.sampled_from(list(ErrorCode)),
    error_message=st.text(max_size=200),
    call_id=ids,
    chunk_index=small,
    cache_epoch=small,
    observed_generator_calls=small,
    current_start_frame=small,
    timings_ms=st.dictionaries(st.text(max_size=20), finite, max_size=5),
    tensors=spec_tuples,
)

tp_headers = st.builds(
    TPHeaderV1,
    action=st.sampled_from(list(Action)),
    call_id=ids,
    chunk_index=small,
    cache_epoch=small,
    init_cache=st.booleans(),
    reset_cache=st.booleans(),
    do_kv_recompute=st.booleans(),
    timesteps=st.lists(st.integers(-5, 5000), max_size=8).map(tuple),
    seed=seeds,
    tensors=spec_tuples,
)

readies = st.builds(
    ReadyV1,
    mesh_size=st.integers(1, 64),
    warmup_chunks=st.integers(0, 8),
    warmup_ms=st.lists(finite, max_size=8).map(tuple),
    fingerprint=st.text(max_size=64),
    tensors=spec_tuples,
)

any_message = st.one_of(envelopes, results, tp_headers, readies)


@st.composite
def message_with_tensors(draw: st.DrawFn, messages: st.SearchStrategy = any_message):
    msg = draw(messages)
    seed = draw(st.integers(0, 2**32 - 1))
    return msg, [make_tensor(s, seed + i) for i, s in enumerate(msg.tensors)]


# -- valid chunk traffic for a random geometry --------------------------------------------------------

geometries = st.builds(
    ChunkGeometry,
    latent_channels=st.integers(1, 4),
    latent_frames=st.integers(1, 3),
    latent_height=st.integers(1, 4),
    latent_width=st.integers(1, 4),
    text_len=st.integers(1, 4),
    text_dim=st.integers(1, 8),
    max_context_frames=st.integers(1, 6),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)

timestep_lists = st.lists(st.integers(1, 1000), min_size=1, max_size=6, unique=True).map(
    lambda ts: tuple(sorted(ts, reverse=True))
)


@st.composite
def valid_infer(draw: st.DrawFn, geometry: ChunkGeometry):
    """A preflight-valid INFER envelope for ``geometry`` and tensors that match it."""
    recompute = draw(st.booleans())
    init = False if recompute else draw(st.booleans())
    ts = draw(timestep_lists)
    spec_list = [
        TensorSpec(name=T_CONDITIONING, dtype=geometry.dtype, shape=geometry.conditioning_shape()),
        TensorSpec(name=T_NOISE, dtype=geometry.dtype, shape=geometry.noise_shape()),
    ]
    if recompute:
        frames = draw(st.integers(1, geometry.max_context_frames))
        spec_list.append(
            TensorSpec(name=T_CONTEXT, dtype=geometry.dtype, shape=geometry.context_shape(frames))
        )
    env = PPEnvelopeV1(
        action=Action.INFER,
        call_id=draw(st.integers(1, 2**40)),
        chunk_index=draw(small),
        cache_epoch=draw(small),
        init_cache=init,
        reset_cache=draw(st.booleans()),
        do_kv_recompute=recompute,
        num_denoising_steps=len(ts),
        timesteps=ts,
        expected_generator_calls=len(ts) + int(recompute),
        seed=draw(seeds),
        tensors=tuple(spec_list),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return env, [make_tensor(s, seed + i) for i, s in enumerate(env.tensors)]


def latents_spec(geometry: ChunkGeometry) -> TensorSpec:
    return TensorSpec(name=T_LATENTS_OUT, dtype=geometry.dtype, shape=geometry.latents_shape())
