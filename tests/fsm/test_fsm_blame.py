"""Which rank is to blame (fsm/blame.py): a silent death, then a local cause, then the blamed peer."""

from __future__ import annotations

from pp1.fsm.base import FailureCause
from pp1.fsm.blame import root_cause, unreported_cause

ROLES = {0: "front", 1: "leader", 2: "worker"}


def remote(rank: int, blame: int | None, reason: str = "channel broke") -> FailureCause:
    return FailureCause(rank=rank, phase="serving", reason=reason, kind="remote", blame=blame)


def test_nothing_failed() -> None:
    assert root_cause({}) is None


def test_a_local_cause_is_the_root_whatever_the_echoes_say() -> None:
    local = FailureCause(rank=2, phase="running", reason="shard failed: boom", kind="local")
    root = root_cause({0: remote(0, 1), 1: remote(1, 2), 2: local}, roles=ROLES)
    assert root is not None and (root.rank, root.kind) == (2, "local")
    # its own reason first, then what the rank that blames it saw (a stall: "drain did not finish" alone says little)
    assert root.reason == "shard failed: boom; rank 1 (leader) saw: channel broke"


def test_echoes_name_the_blamed_peer_not_the_rank_that_noticed() -> None:
    root = root_cause({0: remote(0, 1, "lost the leader"), 2: remote(2, 1, "orphan")}, roles=ROLES)
    assert root is not None and root.rank == 1 and root.kind == "local"
    assert "rank 1 (leader) failed" in root.reason and "rank 0 (front) saw it: lost the leader" in root.reason


def test_a_silent_death_is_the_root() -> None:
    root = root_cause({0: remote(0, 1)}, silent={1: "died without a word (killed by SIGKILL)"}, roles=ROLES)
    assert root is not None and root.rank == 1 and "killed by SIGKILL" in root.reason and "rank 0 (front) saw" \
        in root.reason


def test_a_remote_cause_without_a_name_is_still_reported() -> None:
    c = remote(2, None, "a mesh peer was lost")
    assert root_cause({2: c}) is c
    assert c.at_fault is None and remote(0, 1).at_fault == 1


def test_a_rank_that_lingered_in_the_teardown_is_the_stalled_one_unless_a_rank_failed_on_its_own() -> None:
    """torchrun's SIGTERM to the rest of a failed job: a rank still running then lingered. Alone among the
    local causes it is the stalled rank (the others' watchdogs blame a peer); beside a genuine local cause
    (a shard that raised) it is an echo."""
    lingered = unreported_cause(2, "serving", "SIGTERM during serving", failed_peer=0)
    assert lingered.kind == "local" and lingered.lingered and "after rank 0 failed" in lingered.reason
    assert not unreported_cause(1, "serving", "boom").lingered
    # the worker stalled: the front blames the leader (its only peer), the leader a TP wait (no peer)
    root = root_cause({0: remote(0, 1, "no result within the deadline"), 1: remote(1, None, "timed out"),
                       2: lingered}, roles=ROLES)
    assert root is not None and root.rank == 2 and root.lingered
    # the leader raised: the worker, signalled before its watchdog, lingered
    genuine = FailureCause(rank=1, phase="serving", reason="shard failed: boom", kind="local")
    root = root_cause({0: remote(0, 1), 1: genuine, 2: lingered}, roles=ROLES)
    assert root is not None and root.rank == 1 and root.reason.startswith("shard failed: boom")
