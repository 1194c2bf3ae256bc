"""DistributedRuntime: who this rank is (from torchrun's env and the RunConfig), its process groups,
and the collective / point-to-point calls, each checked against the group expected for its purpose.

Groups are created in ONE fixed order on every rank (``new_group`` is collective, even for ranks
outside the group): world CPU, mesh CPU, mesh device, pair CPU, pair device (pair = front and
leader, PP1 only). CPU groups are gloo; device groups are NCCL on GPUs and gloo on CPU.

Waits that may need a bound take ``timeout_s``. On gloo a timed-out wait closes the pair for good:
the caller gets :class:`ChannelPoisoned` and must never touch that group again (crash-only exit).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from pp1.adapters.transport.device_waits import ENV_DOUBLE, BlockingDeviceDouble, DeviceWaits
from pp1.protocol.config import Role, RunConfig
from pp1.protocol.errors import LocalProtocolError

log = logging.getLogger("pp1.adapters.transport.runtime")

GroupName = Literal["world_cpu", "mesh_cpu", "mesh_dev", "pair_cpu", "pair_dev"]

# purpose -> the only group allowed to carry it
PURPOSE_GROUP: dict[str, GroupName] = {
    "parity": "world_cpu",
    "vote": "world_cpu",
    "vote_causes": "world_cpu",
    "barrier": "world_cpu",
    "warm_world_cpu": "world_cpu",
    "fingerprint": "mesh_cpu",
    "tp_header": "mesh_cpu",
    "warm_mesh_cpu": "mesh_cpu",
    "tp_tensors": "mesh_dev",
    "tp_all_reduce": "mesh_dev",
    "warm_mesh_dev": "mesh_dev",
    "pp_header": "pair_cpu",
    "warm_pair_cpu": "pair_cpu",
    "pp_tensors": "pair_dev",
    "warm_pair_dev": "pair_dev",
}

DEFAULT_PG_TIMEOUT_S = 600.0  # startup collectives wait for the slowest loader


@dataclass(frozen=True)
class Posted:
    """A started point-to-point op (:meth:`DistributedRuntime.post_send` / ``post_recv``): its work, purpose and,
    on a device group, its ``device_waits`` token."""

    work: Any
    purpose: str
    token: int | None


class PeerLost(RuntimeError):
    """A collective or p2p op failed (typically: the peer's connection closed, i.e. it died)."""

    def __init__(self, purpose: str, detail: str) -> None:
        super().__init__(f"{purpose}: {detail}")
        self.purpose = purpose
        self.detail = detail


class ChannelPoisoned(PeerLost):
    """The channel may not be touched again (an earlier wait timed out or broke mid-message)."""


class WaitExpired(ChannelPoisoned):
    """A bounded wait timed out: on gloo the group's pair is closed for good; crash, never touch it again."""


def device_timeout(device: Any, timeout_s: float | None) -> float | None:
    """The bound a wait on ``device``'s group may take: gloo (CPU) waits can be bounded; a timed-out NCCL
    wait aborts the communicator (pp1.md §6), so device waits on GPUs are unbounded here and watched
    from the CPU control plane instead."""
    return timeout_s if getattr(device, "type", device) == "cpu" else None


@dataclass
class Groups:
    """Process groups of this job; ``None`` where this rank is not a member."""

    world_cpu: Any = None
    mesh_cpu: Any = None
    mesh_dev: Any = None
    pair_cpu: Any = None
    pair_dev: Any = None

    def name_of(self, group: Any) -> str:
        for name in ("world_cpu", "mesh_cpu", "mesh_dev", "pair_cpu", "pair_dev"):
            g = getattr(self, name)
            if g is not None and g is group:
                return name
        return "<unknown group>"


def _env_int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in env:
        if default is None:
            raise LocalProtocolError(f"env.{key}", "not set (start this rank through torchrun)", "missing_env")
        return default
    try:
        return int(env[key])
    except ValueError:
        raise LocalProtocolError(f"env.{key}", f"not an integer: {env[key]!r}", "bad_env") from None


class DistributedRuntime:
    """This rank's identity and process groups. Build with :meth:`from_env`, then :meth:`init`."""

    def __init__(
        self, config: RunConfig, rank: int, world_size: int, local_rank: int = 0, device: str = "cpu"
    ) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.mesh_global_ranks: tuple[int, ...] = tuple(config.mesh_global_ranks)
        self.front_rank: int | None = config.front_rank
        self.leader_rank: int = config.leader_rank
        self.mesh_size = len(self.mesh_global_ranks)
        self._timeout = datetime.timedelta(seconds=DEFAULT_PG_TIMEOUT_S)
        self.is_mesh_member = rank in self.mesh_global_ranks
        self.mesh_rank: int | None = self.mesh_global_ranks.index(rank) if self.is_mesh_member else None
        self.role: Role = config.role_of(rank)  # front | leader | worker | tp_rank0 (pure TP: leader + front)
        self.hosts_front = config.hosts_front(rank)
        self.device = self._pick_device(device)
        self.groups = Groups()
        self.initialised = False
        self.device_waits = DeviceWaits()  # outstanding device ops (the liveness monitor reads them)
        self._double: BlockingDeviceDouble | None = None  # PP1_DEVICE_DOUBLE=blocking (CPU tests)
        self._double_wanted = os.environ.get(ENV_DOUBLE, "") == "blocking" and self.device.type == "cpu"
        self._group_infos: dict[Any, tuple[str, tuple[int, ...]]] = {}  # group -> (name, global ranks)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_env(
        cls, config: RunConfig, device: str = "cpu", env: Mapping[str, str] | None = None
    ) -> DistributedRuntime:
        env = os.environ if env is None else env
        rank = _env_int(env, "RANK")
        world = _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK", default=rank)
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in env:
                raise LocalProtocolError(f"env.{key}", "not set (start this rank through torchrun)", "missing_env")
        return cls(config, rank=rank, world_size=world, local_rank=local, device=device)

    def _check_topology(self) -> None:
        cfg = self.config
        if self.world_size != cfg.world_size:
            raise LocalProtocolError(
                "config.world_size", f"WORLD_SIZE={self.world_size} but the config says {cfg.world_size}", "topology"
            )
        mesh = self.mesh_global_ranks
        if len(set(mesh)) != len(mesh) or not mesh:
            raise LocalProtocolError("config.mesh_global_ranks", f"{mesh} must be distinct and non-empty", "topology")
        expected = set(range(self.world_size))
        covered = set(mesh) | ({self.front_rank} if self.front_rank is not None else set())
        if covered != expected or (self.front_rank is not None and self.front_rank in mesh):
            raise LocalProtocolError(
                "config.mesh_global_ranks",
                f"front={self.front_rank} + mesh {mesh} must cover ranks 0..{self.world_size - 1} exactly once",
                "topology",
            )
        if cfg.topology == "tp" and mesh[0] != 0:
            raise LocalProtocolError("config.mesh_global_ranks", "pure TP: rank 0 must lead the mesh", "topology")

    def _pick_device(self, device: str) -> torch.device:
        if device == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def ids(self) -> str:
        return f"rank={self.rank} role={self.role} mesh_rank={self.mesh_rank}"

    @property
    def pair_ranks(self) -> tuple[int, int] | None:
        """(front, leader) under PP1, None under pure TP."""
        return None if self.front_rank is None else (self.front_rank, self.leader_rank)

    @property
    def device_backend(self) -> str:
        return self.config.device_backend

    # -- init and groups ---------------------------------------------------------------------------
    def init_world(self, timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> Any:
        """init_process_group and the world CPU group: the only groups that do not depend on the
        topology, so that parity can run before any topology-dependent ``new_group``."""
        self._timeout = datetime.timedelta(seconds=timeout_s)
        dev_backend = self.config.device_backend
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        default_backend = "cpu:gloo,cuda:nccl" if dev_backend == "nccl" else dev_backend
        if not dist.is_initialized():
            dist.init_process_group(
                backend=default_backend, store=self._attempt_store(), rank=self.rank, world_size=self.world_size,
                timeout=self._timeout,
            )
        self.groups.world_cpu = dist.new_group(
            list(range(self.world_size)), backend=self.config.control_backend, timeout=self._timeout
        )
        return self.groups.world_cpu

    def _attempt_store(self) -> Any:
        """The job's key-value store, its keys prefixed by torchrun's restart count. torchrun (2.13) keeps
        its agent's store across a restart without a prefix of its own, so a restarted job read the
        addresses of the attempt before it and hung in init (seen: gloo "Connection refused" to a dead
        rank). Under torchrun the agent hosts the store; otherwise rank 0 does."""
        env = os.environ
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), self.world_size,
                              is_master=not agent and self.rank == 0, timeout=self._timeout)
        store = dist.PrefixStore(f"pp1/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        if self._double_wanted:
            self._double = BlockingDeviceDouble(store, self.rank)
            log.warning("%s %s=blocking: device collectives wait for dead peers without a bound", self.ids,
                        ENV_DOUBLE)
        return store

    def init_groups(self) -> Groups:
        """Every topology-dependent group, in ONE fixed order on every rank (call after parity:
        ranks that agree on the config agree on these calls)."""
        self._check_topology()
        timeout = self._timeout
        dev_backend, ctl = self.config.device_backend, self.config.control_backend
        g = self.groups
        mesh = list(self.mesh_global_ranks)
        mesh_cpu = dist.new_group(mesh, backend=ctl, timeout=timeout)
        mesh_dev = dist.new_group(mesh, backend=dev_backend, timeout=timeout)
        if self.is_mesh_member:
            g.mesh_cpu, g.mesh_dev = mesh_cpu, mesh_dev
        if self.pair_ranks is not None:
            pair = list(self.pair_ranks)
            pair_cpu = dist.new_group(pair, backend=ctl, timeout=timeout)
            pair_dev = dist.new_group(pair, backend=dev_backend, timeout=timeout)
            if self.rank in pair:
                g.pair_cpu, g.pair_dev = pair_cpu, pair_dev
        self.initialised = True
        log.info("%s groups ready (device backend %s, control %s)", self.ids, dev_backend, ctl)
        return g

    def init(self, timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> Groups:
        """init_world + init_groups, for callers that skip parity (tests)."""
        self.init_world(timeout_s)
        return self.init_groups()

    # -- group checks ------------------------------------------------------------------------------
    def check_group(self, group: Any, purpose: str) -> None:
        """``group`` must be the group this purpose travels on, and this rank must be in it."""
        expected = PURPOSE_GROUP.get(purpose)
        if expected is None:
            raise LocalProtocolError("runtime.purpose", f"unknown purpose {purpose!r}", "unknown_purpose")
        want = getattr(self.groups, expected)
        if want is None:
            raise LocalProtocolError(
                f"runtime.groups.{expected}", f"{purpose}: this rank ({self.ids}) is not a member", "not_a_member"
            )
        if group is not want:
            raise LocalProtocolError(
                "runtime.group",
                f"{purpose} must travel on {expected}, got {self.groups.name_of(group)}",
                "wrong_group",
            )

    def is_cpu_group(self, group: Any) -> bool:
        return group is self.groups.world_cpu or group is self.groups.mesh_cpu or group is self.groups.pair_cpu

    def tensor_device(self, group: Any) -> torch.device:
        """Where a tensor must live to travel on ``group``."""
        return torch.device("cpu") if self.is_cpu_group(group) else self.device

    # -- ops ---------------------------------------------------------------------------------------
    def _wait(self, work: Any, purpose: str, timeout_s: float | None, poisonable: bool) -> None:
        try:
            if timeout_s is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
        except RuntimeError as exc:
            text = str(exc)
            timed_out = "Timed out" in text or "timed out" in text
            if timed_out and poisonable:
                raise WaitExpired(purpose, f"no data within {timeout_s:.3f} s: {text[:160]}") from exc
            raise PeerLost(purpose, text[:300]) from exc

    def all_gather_object(self, obj: Any, group: Any, purpose: str) -> list[Any]:
        self.check_group(group, purpose)
        out: list[Any] = [None] * dist.get_world_size(group)
        try:
            dist.all_gather_object(out, obj, group=group)
        except RuntimeError as exc:
            raise PeerLost(purpose, str(exc)[:300]) from exc
        return out

    def all_reduce(
        self, t: torch.Tensor, op: Any, group: Any, purpose: str, timeout_s: float | None = None
    ) -> torch.Tensor:
        self._op(group, purpose, timeout_s, lambda: dist.all_reduce(t, op=op, group=group, async_op=True))
        return t

    def broadcast(
        self, t: torch.Tensor, src: int, group: Any, purpose: str, timeout_s: float | None = None
    ) -> torch.Tensor:
        """``src`` is a global rank."""
        self._op(group, purpose, timeout_s, lambda: dist.broadcast(t, src=src, group=group, async_op=True))
        return t

    def send(self, t: torch.Tensor, dst: int, group: Any, purpose: str, timeout_s: float | None = None) -> None:
        """Blocking send to global rank ``dst``."""
        self.finish(self.post_send(t, dst, group, purpose), timeout_s)

    def recv(self, t: torch.Tensor, src: int, group: Any, purpose: str, timeout_s: float | None = None) -> torch.Tensor:
        """Receive from global rank ``src`` into ``t``; with ``timeout_s`` a timeout poisons the group."""
        self.finish(self.post_recv(t, src, group, purpose), timeout_s)
        return t

    # -- point-to-point in two steps (a message's parts posted together, waited for in order) --------------
    def post_send(self, t: torch.Tensor, dst: int, group: Any, purpose: str) -> Posted:
        """Start a send to global rank ``dst`` (checked like :meth:`send`); :meth:`finish` waits for it. ``t``
        must not change until then."""
        return self._post(group, purpose, lambda: dist.isend(t, dst=dst, group=group))

    def post_recv(self, t: torch.Tensor, src: int, group: Any, purpose: str) -> Posted:
        """Start a receive from global rank ``src`` into ``t``; :meth:`finish` waits for it."""
        return self._post(group, purpose, lambda: dist.irecv(t, src=src, group=group))

    def finish(self, posted: Posted, timeout_s: float | None = None) -> None:
        """Wait for a posted op (bounded: a timeout poisons); a device op stays outstanding until it
        completed on the device."""
        try:
            self._wait(posted.work, posted.purpose, timeout_s, poisonable=True)
        except BaseException:
            if posted.token is not None:
                self.device_waits.end(posted.token)
            raise
        if posted.token is not None:
            self.device_waits.settle(posted.token)

    def _post(self, group: Any, purpose: str, start: Callable[[], Any]) -> Posted:
        self.check_group(group, purpose)
        if self.is_cpu_group(group):
            return Posted(self._start(purpose, start), purpose, None)
        name, members = self._group_info(group)
        token, _ = self.device_waits.begin(name, members, purpose, False)
        try:
            work = self._start(purpose, start)
        except BaseException:
            self.device_waits.end(token)
            raise
        self.device_waits.attach(token, work)
        return Posted(work, purpose, token)

    def _group_info(self, group: Any) -> tuple[str, tuple[int, ...]]:
        """(name, global ranks) of one of this rank's groups (looked up once)."""
        info = self._group_infos.get(group)
        if info is None:
            info = self._group_infos[group] = (self.groups.name_of(group), tuple(dist.get_process_group_ranks(group)))
        return info

    @staticmethod
    def _start(purpose: str, start: Callable[[], Any]) -> Any:
        try:
            return start()
        except RuntimeError as exc:
            raise PeerLost(purpose, str(exc)[:300]) from exc

    def _op(self, group: Any, purpose: str, timeout_s: float | None, start: Callable[[], Any]) -> None:
        """A collective: check the group for ``purpose``, start it, wait for it (bounded: a timeout poisons).
        On a device group it is outstanding (``device_waits``) until it completed on the device; the
        blocking double (CPU tests) has every member meet first."""
        self.check_group(group, purpose)
        if self.is_cpu_group(group):
            self._wait(self._start(purpose, start), purpose, timeout_s, poisonable=True)
            return
        name, members = self._group_info(group)
        token, seq = self.device_waits.begin(name, members, purpose, True)
        try:
            if self._double is not None and seq is not None:
                self._double.meet(name, seq, members)
            work = self._start(purpose, start)
            self.device_waits.attach(token, work)
            self._wait(work, purpose, timeout_s, poisonable=True)
        except BaseException:
            self.device_waits.end(token)
            raise
        self.device_waits.settle(token)

    # -- teardown ----------------------------------------------------------------------------------
    def teardown(self, bound_s: float = 3.0) -> bool:
        """destroy_process_group in a daemon thread, waiting at most ``bound_s``; True when it finished."""
        if not dist.is_initialized():
            return True
        done = threading.Event()

        def _destroy() -> None:
            try:
                dist.destroy_process_group()
            except Exception as exc:  # best effort
                log.debug("%s destroy_process_group: %s", self.ids, exc)
            finally:
                done.set()

        threading.Thread(target=_destroy, name="pp1-teardown", daemon=True).start()
        finished = done.wait(bound_s)
        if not finished:
            log.warning("%s destroy_process_group still running after %.1f s; leaving it", self.ids, bound_s)
        return finished


class DistributedCollectives:
    """The startup collectives over this runtime's groups (``interface.StartupCollectives``)."""

    def __init__(self, rt: DistributedRuntime, pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> None:
        self.rt, self.pg_timeout_s = rt, pg_timeout_s

    def init_world(self) -> None:
        self.rt.init_world(self.pg_timeout_s)

    def gather_configs(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        return self.rt.all_gather_object(config, self.rt.groups.world_cpu, "parity")

    def init_groups(self) -> None:
        try:
            self.rt.init_groups()
        except LocalProtocolError:
            raise
        except Exception as exc:  # every rank has the same config: every rank fails the same way
            raise LocalProtocolError("topology", str(exc), "topology") from exc

    def vote(self, vote: int, cause: str | None) -> tuple[int, list[str | None]]:
        rt = self.rt
        t = torch.tensor([vote], dtype=torch.int32)
        rt.all_reduce(t, dist.ReduceOp.MIN, rt.groups.world_cpu, "vote")
        causes: list[str | None] = []
        if int(t.item()) == 0:
            causes = rt.all_gather_object(cause, rt.groups.world_cpu, "vote_causes")
        return int(t.item()), causes

    def gather_fingerprints(self, fingerprint: str) -> list[str]:
        return self.rt.all_gather_object(fingerprint, self.rt.groups.mesh_cpu, "fingerprint")

    def barrier(self, verdict: int) -> int:
        rt = self.rt
        t = torch.tensor([verdict], dtype=torch.int32)
        rt.all_reduce(t, dist.ReduceOp.MIN, rt.groups.world_cpu, "barrier")
        return int(t.item())
