"""The mesh leader: performs the intents of B1's LeaderRelay (receive, relay to the workers, run
its shard, reply) over the PP channel; under pure TP the same driver runs inside rank 0 with an
in-process sink (see tp_main).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event, set_state
from pp1.adapters.rank.startup import Loaded, RankExit
from pp1.adapters.roles.shard import run_shard, warmup_tensors
from pp1.adapters.transport.pp_channel import PING_CALL_ID, PPControlPlane
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost
from pp1.adapters.transport.tp_channel import TPControlPlane
from pp1.fsm.intents import (
    EXIT_FAILED,
    EXIT_OK,
    Exit,
    Intent,
    RecvTensors,
    RunShard,
    SendReady,
    SendResult,
    SendTP,
)
from pp1.fsm.leader import LeaderRelay
from pp1.fsm.lifecycle import Lifecycle
from pp1.pipelines.interface import Generator
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.messages import Action, PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.leader")


class LeaderSink(Protocol):
    """Where the leader's envelope tensors come from and its results / READY go."""

    def recv_envelope_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]: ...

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor]) -> None: ...

    def send_ready(self, ready: ReadyV1) -> None: ...


class PPSink:
    """The leader's end of the PP channel as a LeaderSink."""

    def __init__(self, pp: PPControlPlane) -> None:
        self.pp = pp

    def recv_envelope_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self.pp.recv_tensors(specs, timeout_s)

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor]) -> None:
        self.pp.send_result(result, tensors)

    def send_ready(self, ready: ReadyV1) -> None:
        self.pp.send_ready(ready)


class LeaderDriver:
    """Performs a LeaderRelay's intents in order and feeds the outcomes back into it."""

    def __init__(
        self,
        rt: DistributedRuntime,
        relay: LeaderRelay,
        generator: Generator,
        tp: TPControlPlane,
        sink: LeaderSink,
        faults: FaultPlan,
        recv_timeout_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rt, self.relay, self.generator, self.tp, self.sink = rt, relay, generator, tp, sink
        self.faults = faults
        self.recv_timeout_s = recv_timeout_s
        self.clock = clock
        self.poisoned = False

    def execute(self, intents: list[Intent], received_at: float | None = None) -> Exit | None:
        """Run ``intents`` (and every intent they lead to). Returns the Exit intent, if any."""
        queue: deque[Intent] = deque(intents)
        tensors: list[torch.Tensor] = []
        made_for: int | None = None  # call_id of the WARMUP header whose tensors were made
        latents: torch.Tensor | None = None
        relay = self.relay
        while queue:
            it = queue.popleft()
            try:
                if isinstance(it, RecvTensors):
                    got = self.sink.recv_envelope_tensors(it.specs, self.recv_timeout_s)
                    tensors = [] if it.discard else got
                elif isinstance(it, SendTP):
                    h = it.header
                    if h.action is Action.WARMUP:
                        tensors, made_for = warmup_tensors(h, self.rt.device), h.call_id
                    self.tp.send(h, tensors if h.tensors else [])
                    if h.action is Action.INFER:
                        self.faults.check(f"relayed:{h.chunk_index}")
                elif isinstance(it, RunShard):
                    h = it.header
                    if h.action is Action.WARMUP and made_for != h.call_id:
                        tensors, made_for = warmup_tensors(h, self.rt.device), h.call_id
                    more, latents = self._run(h, tensors, received_at)
                    queue.extend(more)
                elif isinstance(it, SendResult):
                    out = [latents] if it.result.tensors and latents is not None else []
                    self.sink.send_result(it.result, out)
                    queue.extend(relay.on_result_sent(self.clock()))
                elif isinstance(it, SendReady):
                    self.sink.send_ready(it.ready)
                elif isinstance(it, Exit):
                    return it
            except (PeerLost, RemoteProtocolError) as exc:
                self.poisoned = True
                return _first_exit(relay.on_fatal(f"channel broke during {type(it).__name__}: {exc}", "remote"))
            except LocalProtocolError as exc:  # we were about to break the protocol: a bug, fail the rank
                self.poisoned = True
                return _first_exit(relay.on_fatal(f"local protocol error in {type(it).__name__}: {exc}", "local"))
        return None

    def _run(
        self, h: TPHeaderV1, tensors: list[torch.Tensor], received_at: float | None
    ) -> tuple[list[Intent], torch.Tensor | None]:
        try:
            out, ms = run_shard(self.generator, h, tensors)
        except Exception as exc:
            log.exception("shard failed call_id=%d chunk_index=%d cache_epoch=%d", h.call_id, h.chunk_index,
                          h.cache_epoch)
            return self.relay.on_shard_failed(f"{type(exc).__name__}: {exc}"), None
        now = self.clock()
        timings = {**out.timings_ms, "shard_ms": ms}
        timings.setdefault("total", ms)
        if received_at is not None:
            timings["leader_ms"] = (now - received_at) * 1000
        log.debug("shard done %s call_id=%d chunk_index=%d cache_epoch=%d calls=%d %.1f ms", h.action.value,
                  h.call_id, h.chunk_index, h.cache_epoch, out.generator_calls, ms)
        return self.relay.on_shard_done(out.generator_calls, out.current_start_frame, timings, now), out.latents


def _first_exit(intents: list[Intent]) -> Exit:
    for it in intents:
        if isinstance(it, Exit):
            return it
    return Exit(EXIT_FAILED, "fatal")


def make_relay(rt: DistributedRuntime, loaded: Loaded, cfg, watchdog: bool, clock: Callable[[], float],  # type: ignore[no-untyped-def]
               last_call_id: int | None = None) -> LeaderRelay:
    return LeaderRelay(
        rt.rank, loaded.geometry, rt.mesh_size, timesteps=loaded.timesteps, warmup_chunks=cfg.warmup_chunks,
        recompute_every=cfg.recompute_every, seed=cfg.seed, fingerprint=loaded.fingerprint,
        watchdog_s=cfg.watchdog_s if watchdog else None, now=clock(), last_call_id=last_call_id, role=rt.role,
        mesh_rank=rt.mesh_rank,
    )


def warmup(driver: LeaderDriver, lc: Lifecycle, faults: FaultPlan) -> None:
    """Drive the warmup chunks through the mesh; SendReady ends it."""
    faults.check("warmup")
    t0 = time.perf_counter()
    ex = driver.execute(driver.relay.start_warmup())
    if ex is not None:
        raise RankExit(ex.code, f"warmup failed: {ex.reason}", poisoned=driver.poisoned)
    lc.fire("warmup_done")
    set_state(lc.state)
    driver.relay.last_activity_at = driver.clock()  # the watchdog counts from READY
    emit_event("phase", phase=lc.state, warmup_s=time.perf_counter() - t0)


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
    """PP1 leader, after the common startup: warm the channels, warmup, then the relay loop."""
    assert loaded.generator is not None
    pp = PPControlPlane(rt, loaded.geometry, send_timeout_s=cfg.deadline_floor_s + cfg.watchdog_s)
    warm_timeout = cfg.watchdog_s * 4
    tp.warm(warm_timeout)
    pp.warm(warm_timeout)
    lc.fire("channels_warm")
    set_state(lc.state)
    relay = make_relay(rt, loaded, cfg, watchdog=True, clock=clock, last_call_id=PING_CALL_ID)
    driver = LeaderDriver(rt, relay, loaded.generator, tp, PPSink(pp), faults, recv_timeout_s=cfg.watchdog_s,
                          clock=clock)
    warmup(driver, lc, faults)
    while True:
        if drain.is_set() and lc.state == "serving":
            lc.fire("drain")
            set_state(lc.state)
            log.info("drain requested: finishing the call in hand, waiting for SHUTDOWN")
        timeout = relay.watchdog_deadline() - clock()
        try:
            env = pp.recv_envelope(max(timeout, 0.0) + 0.02)
        except ChannelPoisoned as exc:  # the watchdog: no envelope within W
            ex = _first_exit(relay.on_tick(clock()) or relay.on_fatal(f"envelope wait failed: {exc}"))
            raise RankExit(ex.code, ex.reason, poisoned=True) from exc
        except (PeerLost, RemoteProtocolError) as exc:
            ex = _first_exit(relay.on_fatal(f"PP channel broke: {exc}", "remote"))
            raise RankExit(ex.code, ex.reason, poisoned=True) from exc
        received_at = clock()
        (log.info if env.action is not Action.NOOP else log.debug)(
            "envelope %s call_id=%d chunk_index=%d cache_epoch=%d", env.action.value, env.call_id, env.chunk_index,
            env.cache_epoch)
        if env.action is Action.INFER:
            faults.check(f"chunk:{env.chunk_index}")
        ex = driver.execute(relay.on_envelope(env, received_at), received_at)
        if ex is not None:
            if ex.code == EXIT_OK:
                lc.fire("shutdown_received")
                set_state(lc.state)
                return EXIT_OK
            raise RankExit(ex.code, ex.reason, poisoned=driver.poisoned or ex.code != EXIT_OK)
