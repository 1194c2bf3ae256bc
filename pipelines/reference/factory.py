"""The reference pipeline's ``PipelineFactory`` (``pp1.pipelines.reference:factory``)."""

from __future__ import annotations

import torch

from pp1.protocol.geometry import ChunkGeometry

from ..comm import Communicator
from ..dit.generator import check_mesh_heads
from ..interface import PipelineFactory
from ..loader import PipelineOptionError, parse_bool
from .generator import ReferenceGenerator
from .presets import PRESETS, get_preset
from .stage0 import ReferenceStage0

OPTIONS = {"fp8_linears": "true | false (default false): the six large linears of every block in float8 "
           "e4m3 with per-row scales (CUDA, compute capability 8.9+, bfloat16/float16 runs)"}


class ReferenceFactory:
    """Random-but-seeded Wan 2.1 / Krea-shaped causal DiT; presets: ``tiny``, ``wan-1.3b-shape``,
    ``krea-14b-shape``. Compiles (``--compile``); options: ``OPTIONS``."""

    name = "reference"
    presets = tuple(PRESETS)
    supports_compile = True
    fp8_linears = False

    def __init__(self, fp8_linears: bool = False) -> None:
        self.fp8_linears = fp8_linears

    def with_options(self, options: dict[str, str]) -> ReferenceFactory:
        for key in options:
            if key not in OPTIONS:
                raise PipelineOptionError(key, f"unknown option of the reference pipeline; known: {sorted(OPTIONS)}")
        return ReferenceFactory(fp8_linears=parse_bool("fp8_linears", options.get("fp8_linears", "false")))

    def geometry(self, preset: str) -> ChunkGeometry:
        return get_preset(preset).geometry()

    def timesteps(self, preset: str) -> tuple[int, ...]:
        return get_preset(preset).timesteps

    def check_mesh_size(self, preset: str, mesh_size: int) -> None:
        """Heads and FFN columns are split over the mesh (unevenly is fine): a rank needs at least one head."""
        check_mesh_heads(f"preset {preset!r}", get_preset(preset).num_heads, mesh_size)

    def build_stage0(self, preset: str, device: torch.device, dtype: torch.dtype) -> ReferenceStage0:
        return ReferenceStage0(get_preset(preset), torch.device(device), dtype)

    def build_generator(
        self,
        preset: str,
        mesh_rank: int,
        mesh_size: int,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
    ) -> ReferenceGenerator:
        return ReferenceGenerator(get_preset(preset), mesh_rank, mesh_size, comm, torch.device(device), dtype,
                                  compile=compile, fp8_linears=self.fp8_linears)


def factory() -> PipelineFactory:
    """Entry point for ``--pipeline pp1.pipelines.reference:factory``."""
    return ReferenceFactory()
