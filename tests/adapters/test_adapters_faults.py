"""Fault-injection specs (PP1_FAULT) and the fault-time records."""

from __future__ import annotations

import json

import pytest

from pp1.adapters.rank.faults import FaultPlan, InjectedFault, parse_faults, record


def test_parse_faults_several_and_args() -> None:
    fs = parse_faults("rank=2,at=load,do=fail; rank=1,at=chunk:3,do=stall:5")
    assert [(f.rank, f.at, f.do, f.arg) for f in fs] == [(2, "load", "fail", ""), (1, "chunk:3", "stall", "5")]
    assert parse_faults(None) == [] and parse_faults("") == []


def test_parse_faults_rejects_incomplete_spec() -> None:
    with pytest.raises(ValueError, match="needs rank="):
        parse_faults("rank=1,do=fail")


@pytest.mark.parametrize(("spec", "needle"), [
    ("rank=1,at=lod,do=fail", "unknown point at='lod'"),
    ("rank=1,at=chunk:x,do=fail", "must be an integer"),
    ("rank=1,at=load,do=fial", "unknown action do='fial'"),
    ("rank=1,at=load,do=fail:3", "takes no argument"),
    ("rank=1,at=load,do=stall:soon", "must be a number"),
    ("rank=x,at=load,do=fail", "rank must be an integer"),
    ("rank=1,at=load,do=fail,when=now", "nothing else"),
])
def test_a_mistyped_fault_is_refused_naming_what_is_wrong(spec: str, needle: str) -> None:
    """A mistyped fault must not pass a test silently (issue 11)."""
    with pytest.raises(ValueError, match=needle):
        parse_faults(spec)


def test_every_lifecycle_phase_is_a_point_and_unfired_faults_are_reported() -> None:
    from pp1.fsm.lifecycle import MESH_STATES

    fs = parse_faults(";".join(f"rank=0,at={s},do=stall:0" for s in MESH_STATES if s not in ("shutdown", "failed")))
    plan = FaultPlan(0, fs)
    plan.check("warmup")
    assert "rank=0,at=warmup,do=stall:0" not in plan.unfired() and "rank=0,at=serving,do=stall:0" in plan.unfired()


def test_plan_fires_only_its_rank_and_only_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PP1_FAULT_TIMES", str(tmp_path / "t.jsonl"))
    plan = FaultPlan(1, parse_faults("rank=1,at=load,do=fail;rank=2,at=load,do=fail;rank=1,at=chunk:2,do=corrupt_envelope"))
    assert FaultPlan(3, plan.faults).faults == []
    with pytest.raises(InjectedFault):
        plan.check("load")
    assert plan.check("load") is None  # fired once
    f = plan.check("chunk:2")
    assert f is not None and f.do == "corrupt_envelope"  # message-level faults are returned to the caller
    assert plan.check("chunk:2") is None
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(x["event"], x["at"]) for x in lines] == [("fault", "load"), ("fault", "chunk:2")]


def test_record_is_a_no_op_without_the_env(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("PP1_FAULT_TIMES", raising=False)
    record("exit", rank=0)  # nothing to write, no error


@pytest.mark.timeout(60)
def test_events_to_a_gone_launcher_neither_raise_nor_stop_the_exit(tmp_path) -> None:
    """The launcher reading a rank's events was killed: emitting goes on silently, the exit path still ends
    the process with its own code (it used to raise BrokenPipeError before os._exit)."""
    import subprocess
    import sys

    code = ("import os, sys, time\n"
            "from pp1.adapters.rank.observe import emit_event\n"
            "time.sleep(0.5)\n"  # the reader closes its end meanwhile
            "for i in range(3): emit_event('chunk', chunk_index=i)\n"
            "sys.stderr.write('still here\\n'); sys.stderr.flush(); os._exit(7)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _out, err = proc.communicate(timeout=50)
    assert proc.returncode == 7 and b"still here" in err, err.decode()
