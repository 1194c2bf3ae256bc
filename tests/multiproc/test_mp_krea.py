"""The Krea pipeline in the REAL job (separate processes over gloo, tiny files in the released layouts):
PP1 front + TP=3 (uneven shards: heads 2/1/1) shows the same chunks as the single-process loop
(context re-encoded: Krea's rule); so does TP=2 with ``--compile`` (the shared DiT's split segments,
the QK-norm's sums of squares all-reduced between them over gloo; compiled during load, nothing
after); and a checkpoint whose shapes do not fit the preset fails every rank's load with a message
naming the file and the key, with no rank left hanging. The jobs run together while this process
computes the eager reference. Ranks are this test's subprocesses (testing/localjob.py), killed by pid
when the fixture ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pp1.adapters.front.frame_dump import latents_path  # noqa: E402
from pp1.pipelines.comm import SoloCommunicator  # noqa: E402
from pp1.pipelines.krea import factory  # noqa: E402
from pp1.pipelines.krea.config import get_model  # noqa: E402
from pp1.pipelines.krea.tiny import write_tiny_files  # noqa: E402
from pp1.pipelines.krea.writer import write_random_checkpoint  # noqa: E402
from pp1.pipelines.local_loop import ChunkSchedule, run_loop  # noqa: E402
from pp1.testing.localjob import LocalJob  # noqa: E402

pytestmark = pytest.mark.multiproc

PRESET, SEED, CHUNKS, PROMPT = "krea-tiny", 7, 4, "a paper boat on a rainy street"
COMMON = ["--pipeline", "pp1.pipelines.krea:factory", "--preset", PRESET, "--dtype", "float32", "--device", "cpu",
          "--chunks", str(CHUNKS), "--recompute-every", "1", "--seed", str(SEED), "--prompt", PROMPT,
          "--heartbeat-s", "0.5", "--watchdog-s", "20", "--deadline-floor-s", "60", "--pg-timeout-s", "90",
          "--ready-timeout-s", "90", "--fail-grace-s", "0.2", "--teardown-s", "2", "--warmup-chunks", "1",
          "--context-source", "reencode"]
COMPILE = ["--compile", "--pg-timeout-s", "240", "--ready-timeout-s", "240"]  # compiling takes a while on 2 cores


def options(files: dict[str, str]) -> list[str]:
    return [a for k, v in files.items() for a in ("--pipeline-option", f"{k}={v}")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tiny = write_tiny_files(tmp_path_factory.mktemp("files"))
    bad = tmp_path_factory.mktemp("bad") / "wrong-shape.safetensors"
    write_random_checkpoint(bad, get_model(PRESET), override={"blocks.1.ffn.2.weight": torch.zeros(48, 60)})
    jobs: dict[str, tuple[LocalJob, Path]] = {}
    configs = (("pp1_tp3", "pp1", 4, tiny.checkpoint, []), ("bad", "pp1", 3, bad, []),
               ("tp2_compiled", "tp", 2, tiny.checkpoint, COMPILE))
    with ExitStack() as stack:
        for name, topology, world, ckpt, extra in configs:
            work = tmp_path_factory.mktemp(name)
            tp = world - 1 if topology == "pp1" else world
            args = [*COMMON, "--topology", topology, "--tp", str(tp), "--dump-frames", str(work / "frames"),
                    *options({**tiny.options(), "checkpoint": str(ckpt)}), *extra]
            jobs[name] = (stack.enter_context(LocalJob(world, args, workdir=work)), work / "frames")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            krea = factory().with_options(tiny.options())
            cpu = torch.device("cpu")
            stage0 = krea.build_stage0(PRESET, cpu, torch.float32)
            gen = krea.build_generator(PRESET, 0, 1, SoloCommunicator(), cpu, torch.float32)
            sched = ChunkSchedule(stage0.geometry, krea.timesteps(PRESET), seed=SEED, recompute_every=1,
                                  context_source="reencode")
            ref = run_loop(stage0, gen.run, sched, PROMPT, CHUNKS)
        finally:
            torch.set_num_threads(before)
        out: dict[str, Any] = {"ref": ref}
        for name, (job, dump) in jobs.items():
            codes = job.wait_all(300 if name == "tp2_compiled" else 150)
            late = "compiled again while serving" in job.logs()
            out[name] = (codes, job.report(), dump, f"codes={codes} late_compile={late}\n{job.logs()[-8000:]}",
                         {r: job.events(r) for r in range(job.world_size)})
        yield out


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["pp1_tp3", "tp2_compiled"])
def test_the_job_equals_the_single_process_eager_loop(runs: dict[str, Any], name: str) -> None:
    """PP1 front + uneven TP=3; TP=2 compiled (every rank compiled once, during load)."""
    codes, report, dump, logs, events = runs[name]
    assert set(codes.values()) == {0} and report.get("ok"), logs
    if name == "tp2_compiled":
        for r, evs in events.items():
            compiled = [e for e in evs if e.get("event") == "compiled"]
            assert len(compiled) == 1 and compiled[0]["compile_s"] > 0, (r, logs)
        assert "late_compile=False" in logs, logs
    ref = runs["ref"]
    for k in range(CHUNKS):
        got = torch.load(latents_path(dump, 0, k))
        torch.testing.assert_close(got, ref.outputs[k].latents, rtol=1e-4, atol=1e-4, msg=f"{name} chunk {k}")


@pytest.mark.timeout(420)
def test_a_checkpoint_that_does_not_fit_fails_every_rank_naming_the_key(runs: dict[str, Any]) -> None:
    codes, _, _, logs, _ = runs["bad"]
    assert None not in codes.values() and all(c != 0 for c in codes.values()), logs  # no rank hangs, none is ok
    assert "model.blocks.1.ffn.2.weight" in logs and "expected [48, 64]" in logs, logs
