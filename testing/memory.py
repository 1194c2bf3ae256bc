"""The transport's third implementation: every rank's channel ends joined in memory, with VIRTUAL time, and
a whole job built on it the way production builds each rank (``adapters/roles/*.py``): the real lifecycle,
role and chunk machines, the real executors (``StartupExecutor``, ``FrontEngine``, ``LeaderExecutor``,
``WorkerExecutor``), a cheap stage 0 (the stand-in's) and a fake generator that counts its calls. For the
model test (``tests/model/``), which steps any rank in any order and injects faults between steps.

Time is a cluster clock (:attr:`MemoryTransport.now`) that only the test advances; nothing sleeps.

The transport's rules (what gloo does, as far as the protocol can tell):

- **Channels.** The PP pair (front <-> leader) and the TP channel (leader -> each worker) are FIFOs of
  frames: a message's control frame (header + metadata, encoded by the codec and decoded by the
  receiver), then, as a separate frame, the tensors it announced. The receiver must take them in order:
  a header's announced tensors must be received, with the announced specs, before the next header
  (``TransportViolation`` otherwise: a real stream would be out of step). A WARMUP header travels alone.
- **Sends** complete at once unless the receiving rank is stalled: then they wait, bounded by their
  timeout (counted from the first attempt); a send to a dead rank fails (``PeerLost``).
- **Receives and rendezvous** (startup collectives, the pair and mesh warm-ups, the generator's
  all-reduce) complete when their data is there or every participant joined; until then they raise
  :class:`WouldBlock` BEFORE consuming anything (the executor keeps the intent at its head). A bounded
  wait whose end has passed in virtual time raises ``WaitExpired`` and, as on gloo, closes the channel
  for good (the peer's later operations on it fail with ``PeerLost``). An operation whose peer is dead
  raises ``PeerLost`` ("connection closed by peer") once nothing it could still receive is queued.
- An end that saw a failure is poisoned: every later call raises ``ChannelPoisoned`` (as the real
  channels do).

:meth:`MemoryJob.ready` says whether a rank's next step would not block (as far as the transport knows:
an operation not attempted yet counts as ready; its first attempt either completes or records what it
waits for), :meth:`MemoryJob.step` performs it, :meth:`MemoryJob.timers` lists when something happens
by itself. What is faked: the generator (no model: one mesh-wide barrier per call), the process shell
(``main.py``'s signal policy is mirrored by :meth:`MemoryRank.signal`), torch.distributed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from pp1.adapters.front.engine import FrameBatch, FrontEngine
from pp1.adapters.rank.executor import Executor
from pp1.adapters.rank.faults import Fault, FaultPlan
from pp1.adapters.rank.options import JobOptions
from pp1.adapters.rank.startup import LoadedPipeline, StartupExecutor
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.front import DrainWatcher, front_machine
from pp1.adapters.roles.leader import LeaderExecutor, leader_machine
from pp1.adapters.roles.worker import WorkerExecutor
from pp1.adapters.transport.inprocess import InProcessChannel
from pp1.adapters.transport.interface import WouldBlock
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost, WaitExpired
from pp1.fsm.base import Intent
from pp1.fsm.events import EnvelopeReceived
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK, Exit
from pp1.fsm.lifecycle import LifecycleMachine, drain_bound_s, make_lifecycle
from pp1.fsm.worker import WorkerLoopMachine
from pp1.pipelines.interface import ChunkCall, ChunkOutput
from pp1.protocol.codec import decode, encode
from pp1.protocol.config import RunConfig
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import PPEnvelopeV1, PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.preflight import (
    preflight_envelope,
    preflight_ready,
    preflight_result,
    preflight_tp_header,
    validate_ready,
    validate_result,
)
from pp1.protocol.tensors import TensorSpec
from pp1.testing.standin import StandinStage0

log = logging.getLogger("pp1.testing.memory")

# The job's sizes: the stand-in's geometry (3 latent frames a chunk, a window of 6) and four steps.
GEOMETRY = ChunkGeometry(latent_channels=4, latent_frames=3, latent_height=4, latent_width=4, text_len=4,
                         text_dim=8, max_context_frames=6)
TIMESTEPS = (1000, 750, 500, 250)
FINGERPRINT = "memory-generator-v1"
CPU = torch.device("cpu")


class TransportViolation(AssertionError):
    """A rank used a channel in a way that would put a real stream out of step (a receive skipped, tensors
    received that were never announced, collectives called in a different order on different ranks)."""


Observer = Callable[..., None]  # (name, /, **fields)


# == the transport ===================================================================================


@dataclass
class _Frame:
    """One frame on a FIFO: a message's control part (encoded) or the tensors it announced."""

    kind: str  # "control" | "tensors"
    sent_at: float
    header: bytes = b""
    meta: bytes = b""
    specs: tuple[TensorSpec, ...] = ()
    tensors: list[torch.Tensor] = field(default_factory=list)


class _Link:
    """A gloo pair between two ranks: one FIFO per direction (keyed by the receiver); broken for good once a
    wait on it timed out."""

    def __init__(self, name: str, a: int, b: int) -> None:
        self.name = name
        self.ranks = (a, b)
        self.inbox: dict[int, deque[_Frame]] = {a: deque(), b: deque()}
        self.broken: str | None = None
        self.garble_next: set[int] = set()  # receivers whose next control frame arrives undecodable
        self.tamper_next: dict[int, Callable[[Any], Any]] = {}  # receiver -> rewrites the next message it decodes


@dataclass
class _Round:
    """One collective call on a group: every member's contribution; done once all joined (alive)."""

    name: str
    members: tuple[int, ...]
    values: dict[int, Any] = field(default_factory=dict)
    done: bool = False
    broken: str | None = None
    result: Any = None


@dataclass
class _Blocked:
    """What a rank's last step waits for: ``go()`` says when it could complete (or fail) now; ``until``
    ends the wait (``failure``: a bound that ran out means something went wrong; else a heartbeat)."""

    what: str
    go: Callable[[], bool]
    until: float | None
    failure: bool = True


class MemoryTransport:
    """Every rank's channels and groups, in memory. ``front``: the front's rank (None: pure TP);
    ``mesh``: the mesh's global ranks, the leader first."""

    def __init__(self, world_size: int, mesh: Sequence[int], front: int | None, pg_timeout_s: float = 600.0) -> None:
        self.now = 0.0
        self.world = tuple(range(world_size))
        self.mesh = tuple(mesh)
        self.front = front
        self.leader = self.mesh[0]
        self.pg_timeout_s = pg_timeout_s
        self.dead: set[int] = set()
        self.stalled_until: dict[int, float] = {}
        self.pp = _Link("pp", front, self.leader) if front is not None else None
        self.tp = {w: _Link("tp", self.leader, w) for w in self.mesh[1:]}
        self.groups: dict[str, tuple[int, ...]] = {"world": self.world, "mesh_cpu": self.mesh, "mesh_dev": self.mesh}
        if front is not None:
            self.groups["pair_dev"] = (front, self.leader)
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._seq: dict[tuple[str, int], int] = {}
        self._since: dict[int, float] = {}  # rank -> when its current bounded operation began
        self.blocked: dict[int, _Blocked] = {}
        self.observers: list[Observer] = []

    def clock(self) -> float:
        return self.now

    # -- who can move -------------------------------------------------------------------------------
    def alive(self, rank: int) -> bool:
        return rank not in self.dead

    def stalled(self, rank: int) -> bool:
        return self.stalled_until.get(rank, 0.0) > self.now

    def kill(self, rank: int) -> None:
        """The rank's process is gone: its peers' operations on its channels fail (after what it sent)."""
        self.dead.add(rank)
        self.blocked.pop(rank, None)
        self._since.pop(rank, None)

    def break_link(self, link: _Link, why: str) -> None:
        if link.broken is None:
            link.broken = why
            self.notify("link_broken", link=link.name, ranks=link.ranks, why=why)

    def notify(self, name: str, /, **fields: Any) -> None:
        for obs in self.observers:
            obs(name, **fields)

    # -- waiting ------------------------------------------------------------------------------------
    def bound(self, rank: int, timeout_s: float | None) -> float | None:
        """The end of a bound given relative to when the operation began (its first attempt)."""
        start = self._since.setdefault(rank, self.now)
        return None if timeout_s is None else start + timeout_s

    def done(self, rank: int) -> None:
        self._since.pop(rank, None)

    def wait(self, rank: int, what: str, until: float | None, go: Callable[[], bool],
             expire: Callable[[], None] | None = None, failure: bool = True) -> NoReturn:
        """The operation cannot complete now: WaitExpired when its end passed, else WouldBlock (recording
        what it waits for)."""
        if until is not None and self.now >= until:
            self.done(rank)
            if expire is not None:
                expire()
            self.notify("expired", rank=rank, what=what, until=until)
            raise WaitExpired(what, f"no data within the bound (virtual t={self.now:g} >= {until:g})")
        self.blocked[rank] = _Blocked(what, go, until, failure)
        raise WouldBlock(what)

    # -- the FIFOs ----------------------------------------------------------------------------------
    def check_peer(self, link: _Link, peer: int, what: str) -> None:
        if link.broken is not None:
            raise PeerLost(what, f"connection closed: {link.broken}")
        if not self.alive(peer):
            raise PeerLost(what, f"Connection closed by peer [rank {peer}]")

    def send(self, src: int, links: Sequence[tuple[_Link, int]], frames: list[_Frame], timeout_s: float | None,
             what: str) -> None:
        """Append ``frames`` to every (link, receiver); waits while a receiver is stalled."""
        end = self.bound(src, timeout_s)
        try:
            for link, dst in links:
                self.check_peer(link, dst, what)
        except PeerLost:
            self.done(src)
            raise
        late = [(link, dst) for link, dst in links if self.stalled(dst)]
        if late:
            def expire() -> None:
                for link, _ in late:
                    self.break_link(link, f"{what} from rank {src} timed out")

            def go() -> bool:
                return all(not self.stalled(d) or not self.alive(d) or ln.broken for ln, d in late)

            self.wait(src, what, end, go, expire)
        self.done(src)
        for link, dst in links:
            for f in frames:
                if f.kind == "control" and dst in link.garble_next:
                    link.garble_next.discard(dst)
                    f = _Frame("control", f.sent_at, b"XXXX" + f.header[4:], f.meta)
                link.inbox[dst].append(f)

    def recv_control(self, rank: int, link: _Link, src: int, until: float | None, what: str) -> tuple[_Frame, Any]:
        """The next control frame and its decoded message (RemoteProtocolError when it does not decode)."""
        q = link.inbox[rank]

        def expire() -> None:
            self.break_link(link, f"{what} of rank {rank} timed out")

        if link.broken is not None:
            raise PeerLost(what, f"connection closed: {link.broken}")
        if q:
            f = q[0]
            if f.kind != "control":
                raise TransportViolation(f"rank {rank} {what}: the next frame on {link.name} is the tensors "
                                         f"{_names(f.specs)} its last header announced: a receive was skipped")
            if until is None or self.now < until or f.sent_at <= until:
                q.popleft()
                msg = decode(f.header, f.meta)
                tamper = link.tamper_next.pop(rank, None)
                return f, (tamper(msg) if tamper is not None else msg)
            self.wait(rank, what, until, lambda: True, expire)  # it arrived after the bound: expired first
        if not self.alive(src):
            raise PeerLost(what, f"Connection closed by peer [rank {src}]")
        self.wait(rank, what, until, lambda: bool(q) or link.broken is not None or not self.alive(src), expire)

    def recv_tensors(self, rank: int, link: _Link, src: int, specs: Sequence[TensorSpec], what: str
                     ) -> list[torch.Tensor]:
        """The tensors the header just received announced: they must be next, with exactly these specs."""
        q = link.inbox[rank]
        if link.broken is not None:
            raise PeerLost(what, f"connection closed: {link.broken}")
        if q and q[0].kind == "tensors":
            f = q.popleft()
            if tuple(specs) != f.specs:
                raise TransportViolation(f"rank {rank} {what}: received tensors as {_names(specs)} but the header "
                                         f"announced {_names(f.specs)}")
            return list(f.tensors)
        if not q and not self.alive(src):
            raise PeerLost(what, f"Connection closed by peer [rank {src}]")
        raise TransportViolation(f"rank {rank} {what}: tensors {_names(specs)} expected, but "
                                 f"{'the next frame is a header' if q else 'none were sent'} on {link.name}")

    # -- rendezvous ---------------------------------------------------------------------------------
    def collective(self, rank: int, group: str, name: str, value: Any, combine: Callable[[list[Any]], Any],
                   timeout_s: float | None) -> Any:
        """This rank's n-th call on ``group``: completes when every member joined the same call (alive)."""
        members = self.groups[group]
        n = self._seq.get((group, rank), 0)
        rnd = self._rounds.setdefault((group, n), _Round(name, members))
        if rnd.name != name:
            raise TransportViolation(f"rank {rank} calls {name} as its call #{n} on {group}, another rank called "
                                     f"{rnd.name}: collectives out of order")
        end = self.bound(rank, timeout_s)
        if not rnd.done and rnd.broken is None:
            rnd.values[rank] = value
            if all(m in rnd.values and self.alive(m) for m in members):
                rnd.result = combine([rnd.values[m] for m in members])
                rnd.done = True
        if rnd.done:
            self._seq[(group, rank)] = n + 1
            self.done(rank)
            return rnd.result
        dead = [m for m in members if not self.alive(m)]
        if rnd.broken is not None or dead:
            self.done(rank)
            raise PeerLost(name, rnd.broken or f"Connection closed by peer [rank {dead[0]}]")

        def expire() -> None:
            rnd.broken = f"{name}: rank {rank} timed out"

        self.wait(rank, name, end, lambda: rnd.done or rnd.broken is not None or any(not self.alive(m) for m in members),
                  expire)


def _names(specs: Sequence[TensorSpec]) -> list[str]:
    return [f"{s.name}{list(s.shape)}:{s.dtype}" for s in specs]


def _frames(msg: Any, tensors: Sequence[torch.Tensor], now: float, with_tensors: bool = True) -> list[_Frame]:
    enc = encode(msg, tensors)
    out = [_Frame("control", now, enc.header, enc.meta)]
    if msg.tensors and with_tensors:
        out.append(_Frame("tensors", now, specs=tuple(msg.tensors), tensors=list(enc.tensors)))
    return out


class _End:
    """What every end shares: the poison guard (a failed operation poisons the end for good)."""

    name = "?"

    def __init__(self, t: MemoryTransport, rank: int) -> None:
        self.t, self.rank = t, rank
        self.poisoned: str | None = None

    def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.poisoned is not None:
            raise ChannelPoisoned(self.name, f"channel already poisoned: {self.poisoned}")
        try:
            return fn(*args)
        except (PeerLost, RemoteProtocolError) as exc:
            self.poisoned = str(exc)
            raise

    def _expect(self, msg: Any, kind: type, where: str) -> Any:
        if not isinstance(msg, kind):
            err = RemoteProtocolError(where, f"expected {kind.__name__}, got {type(msg).__name__}", "unexpected_kind")
            self.poisoned = str(err)
            raise err
        return msg


class MemoryFrontEnd(_End):
    """The front's end of the PP pair (``interface.FrontEnd``)."""

    name = "pp"
    overlaps = True

    def __init__(self, t: MemoryTransport, rank: int, geometry: ChunkGeometry, send_timeout_s: float | None) -> None:
        super().__init__(t, rank)
        assert t.pp is not None
        self.link, self.peer = t.pp, t.leader
        self.geometry, self.send_timeout_s = geometry, send_timeout_s
        self.last_call_id: int | None = None
        self.last_infer_epoch: int | None = None

    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None = None,
                      preflight: bool = True) -> None:
        if preflight:
            last_epoch = self.last_infer_epoch if env.action.value == "infer" else None
            preflight_envelope(env, tensors, self.geometry, self.last_call_id, last_cache_epoch=last_epoch)
        frames = _frames(env, tensors, self.t.now)
        bound = self.send_timeout_s if timeout_s is None else timeout_s
        self._io(self.t.send, self.rank, [(self.link, self.peer)], frames, bound, "pp_header")
        self.last_call_id = env.call_id
        if env.action.value == "infer":
            self.last_infer_epoch = env.cache_epoch
        self.t.notify("envelope", rank=self.rank, env=env, tensors=list(tensors))

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        self.t.notify("await_result", rank=self.rank, until=until)
        _, msg = self._io(self.t.recv_control, self.rank, self.link, self.peer, until, "pp_header")
        res = self._expect(msg, PPResultV1, "result")
        self.t.notify("result", rank=self.rank, result=res)
        tensors = self._io(self.t.recv_tensors, self.rank, self.link, self.peer, res.tensors, "pp_tensors") \
            if res.tensors else []
        self._io(validate_result, res, self.geometry)
        return res, tensors

    def recv_ready(self, until: float | None) -> ReadyV1:
        _, msg = self._io(self.t.recv_control, self.rank, self.link, self.peer, until, "pp_header")
        ready = self._expect(msg, ReadyV1, "ready")
        self._io(validate_ready, ready)
        return ready

    def warm_pair(self, timeout_s: float) -> None:
        self._io(_warm_pair, self.t, self.rank, timeout_s)


def _warm_pair(t: MemoryTransport, rank: int, timeout_s: float) -> None:
    assert t.pp is not None
    try:
        t.collective(rank, "pair_dev", "warm_pair", 1, sum, timeout_s)
    except WaitExpired:
        t.break_link(t.pp, f"warm_pair of rank {rank} timed out")
        raise


class MemoryLeaderEnd(_End):
    """The leader's end of the PP pair (``interface.LeaderEnd``)."""

    name = "pp"

    def __init__(self, t: MemoryTransport, rank: int, geometry: ChunkGeometry, send_timeout_s: float | None) -> None:
        super().__init__(t, rank)
        assert t.pp is not None and t.front is not None
        self.link, self.peer = t.pp, t.front
        self.geometry, self.send_timeout_s = geometry, send_timeout_s

    def recv_envelope(self, until: float | None) -> PPEnvelopeV1:
        _, msg = self._io(self.t.recv_control, self.rank, self.link, self.peer, until, "pp_header")
        return self._expect(msg, PPEnvelopeV1, "envelope")

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self._io(self.t.recv_tensors, self.rank, self.link, self.peer, specs, "pp_tensors")

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        preflight_result(result, tensors, self.geometry)
        frames = _frames(result, tensors, self.t.now)
        self._io(self.t.send, self.rank, [(self.link, self.peer)], frames, self.send_timeout_s, "pp_header")

    def send_ready(self, ready: ReadyV1) -> None:
        preflight_ready(ready)
        self._io(self.t.send, self.rank, [(self.link, self.peer)], _frames(ready, [], self.t.now),
                 self.send_timeout_s, "pp_header")

    def warm_pair(self, timeout_s: float) -> None:
        self._io(_warm_pair, self.t, self.rank, timeout_s)


class MemoryMeshEnd(_End):
    """A mesh rank's end of the TP channel (``interface.MeshEnd``): the leader broadcasts, workers receive."""

    name = "tp"

    def __init__(self, t: MemoryTransport, rank: int, geometry: ChunkGeometry, send_timeout_s: float | None) -> None:
        super().__init__(t, rank)
        self.geometry, self.send_timeout_s = geometry, send_timeout_s

    def send_header(self, header: TPHeaderV1, tensors: Sequence[torch.Tensor] = (), with_tensors: bool = True,
                    preflight: bool = True) -> None:
        """``preflight=False`` (the header was built from a just-validated envelope) is checked anyway here:
        the model thereby tests the claim that it need not be."""
        t = self.t
        if len(t.mesh) == 1:
            return
        preflight_tp_header(header, tensors, self.geometry)
        frames = _frames(header, tensors, t.now, with_tensors)
        self._io(t.send, self.rank, [(t.tp[w], w) for w in t.mesh[1:]], frames, self.send_timeout_s, "tp_header")
        t.notify("tp_header", rank=self.rank, header=header)

    def recv_header(self, until: float | None) -> TPHeaderV1:
        link = self.t.tp[self.rank]
        _, msg = self._io(self.t.recv_control, self.rank, link, self.t.leader, until, "tp_header")
        return self._expect(msg, TPHeaderV1, "tp_header")

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self._io(self.t.recv_tensors, self.rank, self.t.tp[self.rank], self.t.leader, specs, "tp_tensors")

    def warm_mesh(self, timeout_s: float) -> None:
        self._io(self.t.collective, self.rank, "mesh_dev", "warm_mesh", 1, sum, timeout_s)


class MemoryStartup:
    """One rank's startup collectives (``interface.StartupCollectives``), bounded by the process-group
    timeout like ``DistributedCollectives``."""

    def __init__(self, t: MemoryTransport, rank: int) -> None:
        self.t, self.rank = t, rank
        self._vote: int | None = None  # the vote's result while its causes are still being gathered

    def _world(self, name: str, value: Any, combine: Callable[[list[Any]], Any]) -> Any:
        return self.t.collective(self.rank, "world", name, value, combine, self.t.pg_timeout_s)

    def init_world(self) -> None:
        self._world("init_world", None, lambda _: None)

    def gather_configs(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        return self._world("parity", config, list)

    def init_groups(self) -> None:
        self._world("init_groups", None, lambda _: None)

    def vote(self, vote: int, cause: str | None) -> tuple[int, list[str | None]]:
        if self._vote is None:
            self._vote = self._world("vote", vote, min)
        low = self._vote
        causes = self._world("vote_causes", cause, list) if low == 0 else []  # WouldBlock: the vote is kept
        self._vote = None
        return low, causes

    def gather_fingerprints(self, fingerprint: str) -> list[str]:
        return self.t.collective(self.rank, "mesh_cpu", "fingerprint", fingerprint, list, self.t.pg_timeout_s)

    def barrier(self, verdict: int) -> int:
        return self._world("barrier", verdict, min)


class MemoryCommunicator:
    """The generator's collective (``pipelines.comm.Communicator``) on the mesh device group: a sum whose
    every contribution must be the same call's (the fake generator passes its call's ids)."""

    def __init__(self, t: MemoryTransport, rank: int) -> None:
        self.t, self.global_rank = t, rank
        self.rank = t.mesh.index(rank)
        self.size = len(t.mesh)

    def all_reduce_sum_(self, x: torch.Tensor) -> None:
        if self.size == 1:
            return
        got = self.t.collective(self.global_rank, "mesh_dev", "tp_all_reduce", x.clone(), _same_call_sum, None)
        x.copy_(got)


def _same_call_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise TransportViolation(f"mesh out of step: the ranks' all-reduces belong to different calls {parts}")
    return parts[0] * len(parts)


# == the fakes =======================================================================================


class CountingGenerator:
    """A generator shard that runs no model: per call one all-reduce through its communicator carrying the
    call's ids (every mesh rank must run the same call), a call counter, latents of the right shape.
    ``fault``: the next call raises ("raise") or miscounts its generator calls ("tripwire"; "tripwire_twice":
    the next two). ``slow_s``: the
    next call computes that many (virtual) seconds before its all-reduce; ``tempo``: the next calls', one each."""

    def __init__(self, geometry: ChunkGeometry, comm: MemoryCommunicator) -> None:
        self.geometry, self.comm = geometry, comm
        self.calls = 0  # completed calls (every action)
        self.start_frame = 0
        self.fault: str | None = None
        self.slow_s = 0.0
        self.tempo: deque[float] = deque()  # compute seconds of the next calls, one each (after slow_s)
        self._computed_at: float | None = None  # when the call in hand is computed (a slow call)
        self.seen: list[tuple[int, int, int, bool]] = []  # (call_id, chunk_index, cache_epoch, recompute)

    def run(self, call: ChunkCall) -> ChunkOutput:
        g = self.geometry
        if tuple(call.noise.shape) != tuple(g.noise_shape()):
            raise ValueError(f"noise {tuple(call.noise.shape)} != {g.noise_shape()}")
        ctx = 0
        if call.do_kv_recompute:
            if call.context_frames is None:
                raise ValueError("do_kv_recompute without context_frames")
            ctx = int(call.context_frames.shape[1])
            if not 1 <= ctx <= g.max_context_frames:  # the KV cache holds at most the window
                raise ValueError(f"{ctx} context frames exceed the window of {g.max_context_frames}")
        elif call.context_frames is not None:
            raise ValueError("context_frames without do_kv_recompute")
        fault = self.fault
        if fault == "tripwire_twice":  # this call and the next miscount
            fault = "tripwire"
        if fault == "raise":
            self.fault, self._computed_at = None, None
            raise RuntimeError(f"injected generator failure (call_id={call.call_id})")
        t = self.comm.t
        if self._computed_at is None:  # the call's first attempt: how long it computes is fixed now
            slow = self.slow_s or (self.tempo.popleft() if self.tempo else 0.0)
            self.slow_s, self._computed_at = 0.0, t.now + slow
        at = self._computed_at
        if t.now < at:  # computing: a heartbeat-like timer, not a bound
            t.wait(self.comm.global_rank, "compute", at, lambda: t.now >= at, failure=False)
        ids = torch.tensor([self.calls, call.call_id, call.chunk_index, call.cache_epoch, int(call.do_kv_recompute),
                            ctx, int(call.init_cache), int(call.reset_cache)], dtype=torch.float64)
        self.comm.all_reduce_sum_(ids)  # WouldBlock until every mesh rank runs this call: nothing changed yet
        self.calls += 1
        self._computed_at = None
        self.seen.append((call.call_id, call.chunk_index, call.cache_epoch, call.do_kv_recompute))
        if call.init_cache or call.reset_cache:
            self.start_frame = 0
        self.start_frame += g.latent_frames
        calls = call.expected_generator_calls
        if fault == "tripwire":
            self.fault = "tripwire" if self.fault == "tripwire_twice" else None
            calls += 1
        return ChunkOutput(latents=(call.noise * 0.5).to(torch.float32), generator_calls=calls,
                           current_start_frame=self.start_frame, timings_ms={"total": 1.0})

    def reset(self) -> None:
        self.start_frame = 0

    def fingerprint(self) -> str:
        return FINGERPRINT


class SmallStage0(StandinStage0):
    """The stand-in's stage 0 with frames at the latents' size (decoding is most of a cheap stage 0's time)."""

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        c, t, h, w = latents.shape
        frames = 4 * t - (3 if first_chunk else 0)
        x = latents[:3].float().mean(dim=1)
        img = ((x.tanh() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        return img.unsqueeze(0).expand(frames, -1, -1, -1).contiguous()


class MemoryFactory:
    """The fake pipeline's factory (what ``LoadedPipeline.factory`` holds)."""

    name = "memory"

    def geometry(self, preset: str) -> ChunkGeometry:
        return GEOMETRY

    def timesteps(self, preset: str) -> tuple[int, ...]:
        return TIMESTEPS


class SteppedInProcessChannel(InProcessChannel):
    """Pure TP's in-process channel, steppable: as in production the front's send runs the leader's whole
    call (its executor, in this process), but a mesh operation that cannot complete yet (WouldBlock) leaves
    the send at the front's head; retried, the send resumes the leader's call instead of sending again."""

    def __init__(self, geometry: ChunkGeometry, transport: MemoryTransport, rank: int) -> None:
        super().__init__(geometry)
        self.t, self.rank = transport, rank
        self.leader: LeaderExecutor | None = None
        self.delivering: int | None = None  # the call_id whose leader call is in progress
        self._sending: tuple[PPEnvelopeV1, list[torch.Tensor]] | None = None
        self.deliver = self._deliver

    def _deliver(self, env: PPEnvelopeV1) -> str | None:
        assert self.leader is not None
        self.delivering = env.call_id
        self._sending = (env, list(self._tensors))
        self.leader.feed(EnvelopeReceived(env, self.t.now))
        return self._resume()

    def _resume(self) -> str | None:
        assert self.leader is not None
        ex = self.leader.drain()  # WouldBlock: the call stays in progress
        self.delivering = None
        return ex.reason if ex is not None else None

    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None = None,
                      preflight: bool = True) -> None:
        if self.delivering is None:
            super().send_envelope(env, tensors, timeout_s, preflight)
        else:
            self.exited = self._resume()
        sent, self._sending = self._sending, None
        if sent is not None:  # sent when the leader's call is done (as production's send returns then)
            self.t.notify("envelope", rank=self.rank, env=sent[0], tensors=sent[1])

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        self.t.notify("await_result", rank=self.rank, until=until)
        if self._results:
            self.t.notify("result", rank=self.rank, result=self._results[0][0])
        return super().recv_result(until)


# == one rank ========================================================================================


class MemoryBoard:
    """The job's store as far as drains go (``ProgressBoard.request_drain`` / ``drain_requested``): a drain
    asked of any rank is published; the front's drain watcher (``adapters/roles/front.DrainWatcher``)
    reads it every ``POLL_S`` once its engine serves and asks the engine to stop (``MemoryJob.advance_to``)."""

    POLL_S = DrainWatcher.POLL_S

    def __init__(self, job: MemoryJob, rank: int) -> None:
        self.job, self.rank = job, rank

    def request_drain(self) -> None:
        if self.job.drain_rank is None:
            self.job.drain_rank, self.job.drain_at = self.rank, self.job.now

    def drain_requested(self) -> int | None:
        return self.job.drain_rank

    def failed_rank(self) -> int | None:
        """Another rank that failed (its lifecycle says so, or it exited non-zero): the store as the Exiter
        leaves it."""
        for r in self.job.ranks:
            if r.rank != self.rank and (r.lifecycle.state == "failed" or r.code not in (None, 0)):
                return r.rank
        return None


class MemoryRank:
    """One rank's process: its lifecycle, its startup executor, then its role's executor, built as
    ``adapters/roles/`` builds them. ``code``: the exit code once it exited (-9: killed)."""

    def __init__(self, job: MemoryJob, rank: int, config: RunConfig, options: JobOptions, faults: FaultPlan,
                 *, load_error: str | None = None, fingerprint: str = FINGERPRINT) -> None:
        self.job, self.rank, self.config = job, rank, config
        t = job.transport
        self.rt = DistributedRuntime(config, rank, config.world_size)  # who it is; never initialised
        self.role = self.rt.role
        self.lifecycle: LifecycleMachine = make_lifecycle(self.role, rank, mesh_rank=self.rt.mesh_rank)
        self.ctx = RankContext(rt=self.rt, config=config, options=options, lifecycle=self.lifecycle, faults=faults,
                               clock=t.clock, started_at=t.now,
                               progress=MemoryBoard(job, rank))  # type: ignore[arg-type]
        self.load_error, self.fingerprint = load_error, fingerprint
        self.generator: CountingGenerator | None = None
        self.engine: FrontEngine | None = None
        self.leader: LeaderExecutor | None = None
        self.worker: WorkerExecutor | None = None
        self.channel: SteppedInProcessChannel | None = None
        self.startup = StartupExecutor(MemoryStartup(t, rank), self.lifecycle, faults, self._build, clock=t.clock)
        self.executor: Executor = self.startup
        self.phase = "startup"
        self.code: int | None = None
        self.reason = ""
        self.drain_deadline: float | None = None
        self.startup.begin(self.lifecycle.start(config.model_dump(mode="json")))

    @property
    def alive(self) -> bool:
        return self.code is None

    # -- the load step (main.build_loader) ----------------------------------------------------------
    def _build(self) -> LoadedPipeline:
        if self.load_error:
            raise RuntimeError(self.load_error)
        g = self.job.geometry
        loaded = LoadedPipeline(factory=MemoryFactory(), geometry=g, timesteps=TIMESTEPS)  # type: ignore[arg-type]
        if self.rt.hosts_front:
            loaded.stage0 = SmallStage0(g, CPU, torch.float32)
        if self.rt.is_mesh_member:
            self.generator = CountingGenerator(g, MemoryCommunicator(self.job.transport, self.rank))
            loaded.generator = self.generator
            loaded.fingerprint = self.fingerprint
        return loaded

    # -- stepping -----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Perform the next intent. False: it would block (nothing consumed)."""
        t = self.job.transport
        t.blocked.pop(self.rank, None)
        try:
            ex = self.executor.step()
        except WouldBlock:
            return False
        if ex is not None:
            self._exit(ex)
        elif self.phase == "startup" and not self.executor.pending:
            self.ctx.loaded = self.startup.loaded
            self._serve()
        elif self.phase == "tp_warmup" and not self.executor.pending:
            self._serve_tp_front()
        return True

    def _exit(self, ex: Exit) -> None:
        if self.phase == "startup":
            code = ex.code  # run_startup: RankExit(ex.code)
        elif self.phase == "tp_warmup":
            code = ex.code or EXIT_FAILED  # serve_tp_rank0: warmup failed
        elif self.engine is not None:  # _serve / _exit_code: 0, or RankExit(EXIT_FAILED) after the grace
            code = EXIT_OK if ex.code == EXIT_OK else EXIT_FAILED
        else:  # mesh_exit
            code = ex.code
        self.die(code, ex.reason)

    def die(self, code: int, reason: str) -> None:
        if self.code is not None:
            return
        self.code, self.reason = code, reason
        self.job.transport.kill(self.rank)
        self.job.transport.notify("exit", rank=self.rank, code=code, reason=reason)

    # -- the roles (adapters/roles/*.py) -------------------------------------------------------------
    def _serve(self) -> None:
        ctx, cfg, t = self.ctx, self.config, self.job.transport
        p = ctx.pipeline
        now = t.now
        if self.role == "front":
            channel = MemoryFrontEnd(t, self.rank, p.geometry, send_timeout_s=cfg.deadline_floor_s)
            self._start_front(front_machine(ctx, ping=True, overlap=channel.overlaps), channel)
        elif self.role == "leader":
            assert p.generator is not None
            pp = MemoryLeaderEnd(t, self.rank, p.geometry, send_timeout_s=cfg.deadline_floor_s + cfg.watchdog_s)
            tp = MemoryMeshEnd(t, self.rank, p.geometry, send_timeout_s=cfg.watchdog_s)
            relay = leader_machine(ctx, front_in_process=False)
            self.leader = LeaderExecutor(relay, p.generator, tp, pp, CPU, ctx.faults, recv_timeout_s=cfg.watchdog_s,
                                         warm_timeout_s=4 * cfg.watchdog_s, clock=t.clock)
            ctx.attach(self.leader)
            self.executor = self.leader
            self.leader.begin(relay.start(now))
            self.phase = "serving"
        elif self.role == "worker":
            assert p.generator is not None
            tp = MemoryMeshEnd(t, self.rank, p.geometry, send_timeout_s=cfg.watchdog_s)
            loop = WorkerLoopMachine(self.rank, watchdog_s=cfg.watchdog_s, now=now, geometry=p.geometry,
                                     heartbeat_s=cfg.heartbeat_s, lifecycle=ctx.lifecycle, role=self.role,
                                     mesh_rank=self.rt.mesh_rank)
            self.worker = WorkerExecutor(loop, p.generator, tp, CPU, ctx.faults, recv_timeout_s=cfg.watchdog_s,
                                         clock=t.clock)
            ctx.attach(self.worker)
            self.executor = self.worker
            self.worker.begin(loop.start(now))
            self.phase = "serving"
        else:  # tp_rank0: the leader's executor in process, its warmup first
            assert p.generator is not None
            self.channel = SteppedInProcessChannel(p.geometry, t, self.rank)
            relay = leader_machine(ctx, front_in_process=True)
            tp = MemoryMeshEnd(t, self.rank, p.geometry, send_timeout_s=cfg.watchdog_s)
            self.leader = LeaderExecutor(relay, p.generator, tp, self.channel, CPU, ctx.faults, recv_timeout_s=None,
                                         warm_timeout_s=4 * cfg.watchdog_s, clock=t.clock)
            self.channel.leader = self.leader
            self.executor = self.leader
            self.leader.begin(relay.start(now))
            self.phase = "tp_warmup"

    def _serve_tp_front(self) -> None:
        assert self.channel is not None and self.channel.ready is not None
        self._start_front(front_machine(self.ctx, ping=False, overlap=self.channel.overlaps), self.channel)

    def _start_front(self, machine: Any, channel: Any) -> None:
        ctx, t = self.ctx, self.job.transport
        p, opts = ctx.pipeline, ctx.options
        assert p.stage0 is not None
        engine = FrontEngine(machine, channel, p.stage0, p.geometry, conditioning=p.stage0.encode_prompt(opts.prompt),
                             prompt=opts.prompt, faults=ctx.faults, clock=t.clock, wait=self._idle_wait)
        for sink in ctx.frame_sinks:
            engine.add_sink(sink)
        ctx.engine = self.engine = engine
        self.engine_at = t.now  # the front's drain watcher starts with its engine (adapters/roles/front.py)
        ctx.attach(engine)
        self.executor = engine
        t.notify("front_engine", rank=self.rank, engine=engine)
        engine.begin(machine.start(t.now))
        self.phase = "serving"

    def _idle_wait(self, ex: Executor, until: float) -> None:
        """The engine's ``Idle``: wake at ``until`` or on a request; WouldBlock until then."""
        t = self.job.transport
        if ex.woken or t.now >= until:
            return
        t.wait(self.rank, "idle", until, lambda: ex.woken or ex.has_requests(), failure=False)

    # -- the process shell (adapters/roles/main.py) ---------------------------------------------------
    def signal(self) -> str:
        """SIGTERM / Ctrl-C, as ``main.on_signal`` handles it; returns the lifecycle's verdict (or
        "ignored" when a drain is already under way). A drain asked for before the serving executor exists
        is kept by the rank's context and replayed when it attaches (``RankContext.request_drain``)."""
        if not self.alive:
            return "dead"
        t = self.job.transport
        failed = self.ctx.progress.failed_rank() if self.ctx.progress is not None else None
        verdict = self.lifecycle.signal_verdict(job_failed=failed is not None)
        if verdict == "drain" and self.drain_deadline is None:
            self.ctx.request_drain(t.now)
            deadline_s = self.engine.machine.chunk.deadline_s() if self.engine is not None else None
            self.drain_deadline = t.now + drain_bound_s(self.config, self.rt.hosts_front, deadline_s)
            return "drain"
        if verdict == "fail":
            self.die(EXIT_FAILED, f"SIGTERM during {self.lifecycle.state}")
            return "fail"
        return "ignored"

    def check_drain_bound(self) -> None:
        """main's loop: a drain that outlives its bound ends the process (exit 1)."""
        if self.alive and self.drain_deadline is not None and self.job.transport.now > self.drain_deadline:
            self.die(EXIT_FAILED, "drain did not finish within its bound")

    # -- questions ----------------------------------------------------------------------------------
    def head(self) -> Intent | None:
        return self.executor.pending[0] if self.executor.pending else None

    def describe(self) -> str:
        sub = ""
        if self.engine is not None:
            sub = f"/{self.engine.machine.state}/{self.engine.machine.chunk.state}"
        elif self.leader is not None:
            sub = f"/{self.leader.machine.state}"
        elif self.worker is not None:
            sub = f"/{self.worker.machine.state}"
        head = self.head()
        b = self.job.transport.blocked.get(self.rank)
        return (f"r{self.rank}:{self.role}:{self.lifecycle.state}{sub}"
                + (f"(exit {self.code})" if not self.alive else f"[{type(head).__name__ if head else '-'}"
                   + (f" waits {b.what}" + (f" until {b.until:g}" if b.until is not None else "") if b else "") + "]"))


# == the job =========================================================================================


class MemoryJob:
    """A whole job in memory: ``topology`` "pp1" (front rank 0 + mesh ranks 1..M) or "tp" (mesh ranks
    0..M-1; rank 0 leads and fronts). Startup faults: ``bad_config_rank`` (its run config differs: parity
    fails), ``load_fail_rank`` (its load raises), ``bad_fingerprint_rank`` (a mesh rank whose shard
    fingerprint differs). ``front_faults``: ``PP1_FAULT`` faults of the front (message faults only:
    ``corrupt_envelope``, ``unserialisable``, ``bad_dtype``). ``config``: RunConfig fields;
    ``options``: JobOptions fields (``chunks`` (None: serve until stopped), ``then``, ``ready_timeout_s``);
    ``window``: the attention window in latent frames (default: the stand-in's 6; 3 a chunk)."""

    def __init__(self, topology: str = "pp1", mesh_size: int = 2, *, bad_config_rank: int | None = None,
                 load_fail_rank: int | None = None, bad_fingerprint_rank: int | None = None,
                 front_faults: Sequence[Fault] = (), options: dict[str, Any] | None = None,
                 window: int | None = None, **config: Any) -> None:
        self.geometry = GEOMETRY if window is None else GEOMETRY.model_copy(update={"max_context_frames": window})
        if topology == "pp1":
            front: int | None = 0
            mesh = tuple(range(1, 1 + mesh_size))
        else:
            front, mesh = None, tuple(range(mesh_size))
        world = len(mesh) + (1 if front is not None else 0)
        defaults: dict[str, Any] = dict(heartbeat_s=1.0, watchdog_s=5.0, deadline_floor_s=30.0,
                                        pipeline="pp1.testing.memory:MemoryFactory")
        self.config = RunConfig(topology=topology, world_size=world, mesh_global_ranks=mesh,  # type: ignore[arg-type]
                                **{**defaults, **config})
        opts = dict(chunks=None, after_chunks="shutdown", prompt="a calm sea at dawn", ready_timeout_s=600.0)
        opts.update(options or {})
        self.options = JobOptions(**opts)  # type: ignore[arg-type]
        self.transport = MemoryTransport(world, mesh, front, pg_timeout_s=self.options.pg_timeout_s)
        self.drain_rank: int | None = None  # the job's store: the first rank asked to drain
        self.drain_at = 0.0  # when it was asked
        self.drain_watched = False  # the front's watcher asked its engine to stop
        self.ranks: list[MemoryRank] = []
        for r in range(world):
            cfg = self.config
            if r == bad_config_rank:
                cfg = cfg.model_copy(update={"dtype": "bfloat16"})
            faults = FaultPlan(r, list(front_faults) if r == 0 else [])
            self.ranks.append(MemoryRank(
                self, r, cfg, self.options, faults,
                load_error=f"injected load failure on rank {r}" if r == load_fail_rank else None,
                fingerprint=FINGERPRINT + ("-drifted" if r == bad_fingerprint_rank else "")))
        self.front = self.ranks[0]  # the front, or pure TP's rank 0
        self.leader = self.ranks[mesh[0]]
        self.mesh = [self.ranks[r] for r in mesh]

    @property
    def now(self) -> float:
        return self.transport.now

    def clock(self) -> float:
        return self.transport.now

    # -- stepping -----------------------------------------------------------------------------------
    def ready(self, rank: int) -> bool:
        """Would the rank's next step not block (as far as the transport knows)?"""
        r, t = self.ranks[rank], self.transport
        if not r.alive or t.stalled(rank):
            return False
        b = t.blocked.get(rank)
        if b is None:
            return True
        head = r.head()
        if head is not None and head.BETWEEN_STEPS and r.executor.has_requests():
            return True
        return bool(b.go()) or (b.until is not None and t.now >= b.until)

    def enabled(self) -> list[int]:
        return [r.rank for r in self.ranks if self.ready(r.rank)]

    def step(self, rank: int) -> bool:
        """Step ``rank``'s executor once (it must be alive and not stalled). False: it would block."""
        r = self.ranks[rank]
        assert r.alive and not self.transport.stalled(rank), f"rank {rank} cannot step"
        return r.step()

    def all_exited(self) -> bool:
        return all(not r.alive for r in self.ranks)

    # -- time ---------------------------------------------------------------------------------------
    def timers(self, failure_only: bool = False) -> list[float]:
        """When something will happen by itself: the end of every bounded wait of a live rank (and, unless
        ``failure_only``, heartbeats, stall ends and drain bounds)."""
        t = self.transport
        out: list[float] = []
        for r in self.ranks:
            if not r.alive:
                continue
            b = t.blocked.get(r.rank)
            if b is not None and b.until is not None and (b.failure or not failure_only):
                out.append(b.until)
            if failure_only:
                continue
            if t.stalled(r.rank):
                out.append(t.stalled_until[r.rank])
            if r.drain_deadline is not None:
                out.append(r.drain_deadline + 1e-6)
        watch = self._drain_watch_at()
        if watch is not None and not failure_only:
            out.append(watch)
        return out

    def poll_drain(self, now: bool = False) -> None:
        """The front's drain watcher reads the store: at its poll time, or ``now`` (a scheduler's choice:
        with virtual time standing still while ranks step, a poll in production lands between any two steps)."""
        watch = self._drain_watch_at()
        if watch is not None and (now or self.transport.now >= watch):
            self.drain_watched = True
            assert self.front.engine is not None
            self.front.engine.request_stop()

    def _drain_watch_at(self) -> float | None:
        """When the front's drain watcher next reads the board and finds a drain (None: nothing to find)."""
        f = self.front
        if self.drain_rank is None or self.drain_watched or f.engine is None or not f.alive:
            return None
        poll = MemoryBoard.POLL_S
        since = max(self.drain_at, f.engine_at)  # the first poll after both the request and the watcher's start
        return f.engine_at + poll * (math.floor((since - f.engine_at) / poll) + 1)

    def advance_to(self, when: float) -> None:
        """Move the clock to ``when`` (never back); drains past their bound end their rank."""
        t = self.transport
        t.now = max(t.now, when)
        self.poll_drain()
        for r in self.ranks:
            r.check_drain_bound()

    # -- faults and requests ------------------------------------------------------------------------
    def kill(self, rank: int) -> None:
        self.ranks[rank].die(-9, "killed")

    def stall(self, rank: int, seconds: float) -> None:
        t = self.transport
        t.stalled_until[rank] = max(t.stalled_until.get(rank, 0.0), t.now + seconds)

    def garble_next_frame(self, to_rank: int) -> None:
        """The next control frame to ``to_rank`` (on the PP pair or its TP channel) arrives undecodable."""
        t = self.transport
        link = t.pp if to_rank in (t.front, t.leader) and t.pp is not None else t.tp.get(to_rank)
        if link is not None:
            link.garble_next.add(to_rank)

    def add_sink(self, sink: Callable[[FrameBatch], None]) -> None:
        """Who sees the front's shown chunks (register before the front serves)."""
        self.front.ctx.frame_sinks.append(sink)

    def describe(self) -> str:
        return f"t={self.now:g} " + " ".join(r.describe() for r in self.ranks)
