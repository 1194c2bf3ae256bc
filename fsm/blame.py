"""Which rank is to blame: the root cause of a failed job, from what every rank reported.

A failure spreads: the leader dies, the front's channel breaks (remote), a worker loses the leader
(remote), torchrun tears the rest down. The user must be told the rank at fault, not the first rank
that noticed. The rules, in order:

1. A rank that died without a word (killed, crashed before it could report) is the root: whatever the
   others saw followed from it.
2. Else a local cause (a rank whose own work failed, or that broke the protocol itself), with what a
   peer that blames it saw (a stalled rank's own cause may only say its drain ran out). A rank that
   *lingered* (signalled in torchrun's teardown after another rank failed: stuck, or waiting on the
   failed one) comes after every other local cause: alone, it is the stalled rank.
3. Else a remote cause that names the peer at fault (``FailureCause.blame``): that peer is blamed, with
   the reporter's account.
4. Else any remote cause (a peer, not known which).

Pure: the launcher (events of every rank) and the server (the job's progress board) call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .base import FailureCause


def root_cause(reports: Mapping[int, FailureCause], silent: Mapping[int, str] | None = None,
               roles: Mapping[int, str] | None = None) -> FailureCause | None:
    """The root cause among ``reports`` (rank -> its cause) and ``silent`` (rank -> how it ended without a
    cause, e.g. "killed by SIGKILL"); None when nothing failed. ``roles`` name ranks in the reasons."""
    roles = roles or {}

    def who(rank: int | None) -> str:
        return f"rank {rank} ({roles[rank]})" if rank is not None and rank in roles else f"rank {rank}"

    if silent:
        rank = min(silent)
        seen = sorted((c for c in reports.values() if c.at_fault == rank), key=_order) or sorted(reports.values(),
                                                                                          key=_order)
        also = f"; {who(seen[0].rank)} saw: {seen[0].reason}" if seen else ""
        return FailureCause(rank=rank, phase="?", reason=f"{who(rank)} {silent[rank]}{also}", kind="local")
    if not reports:
        return None
    local = sorted((c for c in reports.values() if c.kind == "local"), key=_order)
    if local:
        c = local[0]
        seen = sorted((r for r in reports.values() if r.kind == "remote" and r.blame == c.rank), key=_order)
        if not seen:
            return c
        return replace(c, reason=f"{c.reason}; {who(seen[0].rank)} saw: {seen[0].reason}")
    blamed = sorted((c for c in reports.values() if c.blame is not None), key=_order)
    if blamed:
        c = blamed[0]
        culprit = reports.get(c.blame)  # type: ignore[arg-type]
        if culprit is not None and culprit.kind == "local":
            return culprit
        return FailureCause(rank=c.blame, phase=culprit.phase if culprit else "?",  # type: ignore[arg-type]
                            reason=f"{who(c.blame)} failed, as {who(c.rank)} saw it: {c.reason}", kind="local")
    return sorted(reports.values(), key=_order)[0]


def _order(c: FailureCause) -> tuple[int, int]:
    return (0 if c.kind == "local" and not c.lingered else 1 if c.kind == "local" else 2, c.rank)


def unreported_cause(rank: int, phase: str, reason: str, failed_peer: int | None = None) -> FailureCause:
    """The cause of a rank that exits non-zero without a machine's cause: its own (local). When it was ended
    by a signal after ``failed_peer`` had failed, it *lingered*: still in ``phase`` while the job was torn
    down, either stalled itself (the root: nobody else can say so) or waiting on a peer that failed (an
    echo, which a genuine local cause outranks)."""
    if failed_peer is not None:
        return FailureCause(rank=rank, phase=phase, kind="local", lingered=True,
                            reason=f"still in {phase} after rank {failed_peer} failed ({reason}): stalled, or "
                                   f"waiting on a failed peer")
    return FailureCause(rank=rank, phase=phase, reason=reason, kind="local")
