"""The liveness monitor on real processes (CPU/gloo) with the device-group double
(``PP1_DEVICE_DOUBLE=blocking``: the mesh's collectives wait for a dead peer without a bound, as NCCL
does; gloo alone would see the closed connection). A mesh rank killed or stalled inside its shard
leaves its peers waiting in an all-reduce: the monitor ends the wait within 10 s, naming the rank,
never at the process group's timeout (60 s here)."""

from __future__ import annotations

import time

import pytest

from pp1.testing.fault_scenarios import BASE_ARGS
from pp1.testing.localjob import LocalJob

pytestmark = pytest.mark.multiproc

# the front's deadline far away: the mesh's own monitor must end the wait (and rank 0 hosts the store here)
ARGS = [*BASE_ARGS, "--topology", "pp1", "--tp", "2", "--chunks", "6", "--deadline-floor-s", "30"]
DOUBLE = {"PP1_DEVICE_DOUBLE": "blocking"}
BOUND_S = 10.0


def _fail_msg(job: LocalJob, what: str) -> str:
    return f"{what}\ncodes={job.codes()}\n{job.logs()[-6000:]}"


def _exit_cause(job: LocalJob, rank: int) -> dict | None:
    exits = [e for e in job.events(rank) if e.get("event") == "exit"]
    return exits[-1].get("cause") if exits else None


@pytest.mark.timeout(120)
def test_the_double_alone_runs_chunks(tmp_path) -> None:
    job = LocalJob(3, ARGS, env=DOUBLE, workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    assert codes == {0: 0, 1: 0, 2: 0}, _fail_msg(job, "the double broke a healthy run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("fault", "words"), [
    ("rank=2,at=shard:3,do=kill", "rank 2 is silent"),
    ("rank=2,at=shard:3,do=stall:60", "rank 2 stalled: it has not entered tp_all_reduce"),
])
def test_a_peer_lost_inside_a_collective_ends_the_wait_within_10_s(fault: str, words: str, tmp_path) -> None:
    job = LocalJob(3, ARGS, env={**DOUBLE, "PP1_FAULT": fault}, workdir=tmp_path)
    with job:
        assert job.wait_event(1, "exit", 60) is not None, _fail_msg(job, "the leader never exited")
        deadline = time.monotonic() + 15  # its exit event is out: wait for the process itself to be reaped
        while 1 not in (detect := job.detection_times()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert 1 in detect and detect[1] <= BOUND_S, _fail_msg(job, f"leader exit {detect.get(1)} s after the fault")
    cause = _exit_cause(job, 1)
    assert cause and cause["kind"] == "remote" and cause["blame"] == 2 and words in cause["reason"], \
        _fail_msg(job, f"leader's cause: {cause}")
