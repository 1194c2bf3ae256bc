"""The in-memory transport's rules (``pp1.testing.memory``), one by one: what the model test relies on."""

from __future__ import annotations

import pytest
import torch

from pp1.adapters.transport.interface import WouldBlock
from pp1.adapters.transport.runtime import ChannelPoisoned, PeerLost, WaitExpired
from pp1.pipelines.interface import ChunkCall
from pp1.protocol.messages import T_CONDITIONING, T_NOISE, Action, PPEnvelopeV1, PPResultV1, TPHeaderV1
from pp1.protocol.tensors import TensorSpec
from pp1.testing.memory import (
    GEOMETRY,
    TIMESTEPS,
    CountingGenerator,
    MemoryCommunicator,
    MemoryFrontEnd,
    MemoryJob,
    MemoryLeaderEnd,
    MemoryMeshEnd,
    MemoryStartup,
    MemoryTransport,
    TransportViolation,
)

pytestmark = pytest.mark.timeout(60)
G = GEOMETRY


def pair() -> tuple[MemoryTransport, MemoryFrontEnd, MemoryLeaderEnd]:
    t = MemoryTransport(3, (1, 2), 0)
    return t, MemoryFrontEnd(t, 0, G, send_timeout_s=10.0), MemoryLeaderEnd(t, 1, G, send_timeout_s=10.0)


def specs() -> tuple[TensorSpec, ...]:
    return (TensorSpec(name=T_CONDITIONING, dtype="float32", shape=G.conditioning_shape()),
            TensorSpec(name=T_NOISE, dtype="float32", shape=G.noise_shape()))


def infer(call_id: int = 1) -> tuple[PPEnvelopeV1, list[torch.Tensor]]:
    env = PPEnvelopeV1(action=Action.INFER, call_id=call_id, chunk_index=0, cache_epoch=0, init_cache=True,
                       num_denoising_steps=len(TIMESTEPS), timesteps=TIMESTEPS,
                       expected_generator_calls=len(TIMESTEPS), tensors=specs())
    return env, [torch.zeros(G.conditioning_shape()), torch.ones(G.noise_shape())]


def header(action: Action = Action.INFER, call_id: int = 1) -> TPHeaderV1:
    return TPHeaderV1(action=action, call_id=call_id, chunk_index=0, cache_epoch=0, init_cache=True,
                      timesteps=TIMESTEPS, tensors=specs())


def test_a_receive_blocks_before_consuming_then_gets_the_message_and_its_tensors() -> None:
    t, front, leader = pair()
    with pytest.raises(WouldBlock):
        leader.recv_envelope(until=5.0)
    assert t.blocked[1].what == "pp_header" and not t.blocked[1].go()
    env, tensors = infer()
    front.send_envelope(env, tensors)
    assert t.blocked[1].go()
    assert leader.recv_envelope(until=5.0) == env
    got = leader.recv_tensors(env.tensors, None)
    assert [torch.equal(a, b) for a, b in zip(got, tensors, strict=True)] == [True, True]


def test_a_wait_past_its_bound_expires_and_closes_the_pair() -> None:
    t, front, leader = pair()
    t.now = 5.0
    with pytest.raises(WaitExpired):
        leader.recv_envelope(until=5.0)
    with pytest.raises(PeerLost):  # gloo closed the pair: the peer's next operation fails
        front.send_envelope(*infer())
    with pytest.raises(ChannelPoisoned):  # and this end never touches it again
        leader.recv_envelope(until=None)


def test_a_message_that_arrived_in_time_is_received_after_the_bound() -> None:
    t, front, leader = pair()
    front.send_envelope(*infer())
    t.now = 50.0
    assert leader.recv_envelope(until=5.0).call_id == 1


def test_a_dead_peer_fails_once_what_it_sent_is_received() -> None:
    t, front, leader = pair()
    front.send_envelope(*infer())
    t.kill(0)
    assert leader.recv_envelope(until=None).call_id == 1
    leader.recv_tensors(specs(), None)
    with pytest.raises(PeerLost, match="closed by peer"):
        leader.recv_envelope(until=None)
    with pytest.raises(PeerLost):
        leader.send_result(PPResultV1(action=Action.NOOP, ok=True, call_id=1))


def test_announced_tensors_must_be_received_before_the_next_header() -> None:
    t = MemoryTransport(3, (0, 1, 2), None)
    lead, w1 = MemoryMeshEnd(t, 0, G, 5.0), MemoryMeshEnd(t, 1, G, 5.0)
    _, tensors = infer()
    lead.send_header(header(call_id=1), tensors)
    lead.send_header(header(Action.NOOP, call_id=2).model_copy(update={"init_cache": False, "timesteps": (),
                                                                         "tensors": ()}))
    assert w1.recv_header(until=None).call_id == 1
    with pytest.raises(TransportViolation, match="a receive was skipped"):
        w1.recv_header(until=None)


def test_tensors_are_received_with_the_announced_specs() -> None:
    t = MemoryTransport(2, (0, 1), None)
    lead, w1 = MemoryMeshEnd(t, 0, G, 5.0), MemoryMeshEnd(t, 1, G, 5.0)
    lead.send_header(header(), infer()[1])
    w1.recv_header(until=None)
    with pytest.raises(TransportViolation, match="announced"):
        w1.recv_tensors(specs()[:1], None)


def test_warmup_tensors_do_not_travel() -> None:
    t = MemoryTransport(2, (0, 1), None)
    lead, w1 = MemoryMeshEnd(t, 0, G, 5.0), MemoryMeshEnd(t, 1, G, 5.0)
    warm = header(Action.WARMUP, call_id=0)
    lead.send_header(warm, infer()[1], with_tensors=False)
    assert w1.recv_header(until=None) == warm
    with pytest.raises(TransportViolation, match="none were sent"):
        w1.recv_tensors(warm.tensors, None)


def test_a_send_to_a_stalled_rank_waits_then_runs_out_at_its_bound() -> None:
    t, front, leader = pair()
    t.stalled_until[1] = 100.0
    with pytest.raises(WouldBlock):
        front.send_envelope(*infer(), timeout_s=10.0)
    assert t.blocked[0].until == 10.0
    t.now = 10.0
    with pytest.raises(WaitExpired):
        front.send_envelope(*infer(), timeout_s=10.0)


def test_a_send_to_a_stalled_rank_completes_once_the_stall_ends() -> None:
    t, front, leader = pair()
    t.stalled_until[1] = 3.0
    with pytest.raises(WouldBlock):
        front.send_envelope(*infer(), timeout_s=10.0)
    t.now = 3.0
    front.send_envelope(*infer(), timeout_s=10.0)
    assert leader.recv_envelope(until=None).call_id == 1


def test_startup_collectives_complete_when_all_joined_and_fail_on_a_dead_one() -> None:
    t = MemoryTransport(3, (1, 2), 0)
    s = [MemoryStartup(t, r) for r in range(3)]
    for r in (0, 1):
        with pytest.raises(WouldBlock):
            s[r].gather_configs({"rank": r})
    assert s[2].gather_configs({"rank": 2}) == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert s[0].gather_configs({"rank": 0}) == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    with pytest.raises(WouldBlock):
        s[0].barrier(1)
    t.kill(1)
    with pytest.raises(PeerLost):
        s[0].barrier(1)


def test_the_vote_gathers_causes_and_can_be_retried() -> None:
    t = MemoryTransport(2, (1,), 0)
    a, b = MemoryStartup(t, 0), MemoryStartup(t, 1)
    with pytest.raises(WouldBlock):
        a.vote(1, None)
    with pytest.raises(WouldBlock):  # the vote is done; its causes wait for rank 0
        b.vote(0, "load failed")
    assert a.vote(1, None) == (0, [None, "load failed"])
    assert b.vote(0, "load failed") == (0, [None, "load failed"])


def test_collectives_called_out_of_order_are_a_violation() -> None:
    t = MemoryTransport(2, (1,), 0)
    with pytest.raises(WouldBlock):
        MemoryStartup(t, 0).gather_configs({})
    with pytest.raises(TransportViolation, match="out of order"):
        MemoryStartup(t, 1).barrier(1)


def call(call_id: int) -> ChunkCall:
    return ChunkCall(call_id=call_id, chunk_index=0, cache_epoch=0, init_cache=True, reset_cache=False,
                     do_kv_recompute=False, timesteps=TIMESTEPS, seed=0, conditioning=torch.zeros(G.conditioning_shape()),
                     noise=torch.ones(G.noise_shape()))


def test_the_generator_runs_only_when_every_mesh_rank_runs_the_same_call() -> None:
    t = MemoryTransport(2, (0, 1), None)
    g0, g1 = CountingGenerator(G, MemoryCommunicator(t, 0)), CountingGenerator(G, MemoryCommunicator(t, 1))
    with pytest.raises(WouldBlock):
        g0.run(call(1))
    assert g0.calls == 0  # nothing changed: the call can be retried
    assert g1.run(call(1)).generator_calls == len(TIMESTEPS)
    assert g0.run(call(1)).generator_calls == len(TIMESTEPS) and g0.calls == g1.calls == 1
    with pytest.raises(WouldBlock):
        g0.run(call(2))
    with pytest.raises(TransportViolation, match="out of step"):
        g1.run(call(3))


def test_the_generator_fails_when_a_mesh_rank_is_dead() -> None:
    t = MemoryTransport(2, (0, 1), None)
    g0 = CountingGenerator(G, MemoryCommunicator(t, 0))
    with pytest.raises(WouldBlock):
        g0.run(call(1))
    t.kill(1)
    with pytest.raises(PeerLost):
        g0.run(call(1))


def test_ready_says_whether_a_step_would_block() -> None:
    job = MemoryJob("pp1", 1)
    assert job.ready(0) and job.ready(1)  # nothing attempted yet
    assert not job.step(0) and not job.ready(0)  # InitWorld: its arrival is recorded, rank 1 has not joined
    assert job.step(1) and job.ready(0)  # rank 1 joined: rank 0's collective completes now
    assert job.step(0)
    job.stall(1, 5.0)
    assert not job.ready(1)


@pytest.mark.parametrize("topology,m", [("pp1", 1), ("pp1", 3), ("tp", 1), ("tp", 2)])
def test_a_whole_job_streams_and_shuts_down(topology: str, m: int) -> None:
    job = MemoryJob(topology, m, warmup_chunks=2)
    shown: list[int] = []
    job.add_sink(lambda batch: shown.append(batch.record.chunk_index))
    for i in range(5000):
        if job.all_exited():
            break
        ranks = job.enabled()
        if ranks:
            job.step(ranks[i % len(ranks)])
        else:
            job.advance_to(min(job.timers()))
        if len(shown) >= 3 and job.front.lifecycle.state == "serving":
            job.front.signal()
    assert [r.code for r in job.ranks] == [0] * len(job.ranks) and shown[:3] == [0, 1, 2]
