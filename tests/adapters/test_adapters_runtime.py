"""DistributedRuntime identity and group checks. Identity tests need no process group; the group
tests run a one-rank gloo job in a subprocess (so this pytest process never holds a default group)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pp1.adapters.transport.runtime import DistributedRuntime
from pp1.protocol.config import RunConfig
from pp1.protocol.errors import LocalProtocolError
from pp1.testing.localjob import free_port


def _pp1(m: int) -> RunConfig:
    return RunConfig(topology="pp1", world_size=1 + m, mesh_global_ranks=tuple(range(1, 1 + m)))


def test_roles_under_pp1() -> None:
    cfg = _pp1(3)
    roles = [DistributedRuntime(cfg, rank=r, world_size=4) for r in range(4)]
    assert [rt.role for rt in roles] == ["front", "leader", "worker", "worker"]
    assert [rt.mesh_rank for rt in roles] == [None, 0, 1, 2]
    assert roles[0].hosts_front and not roles[1].hosts_front
    assert roles[1].pair_ranks == (0, 1) and roles[2].leader_rank == 1 and roles[0].front_rank == 0


def test_roles_under_pure_tp() -> None:
    cfg = RunConfig(topology="tp", world_size=2, mesh_global_ranks=(0, 1))
    r0, r1 = (DistributedRuntime(cfg, rank=r, world_size=2) for r in range(2))
    assert (r0.role, r0.hosts_front, r0.mesh_rank, r0.pair_ranks) == ("tp_rank0", True, 0, None)  # leader + front
    assert (r1.role, r1.mesh_rank) == ("worker", 1)


def test_from_env_requires_torchrun_variables() -> None:
    with pytest.raises(LocalProtocolError, match="RANK"):
        DistributedRuntime.from_env(_pp1(2), env={})
    rt = DistributedRuntime.from_env(_pp1(2), env={"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "x",
                                                   "MASTER_PORT": "1"})
    assert (rt.rank, rt.local_rank, rt.role) == (2, 2, "worker")


def test_world_size_mismatch_is_refused_when_groups_are_made() -> None:
    rt = DistributedRuntime(_pp1(2), rank=0, world_size=4)
    with pytest.raises(LocalProtocolError, match="WORLD_SIZE=4"):
        rt._check_topology()


def test_unknown_purpose_and_non_member_are_local_errors() -> None:
    rt = DistributedRuntime(RunConfig(topology="tp", world_size=1, mesh_global_ranks=(0,)), rank=0, world_size=1)
    with pytest.raises(LocalProtocolError) as e:
        rt.check_group(object(), "gossip")
    assert e.value.code == "unknown_purpose"
    with pytest.raises(LocalProtocolError) as e:
        rt.check_group(None, "pp_header")  # pure TP has no PP pair
    assert e.value.code == "not_a_member"


GROUP_CHECKS = textwrap.dedent("""
    import torch, torch.distributed as dist
    from pp1.adapters.transport.runtime import DistributedRuntime
    from pp1.protocol.config import RunConfig
    from pp1.protocol.errors import LocalProtocolError
    rt = DistributedRuntime.from_env(RunConfig(topology="tp", world_size=1, mesh_global_ranks=(0,)))
    g = rt.init(timeout_s=30)
    t = torch.ones(1)
    rt.all_reduce(t, dist.ReduceOp.MIN, group=g.world_cpu, purpose="vote")
    try:
        rt.all_reduce(t, dist.ReduceOp.MIN, group=g.mesh_cpu, purpose="vote")
    except LocalProtocolError as e:
        assert e.code == "wrong_group" and "world_cpu" in e.reason, e
    else:
        raise SystemExit("the wrong group was accepted")
    try:
        rt.broadcast(t, src=0, group=g.mesh_dev, purpose="tp_header")
    except LocalProtocolError as e:
        assert e.code == "wrong_group", e
    else:
        raise SystemExit("a header on the device group was accepted")
    assert rt.all_gather_object({"a": 1}, g.mesh_cpu, "fingerprint") == [{"a": 1}]
    assert g.pair_cpu is None and g.mesh_cpu is not g.world_cpu
    assert rt.teardown(5.0)
    print("GROUPS-OK")
""")


@pytest.mark.timeout(60)
def test_wrappers_check_the_group_of_each_purpose() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", GROUP_CHECKS], env=env, capture_output=True, text=True, timeout=50)
    assert "GROUPS-OK" in out.stdout, out.stdout + out.stderr
