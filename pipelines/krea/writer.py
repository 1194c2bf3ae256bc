"""Write checkpoints in the released layout (original Wan names, ``model.`` prefix) with random
weights: the tests' tiny checkpoints, and a full-size 14B file for the GPU load check.

``write_safetensors`` streams: the header first, then one tensor at a time (a 14B file never sits
in memory whole). The format is safetensors' own (8-byte little-endian header length, JSON header
with dtype / shape / data_offsets, packed data); ``safetensors`` reads it back (tested).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .checkpoint import DTYPE_SIZES, PREFIX, expected_tensors
from .config import KreaModelConfig

_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}


def write_safetensors(
    path: Path | str,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    order: Iterable[str] | None = None,
) -> int:
    """Write ``specs`` (key -> (shape, dtype)) with each tensor from ``make(key)``; returns the file size."""
    keys = list(order or specs)
    header: dict[str, dict] = {}
    offset = 0
    for k in keys:
        shape, dtype = specs[k]
        n = math.prod(shape) * DTYPE_SIZES[_NAMES[dtype]]
        header[k] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section (as safetensors does)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for k in keys:
            shape, dtype = specs[k]
            t = make(k)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{k}: made {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
            fh.write(memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def random_weight(name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A weight with a sensible scale (so a forward pass stays finite): norms ~1, biases small,
    matrices ~ 1/sqrt(fan_in), the modulations ~ 1/sqrt(dim) (Wan's init)."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=gen, device=device)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if name.endswith("modulation"):
        fan_in = shape[-1]
    return torch.randn(shape, generator=gen, device=device) * fan_in**-0.5


def write_random_checkpoint(
    path: Path | str,
    cfg: KreaModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prefix: str = PREFIX,
    drop: tuple[str, ...] = (),
    override: dict[str, torch.Tensor] | None = None,
) -> int:
    """A random checkpoint of ``cfg`` in the released layout. ``drop``: names to leave out;
    ``override``: name -> tensor written instead (tests of bad files). Returns the file size."""
    device = torch.device(device)
    override = override or {}
    specs = {}
    for name, shape in expected_tensors(cfg).items():
        if name in drop:
            continue
        t = override.get(name)
        specs[prefix + name] = (tuple(t.shape), t.dtype) if t is not None else (shape, dtype)

    def make(key: str) -> torch.Tensor:
        name = key[len(prefix):]
        if name in override:
            return override[name]
        g = torch.Generator(device=device).manual_seed(hash_seed(seed, name))
        return random_weight(name, specs[key][0], g, device).to(dtype)

    return write_safetensors(path, specs, make)


def hash_seed(seed: int, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1
