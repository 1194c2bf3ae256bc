"""Memory preflight of a mesh rank: weights + KV caches + working memory, checked against the
device's free memory BEFORE any weight is loaded (a rank that cannot fit fails its load, and the
load vote fails every rank with this message).

Weights: this rank's elements of every checkpoint tensor (rows / columns of its heads and FFN
columns, the rest whole) at the run dtype. KV: self-attention window (context + chunk frames) and
the cross-attention K/V, both for this rank's heads. Working memory: the residual stream and the
largest per-block intermediates of one forward over a chunk (or the context, whichever is bigger),
attention scores if SDPA materialises them, plus a fixed margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dit.sharding import ShardPlan
from .checkpoint import CheckpointInfo, expected_tensors
from .config import KreaRun

GIB = 1 << 30
MARGIN = 1 * GIB  # allocator fragmentation, CUDA workspaces, small tensors


class MemoryPreflightError(RuntimeError):
    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    cross_kv: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.cross_kv + self.working

    def describe(self) -> str:
        g = GIB
        return (f"{self.total / g:.2f} GiB = weights {self.weights / g:.2f} + KV {self.kv_cache / g:.2f} + "
                f"cross-KV {self.cross_kv / g:.2f} + working {self.working / g:.2f}")


def shard_elements(name: str, shape: tuple[int, ...], plan: ShardPlan) -> int:
    """Elements of tensor ``name`` (original name) that rank ``plan`` loads."""
    n = 1
    for s in shape:
        n *= s
    a0, a1 = plan.head_features
    c0, c1 = plan.ffn_cols
    full_dim = plan.num_heads * plan.head_dim
    if ".self_attn." in name or ".cross_attn." in name:
        if name.endswith((".o.bias",)):
            return n
        return n * (a1 - a0) // full_dim  # rows of q/k/v (+ biases, norms) or columns of o
    if ".ffn.0." in name or name.endswith(".ffn.2.weight"):
        return n * (c1 - c0) // plan.ffn_dim
    return n


def estimate(run: KreaRun, plan: ShardPlan, dtype: torch.dtype) -> MemoryEstimate:
    cfg = run.model
    size = torch.empty(0, dtype=dtype).element_size()
    weights = sum(shard_elements(k, s, plan) for k, s in expected_tensors(cfg).items()) * size
    hl, hd, tpf = plan.local_heads, cfg.head_dim, run.tokens_per_frame
    kv = 2 * cfg.num_blocks * cfg.window_frames * tpf * hl * hd * size
    cross = 2 * cfg.num_blocks * cfg.text_len * hl * hd * size
    n = max(cfg.chunk_frames, cfg.context_frames) * tpf  # tokens of one forward
    keys = cfg.window_frames * tpf
    working = (
        6 * n * cfg.dim * 4  # residual stream and norms in float32
        + n * 3 * hl * hd * size * 3  # fused qkv, roped q / k
        + 2 * n * plan.local_ffn * size  # FFN hidden (and its activation)
        + hl * n * keys * 4  # attention scores if the kernel materialises them (CPU, masked SDPA)
        + n * keys * 4  # the KV bias / block-causal mask
    )
    return MemoryEstimate(weights, kv, cross, working + MARGIN)


def preflight(
    run: KreaRun, plan: ShardPlan, info: CheckpointInfo, device: torch.device, dtype: torch.dtype, enforce: bool
) -> MemoryEstimate:
    """The estimate; on CUDA with ``enforce``, refuse if it exceeds the device's free memory."""
    est = estimate(run, plan, dtype)
    if enforce and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if est.total > free:
            raise MemoryPreflightError(
                f"krea generator, mesh rank {plan.mesh_rank}/{plan.mesh_size} on {device}: needs about "
                f"{est.describe()} but {free / GIB:.2f} of {total / GIB:.2f} GiB are free ({info.path}); use "
                "more mesh ranks (--tp), a smaller resolution, or --pipeline-option memory_check=off")
    return est
