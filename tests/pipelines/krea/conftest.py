"""Fixtures of the Krea pipeline tests: tiny files in the released layouts, written once per session
(no download anywhere), and the factory configured with them. CPU, float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from pp1.pipelines.krea import KreaFactory, factory  # noqa: E402
from pp1.pipelines.krea.tiny import TinyFiles, write_tiny_files  # noqa: E402

PRESET = "krea-tiny"
CPU = torch.device("cpu")
STEPS = (1000, 750, 500, 250)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return write_tiny_files(tmp_path_factory.mktemp("krea-tiny"))


@pytest.fixture(scope="session")
def krea(tiny: TinyFiles) -> KreaFactory:
    return factory().with_options(tiny.options())


def options_with(tiny: TinyFiles, **extra: str | Path) -> dict[str, str]:
    return {**tiny.options(), **{k: str(v) for k, v in extra.items()}}
