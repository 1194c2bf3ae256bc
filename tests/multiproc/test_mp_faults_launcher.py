"""Faults from outside on the real ``pp1 run`` (launcher -> torchrun -> front + TP=2, CPU/gloo, the stand-in
pipeline): a representative subset of the fault table's drills (``pp1.testing.launcher_faults``). Each
drill finds every process of the job in /proc, times the injection to "every process gone", and kills
whatever is left (by pid) before it returns; each test has a timeout. The bounds are the issue's plus
slack for a shared 2-core CI box."""

from __future__ import annotations

import pytest

from pp1.testing.launcher_faults import DRILLS, DrillResult, run_drill

SLACK_S = 4.0


def _run(name: str, tmp_path) -> DrillResult:  # type: ignore[no-untyped-def]
    res = run_drill(DRILLS[name], workdir=tmp_path, hang_s=20.0)
    assert res.injected, f"{name}: never injected\n" + "\n".join(res.lines[-30:])
    return res


def _why(res: DrillResult) -> str:
    return f"{res.record()}\n" + "\n".join(res.lines[-30:])


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_sigkill_torchrun_every_rank_gone_within_2s_and_torchrun_named(tmp_path) -> None:
    res = _run("SIGKILL-torchrun-streaming", tmp_path)
    assert not res.leftovers, _why(res)
    ranks = [t for kind, t in res.per_process_s.items() if kind.startswith("rank")]
    assert len(ranks) == 3 and max(ranks) <= 2.0 + SLACK_S, _why(res)
    assert res.code not in (0, None) and "torchrun killed by SIGKILL" in res.last_line, _why(res)
    assert not res.problems(slack_s=SLACK_S), _why(res)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_sigkill_launcher_torchrun_drains_the_job(tmp_path) -> None:
    res = _run("SIGKILL-launcher-streaming", tmp_path)
    assert not res.problems(slack_s=SLACK_S), _why(res)
    assert res.rank_exits == {"rank0": 0, "rank1": 0, "rank2": 0}, _why(res)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_sigterm_worker_mid_stream_drains_the_whole_job_exit_0(tmp_path) -> None:
    res = _run("SIGTERM-worker-streaming", tmp_path)
    assert res.code == 0 and "pp1 run: ok" in res.last_line, _why(res)
    assert not res.problems(slack_s=SLACK_S), _why(res)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_sigterm_front_between_ready_and_first_chunk_is_not_lost(tmp_path) -> None:
    res = _run("SIGTERM-front-ready", tmp_path)
    assert res.code == 0 and "pp1 run: ok" in res.last_line, _why(res)
    assert res.chunks_after <= 2, _why(res)  # the drain: at most the chunk in flight, never the whole stream
    assert not res.problems(slack_s=SLACK_S), _why(res)


@pytest.mark.multiproc
@pytest.mark.timeout(150)
def test_sigkill_leader_names_rank_1_leader(tmp_path) -> None:
    res = _run("SIGKILL-leader-streaming", tmp_path)
    assert res.code not in (0, None) and "rank 1 (leader)" in res.last_line, _why(res)
    assert not res.problems(slack_s=SLACK_S), _why(res)


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_mistyped_fault_refused_before_any_process_starts(tmp_path) -> None:
    res = _run("rank=1,at=chunck:3,do=kill", tmp_path)
    assert res.code == 2 and "PP1_FAULT" in res.last_line and "chunck:3" in res.last_line, _why(res)
    assert res.seen == ["launcher"], _why(res)
