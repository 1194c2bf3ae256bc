"""The point-to-point path as it runs on GPUs, without one: the runtime's ``post_send`` / ``post_recv`` /
``finish`` and the wire's ``send_p2p`` / ``post_tensors`` / ``finish_tensors`` over a stand-in for
torch.distributed whose device ops behave as NCCL's do (a post returns at once, ``wait`` returns once the op
is queued on the stream, the op completes on the device later), and a ``meta`` device in the runtime's place of
a GPU (tensors move to it without one; every device rule keys on "not the CPU").

What it pins (pp1.md §6, specs/runtime.md): a device op is in ``device_waits`` from its post until the device
completed it, not until the CPU's wait returned (the liveness monitor sees a stuck NCCL op wherever the CPU
later blocks); a failed post or wait leaves nothing outstanding; CPU-group ops are never device waits; a
message's parts are all posted before the first wait, waited for in order, the CPU parts bounded and the
device parts unbounded (a timed-out NCCL wait aborts the communicator)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch

import pp1.adapters.transport.runtime as runtime_module
from pp1.adapters.transport import wire
from pp1.adapters.transport.runtime import DistributedRuntime, PeerLost, WaitExpired
from pp1.protocol.codec import encode
from pp1.protocol.config import RunConfig
from pp1.protocol.messages import T_LATENTS_OUT, Action, PPResultV1
from pp1.protocol.tensors import TensorSpec

META = torch.device("meta")


class FakeWork:
    """An NCCL-like work: ``wait`` returns at once (the stream waits, not the CPU) unless told to fail; the
    device completes it when the test says so."""

    def __init__(self, log: list[tuple[Any, ...]], name: str, fail: str | None = None) -> None:
        self.log, self.name, self.fail, self.completed = log, name, fail, False

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self.log.append(("wait", self.name, None if timeout is None else timeout.total_seconds()))
        if self.fail:
            raise RuntimeError(self.fail)
        return True

    def is_completed(self) -> bool:
        return self.completed


class FakeGroup:
    """A process group as the runtime sees one: an object compared (and hashed) by identity."""


class FakeDist:
    """torch.distributed's isend / irecv, recording each post; ``fail_post`` / ``fail_wait`` break the next op."""

    def __init__(self, groups: dict[int, str]) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.works: list[FakeWork] = []
        self.groups = groups  # id(group) -> its name, for the log
        self.fail_post: str | None = None
        self.fail_wait: str | None = None

    def _post(self, op: str, t: torch.Tensor, peer: int, group: Any) -> FakeWork:
        name = f"{op}:{self.groups[id(group)]}:{tuple(t.shape)}"
        self.log.append((op, self.groups[id(group)], peer, tuple(t.shape), t.device.type))
        if self.fail_post:
            raise RuntimeError(self.fail_post)
        work = FakeWork(self.log, name, self.fail_wait)
        self.works.append(work)
        return work

    def isend(self, t: torch.Tensor, dst: int, group: Any) -> FakeWork:
        return self._post("isend", t, dst, group)

    def irecv(self, t: torch.Tensor, src: int, group: Any) -> FakeWork:
        return self._post("irecv", t, src, group)

    def all_reduce(self, t: torch.Tensor, op: Any, group: Any, async_op: bool) -> FakeWork:
        return self._post("all_reduce", t, -1, group)

    def get_process_group_ranks(self, group: Any) -> list[int]:
        return [0, 1]


@pytest.fixture
def gpu_front(monkeypatch: pytest.MonkeyPatch) -> tuple[DistributedRuntime, FakeDist, wire.ChannelGroups]:
    """The front of a PP1 job (front 0, leader 1) whose device is a stand-in GPU, its pair groups made."""
    rt = DistributedRuntime(RunConfig(topology="pp1", world_size=2, mesh_global_ranks=(1,)), rank=0, world_size=2)
    rt.device = META
    rt.groups.pair_cpu, rt.groups.pair_dev = FakeGroup(), FakeGroup()
    fake = FakeDist({id(rt.groups.pair_cpu): "pair_cpu", id(rt.groups.pair_dev): "pair_dev"})
    monkeypatch.setattr(runtime_module, "dist", fake)
    route = wire.ChannelGroups(rt.groups.pair_cpu, rt.groups.pair_dev, "pp_header", "pp_tensors")
    return rt, fake, route


def test_a_device_op_is_outstanding_until_the_device_completes_it(gpu_front) -> None:  # type: ignore[no-untyped-def]
    rt, fake, _ = gpu_front
    posted = rt.post_send(torch.empty(4, device=META), 1, rt.groups.pair_dev, "pp_tensors")
    (op,) = rt.device_waits.outstanding()
    assert (op.group, op.members, op.purpose, op.seq) == ("pair_dev", (0, 1), "pp_tensors", None)
    rt.finish(posted)  # the CPU's wait returned: the op is queued on the stream, not done
    assert [w.purpose for w in rt.device_waits.outstanding()] == ["pp_tensors"]
    fake.works[-1].completed = True
    assert rt.device_waits.outstanding() == ()


def test_an_op_the_device_completed_before_the_wait_is_settled_by_it(gpu_front) -> None:  # type: ignore[no-untyped-def]
    rt, fake, _ = gpu_front
    posted = rt.post_recv(torch.empty(4, device=META), 1, rt.groups.pair_dev, "pp_tensors")
    fake.works[-1].completed = True
    rt.finish(posted)
    assert rt.device_waits.outstanding() == ()


def test_cpu_group_ops_are_not_device_waits(gpu_front) -> None:  # type: ignore[no-untyped-def]
    rt, _, _ = gpu_front
    posted = rt.post_send(torch.empty(32, dtype=torch.uint8), 1, rt.groups.pair_cpu, "pp_header")
    assert rt.device_waits.outstanding() == ()
    rt.finish(posted, 1.0)


def test_a_failed_post_leaves_nothing_outstanding(gpu_front) -> None:  # type: ignore[no-untyped-def]
    rt, fake, _ = gpu_front
    fake.fail_post = "NCCL error: remote process exited"
    with pytest.raises(PeerLost):
        rt.post_send(torch.empty(4, device=META), 1, rt.groups.pair_dev, "pp_tensors")
    assert rt.device_waits.outstanding() == ()


@pytest.mark.parametrize(("text", "error"), [("Timed out waiting 1000ms", WaitExpired),
                                             ("Connection closed by peer", PeerLost)])
def test_a_failed_wait_ends_the_op(gpu_front, text: str, error: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    rt, fake, _ = gpu_front
    fake.fail_wait = text
    posted = rt.post_recv(torch.empty(4, device=META), 1, rt.groups.pair_dev, "pp_tensors")
    with pytest.raises(error):
        rt.finish(posted, 1.0)
    assert rt.device_waits.outstanding() == ()


def test_a_message_is_posted_whole_then_waited_for_in_order(gpu_front) -> None:  # type: ignore[no-untyped-def]
    """Header and metadata on the CPU group with the caller's bound, the latents on the device group unbounded
    (NCCL): three posts, then three waits in the same order."""
    rt, fake, route = gpu_front
    latents = torch.zeros(1, 3, 16, 8, 8)
    result = PPResultV1(action=Action.INFER, ok=True, call_id=7, observed_generator_calls=5,
                        tensors=(TensorSpec(name=T_LATENTS_OUT, dtype="float32", shape=tuple(latents.shape)),))
    frames = encode(result, [latents])
    wire.send_p2p(rt, frames, route, 1, timeout_s=30.0)
    posts, waits = fake.log[:3], fake.log[3:]
    assert [(op, group, peer, dev) for op, group, peer, _, dev in posts] == [
        ("isend", "pair_cpu", 1, "cpu"), ("isend", "pair_cpu", 1, "cpu"), ("isend", "pair_dev", 1, "meta")]
    assert [shape for *_, shape, _ in posts] == [(32,), (len(frames.meta),), tuple(latents.shape)]
    assert [w[1] for w in waits] == [w.name for w in fake.works]  # in the order posted
    (cpu_a, cpu_b, dev) = [w[2] for w in waits]
    assert 0 < cpu_b <= cpu_a <= 30.0 and dev is None


def test_posted_tensor_receives_are_waited_for_unbounded_on_the_device(gpu_front) -> None:  # type: ignore[no-untyped-def]
    rt, fake, route = gpu_front
    specs = [TensorSpec(name="conditioning", dtype="bfloat16", shape=(1, 8, 4)),
             TensorSpec(name="noise", dtype="bfloat16", shape=(1, 3, 2, 2))]
    posted = wire.post_tensors(rt, specs, route, 1)
    assert [entry[0] for entry in fake.log] == ["irecv", "irecv"]  # both posted before any wait
    assert all(t.device == META and t.dtype == torch.bfloat16 for t in posted.tensors)
    assert len(rt.device_waits.outstanding()) == 2
    got = wire.finish_tensors(rt, posted, timeout_s=5.0)
    assert got is posted.tensors and [w[2] for w in fake.log[2:]] == [None, None]
    for w in fake.works:
        w.completed = True
    assert rt.device_waits.outstanding() == ()


def test_device_collectives_are_numbered_and_outstanding_until_completed(gpu_front) -> None:  # type: ignore[no-untyped-def]
    """A collective on a device group counts (its number on the group, what the liveness monitor compares across
    ranks) and stays outstanding after its CPU wait, like a point-to-point op."""
    rt, fake, _ = gpu_front
    rt.groups.mesh_dev = FakeGroup()
    fake.groups[id(rt.groups.mesh_dev)] = "mesh_dev"
    x = torch.empty(4, device=META)
    for _ in range(2):
        rt.all_reduce(x, op=None, group=rt.groups.mesh_dev, purpose="tp_all_reduce")
    assert [(w.group, w.seq) for w in rt.device_waits.outstanding()] == [("mesh_dev", 1), ("mesh_dev", 2)]
    assert rt.device_waits.seqs() == {"mesh_dev": 2}
    for w in fake.works:
        w.completed = True
    assert rt.device_waits.outstanding() == ()
