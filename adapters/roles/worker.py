"""A mesh worker (mesh ranks 1..M-1): loops on TP headers under B1's WorkerLoop and its watchdog.

Waits for the next header on the mesh CPU group, bounded by the watchdog (no header for W ->
orphan exit); receives the announced tensors on the mesh device group; runs its shard. A lost
leader (its connection closed) is an orphan exit too. SHUTDOWN -> exit 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import set_state
from pp1.adapters.rank.startup import Loaded, RankExit
from pp1.adapters.roles.shard import run_shard, warmup_tensors
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost
from pp1.adapters.transport.tp_channel import TPControlPlane
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK, EXIT_ORPHAN, Exit, Intent, RecvTensors, RunShard
from pp1.fsm.lifecycle import Lifecycle
from pp1.fsm.worker import WorkerLoop
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.messages import Action, TPHeaderV1

log = logging.getLogger("pp1.adapters.worker")


def serve(
    rt: DistributedRuntime,
    lc: Lifecycle,
    loaded: Loaded,
    cfg,  # type: ignore[no-untyped-def]
    faults: FaultPlan,
    tp: TPControlPlane,
    drain: threading.Event,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """After the common startup: warm the mesh channels, then the worker loop until an Exit."""
    assert loaded.generator is not None
    tp.warm(cfg.watchdog_s * 4)
    lc.fire("channels_warm")
    set_state(lc.state)
    loop = WorkerLoop(rt.rank, watchdog_s=cfg.watchdog_s, now=clock(), heartbeat_s=cfg.heartbeat_s,
                      role=rt.role, mesh_rank=rt.mesh_rank)
    while True:
        if drain.is_set() and lc.state == "serving":
            lc.fire("drain")
            set_state(lc.state)
            log.info("drain requested: waiting for SHUTDOWN (the watchdog bounds the wait)")
        try:
            header = tp.recv_header(max(loop.watchdog_deadline() - clock(), 0.0) + 0.02)
        except ChannelPoisoned as exc:  # no header within W
            intents = loop.on_tick(clock()) or [Exit(EXIT_ORPHAN, f"header wait failed: {exc}")]
            _exit(loop, intents, lc)
        except PeerLost as exc:  # the leader's connection closed: it is gone
            reason = f"orphan: lost the leader ({exc.detail[:120]})"
            loop.fail_with(reason, "remote")
            _exit(loop, [Exit(EXIT_ORPHAN, reason)], lc)
        except RemoteProtocolError as exc:
            loop.fail_with(f"bad TP header: {exc}", "remote")
            _exit(loop, [Exit(EXIT_FAILED, str(exc))], lc)
        if lc.state == "warmup" and header.action is not Action.WARMUP:
            lc.fire("warmup_done")
            set_state(lc.state)
        if header.action is Action.INFER:
            log.info("header infer call_id=%d chunk_index=%d cache_epoch=%d", header.call_id, header.chunk_index,
                     header.cache_epoch)
            faults.check(f"chunk:{header.chunk_index}")
        intents = loop.on_header(header, clock())
        _perform(rt, loop, lc, loaded, tp, header, intents, cfg, clock)


def _perform(rt: DistributedRuntime, loop: WorkerLoop, lc: Lifecycle, loaded: Loaded, tp: TPControlPlane,
             header: TPHeaderV1, intents: list[Intent], cfg, clock: Callable[[], float]) -> None:  # type: ignore[no-untyped-def]
    tensors: list[torch.Tensor] = []
    for it in intents:
        if isinstance(it, RecvTensors):
            try:
                tensors = tp.recv_tensors(it.specs, cfg.watchdog_s)
            except (PeerLost, RemoteProtocolError) as exc:
                loop.fail_with(f"tensors of call_id={header.call_id} lost: {exc}", "remote")
                _exit(loop, [Exit(EXIT_ORPHAN, str(exc))], lc)
        elif isinstance(it, RunShard):
            h = it.header
            if h.action is Action.WARMUP:
                tensors = warmup_tensors(h, rt.device)
            try:
                assert loaded.generator is not None
                out, ms = run_shard(loaded.generator, h, tensors)
            except Exception as exc:
                log.error("shard failed call_id=%d chunk_index=%d cache_epoch=%d: %s", h.call_id, h.chunk_index,
                          h.cache_epoch, exc)
                _exit(loop, loop.on_shard_failed(f"{type(exc).__name__}: {exc}"), lc)
            log.debug("shard done %s call_id=%d chunk_index=%d cache_epoch=%d calls=%d %.1f ms", h.action.value,
                      h.call_id, h.chunk_index, h.cache_epoch, out.generator_calls, ms)
            loop.on_shard_done(clock())
        elif isinstance(it, Exit):
            _exit(loop, [it], lc)


def _exit(loop: WorkerLoop, intents: list[Intent], lc: Lifecycle) -> None:
    ex = next((i for i in intents if isinstance(i, Exit)), Exit(EXIT_FAILED, str(loop.failure)))
    if ex.code == EXIT_OK:
        lc.fire("shutdown_received")
        set_state(lc.state)
        raise RankExit(EXIT_OK, ex.reason)
    if not lc.is_terminal:
        lc.fail_with(ex.reason, "remote" if ex.code == EXIT_ORPHAN else "local")
    set_state(lc.state)
    raise RankExit(ex.code, ex.reason, poisoned=True)
