"""Rank 0 under pure TP: mesh leader and front in one process. No PP channel: the chunk engine's
link calls the LeaderRelay in-process (validate, relay to the workers over the TP channel, run
the shard, hand the result back). Heartbeat NOOPs still go out every H s: the relay relays them
to the workers, whose watchdog needs them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from pp1.adapters.front.engine import ChunkEngine
from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.rank.startup import Loaded
from pp1.adapters.roles.front import FrontSession, frame_dump, make_machine, prompt_script, run_dumping
from pp1.adapters.roles.leader import LeaderDriver, make_relay, warmup
from pp1.adapters.transport.runtime import DistributedRuntime, PeerLost
from pp1.adapters.transport.tp_channel import TPControlPlane
from pp1.fsm.intents import Exit
from pp1.fsm.lifecycle import Lifecycle
from pp1.protocol.codec import check_tensors, encode
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1
from pp1.protocol.preflight import preflight_envelope, validate_result
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.roles.tp_rank0")


class LocalSink:
    """The in-process leader's sink: envelope tensors are handed over, results kept for the link."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.results: list[tuple[PPResultV1, list[torch.Tensor]]] = []
        self.ready: ReadyV1 | None = None

    def recv_envelope_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        check_tensors(specs, self.pending, RemoteProtocolError, "envelope")
        out, self.pending = self.pending, []
        return out

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor]) -> None:
        self.results.append((result, list(tensors)))

    def send_ready(self, ready: ReadyV1) -> None:
        self.ready = ready


class LocalLink:
    """The chunk engine's Link under pure TP: ``send`` runs the whole call through the relay."""

    overlaps = False  # send runs the whole call: nothing to overlap

    def __init__(self, driver: LeaderDriver, sink: LocalSink, loaded: Loaded) -> None:
        self.driver, self.sink, self.geometry = driver, sink, loaded.geometry
        self.last_call_id: int | None = None
        self.last_infer_epoch: int | None = None
        self.exit: Exit | None = None

    def send(
        self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], preflight: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        if self.exit is not None:
            raise PeerLost("local", f"in-process leader exited: {self.exit.reason}")
        if preflight:
            last_epoch = self.last_infer_epoch if env.action is Action.INFER else None
            preflight_envelope(env, tensors, self.geometry, self.last_call_id, last_cache_epoch=last_epoch)
        encode(env, tensors)  # the same local checks as on the wire (serialisable, tensors match)
        self.last_call_id = env.call_id
        if env.action is Action.INFER:
            self.last_infer_epoch = env.cache_epoch
        self.sink.pending = list(tensors)
        now = self.driver.clock()
        self.exit = self.driver.execute(self.driver.relay.on_envelope(env, now), now)

    def recv(self, deadline_at: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        if not self.sink.results:
            raise PeerLost("local", f"no result from the in-process leader ({self.exit})")
        result, tensors = self.sink.results.pop(0)
        validate_result(result, self.geometry)
        return result, tensors


def serve(
    rt: DistributedRuntime, lc: Lifecycle, loaded: Loaded, cfg: Any, faults: FaultPlan, args: Any,
    session: FrontSession, tp: TPControlPlane,
) -> int:
    assert loaded.stage0 is not None and loaded.generator is not None
    tp.warm(cfg.watchdog_s * 4)
    lc.fire("channels_warm")
    conditioning = loaded.stage0.encode_prompt(args.prompt)  # before warmup: no heartbeat is due yet
    script = prompt_script(args, loaded.stage0)
    sink = LocalSink()
    relay = make_relay(rt, loaded, cfg, watchdog=False, clock=time.monotonic)
    driver = LeaderDriver(rt, relay, loaded.generator, tp, sink, faults, recv_timeout_s=None)
    warmup(driver, lc, faults)
    ready = sink.ready
    assert ready is not None
    session.ready, session.ready_at = ready, time.monotonic()
    emit_event("ready", mesh_size=ready.mesh_size, warmup_ms=list(ready.warmup_ms),
               startup_s=session.ready_at - session.started_at)
    faults.check("ready")
    machine = make_machine(rt, loaded, cfg, first_call_id=1)
    link, dump = frame_dump(args, LocalLink(driver, sink, loaded))
    engine = ChunkEngine(
        machine, link, loaded.stage0, loaded.geometry, prompt=args.prompt,
        conditioning=conditioning, faults=faults, max_chunks=args.chunks, then=args.then,
        on_frames=dump.on_frames if dump else None,
        on_stop=lambda: lc.fire("drain") if lc.state == "serving" else None,
    )
    script.attach(engine)
    session.engine = engine
    return run_dumping(engine, dump, lc, session, args, cfg)
