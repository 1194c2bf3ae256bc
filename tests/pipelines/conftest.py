"""Shared fixtures of the pipeline tests (reference pipeline, micro preset, CPU, float32)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.reference import factory as reference_factory
from pp1.pipelines.reference.factory import ReferenceFactory
from pp1.pipelines.reference.generator import ReferenceGenerator
from pp1.pipelines.reference.stage0 import ReferenceStage0
from pp1.pipelines.threaded_comm import ThreadedMesh

PRESET = "micro"  # most tests: every mechanism, little compute; "tiny" where said
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread (as torchrun gives each rank): on 2 shared cores OpenMP spinning costs more
    than it gains for these small matmuls. Restored afterwards: the setting is process-wide."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def factory() -> ReferenceFactory:
    return reference_factory()  # type: ignore[return-value]


@pytest.fixture(scope="session")
def stage0(factory: ReferenceFactory) -> ReferenceStage0:
    return factory.build_stage0(PRESET, CPU, torch.float32)


@pytest.fixture
def solo_generator(factory: ReferenceFactory) -> ReferenceGenerator:
    return factory.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, torch.float32)


@pytest.fixture
def mesh2() -> Iterator[ThreadedMesh]:
    with ThreadedMesh(2, timeout_s=60) as m:
        yield m


@pytest.fixture
def mesh3() -> Iterator[ThreadedMesh]:
    with ThreadedMesh(3, timeout_s=60) as m:
        yield m
