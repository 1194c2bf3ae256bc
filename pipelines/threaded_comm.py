"""A mesh of N generator shards in N threads of one process (tests, contract suite, local loop).

``ThreadedCommunicator.all_reduce_sum_`` is a barrier-based sum: every rank publishes its tensor,
waits for the others, sums all of them in rank order (so every rank gets bit-identical results),
waits again, then writes the sum in place. No torch.distributed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class MeshBroken(RuntimeError):
    """A shard of the threaded mesh failed or timed out; the mesh can no longer be used."""


class _Shared:
    def __init__(self, size: int, timeout_s: float) -> None:
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.all_reduces = 0  # counted on rank 0


class ThreadedCommunicator:
    """One rank's view of the threaded mesh; satisfies ``pp1.pipelines.comm.Communicator``."""

    def __init__(self, rank: int, size: int, shared: _Shared) -> None:
        self.rank = rank
        self.size = size
        self._shared = shared

    def _wait(self) -> None:
        try:
            self._shared.barrier.wait()
        except threading.BrokenBarrierError:
            raise MeshBroken(f"threaded mesh rank {self.rank}: a peer failed or timed out") from None

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        sh = self._shared
        sh.slots[self.rank] = t
        self._wait()
        total = sh.slots[0].clone()
        for other in sh.slots[1:]:
            total += other.to(total.device)
        if self.rank == 0:
            sh.all_reduces += 1
        self._wait()  # nobody overwrites its tensor before every rank has read it
        t.copy_(total)


class ThreadedMesh:
    """N communicators plus a pool of N threads to run one function per rank at once."""

    def __init__(self, size: int, timeout_s: float = 120.0) -> None:
        if size < 1:
            raise ValueError(f"mesh size must be >= 1, got {size}")
        self.size = size
        self._shared = _Shared(size, timeout_s)
        self.comms = [ThreadedCommunicator(r, size, self._shared) for r in range(size)]
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="pp1-tp")

    @property
    def all_reduces(self) -> int:
        """All-reduces completed so far (the count of one rank)."""
        return self._shared.all_reduces

    def map(self, fn: Callable[[int, ThreadedCommunicator], T]) -> list[T]:
        """Run ``fn(rank, comm)`` on every rank concurrently; results in rank order.

        If a rank raises, the barrier is broken so no peer waits forever, and the first
        exception (by rank) is re-raised.
        """

        def guarded(rank: int) -> T:
            try:
                return fn(rank, self.comms[rank])
            except BaseException:
                self._shared.barrier.abort()
                raise

        futures = [self._pool.submit(guarded, r) for r in range(self.size)]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # collected, re-raised below
                errors.append(exc)
        if errors:
            primary = next((e for e in errors if not isinstance(e, MeshBroken)), errors[0])
            raise primary
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadedMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
