"""Running one mesh rank's generator shard: the ChunkCall built from a TP header and its tensors, and
the tensors of a WARMUP header (made from its seed, identically on every mesh rank)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from pp1.pipelines.interface import ChunkCall, ChunkOutput, Generator
from pp1.protocol.codec import torch_dtype
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, TPHeaderV1


def warmup_tensors(header: TPHeaderV1, device: torch.device) -> list[torch.Tensor]:
    """The tensors a WARMUP header announces, drawn from ``header.seed`` (same on every rank)."""
    g = torch.Generator().manual_seed(int(header.seed))
    return [
        torch.randn(tuple(s.shape), generator=g, dtype=torch.float32).to(torch_dtype(s.dtype)).to(device)
        for s in header.tensors
    ]


def chunk_call(header: TPHeaderV1, tensors: Sequence[torch.Tensor]) -> ChunkCall:
    """The pipeline's view of a call: the header's call parameters (all but the action) and its tensors."""
    named = dict(zip(header.tensor_names(), tensors, strict=True))
    params = {k: v for k, v in header.call_params().items() if k != "action"}
    return ChunkCall(**params, conditioning=named[T_CONDITIONING], noise=named[T_NOISE],
                     context_frames=named.get(T_CONTEXT))


def run_shard(generator: Generator, header: TPHeaderV1, tensors: Sequence[torch.Tensor]) -> tuple[ChunkOutput, float]:
    """Run the call; returns the output and the wall time in ms (synchronised on GPUs)."""
    t0 = time.perf_counter()
    out = generator.run(chunk_call(header, tensors))
    if out.latents.is_cuda:
        torch.cuda.synchronize(out.latents.device)
    return out, (time.perf_counter() - t0) * 1000
