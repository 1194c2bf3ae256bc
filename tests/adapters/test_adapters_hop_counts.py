"""How much checking one protocol hop costs, pinned as counts (not times): a chunk's round trip front ->
leader (-> worker) -> front through the real channels, wire, executors and machines (the hop bench's
front, the leader's and a worker's serve loops, the no-op generator), over an in-memory runtime whose
ranks are threads. Per round trip, each message's metadata becomes JSON once per side (the sender's
encode, the receiver's canonical check) and each message meets the rules once per side (the sender's
preflight, the receiver's validation), except the TP header relaying an envelope the leader validated
one step before (only encoded)."""

from __future__ import annotations

import itertools
import queue
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pp1.adapters.rank.options import JobOptions, run_config
from pp1.adapters.roles import hop
from pp1.adapters.roles.leader import serve_leader
from pp1.adapters.roles.worker import serve_worker
from pp1.adapters.transport.channels import PPChannel
from pp1.adapters.transport.runtime import Groups, WaitExpired
from pp1.protocol import codec, preflight
from pp1.protocol.config import RunConfig
from pp1.protocol.messages import Action, PPEnvelopeV1, relay_header

CPU_GROUPS = ("world_cpu", "mesh_cpu", "pair_cpu")


class Queues(dict):
    """(group, src, dst) -> the queue of that link, made on first use by whichever thread comes first. Not a
    ``defaultdict``: its factory runs Python code, so two threads missing the same key at once could each
    install a queue, one overwriting the other with a message already in it (a lost message, a hang)."""

    def __missing__(self, key: tuple[str, int, int]) -> queue.Queue:
        return self.setdefault(key, queue.Queue())


class ThreadRuntime:
    """The runtime's identity and ops (send, recv, broadcast, all_reduce) for one rank of a job whose ranks
    are threads of this process: every (group, src, dst) is a queue of tensor copies. Groups are names."""

    def __init__(self, config: RunConfig, rank: int, queues: dict[tuple[str, int, int], queue.Queue]) -> None:
        self.config, self.rank, self.queues = config, rank, queues
        self.world_size = config.world_size
        self.mesh_global_ranks = tuple(config.mesh_global_ranks)
        self.front_rank, self.leader_rank = config.front_rank, config.leader_rank
        self.mesh_size = len(self.mesh_global_ranks)
        self.is_mesh_member = rank in self.mesh_global_ranks
        self.mesh_rank = self.mesh_global_ranks.index(rank) if self.is_mesh_member else None
        self.role = config.role_of(rank)
        self.hosts_front = config.hosts_front(rank)
        self.device = torch.device("cpu")
        pair = (self.front_rank, self.leader_rank)
        self.members = {"mesh_cpu": self.mesh_global_ranks, "mesh_dev": self.mesh_global_ranks,
                        "pair_cpu": pair, "pair_dev": pair}
        self.groups = Groups(**{g: g for g, ranks in self.members.items() if rank in ranks})

    @property
    def ids(self) -> str:
        return f"rank={self.rank} role={self.role}"

    @property
    def pair_ranks(self) -> tuple[int, int]:
        assert self.front_rank is not None
        return (self.front_rank, self.leader_rank)

    def is_cpu_group(self, group: Any) -> bool:
        return group in CPU_GROUPS

    def tensor_device(self, group: Any) -> torch.device:
        return self.device

    def send(self, t: torch.Tensor, dst: int, group: Any, purpose: str, timeout_s: float | None = None) -> None:
        self.queues[(group, self.rank, dst)].put(t.detach().clone())

    def recv(self, t: torch.Tensor, src: int, group: Any, purpose: str, timeout_s: float | None = None
             ) -> torch.Tensor:
        try:
            got = self.queues[(group, src, self.rank)].get(timeout=min(timeout_s or 30.0, 30.0))
        except queue.Empty:
            raise WaitExpired(purpose, f"nothing from rank {src} on {group}") from None
        assert got.numel() == t.numel() and got.dtype == t.dtype, (purpose, got.shape, t.shape)
        return t.copy_(got.reshape(t.shape))

    def post_send(self, t: torch.Tensor, dst: int, group: Any, purpose: str) -> None:
        self.send(t, dst, group, purpose)

    def post_recv(self, t: torch.Tensor, src: int, group: Any, purpose: str) -> Callable[[float | None], Any]:
        return lambda timeout_s: self.recv(t, src, group, purpose, timeout_s)

    def finish(self, posted: Callable[[float | None], Any] | None, timeout_s: float | None = None) -> None:
        if posted is not None:
            posted(timeout_s)

    def broadcast(self, t: torch.Tensor, src: int, group: Any, purpose: str, timeout_s: float | None = None
                  ) -> torch.Tensor:
        if src != self.rank:
            return self.recv(t, src, group, purpose, timeout_s)
        for dst in self.members[group]:
            if dst != self.rank:
                self.send(t, dst, group, purpose)
        return t

    def all_reduce(self, t: torch.Tensor, op: Any, group: Any, purpose: str, timeout_s: float | None = None
                   ) -> torch.Tensor:
        others = [r for r in self.members[group] if r != self.rank]
        for dst in others:
            self.send(t, dst, group, purpose)
        total = t.clone()
        for src in others:
            total += self.recv(torch.empty_like(t), src, group, purpose, timeout_s)
        return t.copy_(total)


class Counter:
    """Calls of a module's function (another module's attribute, e.g. the codec's ``json.dumps``), counted
    from every thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, attr: str | None = None) -> None:
        self._calls = itertools.count()
        self.n = 0
        owner = getattr(module, name) if attr else module
        inner: Callable[..., Any] = getattr(owner, attr or name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.n = next(self._calls) + 1
            return inner(*args, **kwargs)

        if attr:  # a stand-in for the module attribute with the one function counted
            stand_in = types.SimpleNamespace(**{k: getattr(owner, k) for k in dir(owner) if not k.startswith("__")})
            setattr(stand_in, attr, counted)
            monkeypatch.setattr(module, name, stand_in)
        else:
            monkeypatch.setattr(module, name, counted)


def run_hop_job(tp: int, chunks: int) -> None:
    """Front + a mesh of ``tp`` (threads): startup, ``chunks`` round trips of the hop's front, SHUTDOWN."""
    opts = JobOptions(topology="pp1", tp=tp, preset="micro")
    cfg = run_config(opts)
    queues = Queues()
    ctxs = [hop.minimal_context(ThreadRuntime(cfg, r, queues), opts) for r in range(cfg.world_size)]  # type: ignore[arg-type]
    codes: dict[int, Any] = {}

    def mesh_rank(ctx: Any) -> None:
        try:
            codes[ctx.rt.rank] = (serve_leader if ctx.rt.role == "leader" else serve_worker)(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported below
            codes[ctx.rt.rank] = exc

    threads = [threading.Thread(target=mesh_rank, args=(c,), daemon=True) for c in ctxs[1:]]
    for t in threads:
        t.start()
    front = hop.HopFront(ctxs[0], PPChannel(ctxs[0].rt, ctxs[0].pipeline.geometry, send_timeout_s=30.0))
    front.start()
    for _ in range(chunks):
        front.round_trip()
    front.shutdown()
    for t in threads:
        t.join(30)
    assert codes == {r: 0 for r in range(1, cfg.world_size)}, codes


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("tp", "encodes", "checks"), [(1, 4, 4), (2, 6, 5)])
def test_one_hop_encodes_and_checks_each_message_once_per_side(
    tp: int, encodes: int, checks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per chunk round trip: TP=1: envelope (front encodes, leader checks the canonical form) and result
    (leader, front): 4 JSON encodes, 4 rule checks (the front's preflight, the leader's validation, the
    leader's result preflight, the front's validation). TP=2 adds the relayed TP header: encoded by the
    leader (not re-checked: it relays the envelope just validated), decoded and validated by the worker:
    6 encodes, 5 checks. (Before issue 10: 8 / 12 encodes, 4 / 6 checks.)"""
    per_job = []
    for chunks in (2, 5):
        json_encodes = Counter(monkeypatch, codec, "encode_meta")  # every canonical encoding, whoever asks
        rule_checks = Counter(monkeypatch, preflight, "check_common")  # the first rule of every validate_*
        run_hop_job(tp, chunks)
        per_job.append((json_encodes.n, rule_checks.n))
        monkeypatch.undo()
    (e2, c2), (e5, c5) = per_job
    assert ((e5 - e2) / 3, (c5 - c2) / 3) == (encodes, checks)


def test_relayed_headers_of_valid_envelopes_are_valid() -> None:
    """Why the leader need not re-check a header it relays: every envelope that passed its validation makes
    a valid TP header (INFER: the hypothesis round trip in tests/protocol; NOOP and SHUTDOWN here)."""
    from pp1.pipelines.loader import load_factory

    geometry = load_factory().geometry("micro")
    for action in (Action.NOOP, Action.SHUTDOWN):
        env = PPEnvelopeV1(action=action, call_id=7, cache_epoch=2)
        preflight.validate_envelope(env, geometry, 6)
        preflight.validate_tp_header(relay_header(env), geometry, 6)


def test_the_leader_posts_the_receives_of_an_envelopes_tensors_with_its_metadata() -> None:
    """The PP channel's leader end posts the announced tensors' receives as soon as the envelope's metadata
    decoded (its relay machine validates while they travel); ``recv_tensors`` waits for exactly those, and
    refuses specs it did not post (a local error: nothing is received out of step)."""
    from pp1.adapters.front.engine import announce
    from pp1.protocol.errors import LocalProtocolError

    opts = JobOptions(topology="pp1", tp=1, preset="micro")
    cfg = run_config(opts)
    queues = Queues()
    front_rt, leader_rt = (ThreadRuntime(cfg, r, queues) for r in (0, 1))
    geometry = hop.minimal_context(front_rt, opts).pipeline.geometry  # type: ignore[arg-type]
    front, leader = (PPChannel(rt, geometry, send_timeout_s=5.0) for rt in (front_rt, leader_rt))  # type: ignore[arg-type]
    tensors = [torch.randn(geometry.conditioning_shape()), torch.randn(geometry.noise_shape())]
    env = announce(PPEnvelopeV1(action=Action.INFER, call_id=1, chunk_index=0, cache_epoch=0, init_cache=True), tensors)
    for _ in range(2):
        front.send_envelope(env, tensors, preflight=False)
    got = leader.recv_envelope(until=None)
    assert got.tensors == env.tensors
    received = leader.recv_tensors(got.tensors, timeout_s=5.0)
    assert all(torch.equal(a, b) for a, b in zip(received, tensors, strict=True))
    leader.recv_envelope(until=None)
    with pytest.raises(LocalProtocolError) as e:
        leader.recv_tensors(got.tensors[:1], timeout_s=5.0)
    assert e.value.code == "not_posted"
