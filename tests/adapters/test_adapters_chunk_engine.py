"""The front's chunk engine in one process: the in-process leader of pure TP (mesh of 1, stand-in
pipeline, no torch.distributed) or a scripted link. Checks the loop's orderings, not speeds."""

from __future__ import annotations

import pytest
import torch

from pp1.adapters.transport.runtime import WaitExpired
from pp1.protocol.messages import T_CONTEXT, Action, ErrorCode, PPResultV1
from pp1.testing.inprocess import pure_tp_job


class SpyChannel:
    """The front's way to the leader, logging each send and receive (and what was sent)."""

    def __init__(self, inner, log: list, overlaps: bool = True) -> None:
        self.inner, self.log, self.sent, self.received = inner, log, [], []
        self.overlaps = overlaps  # as the PP channel (True) or pure TP's in-process leader (False)

    def send_envelope(self, env, tensors, timeout_s=None, preflight=True):
        self.inner.send_envelope(env, tensors, timeout_s=timeout_s, preflight=preflight)
        self.sent.append((env, list(tensors)))
        self.log.append(f"send {env.action.value} {env.chunk_index}")

    def recv_result(self, until):
        res, tensors = self.inner.recv_result(until)
        self.log.append(f"recv {res.action.value} {res.chunk_index}")
        self.received.append(tensors[0] if tensors else None)
        return res, tensors


class SpyStage0:
    def __init__(self, inner, log: list) -> None:
        self.inner, self.log, self.geometry = inner, log, inner.geometry

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, latents, first_chunk):
        self.log.append("decode")
        return self.inner.decode(latents, first_chunk)


def _engine(faults: str = "", chunks: int = 4, log: list | None = None, recompute_every: int = 1,
            overlaps: bool = True):
    log = [] if log is None else log
    spies: list[SpyChannel] = []

    def spy(inner):
        spies.append(SpyChannel(inner, log, overlaps))
        return spies[0]

    job = pure_tp_job(faults=faults, chunks=chunks, recompute_every=recompute_every, channel=spy,
                      stage0=lambda st: SpyStage0(st, log))
    return job.engine, spies[0], job.relay


def test_runs_chunks_with_the_recompute_schedule_then_shuts_down() -> None:
    eng, spy, relay = _engine(chunks=4)
    out = eng.run_to_end()
    assert out.ok and out.state == "ended"
    assert [r.chunk_index for r in out.records] == [0, 1, 2, 3]
    assert [r.recompute for r in out.records] == [False, True, True, True]
    assert [r.frames for r in out.records] == [9, 12, 12, 12]
    assert spy.sent[-1][0].action is Action.SHUTDOWN and relay.state == "exited"


def test_overlap_submits_the_next_chunk_before_decoding_the_last() -> None:
    log: list[str] = []
    eng, _, _ = _engine(chunks=3, log=log)
    assert eng.run_to_end().ok
    infer = [x for x in log if "noop" not in x]
    assert infer == ["send infer 0", "recv infer 0", "send infer 1", "decode", "recv infer 1", "send infer 2",
                     "decode", "recv infer 2", "send shutdown 0", "decode", "recv shutdown 0"]


def test_serial_link_shows_each_chunk_before_computing_the_next() -> None:
    """Pure TP: send runs the whole call, so decoding k after sending k+1 would only delay k."""
    log: list[str] = []
    eng, _, _ = _engine(chunks=3, log=log, overlaps=False)
    assert eng.run_to_end().ok
    infer = [x for x in log if "noop" not in x]
    assert infer == ["send infer 0", "recv infer 0", "decode", "send infer 1", "recv infer 1", "decode",
                     "send infer 2", "recv infer 2", "decode", "send shutdown 0", "recv shutdown 0"]


def test_context_frames_are_the_previous_latents() -> None:
    eng, spy, _ = _engine(chunks=3)
    assert eng.run_to_end().ok
    results = spy.received
    env2, tensors2 = next((e, t) for e, t in spy.sent if e.action is Action.INFER and e.chunk_index == 2)
    ctx = tensors2[list(env2.tensor_names()).index(T_CONTEXT)]
    assert ctx.shape[1] == 6  # two chunks of 3 latent frames, the window
    assert torch.equal(ctx, torch.cat([results[0], results[1]], dim=1))


def test_invalid_envelope_is_answered_not_relayed_and_retried() -> None:
    eng, spy, relay = _engine("rank=0,at=chunk:1,do=corrupt_envelope", chunks=4)
    out = eng.run_to_end()
    assert out.ok and out.stats["retries"] == 1
    assert [(r.cache_epoch, r.chunk_index) for r in out.records] == [(0, 0), (1, 0), (1, 1), (1, 2)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns about the NaN seed we planted
def test_unserialisable_and_bad_dtype_are_refused_before_sending() -> None:
    eng, spy, relay = _engine("rank=0,at=chunk:1,do=unserialisable;rank=0,at=chunk:2,do=bad_dtype", chunks=4)
    out = eng.run_to_end()
    assert out.ok and out.stats["retries"] == 0
    assert [r.chunk_index for r in out.records] == [0, 1, 2, 3]
    ids = [e.call_id for e, _ in spy.sent]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert max(ids) - min(ids) + 1 == len(ids) + 2  # two call_ids were burned, nothing of them sent


class ScriptedChannel:
    """Answers every envelope from a script: a PPResultV1 factory, or an exception to raise."""

    overlaps = True

    def __init__(self, script) -> None:
        self.script, self.sent, self.pending = script, [], None

    def send_envelope(self, env, tensors, timeout_s=None, preflight=True):
        self.sent.append(env)
        self.pending = env

    def recv_result(self, until):
        assert until is not None  # every wait on the front has a deadline
        env, self.pending = self.pending, None
        answer = self.script(env)
        if isinstance(answer, BaseException):
            raise answer
        return answer, []


def _scripted(script, chunks: int = 3, **config):
    scripted = ScriptedChannel(script)
    job = pure_tp_job(chunks=chunks, channel=lambda _inner: scripted, **config)
    return job.engine, scripted


def test_missed_deadline_poisons_and_sends_nothing_more() -> None:
    eng, link = _scripted(lambda env: WaitExpired("pp_header", "no data within 0.1 s"))
    out = eng.run_to_end()
    assert not out.ok and out.poisoned and len(link.sent) == 1  # no farewell on a poisoned channel


def test_mesh_failed_result_fails_and_says_farewell() -> None:
    def script(env):
        return PPResultV1(action=env.action, ok=False, error_code=ErrorCode.MESH_FAILED, error_message="x",
                          call_id=env.call_id, chunk_index=env.chunk_index, cache_epoch=env.cache_epoch)

    eng, link = _scripted(script)
    out = eng.run_to_end()
    assert not out.ok and not out.poisoned and "mesh_failed" in out.reason
    assert [e.action for e in link.sent] == [Action.INFER, Action.SHUTDOWN]
