"""``--compile`` in the REAL job (separate processes over gloo, reference pipeline, micro, float32):

- PP1 front + TP=3 (uneven 2/1/1 heads, 4 processes) with ``--compile`` shows the same latents and
  frames as the single-process EAGER loop; every mesh rank compiled during load (a ``compiled``
  event with its time) and nothing compiled after (the generators' precompile covers every call).
  (TP=2 compiled: tests/pipelines/test_reference_compile.py, shards in threads; compiling costs
  tens of seconds of CPU per rank, so one multi-process job here);
- a segment that cannot compile fails the load vote on every rank, with the cause, before READY.

The jobs start together while this process computes the reference; ranks are this test's
subprocesses (testing/localjob.py), killed by pid when the fixture ends.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

from pp1.adapters.front.frame_dump import frames_path, latents_path
from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.local_loop import ChunkSchedule, LoopResult, run_loop
from pp1.pipelines.reference import factory as reference_factory
from pp1.testing.localjob import LocalJob

pytestmark = pytest.mark.multiproc

PRESET, SEED, CHUNKS = "micro", 11, 4
PROMPT = "a lantern in the fog"
JOB_ARGS = [
    "--preset", PRESET, "--dtype", "float32", "--device", "cpu", "--chunks", str(CHUNKS), "--recompute-every", "1",
    "--seed", str(SEED), "--prompt", PROMPT, "--heartbeat-s", "0.5", "--watchdog-s", "30", "--deadline-floor-s", "60",
    "--pg-timeout-s", "240", "--ready-timeout-s", "240", "--fail-grace-s", "0.2", "--teardown-s", "2",
    "--warmup-chunks", "1", "--compile", "--context-source", "latents",
]
CONFIGS = {"pp1_tp3": ("pp1", 3, 4)}  # name -> (topology, TP, world size)

BROKEN_PLUGIN = '''
"""A reference pipeline whose attn_out segment cannot be one graph (data-dependent Python branch)."""
from pp1.pipelines.dit import segments
from pp1.pipelines.reference.factory import ReferenceFactory

_fn, _tokens = segments.SEGMENTS["attn_out"]


def attn_out(o, w_o, s_o):
    if float(o.sum()) > 0:
        return _fn(o, w_o, s_o)
    return -_fn(o, w_o, s_o)


segments.SEGMENTS["attn_out"] = (attn_out, _tokens)


def factory():
    return ReferenceFactory()
'''


def reference_loop() -> LoopResult:
    factory = reference_factory()
    cpu = torch.device("cpu")
    stage0 = factory.build_stage0(PRESET, cpu, torch.float32)
    gen = factory.build_generator(PRESET, 0, 1, SoloCommunicator(), cpu, torch.float32)
    sched = ChunkSchedule(stage0.geometry, factory.timesteps(PRESET), seed=SEED, recompute_every=1)
    return run_loop(stage0, gen.run, sched, PROMPT, CHUNKS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    jobs: dict[str, tuple[LocalJob, Path]] = {}
    with ExitStack() as stack:  # every rank of every job is killed by pid on the way out
        for name, (topology, tp, world) in CONFIGS.items():
            work = tmp_path_factory.mktemp(name)
            args = [*JOB_ARGS, "--topology", topology, "--tp", str(tp), "--dump-frames", str(work / "frames")]
            jobs[name] = (stack.enter_context(LocalJob(world, args, workdir=work)), work / "frames")
        plugin = tmp_path_factory.mktemp("plugin")
        (plugin / "pp1_broken_compile.py").write_text(textwrap.dedent(BROKEN_PLUGIN))
        work = tmp_path_factory.mktemp("broken")
        broken = stack.enter_context(LocalJob(
            2, [*JOB_ARGS, "--topology", "tp", "--tp", "2", "--pipeline", "pp1_broken_compile:factory"],
            env={"PYTHONPATH": f"{plugin}:{__import__('os').environ.get('PYTHONPATH', '')}"}, workdir=work))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = reference_loop()
        finally:
            torch.set_num_threads(before)
        out: dict[str, Any] = {"ref": ref}
        for name, (job, dump) in jobs.items():
            codes = job.wait_all(400)
            out[name] = (job, codes, dump)
        out["broken"] = (broken, broken.wait_all(120))
        yield out


def _logs(job: LocalJob, codes: dict[int, int | None]) -> str:
    return f"codes={codes}\n{job.logs()[-8000:]}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_job_equals_the_eager_single_process(runs: dict[str, Any], name: str) -> None:
    ref: LoopResult = runs["ref"]
    job, codes, dump = runs[name]
    topology, tp, world = CONFIGS[name]
    assert set(codes.values()) == {0} and job.report().get("ok"), _logs(job, codes)
    mesh_ranks = range(1, world) if topology == "pp1" else range(world)
    for r in mesh_ranks:
        compiled = [e for e in job.events(r) if e.get("event") == "compiled"]
        assert len(compiled) == 1 and compiled[0]["compile_s"] > 0, (r, _logs(job, codes))
    assert "compiled again while serving" not in job.logs(), _logs(job, codes)
    for k in range(CHUNKS):
        latents = torch.load(latents_path(dump, 0, k))
        assert torch.allclose(latents, ref.outputs[k].latents, rtol=1e-4, atol=1e-4), (
            name, k, float((latents - ref.outputs[k].latents).abs().max()))
        diff = (torch.load(frames_path(dump, 0, k)).int() - ref.frames[k].int()).abs()
        assert int(diff.max()) <= 1 and float(diff.gt(0).float().mean()) <= 1e-3, (name, k)


@pytest.mark.timeout(300)
def test_a_compile_failure_fails_the_load_vote_with_its_cause(runs: dict[str, Any]) -> None:
    job, codes = runs["broken"]
    assert all(c not in (0, None) for c in codes.values()), _logs(job, codes)
    for r in range(2):
        failed = [e for e in job.events(r) if e.get("event") == "failed"]
        assert failed and failed[0].get("phase") in ("loading", "voting"), (r, _logs(job, codes))
        assert "compiling attn_out failed" in failed[0]["reason"], (r, failed)
        assert not [e for e in job.events(r) if e.get("event") == "ready"]
