"""The generator's checkpoint: one safetensors file with the original Wan key names, every key
prefixed ``model.`` (Krea's release; an unprefixed file is accepted too).

Validation reads only the header (8 bytes of length + JSON): every tensor the preset needs is
present with the right shape and a float dtype, and the file is long enough for every tensor's
data (a truncated download is refused before any rank loads). Errors name the file and the key.

``fingerprint``: a digest of the header (names, dtypes, shapes, offsets), the file size and 16
samples of 4 KiB of the data: equal on every rank reading the same file, different for another
file (another layout, or the same layout with other weights).

``ShardReader`` reads one rank's slices with ``safe_open(...).get_slice``: q/k/v/FFN-up by rows,
o/FFN-down by columns, the rest whole (see the shard table in pipelines/krea/README.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import KreaModelConfig

PREFIX = "model."
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32")
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
SAMPLES, SAMPLE_BYTES = 16, 4096  # data sampled into the fingerprint


class CheckpointError(ValueError):
    """The checkpoint cannot serve the preset: names the file, the key (or "file") and what is wrong."""

    def __init__(self, path: Path | str, key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        super().__init__(f"checkpoint {path}: {key}: {reason}")


def expected_tensors(cfg: KreaModelConfig) -> dict[str, tuple[int, ...]]:
    """Original Wan 2.1 names (no prefix) -> shapes, for every tensor the generator loads."""
    d, f, pf = cfg.dim, cfg.ffn_dim, cfg.patch_features
    out: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.latent_channels, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (pf, d),
        "head.head.bias": (pf,),
    }
    for i in range(cfg.num_blocks):
        p = f"blocks.{i}."
        out[p + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                out[f"{p}{attn}.{n}.weight"] = (d, d)
                out[f"{p}{attn}.{n}.bias"] = (d,)
            out[f"{p}{attn}.norm_q.weight"] = (d,)
            out[f"{p}{attn}.norm_k.weight"] = (d,)
        out[p + "norm3.weight"] = (d,)
        out[p + "norm3.bias"] = (d,)
        out[p + "ffn.0.weight"] = (f, d)
        out[p + "ffn.0.bias"] = (f,)
        out[p + "ffn.2.weight"] = (d, f)
        out[p + "ffn.2.bias"] = (d,)
    return out


@dataclass(frozen=True)
class TensorEntry:
    key: str  # as stored (with its prefix)
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    raw: bytes  # the JSON header as stored
    tensors: dict[str, TensorEntry]

    def digest(self) -> str:
        """sha256 of the header (names, dtypes, shapes, offsets), the file size and SAMPLES of the data
        (``SAMPLES`` reads of ``SAMPLE_BYTES`` at fixed, evenly spaced offsets): equal on every rank and
        host reading the same bytes, different for another file even with the same layout; cheap
        (no full read of a 28 GB file)."""
        h = hashlib.sha256()
        h.update(self.raw)
        h.update(struct.pack("<Q", self.file_size))
        data0, data_len = 8 + len(self.raw), self.file_size - 8 - len(self.raw)
        with open(self.path, "rb") as fh:
            for i in range(SAMPLES):
                fh.seek(data0 + (data_len - SAMPLE_BYTES) * i // (SAMPLES - 1) if data_len > SAMPLE_BYTES else data0)
                h.update(fh.read(SAMPLE_BYTES))
        return h.hexdigest()[:24]


def read_header(path: Path | str) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file (no tensor data read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file", "not found (or not a file)")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, "file", f"{size} bytes: truncated or not a safetensors file")
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(path, "file", f"header length {n} does not fit the file ({size} bytes): "
                                  "truncated or not a safetensors file")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, "file", f"the header is not JSON ({exc}): not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "file", "the header is not a JSON object: not a safetensors file")
    data_len = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, key, f"malformed header entry {meta!r}") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(path, key, f"unknown dtype {dtype!r}")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise CheckpointError(path, key, f"data_offsets [{begin}, {end}) do not hold a {dtype} tensor of "
                                  f"shape {list(shape)}")
        if end > data_len:
            raise CheckpointError(path, key, f"its data ends at byte {end} of the data section but the file has "
                                  f"only {data_len}: the file is truncated")
        tensors[key] = TensorEntry(key, dtype, shape, int(begin), int(end))
    return SafetensorsHeader(path, size, raw, tensors)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checked checkpoint: its header, the key prefix, and the config it was checked against."""

    header: SafetensorsHeader
    prefix: str
    model: KreaModelConfig

    @property
    def path(self) -> Path:
        return self.header.path

    def entry(self, name: str) -> TensorEntry:
        return self.header.tensors[self.prefix + name]

    def fingerprint(self) -> str:
        return f"krea/{self.model.name}/{self.header.digest()}"


def detect_prefix(header: SafetensorsHeader) -> str:
    keys = [k for k in header.tensors]
    if keys and all(k.startswith(PREFIX) for k in keys):
        return PREFIX
    return ""


def validate_checkpoint(path: Path | str, cfg: KreaModelConfig) -> CheckpointInfo:
    """The header holds every tensor ``cfg`` needs, with its shape and a float dtype; else CheckpointError."""
    header = read_header(path)
    prefix = detect_prefix(header)
    if not header.tensors:
        raise CheckpointError(path, "file", "holds no tensors")
    for name, shape in expected_tensors(cfg).items():
        key = prefix + name
        entry = header.tensors.get(key)
        if entry is None:
            raise CheckpointError(path, key, f"missing (preset {cfg.name} needs it, shape {list(shape)}; keys "
                                  f"look like {next(iter(header.tensors))!r})")
        if entry.shape != shape:
            raise CheckpointError(path, key, f"shape {list(entry.shape)} does not match preset {cfg.name}: "
                                  f"expected {list(shape)}")
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(path, key, f"dtype {entry.dtype}, expected one of {', '.join(FLOAT_DTYPES)}")
    extra_blocks = sorted({int(k[len(prefix):].split(".")[1]) for k in header.tensors
                           if k.startswith(prefix + "blocks.") and k[len(prefix):].split(".")[1].isdigit()}
                          - set(range(cfg.num_blocks)))
    if extra_blocks:
        raise CheckpointError(path, f"{prefix}blocks.{extra_blocks[0]}", f"the file has more blocks than preset "
                              f"{cfg.name} ({cfg.num_blocks}): another model?")
    return CheckpointInfo(header, prefix, cfg)


class ShardReader:
    """Reads whole tensors and row / column slices of one checked checkpoint onto ``device`` in ``dtype``
    (``safe_open(...).get_slice``: only the slice's bytes are copied). Counts what it loaded. A
    ``dit.block.ShardSource``: ``shape`` is the tensor's logical shape (``full`` reshapes the file's,
    e.g. the patch embedding's Conv3d weight to its matrix, ``modulation`` [1, 6, dim] to [6, dim])."""

    def __init__(self, info: CheckpointInfo, device: torch.device, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        self.info, self.device, self.dtype = info, torch.device(device), dtype
        dev = str(self.device) if self.device.type != "cuda" or self.device.index is not None else "cuda:0"
        self._file = safe_open(str(info.path), framework="pt", device=dev)
        self.bytes_loaded = 0

    def close(self) -> None:
        self._file = None  # safe_open has no close(); dropping it unmaps the file

    def _slice(self, name: str, shape: tuple[int, ...], sliced: bool = False):
        stored = self.info.entry(name).shape
        if (stored != shape) if sliced else (math.prod(stored) != math.prod(shape)):
            raise CheckpointError(self.info.path, self.info.prefix + name,
                                  f"shape {list(stored)} cannot serve as {list(shape)}")
        try:
            return self._file.get_slice(self.info.prefix + name)
        except Exception as exc:  # a file changed between validation and loading
            raise CheckpointError(self.info.path, self.info.prefix + name, f"cannot read: {exc}") from exc

    def _keep(self, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if t.numel() != math.prod(shape):
            raise CheckpointError(self.info.path, self.info.prefix + name,
                                  f"read shape {list(t.shape)}, expected {list(shape)}")
        t = t.reshape(shape).to(self.device, self.dtype).contiguous()
        self.bytes_loaded += t.numel() * t.element_size()
        return t

    def full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._keep(name, self._slice(name, shape)[:], shape)

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (dim 0): a column-parallel weight, or a slice of a bias / norm weight."""
        return self._keep(name, self._slice(name, shape, True)[start:stop], (stop - start, *shape[1:]))

    def cols(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) (dim 1) of a [out, in] weight: a row-parallel weight."""
        return self._keep(name, self._slice(name, shape, True)[:, start:stop], (shape[0], stop - start))
