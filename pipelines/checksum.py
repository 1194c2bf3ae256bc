"""A cheap, exact checksum of tensors as held (the drift tripwires: a call's inputs as every mesh rank
received them, a shard's weights as held now vs at load). Exact bytes of a strided sample of each tensor
(at most ``SAMPLE`` elements a tensor, spread over all of it), its shape and dtype, through BLAKE2b:
deterministic on every rank and run, and cheap enough to leave on (a small copy per tensor)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

SAMPLE = 4096


def checksum(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        sample = flat[::stride].contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(sample.view(torch.uint8).cpu().numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def held_tensors(obj: object, skip: tuple[str, ...] = ("_", "cache", "compiler"), _depth: int = 0) -> list[torch.Tensor]:
    """Every tensor an object (a model shard: attributes, lists, nested objects) holds, in attribute order,
    skipping attributes whose name starts with one of ``skip`` (state that changes every call, and private
    derived state such as tables built on first use)."""
    out: list[torch.Tensor] = []
    if _depth > 6:
        return out
    items = vars(obj).items() if hasattr(obj, "__dict__") else []
    for name, value in items:
        if name.startswith(skip):
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, list | tuple):
            for v in value:
                if isinstance(v, torch.Tensor):
                    out.append(v)
                elif hasattr(v, "__dict__"):
                    out.extend(held_tensors(v, skip, _depth + 1))
        elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__.startswith("pp1."):
            out.extend(held_tensors(value, skip, _depth + 1))
    return out
