"""The contract suite passes on the reference pipeline; broken pipelines are refused, clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.contract import (
    Finding,
    PipelineContractError,
    check_pipeline,
    require_pipeline,
    synthetic_call,
    verify_factory,
    verify_generator_output,
    verify_stage0,
    wire_geometry,
)
from pp1.pipelines.interface import ChunkOutput
from pp1.pipelines.reference.factory import ReferenceFactory

PRESET = "micro"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("preset", "mesh_size"), [("tiny", 1), ("tiny", 2), ("micro", 3)])
def test_reference_passes_the_contract(factory, preset: str, mesh_size: int) -> None:  # type: ignore[no-untyped-def]
    assert check_pipeline(factory, preset, mesh_size) == []


def test_bfloat16_run_keeps_the_wire_dtype(factory) -> None:  # type: ignore[no-untyped-def]
    geo = wire_geometry(factory, PRESET, torch.bfloat16)
    assert geo.dtype == "bfloat16"
    s0 = factory.build_stage0(PRESET, torch.device("cpu"), torch.bfloat16)
    verify_stage0(s0, geo)
    gen = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), torch.device("cpu"), torch.bfloat16)
    call = synthetic_call(geo, (1000, 500), call_id=0, init_cache=True)
    verify_generator_output(call, gen.run(call), geo)


class _Broken:
    """Wraps the reference generator and breaks one rule of its output."""

    def __init__(self, inner, how: str) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.how = inner, how

    def run(self, call):  # type: ignore[no-untyped-def]
        out = self.inner.run(call)
        if self.how == "shape":
            return dataclasses.replace(out, latents=out.latents[:, :2])
        if self.how == "dtype":
            return dataclasses.replace(out, latents=out.latents.double())
        if self.how == "calls":
            return dataclasses.replace(out, generator_calls=len(call.timesteps))  # forgets the recompute
        if self.how == "nan":
            return dataclasses.replace(out, latents=out.latents * float("nan"))
        return out

    def reset(self) -> None:
        self.inner.reset()

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


class _BrokenFactory(ReferenceFactory):
    def __init__(self, how: str) -> None:
        self.how = how

    def build_generator(self, preset, mesh_rank, mesh_size, comm, device, dtype):  # type: ignore[no-untyped-def]
        return _Broken(super().build_generator(preset, mesh_rank, mesh_size, comm, device, dtype), self.how)


@pytest.mark.parametrize(
    ("how", "check", "text"),
    [
        ("shape", "generator_output", "output.latents.shape: expected (16, 3, 8, 8), got (16, 2, 8, 8)"),
        ("dtype", "generator_output", "output.latents.dtype: expected float32, got float64"),
        ("calls", "call_count", "output.generator_calls: 4 != expected 5 (4 steps + 1 recompute)"),
        ("nan", "generator_output", "NaN or Inf"),
    ],
)
def test_broken_generator_is_refused(how: str, check: str, text: str) -> None:
    findings = check_pipeline(_BrokenFactory(how), PRESET, 1)
    assert any(f.check == check and text in str(f) for f in findings), findings
    if how == "shape":
        with pytest.raises(PipelineContractError, match="breaks the contract"):
            require_pipeline(_BrokenFactory(how), PRESET, 1)


def test_verify_generator_output_names_every_problem(factory, stage0) -> None:  # type: ignore[no-untyped-def]
    geo = stage0.geometry
    call = synthetic_call(geo, (1000, 750, 500, 250), call_id=3, chunk_index=1, do_kv_recompute=True)
    out = ChunkOutput(latents=torch.zeros(16, 3, 8, 4, dtype=torch.float16), generator_calls=4,
                      current_start_frame=-1)
    with pytest.raises(PipelineContractError) as e:
        verify_generator_output(call, out, geo)
    fields = [f.field for f in e.value.findings]
    assert fields == ["output.latents.shape", "output.latents.dtype", "output.generator_calls",
                      "output.current_start_frame"]
    assert e.value.code == "generator_output"
    with pytest.raises(PipelineContractError, match="expected ChunkOutput"):
        verify_generator_output(call, {"latents": None}, geo)


class _BadStage0:
    def __init__(self, inner, how: str) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.how, self.geometry = inner, how, inner.geometry

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        c = self.inner.encode_prompt(prompt)
        return c * 0 if self.how == "prompt" else c

    def make_noise(self, seed: int, chunk_index: int) -> torch.Tensor:
        n = self.inner.make_noise(seed, chunk_index)
        return n[:, :, :4] if self.how == "noise" else n

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        return self.inner.decode(latents, first_chunk=False if self.how == "frames" else first_chunk)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(frames)


@pytest.mark.parametrize(
    ("how", "text"),
    [
        ("prompt", "two different prompts give the same conditioning"),
        ("noise", "make_noise().shape: expected (16, 3, 8, 8), got (16, 3, 4, 8)"),
        ("frames", "decode(first_chunk=True).shape: expected (9, 64, 64, 3), got (12, 64, 64, 3)"),
    ],
)
def test_broken_stage0_is_refused(stage0, how: str, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PipelineContractError) as e:
        verify_stage0(_BadStage0(stage0, how), stage0.geometry)
    assert text in str(e.value)


def test_verify_factory(factory) -> None:  # type: ignore[no-untyped-def]
    assert verify_factory(factory, PRESET) == factory.geometry(PRESET)

    class NoBuild:
        name = "x"
        geometry = factory.geometry
        timesteps = factory.timesteps

    with pytest.raises(PipelineContractError, match=r"factory\.build_stage0: missing or not callable"):
        verify_factory(NoBuild(), PRESET)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        verify_factory(factory, "huge")
    assert str(Finding("c", "f", "r")) == "[c] f: r"
