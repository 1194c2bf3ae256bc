"""Multi-process tests of the distributed runtime on CPU/gloo: each rank is a subprocess of this
test (RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1/MASTER_PORT), killed by pid in a finally; every test
is bounded by a pytest-timeout marker and by the job's own timeouts.

Set PP1_FAULT_TIMES=path to append each scenario's detection times (JSON lines)."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from pp1.testing.fault_scenarios import BASE_ARGS, SCENARIOS, W, run_scenario
from pp1.testing.localjob import LocalJob

pytestmark = pytest.mark.multiproc


def _save(record: dict) -> None:
    path = os.environ.get("PP1_FAULT_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _fail_msg(job: LocalJob, what: str) -> str:
    return f"{what}\ncodes={job.codes()}\n{job.logs()[-6000:]}"


# -- the happy path, with message-level faults on the way ---------------------------------------------


@pytest.fixture(scope="module")
def tp3_job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """PP1 with TP=3 (4 ranks): 6 chunks (an invalid envelope at chunk 1, an unserialisable one at
    chunk 3, an unsupported dtype at chunk 4), then idle > 3 watchdog periods, then SIGTERM."""
    faults = "rank=0,at=chunk:1,do=corrupt_envelope;rank=0,at=chunk:3,do=unserialisable;rank=0,at=chunk:4,do=bad_dtype"
    job = LocalJob(4, [*BASE_ARGS, "--topology", "pp1", "--tp", "3", "--chunks", "6", "--after-chunks", "idle"],
                   env={"PP1_FAULT": faults}, workdir=tmp_path_factory.mktemp("tp3"))
    out: dict = {"job": job}
    with job:
        idle = job.wait_event(0, "idle", 60)
        assert idle is not None, _fail_msg(job, "the front never went idle")
        time.sleep(3.3 * W)
        out["alive_after_idle"] = job.alive()
        t_term = job.send_signal(0, signal.SIGTERM)
        out["codes"] = job.wait_all(20)
        out["shutdown_s"] = {r: t - t_term for r, t in job.detection_times().items()}
    _save({"scenario": "sigterm_after_idle_tp3", "codes": out["codes"], "detect_s": out["shutdown_s"]})
    return out


@pytest.mark.timeout(120)
def test_tp3_idle_survives_three_watchdog_periods(tp3_job: dict) -> None:
    job = tp3_job["job"]
    assert tp3_job["alive_after_idle"] == [0, 1, 2, 3], _fail_msg(job, "a rank died while idle")
    assert job.report()["stats"]["noops"] >= int(3 * W / 0.25) - 2


@pytest.mark.timeout(120)
def test_tp3_sigterm_every_rank_exits_zero(tp3_job: dict) -> None:
    job = tp3_job["job"]
    assert tp3_job["codes"] == {0: 0, 1: 0, 2: 0, 3: 0}, _fail_msg(job, "not every rank exited 0")
    report = job.report()
    assert report["ok"] and report["summary"]["chunks"] == 6
    assert max(tp3_job["shutdown_s"].values()) < 10


@pytest.mark.timeout(120)
def test_tp3_invalid_envelope_answered_not_relayed(tp3_job: dict) -> None:
    job = tp3_job["job"]
    leader = job.log(1)
    m = re.search(r"call_id=(\d+) chunk_index=1 cache_epoch=0 state=\w+ rejected \[calls_mismatch\]", leader)
    assert m, _fail_msg(job, "the leader did not reject the corrupt envelope")
    bad = m.group(1)
    for worker in (2, 3):
        assert f"header infer call_id={bad} " not in job.log(worker), "a worker saw the rejected envelope"
    assert job.report()["stats"]["retries"] == 1  # ok=False -> hard cut -> retry, then chunks went on


@pytest.mark.timeout(120)
def test_tp3_unserialisable_and_bad_dtype_refused_before_sending(tp3_job: dict) -> None:
    job = tp3_job["job"]
    refused = [e for e in job.events(0) if e["event"] == "refused"]
    codes = sorted(e["code"] for e in refused)
    assert codes == ["bad_dtype", "non_finite_float"], _fail_msg(job, f"refusals: {refused}")
    sent_ids = {int(x) for x in re.findall(r"envelope infer call_id=(\d+)", job.log(1))}
    assert not {e["call_id"] for e in refused} & sent_ids, "a refused envelope reached the leader"


# -- pure TP and drain in flight ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_pure_tp2_runs_chunks_and_shuts_down(tmp_path) -> None:
    job = LocalJob(2, [*BASE_ARGS, "--topology", "tp", "--tp", "2", "--chunks", "4"], workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    assert codes == {0: 0, 1: 0}, _fail_msg(job, "pure TP did not shut down cleanly")
    report = job.report()
    assert report["ok"] and report["summary"]["chunks"] == 4
    assert [c["chunk_index"] for c in report["chunks"]] == [0, 1, 2, 3]


@pytest.mark.timeout(90)
def test_pp1_tp2_sigterm_drains_in_flight_then_every_rank_exits_zero(tmp_path) -> None:
    job = LocalJob(3, [*BASE_ARGS, "--topology", "pp1", "--tp", "2", "--chunks", "100000"], workdir=tmp_path)
    with job:
        assert job.wait_event(0, "chunk", 60, chunk_index=2) is not None, _fail_msg(job, "no chunk 2")
        t = job.send_signal(0, signal.SIGTERM)
        codes = job.wait_all(30)
        shutdown = {r: x - t for r, x in job.detection_times().items()}
    assert codes == {0: 0, 1: 0, 2: 0}, _fail_msg(job, "drain did not end in an orderly shutdown")
    assert max(shutdown.values()) < 10
    _save({"scenario": "sigterm_mid_stream_tp2", "codes": codes, "detect_s": shutdown})
    assert job.report()["ok"]


# -- startup failures ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_config_mismatch_fails_every_rank_before_loading(tmp_path) -> None:
    job = LocalJob(3, [*BASE_ARGS, "--tp", "2"], rank_args={2: ["--seed", "1"]}, workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    assert all(c not in (0, None) for c in codes.values()), _fail_msg(job, "a rank did not fail")
    for r in range(3):
        assert not [e for e in job.events(r) if e.get("event") == "phase" and e.get("phase") == "loading"]
        assert "rank 2 vs rank 0: seed: 0 != 1" in job.log(r), _fail_msg(job, f"rank {r} lacks the diff")


@pytest.mark.timeout(90)
def test_load_failure_on_one_rank_fails_every_rank_naming_it(tmp_path) -> None:
    job = LocalJob(3, [*BASE_ARGS, "--tp", "2"], env={"PP1_FAULT": "rank=2,at=load,do=fail"}, workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    assert all(c not in (0, None) for c in codes.values()), _fail_msg(job, "a rank did not fail")
    for r in range(3):
        failed = [e for e in job.events(r) if e.get("event") == "failed"]
        assert failed and "rank 2" in failed[0]["reason"] and "injected fault" in failed[0]["reason"], \
            _fail_msg(job, f"rank {r} does not name rank 2")


# -- crashes and stalls: every survivor exits within its bound ----------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "name", ["kill_leader_mid_chunk", "kill_worker_mid_chunk", "kill_front_idle", "kill_front_mid_chunk", "leader_stall"]
)
def test_fault_every_survivor_exits_within_bound(name: str, tmp_path) -> None:
    res = run_scenario(SCENARIOS[name], workdir=tmp_path)
    _save(res.record())
    assert not res.problems(), _fail_msg(res.job, f"{name}: {res.problems()} detect_s={res.detect_s}")


# -- drift tripwires: a rank whose inputs or weights drift fails the call, named; never wrong video at exit 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("fault", "rank", "what"), [
    ("rank=2,at=chunk:2,do=perturb_inputs", 2, "inputs drift"),
    ("rank=2,at=warmup,do=perturb_weights", 2, "weights drift"),
    ("rank=1,at=warmup,do=perturb_weights", 1, "weights drift"),
])
def test_drift_fails_the_job_naming_the_rank(fault: str, rank: int, what: str, tmp_path) -> None:
    job = LocalJob(3, [*BASE_ARGS, "--topology", "pp1", "--tp", "2", "--chunks", "5"], env={"PP1_FAULT": fault},
                   workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    assert all(c not in (0, None) for c in codes.values()), _fail_msg(job, "a rank exited 0 with drifted state")
    exits = [e for e in job.events(rank) if e.get("event") == "exit"]
    cause = exits[-1].get("cause") if exits else None
    assert cause and cause["rank"] == rank and cause["kind"] == "local" and what in cause["reason"], \
        _fail_msg(job, f"rank {rank}'s exit cause: {cause}")
    assert not [c for c in job.report().get("chunks", []) if c["chunk_index"] >= 2 and what == "inputs drift"]
