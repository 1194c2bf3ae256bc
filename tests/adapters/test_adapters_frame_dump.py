"""``--dump-frames`` and the loop/engine parity it serves: the real chunk engine (in-process leader,
mesh of 1, reference pipeline, micro) sends bit for bit the envelopes the single-process loop
(``pipelines/local_loop.py``) builds, with context from the latents and re-encoded, over an
overlapping link (PP1 ordering) and a serial one (pure TP); the dump holds the frames the loop shows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pp1 import run_cmd as launcher
from pp1.adapters.front.engine import FrameBatch
from pp1.adapters.front.frame_dump import FrameDump, frames_path, latents_path
from pp1.adapters.launch.launcher import InvalidOption, LaunchOptions, check_options
from pp1.adapters.rank.options import check_dump_dir
from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.local_loop import ChunkSchedule, run_loop
from pp1.pipelines.reference import factory as reference_factory
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, Action
from pp1.testing.inprocess import pure_tp_job

CPU, F32 = torch.device("cpu"), torch.float32
PRESET, SEED, CHUNKS, PROMPT = "micro", 9, 5, "a lighthouse at night"


class Recorder:
    """The engine's way to the leader, recording every INFER envelope and its tensors by name."""

    def __init__(self, inner, overlaps: bool) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.overlaps, self.sent = inner, overlaps, []

    def send_envelope(self, env, tensors, timeout_s=None, preflight=True):  # type: ignore[no-untyped-def]
        if env.action is Action.INFER:
            self.sent.append((env, dict(zip(env.tensor_names(), [t.clone() for t in tensors], strict=True))))
        self.inner.send_envelope(env, tensors, timeout_s=timeout_s, preflight=preflight)

    def recv_result(self, until):  # type: ignore[no-untyped-def]
        return self.inner.recv_result(until)


def _engine_run(source: str, overlaps: bool, dump_dir: Path):  # type: ignore[no-untyped-def]
    recorders: list[Recorder] = []

    def record(inner):  # type: ignore[no-untyped-def]
        recorders.append(Recorder(inner, overlaps))
        return recorders[0]

    job = pure_tp_job(pipeline="pp1.pipelines.reference:factory", preset=PRESET, chunks=CHUNKS, prompt=PROMPT,
                      channel=record, recompute_every=1, seed=SEED, context_source=source, heartbeat_s=5.0,
                      watchdog_s=20.0, warmup_chunks=1, deadline_floor_s=30.0)
    assert job.machine.overlap is overlaps
    dump = FrameDump(str(dump_dir))
    job.engine.add_sink(dump.on_frames)
    out = job.run()
    dump.close()
    assert out.ok and not dump.errors, out.reason
    return out, recorders[0].sent


def _loop(source: str):  # type: ignore[no-untyped-def]
    fac = reference_factory()
    stage0 = fac.build_stage0(PRESET, CPU, F32)
    gen = fac.build_generator(PRESET, 0, 1, SoloCommunicator(), CPU, F32)
    sched = ChunkSchedule(stage0.geometry, fac.timesteps(PRESET), seed=SEED, recompute_every=1,
                          context_source=source)
    return run_loop(stage0, gen.run, sched, PROMPT, CHUNKS), sched


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("source", "overlaps"), [("latents", True), ("reencode", True), ("reencode", False)])
def test_engine_sends_the_loops_envelopes_and_dumps_its_frames(tmp_path: Path, source: str, overlaps: bool) -> None:
    out, sent = _engine_run(source, overlaps, tmp_path / "dump")
    ref, sched = _loop(source)
    assert out.stats["reencoded"] == sched.reencoded == (2 if source == "reencode" else 0)
    assert len(sent) == len(ref.calls) == CHUNKS
    for (env, tensors), call in zip(sent, ref.calls, strict=True):
        assert (env.chunk_index, env.cache_epoch, env.init_cache, env.reset_cache, env.do_kv_recompute,
                tuple(env.timesteps), env.seed) == (call.chunk_index, call.cache_epoch, call.init_cache,
                                                    call.reset_cache, call.do_kv_recompute, call.timesteps, call.seed)
        assert torch.equal(tensors[T_CONDITIONING], call.conditioning)
        assert torch.equal(tensors[T_NOISE], call.noise)
        assert (T_CONTEXT in tensors) == (call.context_frames is not None)
        if call.context_frames is not None:
            assert torch.equal(tensors[T_CONTEXT], call.context_frames), (source, call.chunk_index)
    for k in range(CHUNKS):
        assert torch.equal(torch.load(frames_path(tmp_path / "dump", 0, k)), ref.frames[k])
        assert torch.equal(torch.load(latents_path(tmp_path / "dump", 0, k)), ref.outputs[k].latents)


def test_reencode_changes_the_context_of_later_windows_only() -> None:
    lat, _ = _loop("latents")
    enc, _ = _loop("reencode")
    for k in range(3):  # windows start at latent frame 0 (kept): the same calls and frames
        assert torch.equal(lat.frames[k], enc.frames[k])
    a, b = lat.calls[3].context_frames, enc.calls[3].context_frames  # window starts at 3: re-encoded
    assert torch.equal(a[:, 1:], b[:, 1:]) and not torch.equal(a[:, :1], b[:, :1])
    assert not torch.equal(lat.frames[3], enc.frames[3])  # and the video differs from there on


def test_schedule_refuses_reencode_without_frames_or_encoder() -> None:
    fac = reference_factory()
    stage0 = fac.build_stage0(PRESET, CPU, F32)
    with pytest.raises(ValueError, match="context_source"):
        ChunkSchedule(stage0.geometry, (1000,), context_source="pixels")
    res, sched = _loop("reencode")
    with pytest.raises(ValueError, match="decoded frames"):
        sched.record(res.outputs[-1])


def test_dump_dir_must_be_creatable(tmp_path: Path) -> None:
    check_options(LaunchOptions(preset="micro", dump_frames=str(tmp_path / "a" / "b")))
    assert (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidOption) as exc:
        check_options(LaunchOptions(preset="micro", dump_frames=str(blocker / "sub")))
    assert exc.value.option == "--dump-frames" and "cannot create" in exc.value.reason
    with pytest.raises(ValueError):
        check_dump_dir(str(blocker))


def test_dump_frames_reaches_every_rank_and_pp1_run() -> None:
    opts = LaunchOptions(dump_frames="/tmp/x")
    args = opts.rank_args("r.json")
    assert args[args.index("--dump-frames") + 1] == "/tmp/x"
    assert "--dump-frames" not in LaunchOptions().rank_args("r.json")
    p = argparse.ArgumentParser()
    launcher.add_arguments(p)
    assert launcher.options_from_args(p.parse_args(["--dump-frames", "d"])).dump_frames == "d"
    from pp1.adapters.roles.main import build_parser

    assert build_parser().parse_args(["--dump-frames", "d"]).dump_frames == "d"


def test_a_failing_write_is_reported_not_raised(tmp_path: Path) -> None:
    def boom(_t, _p):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    dump = FrameDump(str(tmp_path), save=boom)
    rec = argparse.Namespace(call_id=3, cache_epoch=0, chunk_index=0)
    dump.on_frames(FrameBatch(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), rec, torch.zeros(1)))  # type: ignore[arg-type]
    dump.close()
    assert dump.saved == 0 and "disk full" in dump.errors[0] and len(dump.errors) == 2  # frames and latents
