"""The mesh leader's relay (mesh rank 0): warm the channels, warmup, then receive -> validate -> relay
-> infer -> reply, driving its own loop (``AwaitEnvelope`` after every reply).

Rules it holds (pp1.md §3, §5):
- every envelope is validated (``pp1.protocol.preflight.validate_envelope``) before anything is
  relayed; an invalid one is answered ``ok=False`` (its announced tensors are received and dropped)
  and NEVER reaches the workers;
- NOOP is relayed to the workers (their heartbeat) and answered ok; PING is answered ok, not relayed;
- SHUTDOWN is relayed, answered, then Exit(0);
- INFER is relayed, the leader runs its shard, the result echoes call_id / chunk_index /
  cache_epoch and carries the observed generator calls; observed != expected -> ``ok=False``
  (TRIPWIRE), the mesh stays up and the front hard-cuts;
- exactly one result per envelope; the next envelope is taken only after ``on_result_sent``.

Channels (pp1.md §2.7), from ``start()``: the TP channel's PING header to the workers and one
all-reduce on the mesh device group (``WarmMesh``); then, under PP1, the front's PING envelope
(call_id ``PING_CALL_ID``) is answered and one tensor round trip warms the pair device group
(``WarmPair``). Warmup (pp1.md §2.8): ``warmup_plan(...)`` chunks through the mesh (WARMUP tensors
are made from the header's seed on every mesh rank: ``MakeWarmupTensors``; the header travels
alone), then SendReady with the per-chunk timings.

Under pure TP (no front) the same machine runs on rank 0 (``front_in_process=True``): there is no
PP PING, SendResult / SendReady are handed to the in-process front, envelopes come from it (no
``AwaitEnvelope``), and the watchdog is off.

With a ``lifecycle``, the relay moves it: ``channels_warm``, ``warmup_done`` (READY sent), ``drain``,
``shutdown_received``, and its failure with the same cause.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import (
    T_CONDITIONING,
    T_CONTEXT,
    T_LATENTS_OUT,
    T_NOISE,
    Action,
    ErrorCode,
    PPEnvelopeV1,
    PPResultV1,
    ReadyV1,
    TPHeaderV1,
    relay_header,
)
from pp1.protocol.preflight import error_code_for, validate_envelope
from pp1.protocol.schedule import PING_CALL_ID, expected_generator_calls, recompute_due, warmup_context_frames
from pp1.protocol.tensors import TensorSpec

from .intents import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ORPHAN,
    AwaitEnvelope,
    CheckWeights,
    Exit,
    Intent,
    MakeWarmupTensors,
    RecvTensors,
    RunShard,
    SendReady,
    SendResult,
    SendTP,
    WarmMesh,
    WarmPair,
)
from .lifecycle import LifecycleMachine, MeshTripwires, RoleMachine

log = logging.getLogger("pp1.fsm.leader")

INIT, CHANNELS, WARMING, IDLE, RUNNING, REPLYING, STOPPING, EXITED, FAILED = (
    "init", "channels", "warming", "idle", "running", "replying", "stopping", "exited", "failed",
)

STATES = [INIT, CHANNELS, WARMING, IDLE, RUNNING, REPLYING, STOPPING, EXITED, FAILED]
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    # (event, source(s), dest)
    ("warm_channels", INIT, CHANNELS),  # TP PING + WarmMesh; PP1: await the front's PING, answer, WarmPair
    ("ping_answered", CHANNELS, CHANNELS),  # PP1: the front's PING was answered: WarmPair
    ("begin_warmup", [INIT, CHANNELS], WARMING),
    ("warmup_chunk_done", WARMING, WARMING),  # next warmup chunk: SendTP + RunShard
    ("warmup_finished", WARMING, IDLE),  # SendReady
    ("envelope_infer", IDLE, RUNNING),  # RecvTensors, SendTP, RunShard
    ("envelope_noop", IDLE, REPLYING),  # SendTP(noop) (heartbeat), SendResult(ok)
    ("envelope_ping", IDLE, REPLYING),  # SendResult(ok), not relayed
    ("envelope_invalid", IDLE, REPLYING),  # RecvTensors(discard), SendResult(ok=False); never relayed
    ("envelope_shutdown", IDLE, STOPPING),  # SendTP(shutdown), SendResult(ok)
    ("shard_done", RUNNING, REPLYING),  # SendResult(ok, or ok=False on a tripwire)
    ("shard_failed", RUNNING, REPLYING),  # recoverable failure: SendResult(ok=False), mesh intact
    ("result_sent", REPLYING, IDLE),
    ("shutdown_sent", STOPPING, EXITED),  # Exit(0)
    # "fail" (every non-terminal state -> failed) is added by ProtocolMachine: warmup failed,
    # mesh failed (a shard raised), watchdog expiry. Intents: best-effort SendResult, Exit(1).
]

# Envelope action -> event, for envelopes that passed validation.
EVENT_FOR_ACTION: dict[Action, str] = {
    Action.INFER: "envelope_infer",
    Action.NOOP: "envelope_noop",
    Action.PING: "envelope_ping",
    Action.SHUTDOWN: "envelope_shutdown",
}

Validate = Callable[[PPEnvelopeV1, ChunkGeometry, "int | None"], object]


def expected_calls(header: TPHeaderV1) -> int:
    """Generator calls a TP header asks for (the schedule's rule)."""
    return expected_generator_calls(len(header.timesteps), header.do_kv_recompute)


def warmup_plan(
    n: int, geometry: ChunkGeometry, timesteps: Sequence[int], recompute_every: int = 1, seed: int = 0
) -> list[TPHeaderV1]:
    """The WARMUP headers the leader drives through the mesh at startup: chunk 0 starts an empty
    KV cache, later chunks recompute every ``recompute_every`` chunks (0 = never) over the frames
    generated so far (capped by the window), like serving does. call_id / chunk_index = 0..n-1,
    epoch 0 (a separate sequence from the front's call_ids: the front's first INFER has
    init_cache=True and starts from an empty cache)."""
    out = []
    for i in range(n):
        recompute = recompute_due(i, recompute_every)
        tensors = [
            TensorSpec(name=T_CONDITIONING, dtype=geometry.dtype, shape=geometry.conditioning_shape()),
            TensorSpec(name=T_NOISE, dtype=geometry.dtype, shape=geometry.noise_shape()),
        ]
        if recompute:
            frames = warmup_context_frames(i, geometry.latent_frames, geometry.max_context_frames)
            tensors.append(TensorSpec(name=T_CONTEXT, dtype=geometry.dtype, shape=geometry.context_shape(frames)))
        out.append(
            TPHeaderV1(
                action=Action.WARMUP,
                call_id=i,
                chunk_index=i,
                cache_epoch=0,
                init_cache=i == 0,
                reset_cache=i == 0,
                do_kv_recompute=recompute,
                timesteps=tuple(timesteps),
                seed=seed + i,
                tensors=tuple(tensors),
            )
        )
    return out


class LeaderRelayMachine(MeshTripwires, RoleMachine):
    """The mesh leader's relay (mesh rank 0): warms the channels, drives warmup, then receives each
    envelope, validates it, relays it to the workers, runs its shard and replies, one result per
    envelope.

    Handlers return the intents to perform, in order. ``rank``: global rank; ``geometry``: the chunk
    geometry envelopes are validated against; ``mesh_size``: M (1 = no workers: nothing is relayed);
    ``timesteps``, ``warmup_chunks``, ``recompute_every``, ``seed``: what warmup drives;
    ``fingerprint``: the mesh's shard fingerprint (sent in READY); ``watchdog_s``: no envelope for
    that long while idle -> orphan exit (None: off); ``validate``: injectable for tests (default: the
    preflight's); ``last_call_id``: the id of an envelope handled before this machine, if any;
    ``front_in_process``: pure TP (no PP channel); ``warm_timeout_s``: bound on the front's PING.
    """

    NAME = "leader"
    STATES = STATES
    TRANSITIONS = TRANSITIONS
    INITIAL = INIT
    TERMINAL = frozenset({EXITED, FAILED})

    def __init__(
        self,
        rank: int,
        geometry: ChunkGeometry,
        mesh_size: int,
        *,
        timesteps: Sequence[int] = (),
        warmup_chunks: int = 0,
        recompute_every: int = 1,
        seed: int = 0,
        fingerprint: str = "",
        watchdog_s: float | None = None,
        now: float = 0.0,
        validate: Validate | None = None,
        last_call_id: int | None = None,
        front_in_process: bool = False,
        warm_timeout_s: float = 60.0,
        lifecycle: LifecycleMachine | None = None,
        front_rank: int | None = None,
        weights_baseline: str | None = None,
        weights_check_every: int = 0,
        **ctx: Any,
    ) -> None:
        if mesh_size < 1:
            raise ValueError(f"mesh_size must be >= 1, got {mesh_size}")
        super().__init__(rank, lifecycle=lifecycle, **ctx)
        self.geometry = geometry
        self.mesh_size = mesh_size
        self.timesteps = tuple(timesteps)
        self.warmup_chunks = warmup_chunks
        self.recompute_every = recompute_every
        self.seed = seed
        self.fingerprint = fingerprint
        self.watchdog_s = watchdog_s
        self.front_in_process = front_in_process
        self.front_rank = front_rank  # its peer on the PP channel (None: pure TP, the front is in process)
        self.weights_baseline, self.weights_check_every = weights_baseline, weights_check_every
        self.warm_timeout_s = warm_timeout_s
        self.last_activity_at = now
        self.validate: Validate = validate or self._preflight_validate
        self.last_call_id = last_call_id  # of the last accepted envelope (e.g. the startup PING's)
        self.last_cache_epoch: int | None = None  # of the last accepted INFER
        self.current: PPEnvelopeV1 | None = None  # the INFER envelope in flight
        self._warmup: list[TPHeaderV1] = []
        self._warmup_ms: list[float] = []
        self.results_sent = 0

    # -- channels -----------------------------------------------------------------------------------
    def start(self, now: float) -> list[Intent]:
        """Warm the channels: the TP PING header (workers wait for it), one all-reduce on the mesh."""
        self.fire("warm_channels")
        self.last_activity_at = now
        ping = TPHeaderV1(action=Action.PING, call_id=PING_CALL_ID)
        return [*([SendTP(ping, with_tensors=False)] if self.mesh_size > 1 else []), WarmMesh()]

    def on_mesh_warm(self, now: float) -> list[Intent]:
        """The mesh is warm. Pure TP: warmup next; PP1: wait for the front's PING."""
        if self.front_in_process:
            self._lifecycle_event("channels_warm")
            return self.start_warmup(now)
        return [AwaitEnvelope(until=now + self.warm_timeout_s)]

    def on_pair_warm(self, now: float) -> list[Intent]:
        """The pair device group is warm: the channels are; warmup next."""
        self._lifecycle_event("channels_warm")
        return self.start_warmup(now)

    def _on_ping(self, env: PPEnvelopeV1) -> list[Intent]:
        if env.action is not Action.PING or env.call_id != PING_CALL_ID or env.tensors:
            return self.on_fatal(f"expected the front's PING (call_id={PING_CALL_ID}) first, got "
                                 f"{env.action.value} call_id={env.call_id}", "remote")
        self.fire("ping_answered")
        self.last_call_id = env.call_id
        return [SendResult(self._result(env, ok=True))]

    # -- warmup -------------------------------------------------------------------------------------
    def start_warmup(self, now: float | None = None) -> list[Intent]:
        """Begin warmup: intents for the first warmup chunk, or SendReady at once when there is none."""
        self.fire("begin_warmup")
        self._warmup = warmup_plan(
            self.warmup_chunks, self.geometry, self.timesteps, self.recompute_every, self.seed
        )
        self._warmup_ms = []
        if not self._warmup:
            return self._finish_warmup(now)
        return self._run_header(self._warmup[0])

    def _finish_warmup(self, now: float | None) -> list[Intent]:
        self.fire("warmup_finished")
        if now is not None:
            self.last_activity_at = now  # the watchdog counts from READY
        ready = ReadyV1(
            mesh_size=self.mesh_size,
            warmup_chunks=len(self._warmup_ms),
            warmup_ms=tuple(self._warmup_ms),
            fingerprint=self.fingerprint,
        )
        log.info("leader rank=%d warmup done: %d chunks %s ms state=%s", self.rank, len(self._warmup_ms),
                 [round(t, 1) for t in self._warmup_ms], self.state)
        self._lifecycle_event("warmup_done")
        check: list[Intent] = [CheckWeights()] if self.weights_baseline is not None else []  # at READY
        return [*check, SendReady(ready), *self._next()]

    def _next(self) -> list[Intent]:
        """Serving: wait for the next envelope (the in-process front of pure TP hands them over)."""
        if self.front_in_process or self.state != IDLE:
            return []
        return [AwaitEnvelope(until=self.watchdog_deadline_or_none())]

    def watchdog_deadline_or_none(self) -> float | None:
        """The watchdog's deadline as a wait bound (None: no watchdog)."""
        wd = self.watchdog_deadline()
        return None if math.isinf(wd) else wd

    def _run_header(self, header: TPHeaderV1) -> list[Intent]:
        warmup = header.action is Action.WARMUP
        out: list[Intent] = [MakeWarmupTensors(header)] if warmup else []
        if self.mesh_size > 1:  # WARMUP tensors never travel; every call's are checked by every worker
            out.append(SendTP(header, with_tensors=not warmup, digest_inputs=bool(header.tensors),
                              preflight=warmup))  # an INFER header relays the envelope just validated
        out.append(RunShard(header))
        return out

    # -- envelopes ----------------------------------------------------------------------------------
    def on_envelope(self, env: PPEnvelopeV1, now: float | None = None) -> list[Intent]:
        """An envelope's header arrived from the front (its tensors, if any, not yet received)."""
        if self.state == CHANNELS:
            return self._on_ping(env)
        if self.state != IDLE:  # e.g. an envelope while a shard runs: outside the table
            self.fire("envelope_infer")  # raises InvalidEvent, state untouched
        if now is not None:
            self.last_activity_at = now
        try:
            event = EVENT_FOR_ACTION.get(env.action)
            if event is None:
                raise RemoteProtocolError(
                    "envelope.action", f"{env.action.value!r} is not an action the front may send", "bad_action"
                )
            self.validate(env, self.geometry, self.last_call_id)
        except RemoteProtocolError as err:
            return self._reject(env, err)
        self.last_call_id = env.call_id
        self.fire(event)
        self._log_env(env, "accepted")
        header = relay_header(env)
        if event == "envelope_infer":
            self.current = env
            self.last_cache_epoch = env.cache_epoch
            out: list[Intent] = []
            if env.tensors:
                out.append(RecvTensors(env.tensors))
            return out + self._run_header(header)
        relay = event in ("envelope_noop", "envelope_shutdown") and self.mesh_size > 1
        out = [SendTP(header, preflight=False)] if relay else []  # relays the envelope just validated
        out.append(SendResult(self._result(env, ok=True)))
        return out

    def _reject(self, env: PPEnvelopeV1, err: RemoteProtocolError) -> list[Intent]:
        self.fire("envelope_invalid")
        code = error_code_for(err)
        message = f"[{err.code}] {err.field}: {err.reason}"
        self._log_env(env, f"rejected {message}", level=logging.WARNING)
        out: list[Intent] = []
        if env.tensors:
            out.append(RecvTensors(env.tensors, discard=True))
        out.append(SendResult(self._result(env, ok=False, code=code, message=message)))
        return out

    # -- the shard ----------------------------------------------------------------------------------
    def on_shard_done(
        self,
        observed_calls: int,
        current_start_frame: int,
        timings_ms: dict[str, float] | None = None,
        now: float | None = None,
    ) -> list[Intent]:
        """This rank's shard finished the call (warmup or INFER). Applies the tripwire."""
        timings = dict(timings_ms or {})
        if self.state == WARMING:
            return self._warmup_chunk_done(observed_calls, timings, now)
        env = self.current
        self.fire("shard_done")  # InvalidEvent unless running
        assert env is not None
        self.current = None
        expected = env.expected_generator_calls
        if observed_calls != expected:
            message = f"tripwire: observed {observed_calls} generator calls, expected {expected}"
            self._log_env(env, message, level=logging.ERROR)
            result = self._result(env, ok=False, code=ErrorCode.TRIPWIRE, message=message,
                                  observed=observed_calls, start_frame=current_start_frame, timings=timings)
            return [SendResult(result)]
        self._log_env(env, f"shard done: {observed_calls} generator calls, start frame {current_start_frame}")
        result = self._result(env, ok=True, observed=observed_calls, start_frame=current_start_frame,
                              timings=timings, latents=True)
        return [SendResult(result)]

    def _warmup_chunk_done(self, observed: int, timings: dict[str, float], now: float | None) -> list[Intent]:
        i = len(self._warmup_ms)
        header = self._warmup[i]
        if observed != expected_calls(header):
            reason = f"warmup chunk {i}: tripwire: observed {observed} generator calls, expected {expected_calls(header)}"
            self.fail_with(reason, "local")
            return [Exit(EXIT_FAILED, reason)]
        self._warmup_ms.append(float(timings.get("total", sum(timings.values()))))
        if now is not None:
            self.last_activity_at = now
        if len(self._warmup_ms) == len(self._warmup):
            return self._finish_warmup(now)
        self.fire("warmup_chunk_done")
        return self._run_header(self._warmup[i + 1])

    def on_shard_failed(self, reason: str, recoverable: bool = False, peer_lost: bool = False) -> list[Intent]:
        """The shard raised. ``recoverable`` (the adapter knows every mesh rank is still in step,
        e.g. the call was refused before any collective): answer ok=False and keep serving.
        Otherwise the mesh is failed: best-effort ok=False (MESH_FAILED) to the front, Exit(1)."""
        if self.state == WARMING:
            cause = self.fail_with(f"warmup chunk {len(self._warmup_ms)} failed: {reason}", "local")
            return [Exit(EXIT_FAILED, cause.reason)]
        if self.state != RUNNING:
            self.fire("shard_failed")  # raises InvalidEvent, state untouched
        env = self.current
        assert env is not None
        self.current = None
        if recoverable:
            self.fire("shard_failed")
            self._log_env(env, f"shard failed (recoverable): {reason}", level=logging.ERROR)
            return [SendResult(self._result(env, ok=False, code=ErrorCode.GENERATOR_FAILED, message=reason))]
        cause = self.fail_with(f"mesh failed (call_id={env.call_id} chunk_index={env.chunk_index}): {reason}",
                               "remote" if peer_lost else "local")
        result = self._result(env, ok=False, code=ErrorCode.MESH_FAILED, message=reason)
        return [SendResult(result), Exit(EXIT_FAILED, cause.reason)]

    def on_result_sent(self, now: float | None = None) -> list[Intent]:
        """The result (and its tensors) went out. Back to idle (then the next envelope), WarmPair after
        the PING's answer, Exit(0) after SHUTDOWN's; nothing after a failure (its Exit follows)."""
        if self.state == FAILED:
            return []
        self.results_sent += 1
        if now is not None:
            self.last_activity_at = now
        if self.state == CHANNELS:
            return [WarmPair()]
        if self.state == STOPPING:
            self.fire("shutdown_sent")
            self._lifecycle_event("shutdown_received")
            return [Exit(EXIT_OK, f"shutdown (call_id={self.last_call_id})")]
        self.fire("result_sent")  # InvalidEvent unless replying
        log.debug("leader rank=%d result sent (last call_id=%s) state=%s", self.rank, self.last_call_id, self.state)
        return [*([CheckWeights()] if self._weights_due() else []), *self._next()]

    # -- the watchdog and fatal errors --------------------------------------------------------------
    def watchdog_deadline(self) -> float:
        """When ``on_tick`` declares the front gone: only while idle, and only with a watchdog."""
        if self.watchdog_s is None or self.state != IDLE:
            return math.inf
        return self.last_activity_at + self.watchdog_s

    def on_tick(self, now: float) -> list[Intent]:
        if now >= self.watchdog_deadline():
            reason = f"orphan: no envelope for {now - self.last_activity_at:.1f} s (watchdog W={self.watchdog_s:g} s)"
            self.fail_with(reason, "remote", self.front_rank)
            log.error("leader rank=%d state=%s %s", self.rank, self.state, reason)
            return [Exit(EXIT_ORPHAN, reason)]
        return []

    def on_fatal(self, reason: str, kind: str = "remote", blame: int | None = None) -> list[Intent]:
        """A channel broke (peer gone, undecodable frame, timed-out wait): the process is poisoned.
        Fails the machine and exits; nothing more is sent. ``blame``: the peer at fault, when known."""
        cause = self.fail_with(reason, "local" if kind == "local" else "remote", blame)
        return [Exit(EXIT_FAILED, cause.reason)]

    def on_timed_out(self, now: float) -> list[Intent]:
        """A bounded wait ran out: the front's PING never came, the watchdog (no envelope for W), or, in any
        other state, a send or a receive of the call in hand (the channel is poisoned: fatal)."""
        if self.state == CHANNELS:
            return self.on_fatal(f"no PING from the front within {self.warm_timeout_s:g} s", "remote", self.front_rank)
        if self.state != IDLE:
            return self.on_fatal(f"a channel operation ran out of time in {self.state}", "remote")
        out = self.on_tick(now)
        return out or self._next()

    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:
        return self.on_fatal(f"channel broke: {reason}", "remote", peer)

    def on_bad_message(self, reason: str) -> list[Intent]:
        return self.on_fatal(f"bad message: {reason}", "remote", self.front_rank)

    def on_local_error(self, reason: str) -> list[Intent]:
        """We were about to break the protocol (a preflight refused a send): a bug; fail the rank."""
        return self.on_fatal(f"local protocol error: {reason}", "local")

    def on_drain(self, now: float) -> list[Intent]:
        """SIGTERM: finish the call in hand, then wait for SHUTDOWN (the watchdog bounds the wait)."""
        self._lifecycle_drain()
        log.info("leader rank=%d drain requested: finishing the call in hand, waiting for SHUTDOWN", self.rank)
        return []

    # -- helpers ------------------------------------------------------------------------------------
    def _preflight_validate(self, env: PPEnvelopeV1, geometry: ChunkGeometry, last_call_id: int | None) -> None:
        """The default ``validate``: the preflight's rules, plus the epoch fence of the last INFER."""
        validate_envelope(env, geometry, last_call_id, last_cache_epoch=self.last_cache_epoch)

    def _result(
        self,
        env: PPEnvelopeV1,
        ok: bool,
        code: ErrorCode | None = None,
        message: str = "",
        observed: int = 0,
        start_frame: int = 0,
        timings: dict[str, float] | None = None,
        latents: bool = False,
    ) -> PPResultV1:
        tensors: tuple[TensorSpec, ...] = ()
        if latents:
            tensors = (TensorSpec(name=T_LATENTS_OUT, dtype=self.geometry.dtype, shape=self.geometry.latents_shape()),)
        # A result must carry an envelope action: the answer to a WARMUP/READY envelope says NOOP.
        action = env.action if env.action in EVENT_FOR_ACTION else Action.NOOP
        return PPResultV1(
            action=action,
            ok=ok,
            error_code=code,
            error_message=message,
            call_id=env.call_id,
            chunk_index=env.chunk_index,
            cache_epoch=env.cache_epoch,
            observed_generator_calls=observed,
            current_start_frame=start_frame,
            timings_ms=timings or {},
            tensors=tensors,
        )

    def _log_env(self, env: PPEnvelopeV1, what: str, level: int = logging.DEBUG) -> None:
        log.log(level, "leader rank=%d action=%s call_id=%d chunk_index=%d cache_epoch=%d state=%s %s",
                self.rank, env.action.value, env.call_id, env.chunk_index, env.cache_epoch, self.state, what)
