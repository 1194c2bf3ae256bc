"""``pp1.pipelines.krea:factory``: Krea Realtime Video 14B from the released checkpoint.

    pp1 run --pipeline pp1.pipelines.krea:factory --preset krea-14b \
        --pipeline-option checkpoint=/m/krea-realtime-video-14b.safetensors \
        --pipeline-option text_encoder=/m/models_t5_umt5-xxl-enc-bf16.pth \
        --pipeline-option tokenizer=/m/google/umt5-xxl --pipeline-option vae=/m/Wan2.1_VAE.pth

``with_options`` (run before any process starts) parses every option and reads the checkpoint's
header (a missing, truncated or non-safetensors file is refused there); the preset's shapes are
checked against the header in ``build_generator`` before any weight is read (the load vote then
fails every rank with the message).
"""

from __future__ import annotations

import torch

from pp1.protocol.geometry import ChunkGeometry

from ..comm import Communicator
from ..dit.generator import check_mesh_heads
from ..loader import PipelineOptionError
from .checkpoint import CheckpointError, read_header
from .config import MODELS, KreaOptions, KreaRun, get_model
from .generator import KreaGenerator
from .stage0 import KreaStage0


class KreaFactory:
    """Presets: ``krea-14b`` (the release), ``krea-tiny`` (the tests' checkpoints). Compiles (``--compile``)."""

    name = "krea"
    presets = tuple(MODELS)
    supports_compile = True

    def __init__(self, options: KreaOptions | None = None) -> None:
        self.options = options or KreaOptions()

    def with_options(self, options: dict[str, str]) -> KreaFactory:
        opts = KreaOptions.parse(options)
        if opts.checkpoint is not None:
            try:
                read_header(opts.checkpoint)
            except CheckpointError as exc:
                raise PipelineOptionError("checkpoint", str(exc)) from None
        return KreaFactory(opts)

    def spec(self, preset: str) -> KreaRun:
        return KreaRun(get_model(preset), self.options)

    def geometry(self, preset: str) -> ChunkGeometry:
        return self.spec(preset).geometry()

    def timesteps(self, preset: str) -> tuple[int, ...]:
        return self.options.steps

    def check_mesh_size(self, preset: str, mesh_size: int) -> None:
        """Heads are split over the mesh (unevenly is fine): a rank needs at least one."""
        check_mesh_heads(preset, get_model(preset).num_heads, mesh_size)

    def build_stage0(self, preset: str, device: torch.device, dtype: torch.dtype) -> KreaStage0:
        return KreaStage0(self.spec(preset), torch.device(device), dtype)

    def build_generator(
        self,
        preset: str,
        mesh_rank: int,
        mesh_size: int,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
    ) -> KreaGenerator:
        return KreaGenerator(self.spec(preset), mesh_rank, mesh_size, comm, torch.device(device), dtype,
                             compile=compile)


def factory() -> KreaFactory:
    """Entry point for ``--pipeline pp1.pipelines.krea:factory`` (options via ``with_options``)."""
    return KreaFactory()
