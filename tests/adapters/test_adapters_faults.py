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
